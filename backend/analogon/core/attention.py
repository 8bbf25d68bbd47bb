"""Attention processors for cross-image attention (and attention-map capture).

``SwapProcessor`` is diffusers' ``AttnProcessor2_0`` (scaled-dot-product attention) with two
additions, both driven by a shared :class:`SwapController` that the sampler updates before each
UNet call (per-step state lives on the controller, not in ``cross_attention_kwargs``, which
diffusers filters):

- **Key/value swap** (Cross-Image Attention, eq. 2): in the decoder's (up blocks') self-attention
  (``attn1``), at the selected spatial resolutions, batch element ``dst`` attends with its own
  queries to the keys and values of batch element ``src``: softmax(Q_dst K_srcᵀ/√d) V_src.
  Every other batch element is computed exactly as the stock processor computes it.
- **Query preservation** (Chung, Hyun & Heo, *Style Injection in Diffusion*, CVPR 2024):
  in the same layers, the queries of batch element ``dst`` become γ·Q_src + (1 − γ)·Q_dst, Q_src
  the queries of another element (the structure image's own latent), so that the swapped
  attention is asked where the structure's positions are, not where the drifting output's are.
  γ = 0 leaves the queries untouched.
- **Contrast** (eq. 3) on the swapped attention map before it multiplies V:
  A ← (A − μ(A))·β + μ(A), μ the mean of each row. This needs the map itself, so those rows
  (and only those, in those layers) are computed with an explicit softmax, in float32, in
  chunks of queries; with β = 1 the SDPA result is used as is.

Resolution is found at call time: a layer's token count is compared with the latent's size
h×w downsampled by 2^k (⌈h/2^k⌉·⌈w/2^k⌉, as the UNet's stride-2 convolutions do), so nothing is
tied to 512² inputs or square images. Which factors 2^k hold decoder self-attention is read
from the UNet (:func:`decoder_attention_factors`).

Capture: with ``controller.capture`` set, decoder self-attention maps (head- and layer-averaged
(S, S)) and cross-attention maps ((S, tokens)) of the listed batch elements are accumulated per
factor, for self-segmentation. Capture never changes the output.

``installed(unet, controller)`` swaps the processors in and restores the previous ones after.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Literal

import torch
import torch.nn.functional as F

ContrastMode = Literal["clip", "paper", "renormalize"]
CONTRAST_MODES = ("clip", "paper", "renormalize")
# Explicit attention is computed in chunks of queries so that a chunk holds at most this many
# float32 scores (heads × queries × keys): ~256 MiB.
_CHUNK_ELEMENTS = 1 << 26
# Self-attention maps are captured only at resolutions with at most this many tokens (64×64):
# one (S, S) float32 map per element is then at most 64 MiB.
MAX_CAPTURE_TOKENS = 4096


def spatial_size(latent_hw: tuple[int, int], factor: int) -> tuple[int, int]:
    """The (h, w) of a UNet feature map at downsampling ``factor`` (a power of 2)."""
    h, w = latent_hw
    return -(-h // factor), -(-w // factor)


def factor_of(seq_len: int, latent_hw: tuple[int, int], max_log2: int = 7) -> int | None:
    """The downsampling factor 2^k whose feature map has ``seq_len`` tokens for this latent size,
    or None when no factor matches."""
    for k in range(max_log2 + 1):
        h, w = spatial_size(latent_hw, 2 ** k)
        if h * w == seq_len:
            return 2 ** k
        if h * w < seq_len:
            return None
    return None


def decoder_attention_factors(unet) -> list[int]:
    """Downsampling factors (relative to the latent) of the up blocks that contain attention,
    finest first. Up block j of n works at factor 2^(n−1−j) (every block but the last upsamples)."""
    n = len(unet.up_blocks)
    out = []
    for j, block in enumerate(unet.up_blocks):
        if getattr(block, "attentions", None) is not None and len(block.attentions) > 0:
            out.append(2 ** (n - 1 - j))
    return sorted(out)


def decoder_self_attention_layers(unet) -> dict[int, int]:
    """How many decoder self-attention layers work at each factor: {factor: count}, e.g. SD 1.5
    {1: 3, 2: 3, 4: 3}, SDXL {2: 6, 4: 30} (its transformers are 2 and 10 blocks deep)."""
    n = len(unet.up_blocks)
    out: dict[int, int] = {}
    for j, block in enumerate(unet.up_blocks):
        count = sum(1 for name, _ in block.named_modules() if name.endswith(".attn1") or name == "attn1")
        if count:
            out[2 ** (n - 1 - j)] = out.get(2 ** (n - 1 - j), 0) + count
    return out


def is_decoder_self_attention(name: str) -> bool:
    return name.startswith("up_blocks.") and ".attn1." in name


def is_decoder_cross_attention(name: str) -> bool:
    return name.startswith("up_blocks.") and ".attn2." in name


def contrast(attn: torch.Tensor, beta: float, mode: str = "clip") -> torch.Tensor:
    """Eq. 3 on attention rows (last dimension): (A − mean)·β + mean.

    mode ``paper``: exactly eq. 3 (rows still sum to 1; weights may go negative);
    ``clip``: then clamped to [0, 1] without renormalising (the authors' code);
    ``renormalize``: clamped at 0 and each row divided by its sum (a proper distribution)."""
    if mode not in CONTRAST_MODES:
        raise ValueError(f"unknown contrast mode {mode!r}; one of {CONTRAST_MODES}")
    if beta == 1.0:  # the identity, exactly (softmax rows are already in [0, 1] and sum to 1)
        return attn
    mean = attn.mean(dim=-1, keepdim=True)
    out = (attn - mean) * beta + mean
    if mode == "paper":
        return out
    if mode == "clip":
        return out.clamp(0.0, 1.0)
    if mode == "renormalize":
        out = out.clamp(min=0.0)
        return out / out.sum(dim=-1, keepdim=True).clamp(min=1e-12)
    raise ValueError(f"unknown contrast mode {mode!r}; one of {CONTRAST_MODES}")


@dataclass
class SwapController:
    """Per-call state shared by all :class:`SwapProcessor` s of one UNet.

    ``swaps`` maps a downsampling factor to the (dst, src) batch-index pairs whose keys/values are
    swapped in decoder self-attention at that factor for the next UNet call; empty: identity."""

    latent_hw: tuple[int, int] | None = None
    swaps: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    beta: float = 1.0
    contrast_mode: str = "clip"
    # query preservation: factor -> (dst, src) pairs; dst's queries become
    # gamma·Q_src + (1 − gamma)·Q_dst in decoder self-attention at that factor
    queries: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    gamma: float = 0.0
    # capture: batch indices whose maps are accumulated; None = no capture
    capture: tuple[int, ...] | None = None
    capture_max_tokens: int = MAX_CAPTURE_TOKENS
    self_maps: dict[int, torch.Tensor] = field(default_factory=dict)  # factor -> (n, S, S) sums
    self_counts: dict[int, int] = field(default_factory=dict)
    cross_maps: dict[int, torch.Tensor] = field(default_factory=dict)  # factor -> (n, S, T) sums
    cross_counts: dict[int, int] = field(default_factory=dict)
    # what happened: (layer name, factor, pairs) per swapped layer call (for tests and reports)
    log: list[tuple[str, int, tuple[tuple[int, int], ...]]] | None = None

    def set_step(self, latent_hw: tuple[int, int], swaps: dict[int, list[tuple[int, int]]] | None = None,
                 beta: float | None = None, queries: dict[int, list[tuple[int, int]]] | None = None,
                 gamma: float | None = None) -> None:
        self.latent_hw = tuple(latent_hw)
        self.swaps = {int(k): list(v) for k, v in (swaps or {}).items() if v}
        self.queries = {int(k): list(v) for k, v in (queries or {}).items() if v}
        if beta is not None:
            self.beta = float(beta)
        if gamma is not None:
            self.gamma = float(gamma)

    def clear_capture(self) -> None:
        self.capture = None
        self.self_maps.clear()
        self.self_counts.clear()
        self.cross_maps.clear()
        self.cross_counts.clear()

    def factor(self, seq_len: int) -> int | None:
        if self.latent_hw is None:
            return None
        return factor_of(seq_len, self.latent_hw)

    def mean_self_map(self, factor: int) -> torch.Tensor | None:
        if factor not in self.self_maps:
            return None
        return self.self_maps[factor] / self.self_counts[factor]

    def mean_cross_map(self, factor: int) -> torch.Tensor | None:
        if factor not in self.cross_maps:
            return None
        return self.cross_maps[factor] / self.cross_counts[factor]


def _explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: float,
                        mode: str) -> torch.Tensor:
    """softmax(q kᵀ/√d) with contrast, times v, in float32, chunked over queries.
    q, k, v: (heads, S, d). Returns (heads, S_q, d) in q's dtype."""
    heads, s_q, d = q.shape
    s_k = k.shape[1]
    scale = 1.0 / math.sqrt(d)
    kf, vf = k.float(), v.float()
    chunk = max(1, _CHUNK_ELEMENTS // max(1, heads * s_k))
    out = torch.empty((heads, s_q, v.shape[-1]), dtype=torch.float32, device=q.device)
    for a in range(0, s_q, chunk):
        qa = q[:, a:a + chunk].float()
        attn = torch.softmax(qa @ kf.transpose(-1, -2) * scale, dim=-1)
        attn = contrast(attn, beta, mode)
        out[:, a:a + chunk] = attn @ vf
    return out.to(q.dtype)


def _attention_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Head-averaged softmax(q kᵀ/√d) in float32: q (heads, S_q, d), k (heads, S_k, d) -> (S_q, S_k)."""
    heads, s_q, d = q.shape
    scale = 1.0 / math.sqrt(d)
    kf = k.float()
    out = torch.zeros((s_q, k.shape[1]), dtype=torch.float32, device=q.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, heads * k.shape[1]))
    for a in range(0, s_q, chunk):
        attn = torch.softmax(q[:, a:a + chunk].float() @ kf.transpose(-1, -2) * scale, dim=-1)
        out[a:a + chunk] = attn.mean(dim=0)
    return out


def _pairs(table: dict[int, list[tuple[int, int]]], factor: int, n: int) -> list[tuple[int, int]]:
    """The (dst, src) pairs of ``table`` at ``factor`` whose indices are in a batch of ``n``."""
    return [(d, s) for d, s in table.get(factor, ()) if d < n and s < n]


class SwapProcessor:
    """``AttnProcessor2_0`` plus the controller's key/value swap, contrast and capture."""

    def __init__(self, controller: SwapController, name: str):
        self.controller = controller
        self.name = name
        self.decoder_self = is_decoder_self_attention(name)
        self.decoder_cross = is_decoder_cross_attention(name)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        ctl = self.controller
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        is_self = encoder_hidden_states is None
        if is_self:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        # which swaps and query mixes apply in this layer, at this resolution
        pairs: list[tuple[int, int]] = []
        factor = None
        if (self.decoder_self or self.decoder_cross) and (ctl.swaps or ctl.queries or ctl.capture is not None):
            factor = ctl.factor(query.shape[1])
        if self.decoder_self and is_self and factor is not None and attention_mask is None:
            pairs = _pairs(ctl.swaps, factor, batch_size)
            mixes = _pairs(ctl.queries, factor, batch_size) if ctl.gamma != 0.0 else []
            if mixes:
                mixed = query.clone()
                for d, s in mixes:
                    mixed[d] = ctl.gamma * query[s] + (1.0 - ctl.gamma) * query[d]
                query = mixed
        if pairs:
            key = key.clone()
            value = value.clone()
            for d, s in pairs:
                key[d] = key[s]
                value[d] = value[s]
            if ctl.log is not None:
                ctl.log.append((self.name, factor, tuple(pairs)))

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        if pairs and ctl.beta != 1.0:
            for d in sorted({d for d, _ in pairs}):
                out[d] = _explicit_attention(query[d], key[d], value[d], ctl.beta, ctl.contrast_mode)

        if ctl.capture is not None and factor is not None:
            self._capture(factor, query, key, is_self)

        hidden_states = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states

    def _capture(self, factor: int, query: torch.Tensor, key: torch.Tensor, is_self: bool) -> None:
        ctl = self.controller
        idx = [i for i in ctl.capture if i < query.shape[0]]
        if not idx:
            return
        if self.decoder_self and is_self:
            if query.shape[2] > ctl.capture_max_tokens:
                return
            maps = torch.stack([_attention_probs(query[i], key[i]) for i in idx])
            store, counts = ctl.self_maps, ctl.self_counts
        elif self.decoder_cross and not is_self:
            maps = torch.stack([_attention_probs(query[i], key[i]) for i in idx])
            store, counts = ctl.cross_maps, ctl.cross_counts
        else:
            return
        if factor in store:
            store[factor] += maps
            counts[factor] += 1
        else:
            store[factor] = maps
            counts[factor] = 1


@contextmanager
def installed(unet, controller: SwapController) -> Iterator[SwapController]:
    """Use :class:`SwapProcessor` s driven by ``controller`` in every attention layer of ``unet``
    for the duration of the block; the previous processors are put back afterwards, even on error."""
    saved = dict(unet.attn_processors)
    unet.set_attn_processor({name: SwapProcessor(controller, name) for name in saved})
    try:
        yield controller
    finally:
        unet.set_attn_processor(saved)
