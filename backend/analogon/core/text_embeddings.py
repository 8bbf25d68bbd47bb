"""Running the model's CLIP text encoder(s) from input token embeddings.

Diffusion Image Analogies optimises input embeddings directly; Difference Inversion appends
learned DIFF embeddings to a prompt. Both need the text encoder run from ``inputs_embeds``
(token embeddings before position embeddings), with the causal mask and the final layer norm,
and the result shaped as the UNet's ``Conditioning`` exactly as the pipeline's own
``encode_prompt`` would shape it:

- SD 1.x / 2.x: the last hidden state after the final layer norm.
- SDXL: the penultimate hidden states of both encoders, concatenated; the pooled embedding is
  the second encoder's projected end-of-text state. The SDXL refiner has the second encoder
  only (``text_encoder`` is None): its penultimate states alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .diffusion import Conditioning, time_ids


@dataclass
class PromptTokens:
    """A prompt as token ids and input embeddings for each of the model's text encoders."""

    ids: list[torch.Tensor]  # per encoder, (1, 77) long
    embeds: list[torch.Tensor]  # per encoder, (1, 77, D_i) token embeddings (no positions)
    eos: int  # index of the first end-of-text token (the pooled position)


def encoders(bundle) -> list[tuple[object, torch.nn.Module]]:
    """(tokenizer, text encoder) of each encoder the model has, in the pipeline's order."""
    out = [(tok, te) for tok, te in ((bundle.tokenizer, bundle.text_encoder),
                                     (bundle.tokenizer_2, bundle.text_encoder_2)) if te is not None]
    return out


def _core(text_encoder):
    # transformers 4.x wraps the transformer in `.text_model`; 5.x does not.
    return getattr(text_encoder, "text_model", text_encoder)


def token_embedding(text_encoder) -> torch.nn.Embedding:
    return _core(text_encoder).embeddings.token_embedding


def tokenize(tokenizer, prompt: str, device) -> torch.Tensor:
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return ids.to(device)


def prompt_tokens(bundle, prompt: str) -> PromptTokens:
    ids, embeds = [], []
    for tok, te in encoders(bundle):
        i = tokenize(tok, prompt, bundle.device)
        ids.append(i)
        with torch.no_grad():
            embeds.append(token_embedding(te)(i))
    eos_id = encoders(bundle)[0][0].eos_token_id
    eos = int((ids[0][0] == eos_id).nonzero()[0].item())
    return PromptTokens(ids, embeds, eos)


def ids_with_slots(ids: torch.Tensor, eos: int, n: int, pad_id: int) -> tuple[torch.Tensor, int, int]:
    """Token ids (L,) with ``n`` slots inserted after the prompt's words, before its end-of-text
    token; words are cut when the prompt would not fit. Slots hold ``pad_id`` (callers replace
    their embeddings). Returns (new ids, index of the first slot, index of the end-of-text)."""
    length = ids.shape[0]
    if not 0 <= n <= length - 2:
        raise ValueError(f"cannot insert {n} slots into {length} positions")
    words = ids[1:eos][: length - 2 - n]
    k = int(words.shape[0])
    new = torch.full_like(ids, pad_id)
    new[0] = ids[0]
    new[1:1 + k] = words
    new[1 + k + n] = ids[eos]
    return new, 1 + k, 1 + k + n


def run_text_encoder(text_encoder, inputs_embeds: torch.Tensor, eos: int | torch.Tensor,
                     hidden_layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states, pooled) from token embeddings (B, L, D). ``hidden_layer=None`` gives the
    final-layer-normed last state; ``-2`` the raw penultimate layer (SDXL). ``pooled`` is the
    final-normed state at ``eos``, projected when the encoder has a projection."""
    core = _core(text_encoder)
    h = core.embeddings(inputs_embeds=inputs_embeds)
    b, n = h.shape[:2]
    causal = torch.full((n, n), torch.finfo(h.dtype).min, device=h.device, dtype=h.dtype).triu(1)
    causal = causal[None, None].expand(b, 1, n, n)
    states = [h]
    for layer in core.encoder.layers:
        out = layer(h, causal)
        h = out[0] if isinstance(out, tuple) else out
        states.append(h)
    last = core.final_layer_norm(h)
    idx = torch.as_tensor(eos, device=h.device).reshape(-1).expand(b)
    pooled = last[torch.arange(b, device=h.device), idx]
    proj = getattr(text_encoder, "text_projection", None)
    if proj is not None:
        pooled = proj(pooled)
    hidden = last if hidden_layer is None else states[hidden_layer]
    return hidden, pooled


def conditioning_from_embeds(bundle, embeds: list[torch.Tensor], eos: int | torch.Tensor,
                             image_hw: tuple[int, int] | None = None) -> Conditioning:
    """The UNet conditioning for per-encoder input embeddings, shaped like ``encode_prompt``."""
    encs = encoders(bundle)
    if not bundle.is_sdxl:
        hidden, _ = run_text_encoder(encs[0][1], embeds[0], eos)
        return Conditioning(hidden.to(bundle.unet.dtype))
    hs, pooled = [], None
    for (_, te), e in zip(encs, embeds):
        h, p = run_text_encoder(te, e, eos, hidden_layer=-2)
        hs.append(h)
        pooled = p
    hidden = torch.cat(hs, dim=-1).to(bundle.unet.dtype)
    ids = time_ids(bundle, image_hw, hidden.device, hidden.dtype).repeat(hidden.shape[0], 1)
    return Conditioning(hidden, pooled.to(bundle.unet.dtype), ids)
