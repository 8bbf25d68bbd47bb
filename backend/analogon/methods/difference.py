"""Difference Inversion (Kim, Kim & Kim, CVPR 2025): DIFF tokens that carry only A → A′.

Given A, A′ and B, learn a few prompt tokens D̃ that hold *only* the difference between A and
A′, then sample B′ from "prompt_B + D̃" on a general Stable Diffusion model. The paper
(Algorithm 1), step by step, as this module does it:

① captions cap_A, cap_A′ (BLIP-2 in the paper; here the user's captions, a BLIP/BLIP-2 model,
  or PEZ hard prompts — :mod:`analogon.core.captioning`; user captions always win). The paper
  also uses PEZ prompts as prompt_A / prompt_A′ in the consistency loss and says captions may
  replace them "at a small cost"; here one caption per image serves both.
② deltas in the CLIP space of the model's text encoder (:mod:`analogon.core.clip_space`):
  D_img = E_I(A′) − E_I(A) (eq. 2), D_txt = E_T(cap_A′) − E_T(cap_A) (eq. 3), on unit-normalised
  features, and D_inter = Slerp(D_img, D_txt; α) (eq. 4), α = 0.8.
③④ D̃: ``n_tokens`` input embeddings per text encoder, initialised to zero (§4.4), inserted
  after the prompt's words and before its end-of-text token: [BOS, words, D̃, EOT, pad…].
⑤⑥ token consistency (§4.3, eqs. 7–9): with t, ε drawn anew each step,
  ε_θ(z_A′,t_after, [prompt_A, +D̃]) must predict ε_after and ε_θ(z_A,t_before, [prompt_A′, −D̃])
  must predict ε_before; L_tc is the sum of the two L2 norms. Both branches run as one batch.
  The regression target follows the model's ``prediction_type`` (ε, v or x₀).
⑦ CLIP loss (eq. 6): L_clip = 1 − cos(P(D̃), D_inter). The paper does not say how D̃ is
  brought into CLIP space. Here the CLIP text tower reads the DIFF tokens directly (it is the
  model's own text encoder, or a fine-tune of it, so the token embeddings are shared):
  P(D̃) = Ê_T([cap_A, D̃]) − Ê_T(cap_A) (Ê: unit-normalised), which is how D_txt itself is
  formed, the DIFF taking the place of the words that change (``clip_anchor="prompt_a"``); or
  Ê_T([D̃]) − Ê_T("") (``clip_anchor="empty"``). For SDXL each text encoder's DIFF is measured in
  its own CLIP (ViT-L/14, ViT-bigG-14) and the two cosine distances are averaged.
  L = λ_tc·L_tc + λ_clip·L_clip (eq. 10), λ_tc = 0.01, λ_clip = 6.

Unknowns of the paper, made parameters (defaults from VISII, the closest published recipe, and
the paper's Fig. 6 for the token count): 5 tokens, 1000 AdamW steps at lr 1e-3, each timestep
used once in shuffled order, best-loss D̃ kept. BOS and padding rows are never trained (only
the slot rows are parameters). D̃ is cached by (A, A′, model, captions, every setting above).

Sampling B′ (not stated in the paper): B is encoded, brought to the strength's timestep either
by DDIM inversion with prompt_B (default; keeps B's layout) or by adding seeded noise (SDEdit),
and denoised with classifier-free guidance from prompt_B + ``diff_scale``·D̃ against the negative
prompt. A DIFF of exact zeros (``diff_scale`` 0) is no DIFF: the prompt is prompt_B alone, so the
result is plain sampling from prompt_B. The edit map grades the change across the canvas with
the shared per-pixel start-time schedule (:class:`analogon.core.editmap.EditSchedule`), the
kept pixels following B's own (inverted or noised) trajectory.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from ..core import images as im
from ..core.compositing import map_to_grid
from ..core.images import over
from ..core.captioning import (
    CAPTIONERS, DEFAULT_CAPTION_MODEL, PezCaptioner, PezSettings, blip_captioner,
    resolve_captions,
)
from ..core.caption_diff import ConflictPrompts, PromptCut, conflict_prompts
from ..core.conditioning_inversion import block_checkpointing
from ..core.clip_space import ClipSpace, clip_spaces_for, slerp, unit
from ..core.diffusion import (
    SCHEDULER_NAMES, Conditioning, encode_prompt, img2img_timesteps, init_noise, make_scheduler,
    noised, sample, vae_decode, vae_encode,
)
from ..core.ddpm_inversion import Inversion, cached, invert
from ..core.editmap import THRESHOLD_KINDS, EditSchedule
from ..core.gradients import LossScaler
from ..core.previews import step_previews
from ..core.text_embeddings import (
    conditioning_from_embeds, encoders, ids_with_slots, token_embedding, tokenize,
)
from ..errors import InputError
from . import register
from .base import (
    Inputs, JobContext, LayerImage, Method, MethodParams, MethodResult, ResultImage, Role,
)

CACHE_VERSION = 2
ROLE_TITLES = {"a": "A (before)", "a_prime": "A′ (after)", "b": "B (target)"}


class _NoSpace(Exception):
    """No CLIP text space to look for B's own value in (raised from the lazy feature function:
    the space is loaded only when cap_B does not name A's old value itself)."""


class Params(MethodParams):
    # -- captions (①) ----------------------------------------------------------------------
    caption_a: str = Field("", max_length=1000, description=(
        "Caption of A. Typed captions always win over the captioner; leave empty to let the "
        "captioner write it (the panel shows what it wrote after a run)."),
        title="Caption of A")
    caption_a_prime: str = Field("", max_length=1000, description=(
        "Caption of A′, the edited A. Typed captions always win; empty: the captioner writes it."),
        title="Caption of A′")
    caption_b: str = Field("", max_length=1000, description=(
        "Caption of B: prompt_B, the prompt the DIFF tokens are added to. Typed captions always "
        "win; empty: the captioner writes it."),
        title="Caption of B")
    captioner: Literal[CAPTIONERS] = Field("blip", description=(  # type: ignore[valid-type]
        "Who writes missing captions: 'blip' a BLIP/BLIP-2 captioning model (the paper uses "
        "BLIP-2), 'pez' PEZ hard prompts found in CLIP space (slower, no extra model), "
        "'user_only' never caption (all three captions must be typed)."),
        title="Captioner", json_schema_extra={"advanced": True})
    captioner_model: str = Field(DEFAULT_CAPTION_MODEL, max_length=500, description=(
        "BLIP or BLIP-2 model for 'blip': a Hugging Face id (from the local cache) or a local "
        "folder. Default: BLIP-2 OPT-2.7b, the paper's captioner."),
        title="Captioning model", json_schema_extra={"advanced": True})
    pez_tokens: int = Field(16, ge=1, le=64, description=(
        "PEZ: tokens per hard prompt (16: the PEZ paper's default)."),
        title="PEZ tokens", json_schema_extra={"advanced": True})
    pez_steps: int = Field(3000, ge=1, le=10000, description=(
        "PEZ: optimisation steps per image (3000: the PEZ paper's default; fewer is faster "
        "and rougher)."),
        title="PEZ steps", json_schema_extra={"advanced": True})
    # -- CLIP deltas (②) ---------------------------------------------------------------------
    clip_model: str = Field("auto", max_length=500, description=(
        "CLIP space for the deltas. 'auto': the CLIP that matches the model's text encoder "
        "(ViT-L/14 for SD 1.x, OpenCLIP ViT-H-14 for SD 2.x as in the paper, ViT-L/14 + "
        "ViT-bigG-14 for SDXL, or the CLIP a model folder carries). Else a local folder, an "
        "open_clip name (e.g. ViT-H-14) or a Hugging Face id."),
        title="CLIP model", json_schema_extra={"advanced": True})
    clip_pretrained: str = Field("", max_length=500, description=(
        "For an open_clip name: its pretrained tag (e.g. laion2b_s32b_b79k) or a weights file."),
        title="CLIP weights", json_schema_extra={"advanced": True})
    alpha: float = Field(0.8, ge=0.0, le=1.0, description=(
        "Slerp between the image delta (0) and the text delta (1); 0.8 is the paper's value "
        "(eq. 4, Fig. 7)."),
        title="Text share of the delta", json_schema_extra={"advanced": True})
    clip_anchor: Literal["prompt_a", "empty"] = Field("prompt_a", description=(
        "How the DIFF tokens are read in CLIP space (the paper does not say): 'prompt_a' the "
        "change they make to A's caption, like the text delta itself (default); 'empty' the "
        "tokens alone against the empty prompt."),
        title="CLIP anchor", json_schema_extra={"advanced": True})
    # -- DIFF tokens (③–⑦) ---------------------------------------------------------------------
    n_tokens: int = Field(5, ge=1, le=32, description=(
        "Number of DIFF tokens (5: the paper's ablation, Fig. 6; fewer miss the change, more "
        "pick up unrelated content)."),
        title="DIFF tokens", json_schema_extra={"advanced": True})
    train_steps: int = Field(500, ge=1, le=5000, description=(
        "Optimisation steps for the DIFF tokens (not in the paper; VISII runs 1000 at lr 1e-3, "
        "which reaches the held-out loss of 500 steps at lr 5e-3: docs/benchmarks-difference.md)."),
        title="Training steps", json_schema_extra={"advanced": True})
    lr: float = Field(5e-3, gt=0.0, le=1.0, description=(
        "AdamW learning rate for the DIFF tokens (not in the paper; VISII: 1e-3 for 1000 steps; "
        "5e-3 reaches its loss in half the steps)."),
        title="Learning rate", json_schema_extra={"advanced": True})
    lambda_tc: float = Field(0.01, ge=0.0, le=1000.0, description=(
        "Weight of the token-consistency loss (0.01: the paper, eq. 10)."),
        title="Consistency loss weight", json_schema_extra={"advanced": True})
    lambda_clip: float = Field(6.0, ge=0.0, le=1000.0, description=(
        "Weight of the CLIP loss (6: the paper, eq. 10)."),
        title="CLIP loss weight", json_schema_extra={"advanced": True})
    tc_norm: Literal["l2", "mse"] = Field("l2", description=(
        "Token-consistency distance: 'l2' the L2 norm of the noise error as written in the "
        "paper (eqs. 7–8; the scale its λ_tc = 0.01 was set for), 'mse' the mean squared error "
        "usual in diffusion training."),
        title="Consistency distance", json_schema_extra={"advanced": True})
    timestep_sampling: Literal["shuffled_once", "uniform"] = Field("shuffled_once", description=(
        "Timesteps of the consistency loss: 'shuffled_once' every training timestep once in a "
        "shuffled order (VISII), 'uniform' drawn independently each step (the paper's U(0, T))."),
        title="Training timesteps", json_schema_extra={"advanced": True})
    prompt_conflict: Literal["drop", "insert", "keep"] = Field("insert", description=(
        "What happens to the words the captions say change (in A's caption, not in A′'s: A's "
        "old value, e.g. 'red'; and B's own value of that attribute, found by the model's text "
        "space): 'drop' leaves them out of prompt_B and of the consistency loss's prompt_A / "
        "prompt_A′, the DIFF tokens going at the end; 'insert' leaves them out and puts the "
        "DIFF tokens where the first of them stood; 'keep' the paper as written (whole "
        "captions, DIFF at the end: the old word stays and fights the DIFF)."),
        title="Words that change", json_schema_extra={"advanced": True})
    keep_best: bool = Field(True, description=(
        "Keep the DIFF tokens with the lowest loss on a fixed held-out set of timesteps and "
        "noises, measured every 'Check every' steps, instead of the last ones."),
        title="Keep the best tokens", json_schema_extra={"advanced": True})
    keep_best_every: int = Field(50, ge=1, le=5000, description=(
        "How often (in training steps) the held-out loss is measured for 'Keep the best "
        "tokens' (and always after the last step)."),
        title="Check every", json_schema_extra={"advanced": True})
    train_seed: int = Field(0, ge=0, le=2**31 - 1, description=(
        "Seed of the training noise and timesteps (separate from the image seed, so that new "
        "samples re-use the learned tokens)."),
        title="Training seed", json_schema_extra={"advanced": True})
    checkpointing: bool = Field(False, description=(
        "Recompute the UNet's blocks in the backward pass of the DIFF training instead of "
        "storing their activations (diffusers' gradient checkpointing): about half the "
        "training memory for about a quarter more time. Does not change the tokens."),
        title="Gradient checkpointing", json_schema_extra={"advanced": True})
    # -- sampling B′ -------------------------------------------------------------------------
    diff_scale: float = Field(1.0, ge=-3.0, le=3.0, description=(
        "Multiplies the DIFF tokens when sampling B′: 1 applies the learned change (the paper), "
        "0 is prompt_B alone, −1 applies the reverse change (A′ → A)."),
        title="Change strength")
    b_start: Literal["ddim_inverted", "ddpm_inverted", "noised"] = Field("ddim_inverted", description=(
        "How B enters the sampler (not in the paper): 'ddim_inverted' B's latent DDIM-inverted "
        "with prompt_B to the strength's timestep (keeps B's layout; cached); 'ddpm_inverted' "
        "B inverted edit-friendly (noise maps that redraw B exactly with prompt_B at this "
        "guidance, so only the DIFF moves it; DDIM sampler; cached); 'noised' B's latent "
        "with seeded noise added (SDEdit)."),
        title="How B enters", json_schema_extra={"advanced": True})
    strength: float = Field(0.6, ge=0.0, le=1.0, description=(
        "How far B is taken back before sampling B′ (fraction of the steps that run; not in "
        "the paper). 0.6 keeps more of B than 0.8 and makes the change as often (measured: "
        "docs/benchmarks-difference.md); higher for changes of layout or shape."),
        title="Strength")
    guidance: float = Field(7.5, ge=1.0, le=30.0, description=(
        "Classifier-free guidance scale (7.5: Stable Diffusion's default; the paper does not "
        "say)."),
        title="Guidance (CFG)", json_schema_extra={"advanced": True})
    steps: int = Field(50, ge=1, le=200, description=(
        "Denoising steps for the whole schedule; strength × steps of them run (50: the "
        "diffusers default)."),
        title="Steps")
    scheduler: Literal[SCHEDULER_NAMES] = Field("ddim", description=(  # type: ignore[valid-type]
        "Sampler. DDIM matches the DDIM inversion of B."),
        title="Sampler", json_schema_extra={"advanced": True})
    negative_prompt: str = Field("", max_length=1000, description=(
        "Negative prompt (the unconditional side of guidance); empty as in the paper's base."),
        title="Negative prompt", json_schema_extra={"advanced": True})
    map_threshold: Literal[THRESHOLD_KINDS] = Field("linear", description=(  # type: ignore[valid-type]
        "How the edit map's grey levels become start times (PIXELS' thresholds; linear is the "
        "default there)."),
        title="Edit map curve", json_schema_extra={"advanced": True})

    @model_validator(mode="after")
    def _check(self):
        if self.b_start == "ddpm_inverted" and self.scheduler != "ddim":
            raise ValueError(f"b_start 'ddpm_inverted' samples with B's noise maps, which only the "
                             f"DDIM sampler takes: choose scheduler 'ddim' (not "
                             f"{self.scheduler!r}) or another b_start")
        return self


# -- DIFF tokens in prompts ------------------------------------------------------------------

@dataclass
class SlotPrompt:
    """A prompt with ``n`` empty slots after its words, per text encoder."""

    embeds: list[torch.Tensor]  # (1, L, D_k) token embeddings; slot rows to be replaced
    starts: list[int]
    eos: list[int]
    n: int

    def fill(self, diffs: list[torch.Tensor], sign: float = 1.0) -> list[torch.Tensor]:
        """Embeddings with ``sign``·D̃ in the slots (differentiable in ``diffs``)."""
        if self.n == 0:
            return list(self.embeds)
        out = []
        for e, s, d in zip(self.embeds, self.starts, diffs):
            rows = (sign * d).to(e.dtype)[None]
            out.append(torch.cat([e[:, :s], rows, e[:, s + self.n:]], dim=1))
        return out


def _ids_with_slots_between(tok, prefix: str, suffix: str, n: int, device
                            ) -> tuple[torch.Tensor, int, int]:
    """[BOS, prefix words, n slots, suffix words, EOT, pad…] (L,), the slot start, the EOT index.
    Words are cut from the end when the prompt would not fit."""
    pre = tokenize(tok, prefix, device)[0]
    pre_eos = int((pre == tok.eos_token_id).nonzero()[0].item())
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if not suffix.strip():
        return ids_with_slots(pre, pre_eos, n, int(pad))
    suf = tokenize(tok, suffix, device)[0]
    suf_eos = int((suf == tok.eos_token_id).nonzero()[0].item())
    length = pre.shape[0]
    if not 0 <= n <= length - 2:
        raise ValueError(f"cannot insert {n} slots into {length} positions")
    room = length - 2 - n
    w_pre = pre[1:pre_eos][:room]
    w_suf = suf[1:suf_eos][:max(0, room - int(w_pre.shape[0]))]
    new = torch.full_like(pre, int(pad))
    new[0] = pre[0]
    k = int(w_pre.shape[0])
    new[1:1 + k] = w_pre
    m = int(w_suf.shape[0])
    new[1 + k + n:1 + k + n + m] = w_suf
    new[1 + k + n + m] = pre[pre_eos]
    return new, 1 + k, 1 + k + n + m


def slot_prompt(bundle, prompt: str, n: int, suffix: str = "") -> SlotPrompt:
    """``prompt`` with ``n`` slots after its words, then ``suffix`` (empty: slots at the end)."""
    embeds, starts, eos = [], [], []
    for tok, te in encoders(bundle):
        new, start, e = _ids_with_slots_between(tok, prompt, suffix, n, bundle.device)
        with torch.no_grad():
            embeds.append(token_embedding(te)(new[None]))
        starts.append(start)
        eos.append(e)
    return SlotPrompt(embeds, starts, eos, n)


def conflict_split(caption: str, cut: PromptCut | None, p: Params) -> tuple[str, str]:
    """(text before the DIFF, text after it) for ``prompt_conflict``: the whole caption and
    nothing ('keep'), the caption without the conflicting words and nothing ('drop'), or the
    words before and after the first conflicting one ('insert')."""
    if cut is None or p.prompt_conflict == "keep":
        return caption, ""
    if p.prompt_conflict == "drop":
        return cut.text, ""
    return cut.prefix, cut.suffix


def conflict_slot_prompt(bundle, caption: str, cut: PromptCut | None, p: Params) -> SlotPrompt:
    pre, suf = conflict_split(caption, cut, p)
    return slot_prompt(bundle, pre, p.n_tokens, suf)


def active_rows(diffs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The DIFF rows that are not all zero (in any encoder); a zero row is no token."""
    keep = torch.zeros(diffs[0].shape[0], dtype=torch.bool, device=diffs[0].device)
    for d in diffs:
        keep |= (d != 0).any(dim=-1).to(keep.device)
    return [d[keep.to(d.device)] for d in diffs]


def diff_conditioning(bundle, prompt: str, diffs: list[torch.Tensor] | None, scale: float,
                      image_hw: tuple[int, int], suffix: str = "") -> Conditioning:
    """Conditioning of "prompt + scale·D̃ + suffix" (zero rows left out: a zero DIFF is the
    prompt alone)."""
    if diffs is None:
        rows = [torch.zeros(0, token_embedding(te).embedding_dim) for _, te in encoders(bundle)]
    else:
        rows = active_rows([scale * d.to(bundle.device) for d in diffs])
    sp = slot_prompt(bundle, prompt, int(rows[0].shape[0]), suffix)
    with torch.no_grad():
        return conditioning_from_embeds(bundle, sp.fill(rows), sp.eos[-1], image_hw)


# -- the deltas (②) -------------------------------------------------------------------------

@dataclass
class Deltas:
    image: torch.Tensor  # (dim,) D_img (unit-feature difference)
    text: torch.Tensor  # (dim,) D_txt
    inter: torch.Tensor  # (dim,) unit D_inter


def clip_deltas(space: ClipSpace, a: np.ndarray, a_prime: np.ndarray, cap_a: str, cap_ap: str,
                alpha: float) -> Deltas:
    fi = unit(space.image_features([a, a_prime]))
    ft = unit(space.text_features([cap_a, cap_ap]))
    d_img, d_txt = fi[1] - fi[0], ft[1] - ft[0]
    return Deltas(d_img, d_txt, slerp(d_img, d_txt, alpha))


def diff_in_clip(space: ClipSpace, diff: torch.Tensor, cap_a: str, anchor: str) -> torch.Tensor:
    """P(D̃): the DIFF tokens read by the CLIP text tower, as a change of (unit) text features."""
    base = cap_a if anchor == "prompt_a" else ""
    with_diff = unit(space.features_with_tokens(base, diff.to(space.device)))[0]
    with torch.no_grad():
        without = unit(space.features_with_tokens(base, None))[0]
    return with_diff - without


def clip_loss(spaces: list[ClipSpace | None], deltas: list[Deltas | None],
              diffs: list[torch.Tensor], cap_a: str, anchor: str) -> torch.Tensor:
    """Mean over the text encoders that have a CLIP space of 1 − cos(P(D̃_k), D_inter_k)."""
    terms = []
    for space, dl, d in zip(spaces, deltas, diffs):
        if space is None or dl is None:
            continue
        p = diff_in_clip(space, d, cap_a, anchor)
        terms.append(1.0 - F.cosine_similarity(p, dl.inter.to(p.device), dim=0, eps=1e-8))
    if not terms:
        return torch.zeros((), device=diffs[0].device)
    return torch.stack(terms).mean()


# -- training (③–⑦) ---------------------------------------------------------------------------

@dataclass
class TrainSetup:
    bundle: Any
    z_a: torch.Tensor  # (1, 4, h, w)
    z_ap: torch.Tensor
    prompt_a: SlotPrompt
    prompt_ap: SlotPrompt
    cap_a: str
    spaces: list[ClipSpace | None]
    deltas: list[Deltas | None]
    image_hw: tuple[int, int]


@dataclass
class TrainResult:
    diffs: list[torch.Tensor]  # per encoder (n, D_k), float32, cpu
    total: list[float] = field(default_factory=list)
    tc: list[float] = field(default_factory=list)
    clip: list[float] = field(default_factory=list)
    best_step: int = -1  # number of updates the kept tokens had (train_steps: the last)
    best_loss: float = float("inf")  # their held-out loss (keep_best)
    heldout: list[tuple[int, float]] = field(default_factory=list)  # (updates, held-out loss)
    unet_batches: int = 0  # UNet forward+backward calls (each a batch of 2)
    seconds: float = 0.0


def timestep_schedule(kind: str, steps: int, n_train: int, g: torch.Generator) -> torch.Tensor:
    """(steps, 2) timesteps for the (after, before) branches."""
    if kind == "uniform":
        return torch.randint(0, n_train, (steps, 2), generator=g)
    cols = []
    for _ in range(2):
        reps = -(-steps // n_train)
        cols.append(torch.cat([torch.randperm(n_train, generator=g) for _ in range(reps)])[:steps])
    return torch.stack(cols, dim=1)


def regression_target(scheduler, z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to output for x_t = √ᾱ z0 + √(1−ᾱ) ε: ε, v or z0."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return eps
    ac = scheduler.alphas_cumprod.to(z0.device)[t.to(z0.device)].float().view(-1, 1, 1, 1)
    if kind == "v_prediction":
        return (ac.sqrt() * eps - (1 - ac).sqrt() * z0).to(eps.dtype)
    if kind == "sample":
        return z0
    raise InputError("unsupported_model", f"Unknown prediction type {kind!r} of this model.")


def forward_noise(scheduler, z0: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
    """x_t = √ᾱ_t z0 + √(1−ᾱ_t) ε, the training-time noising (whatever sampler the model ships)."""
    a = scheduler.alphas_cumprod.to(z0.device)[int(t)].float()
    return (a.sqrt() * z0.float() + (1 - a).sqrt() * eps.float()).to(z0.dtype)


def consistency_loss(setup: TrainSetup, diffs: list[torch.Tensor], t_after: int, t_before: int,
                     eps_after: torch.Tensor, eps_before: torch.Tensor, norm: str = "l2"
                     ) -> torch.Tensor:
    """L_tc (eqs. 7–9) in one UNet batch: row 0 = A′ noised at t_after with [prompt_A, +D̃]
    against ε_after; row 1 = A noised at t_before with [prompt_A′, −D̃] against ε_before."""
    b = setup.bundle
    sched = b.scheduler
    x_after = forward_noise(sched, setup.z_ap, eps_after, t_after)
    x_before = forward_noise(sched, setup.z_a, eps_before, t_before)
    plus = setup.prompt_a.fill(diffs, +1.0)
    minus = setup.prompt_ap.fill(diffs, -1.0)
    embeds = [torch.cat([p, m]) for p, m in zip(plus, minus)]
    eos = torch.tensor([setup.prompt_a.eos[-1], setup.prompt_ap.eos[-1]], device=b.device)
    cond = conditioning_from_embeds(b, embeds, eos, setup.image_hw)
    t = torch.tensor([t_after, t_before], device=b.device)
    x = torch.cat([x_after, x_before]).to(b.unet.dtype)
    pred = b.unet(x, t, **cond.unet_kwargs()).sample.float()
    target = torch.cat([
        regression_target(sched, setup.z_ap, eps_after, t[:1]),
        regression_target(sched, setup.z_a, eps_before, t[1:]),
    ]).float()
    err = (pred - target).flatten(1)
    per = err.norm(dim=1) if norm == "l2" else err.pow(2).mean(dim=1)
    return per.sum()


def total_loss(setup: TrainSetup, diffs, t_after, t_before, eps_after, eps_before, p: Params
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tc = consistency_loss(setup, diffs, t_after, t_before, eps_after, eps_before, p.tc_norm) \
        if p.lambda_tc > 0 else torch.zeros((), device=setup.bundle.device)
    cl = clip_loss(setup.spaces, setup.deltas, diffs, setup.cap_a, p.clip_anchor) \
        if p.lambda_clip > 0 else torch.zeros((), device=setup.bundle.device)
    return p.lambda_tc * tc + p.lambda_clip * cl, tc, cl


HELDOUT_PAIRS = 4


def heldout_set(n_train: int, shape, seed: int, m: int = HELDOUT_PAIRS
                ) -> list[tuple[int, int, torch.Tensor]]:
    """A fixed set of ``m`` (t_after, t_before, ε pair) on which trained tokens are compared:
    timesteps spread evenly over [0, T) (the before branch offset by half a stride), noises
    from their own seed (never the training stream's)."""
    g = torch.Generator(device="cpu").manual_seed(int(seed) + 7919)
    out = []
    for i in range(m):
        ta = int((i + 0.25) * n_train / m)
        tb = int((i + 0.75) * n_train / m)
        out.append((min(ta, n_train - 1), min(tb, n_train - 1),
                    torch.randn((2,) + tuple(shape[1:]), generator=g)))
    return out


@torch.no_grad()
def heldout_loss(setup: TrainSetup, diffs, p: Params, pairs) -> float:
    b = setup.bundle
    total = 0.0
    for ta, tb, eps in pairs:
        e = eps.to(b.device, setup.z_a.dtype)
        loss, _, _ = total_loss(setup, diffs, ta, tb, e[:1], e[1:], p)
        total += float(loss)
    return total / max(1, len(pairs))


def train_diff(setup: TrainSetup, p: Params, on_step=None) -> TrainResult:
    """Zero-initialised DIFF tokens optimised with AdamW on L = λ_tc·L_tc + λ_clip·L_clip.

    With ``keep_best`` the tokens kept are those with the lowest loss on a fixed held-out set
    of (t, ε) (:func:`heldout_set`), measured after every ``keep_best_every`` updates and after
    the last; the training loss of a single random (t, ε) pair says more about the pair than
    about the tokens (the same few easy timesteps would win in every run)."""
    t0 = time.perf_counter()
    b = setup.bundle
    widths = [token_embedding(te).embedding_dim for _, te in encoders(b)]
    diffs = [torch.zeros(p.n_tokens, w, device=b.device, dtype=torch.float32, requires_grad=True)
             for w in widths]
    opt = torch.optim.AdamW(diffs, lr=p.lr)
    scaler = LossScaler.for_bundle(b)
    g = torch.Generator(device="cpu").manual_seed(p.train_seed)
    n_train = int(b.scheduler.config.num_train_timesteps)
    ts = timestep_schedule(p.timestep_sampling, p.train_steps, n_train, g)
    shape = setup.z_a.shape
    pairs = heldout_set(n_train, shape, p.train_seed) if p.keep_best else []
    res = TrainResult(diffs=[])
    best = [d.detach().clone() for d in diffs]
    with block_checkpointing(b.unet, p.checkpointing):
        _train_loop(setup, p, diffs, opt, scaler, g, ts, pairs, res, best, on_step)
    if not p.keep_best:
        best = [d.detach().clone() for d in diffs]
        res.best_step = p.train_steps
    res.diffs = [d.float().cpu() for d in best]
    res.seconds = time.perf_counter() - t0
    return res


def _train_loop(setup: TrainSetup, p: Params, diffs, opt, scaler, g, ts, pairs, res: TrainResult,
                best: list[torch.Tensor], on_step) -> None:
    """The AdamW steps of :func:`train_diff`; ``best`` is updated in place."""
    b = setup.bundle
    shape = setup.z_a.shape
    for step in range(p.train_steps):
        if on_step is not None:
            on_step(step)
        eps = torch.randn((2,) + tuple(shape[1:]), generator=g).to(b.device, setup.z_a.dtype)
        loss, tc, cl = total_loss(setup, diffs, int(ts[step, 0]), int(ts[step, 1]),
                                  eps[:1], eps[1:], p)
        if p.lambda_tc > 0:
            res.unet_batches += 1
        res.total.append(float(loss.detach()))
        res.tc.append(float(tc.detach()))
        res.clip.append(float(cl.detach()))
        opt.zero_grad(set_to_none=True)
        if loss.requires_grad and scaler.backward(loss, diffs):  # fp16 overflow: step skipped
            opt.step()
        done = step + 1
        if p.keep_best and (done % p.keep_best_every == 0 or done == p.train_steps):
            value = heldout_loss(setup, diffs, p, pairs)
            res.heldout.append((done, value))
            if value < res.best_loss:
                res.best_loss, res.best_step = value, done
                best[:] = [d.detach().clone() for d in diffs]


# -- B: DDIM inversion ----------------------------------------------------------------------------

def model_to_eps_x0(scheduler, out: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor):
    kind = scheduler.config.prediction_type
    a, s = alpha.sqrt(), (1 - alpha).sqrt()
    if kind == "epsilon":
        return out, (x - s * out) / a
    if kind == "v_prediction":
        return a * out + s * x, a * x - s * out
    if kind == "sample":
        return (x - a * out) / s, out
    raise InputError("unsupported_model", f"Unknown prediction type {kind!r} of this model.")


def ddim_invert(bundle, z0: torch.Tensor, cond: Conditioning, timesteps, on_step=None
                ) -> list[torch.Tensor]:
    """Deterministic DDIM inversion of ``z0`` (no guidance) along ``timesteps`` (the sampler's,
    descending). Returns the variance-preserving latents aligned with ``timesteps``."""
    ac = bundle.scheduler.alphas_cumprod.to(bundle.device)
    x = z0.float()
    a_cur = torch.tensor(1.0, device=bundle.device)
    traj = []
    asc = [int(t) for t in reversed(list(timesteps))]
    for i, t in enumerate(asc):
        a_t = ac[t].float()
        with torch.no_grad():
            out = bundle.unet(x.to(bundle.unet.dtype), t, **cond.unet_kwargs()).sample.float()
        eps, _ = model_to_eps_x0(bundle.scheduler, out, x, a_t)
        x0 = (x - (1 - a_cur).sqrt() * eps) / a_cur.sqrt()
        x = a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps
        a_cur = a_t
        traj.append(x.clone())
        if on_step is not None:
            on_step(i + 1)
    return list(reversed(traj))


def to_scheduler_space(scheduler, x_vp: torch.Tensor, t, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """A variance-preserving latent √ᾱ z0 + √(1−ᾱ) ε in the scheduler's own latent scale at t
    (σ-schedulers such as Euler keep z0 + σ ε)."""
    one = torch.ones(1, 1, 1, 1, device=x_vp.device, dtype=torch.float32)
    signal = noised(scheduler, one, torch.zeros_like(one), t)
    a = alphas_cumprod.to(x_vp.device)[int(t)].float().sqrt()
    return (x_vp.float() * (signal / a)).to(x_vp.dtype)


# -- the method ---------------------------------------------------------------------------------

class DifferenceMethod(Method):
    id = "difference"
    title = "Difference Inversion"
    description = ("A : A′ :: B : B′ with learned DIFF tokens that carry only the change from A "
                   "to A′, added to B's prompt (Kim et al., CVPR 2025).")
    help = ("Give A, the same picture edited (A′) and a target B. Captions are written by the "
            "captioner unless you type them. Learning the tokens takes a while the first time; "
            "they are cached, so new seeds and settings for B′ are quick.")
    Params = Params
    roles = (
        Role("a", "A (before)", help="The example before the edit."),
        Role("a_prime", "A′ (after)", canvas="a", help="The same example after the edit."),
        Role("b", "B (target)", help="The image to edit the same way."),
    )
    target_role = "b"
    demo_params = {
        "caption_a": "a picture", "caption_a_prime": "a changed picture", "caption_b": "a photo",
        "captioner": "user_only", "n_tokens": 2, "train_steps": 4, "steps": 4, "strength": 0.75,
        "guidance": 3.0,
    }

    def generate(self, ctx: JobContext, inputs: Inputs, params: Params) -> MethodResult:
        p = params
        bundle = ctx.model
        t_start = time.perf_counter()
        a, ap, b = inputs.get("a"), inputs.get("a_prime"), inputs.get("b")
        for role, li in (("a", a), ("a_prime", ap), ("b", b)):
            if li is None:
                raise InputError("missing_image", f"Difference Inversion needs {ROLE_TITLES[role]}.",
                                 {"role": role})
            im.check_not_empty(li.rgba, ROLE_TITLES[role])
        im.check_same_size(a.rgba, ap.rgba, "A and A′ images")
        ap_full = over(ap.rgba, a.rgba)  # a partial A′ layer is A with that patch painted on
        if np.array_equal(a.rgba[..., :3], ap_full[..., :3]):
            raise InputError("no_difference", "A and A′ are the same image: there is no change to "
                             "learn. Put the edited version in A′.")
        if p.captioner == "user_only":  # fail before any model work
            missing = [r for r in ("a", "a_prime", "b") if not getattr(p, "caption_" + r).strip()]
            if missing:
                names = ", ".join(ROLE_TITLES[r] for r in missing)
                raise InputError("captions_missing", f"Type a caption for {names}, or choose a "
                                 "captioner (BLIP or PEZ) to write them.", {"missing": missing})

        # ① captions (user > cache > captioner)
        spaces_box: dict[str, list] = {}

        def spaces() -> list[ClipSpace | None]:
            if "s" not in spaces_box:
                ctx.progress("loading CLIP")
                spaces_box["s"] = clip_spaces_for(bundle, p.clip_model, p.clip_pretrained)
            return spaces_box["s"]

        ap = LayerImage(ap_full, ap.sha)
        captions, sources = self._captions(ctx, p, {"a": a, "a_prime": ap, "b": b}, spaces)
        cap_a, cap_ap, cap_b = captions["a"], captions["a_prime"], captions["b"]
        conflict = self._conflict(p, cap_a, cap_ap, cap_b, spaces)

        # ②–⑦ DIFF tokens, cached
        train_size = im.native_size(a.size, bundle.native_size, bundle.vae_scale_factor)
        key = ctx.cache.key(
            "difference.diff", bundle.key, a=a.sha, a_prime=ap.sha, version=CACHE_VERSION,
            captions=[cap_a, cap_ap], size=list(train_size),
            settings={k: getattr(p, k) for k in TRAIN_SETTINGS},
        )
        entry = ctx.cache.get_entry(key)
        train_info: dict[str, Any]
        if entry is not None:
            tensors, meta = entry
            diffs = [tensors[f"diff_{i}"].clone() for i in range(len(encoders(bundle)))]
            train_info = {"cached": True, **meta}
        else:
            res = self._train(ctx, p, a.rgba, ap.rgba, cap_a, cap_ap, train_size, spaces(),
                              conflict)
            diffs = res.diffs
            train_info = {
                "cached": False, "steps": p.train_steps, "unet_batches": res.unet_batches,
                "best_step": res.best_step, "best_loss": res.best_loss,
                "heldout": res.heldout,
                "loss_first": res.total[0], "loss_last": res.total[-1],
                "clip_loss_first": res.clip[0], "clip_loss_last": res.clip[-1],
                "seconds": round(res.seconds, 3),
                "clip_spaces": [s.describe() if s else None for s in spaces()],
            }
            tensors = {f"diff_{i}": d for i, d in enumerate(diffs)}
            tensors["loss_total"] = torch.tensor(res.total)
            ctx.cache.put(key, tensors, {k: v for k, v in train_info.items() if k != "cached"})

        # sampling B′
        rgb = self._sample(ctx, p, inputs, b, cap_b, diffs, conflict)
        out = rgb
        return MethodResult(
            [ResultImage(out, label=f"difference ×{p.diff_scale:g}")],
            info={"captions": captions, "caption_sources": sources,
                  # for the panel: fill these (empty) fields with what the captioner wrote
                  "param_suggestions": {f"caption_{r}": captions[r] for r in captions
                                        if sources[r] != "user"},
                  "train": train_info,
                  "prompt_conflict": None if conflict is None else conflict.describe(),
                  "seconds": round(time.perf_counter() - t_start, 3)},
        )

    # -- steps ------------------------------------------------------------------------------
    def _captions(self, ctx, p: Params, imgs, spaces):
        bundle = ctx.model
        user = {"a": p.caption_a, "a_prime": p.caption_a_prime, "b": p.caption_b}
        if p.captioner == "blip":
            settings = {"model": p.captioner_model}

            def make():
                ctx.progress("loading captioner")
                return blip_captioner(p.captioner_model, bundle.device, bundle.dtype)
        else:
            settings = {"clip": [p.clip_model, p.clip_pretrained], "model": bundle.key, "pez": 2,
                        "tokens": p.pez_tokens, "steps": p.pez_steps}

            def make():
                sp = next(s for s in spaces() if s is not None)
                return PezCaptioner(sp, PezSettings(p.pez_tokens, p.pez_steps),
                                    on_step=lambda i, n: ctx.progress("captioning (PEZ)", i, n))
        return resolve_captions(user, {r: (li.rgba, li.sha) for r, li in imgs.items()},
                                p.captioner, make, ctx.cache, settings, ROLE_TITLES)

    @staticmethod
    def _conflict(p: Params, cap_a: str, cap_ap: str, cap_b: str, spaces
                  ) -> ConflictPrompts | None:
        """The prompts without the words that change (None for 'keep'). B's own value is looked
        for in the first CLIP text space (loaded only when cap_B does not name A's old value)."""
        if p.prompt_conflict == "keep":
            return None

        def features(texts):
            sp = next((s for s in spaces() if s is not None), None)
            if sp is None:  # no CLIP space: only A's old word itself is found in cap_B
                raise _NoSpace
            return sp.text_features(list(texts))

        try:
            return conflict_prompts(cap_a, cap_ap, cap_b, features)
        except _NoSpace:
            return conflict_prompts(cap_a, cap_ap, cap_b, None)

    def _train(self, ctx, p: Params, a_rgba, ap_rgba, cap_a, cap_ap, size, spaces,
               conflict: ConflictPrompts | None = None) -> TrainResult:
        bundle = ctx.model
        ctx.progress("measuring the change in CLIP space")
        deltas = [clip_deltas(s, a_rgba, ap_rgba, cap_a, cap_ap, p.alpha) if s is not None else None
                  for s in spaces]
        hw = (size[1], size[0])
        dev, dt = bundle.device, bundle.vae.dtype
        z_a = vae_encode(bundle, im.to_tensor(a_rgba, size, dev, dt))
        z_ap = vae_encode(bundle, im.to_tensor(ap_rgba, size, dev, dt))
        setup = TrainSetup(bundle, z_a, z_ap,
                           conflict_slot_prompt(bundle, cap_a, conflict and conflict.a, p),
                           conflict_slot_prompt(bundle, cap_ap, conflict and conflict.a_prime, p),
                           cap_a, spaces, deltas, hw)
        return train_diff(setup, p, on_step=lambda i: ctx.progress("learning DIFF tokens", i + 1,
                                                                    p.train_steps))

    def _sample(self, ctx, p: Params, inputs: Inputs, b, cap_b: str, diffs,
                conflict: ConflictPrompts | None = None) -> np.ndarray:
        bundle = ctx.model
        size = im.native_size(b.size, bundle.native_size, bundle.vae_scale_factor)
        hw = (size[1], size[0])
        box: dict[str, torch.Tensor] = {}

        def z_b_lazy() -> torch.Tensor:
            """B's latent, encoded only when something reads it: a cached inversion without an
            edit map never does (a cache hit costs no VAE encode)."""
            if "z" not in box:
                box["z"] = vae_encode(bundle, im.to_tensor(b.rgba, size, bundle.device, bundle.vae.dtype))
            return box["z"]

        sched = make_scheduler(bundle, p.scheduler, p.steps)
        timesteps = img2img_timesteps(sched, p.steps, p.strength)
        plain, uncond = encode_prompt(bundle, cap_b, p.negative_prompt, hw)
        pre, suf = conflict_split(cap_b, conflict and conflict.b, p)
        cond = diff_conditioning(bundle, pre, diffs, p.diff_scale, hw, suf)

        noise_maps = None
        if len(timesteps) == 0:
            lat = z_b_lazy()
        else:
            if p.b_start == "ddpm_inverted":
                inv = self._ddpm_inverted(ctx, p, b, cap_b, z_b_lazy, plain, uncond, sched,
                                          len(sched.timesteps) - len(timesteps), size)

                def source(i):
                    return inv.x(inv.start + i).to(bundle.device, bundle.unet.dtype)

                def noise_maps(i):
                    return inv.z(inv.start + i)
            elif p.b_start == "noised":
                z_b = z_b_lazy()
                noise = init_noise(bundle, z_b.shape, ctx.generator())

                def source(i):
                    return noised(sched, z_b, noise, timesteps[i])
            else:
                traj = self._inverted(ctx, p, b, cap_b, z_b_lazy, plain, timesteps, size)
                ac = bundle.scheduler.alphas_cumprod

                def source(i):
                    return to_scheduler_space(sched, traj[i].to(bundle.device, bundle.unet.dtype),
                                              timesteps[i], ac)
            x = source(0)
            change = self._change_map(inputs, size, bundle)
            schedule = EditSchedule(change, len(timesteps), p.map_threshold)

            def before(i, t, lat):
                return schedule.apply(i, lat, lambda: source(i)) if i > 0 else lat

            lat = sample(bundle, sched, x, timesteps, cond, uncond, p.guidance, before_step=before,
                         on_step=ctx.step_callback("sampling B′", len(timesteps)),
                         generator=ctx.generator(offset=1),
                         on_prediction=step_previews(ctx, len(timesteps)),
                         eta=1.0 if noise_maps is not None else None, noise_maps=noise_maps)
            if change is not None:
                lat = schedule.finish(lat, z_b_lazy())
        rgb = im.from_tensor(vae_decode(bundle, lat))
        ctx.preview(im.small_preview(rgb), None)
        return rgb

    def _inverted(self, ctx, p: Params, b, cap_b, z_b_lazy, plain: Conditioning, timesteps, size):
        bundle = ctx.model
        key = ctx.cache.key("difference.ddim_inversion", bundle.key, b=b.sha, prompt=cap_b,
                            size=list(size), timesteps=[int(t) for t in timesteps],
                            dtype=str(bundle.dtype), version=CACHE_VERSION)
        hit = ctx.cache.get(key)
        if hit is not None:
            return [hit["traj"][i:i + 1] for i in range(hit["traj"].shape[0])]
        traj = ddim_invert(bundle, z_b_lazy(), plain, timesteps,
                           on_step=ctx.step_callback("inverting B", len(timesteps)))
        ctx.cache.put(key, {"traj": torch.cat(traj).float()}, {"prompt": cap_b})
        return traj

    def _ddpm_inverted(self, ctx, p: Params, b, cap_b, z_b_lazy, plain: Conditioning,
                       uncond: Conditioning, sched, start: int, size) -> Inversion:
        """B's edit-friendly DDPM inversion over the steps that run, with prompt_B guided as the
        sampler guides (so that sampling it with prompt_B redraws B); cached by content."""
        bundle = ctx.model
        key = ctx.cache.key("difference.ddpm_inversion", bundle.key, b=b.sha, prompt=cap_b,
                            negative=p.negative_prompt, guidance=float(p.guidance),
                            size=list(size), steps=p.steps, start=start, seed=ctx.seed,
                            dtype=str(bundle.dtype), version=CACHE_VERSION)

        def make() -> Inversion:
            g = torch.Generator(device="cpu").manual_seed(ctx.seed)
            return invert(bundle, sched, z_b_lazy().float(), plain, uncond, p.guidance, start=start,
                          generator=g, on_step=lambda k, n: ctx.progress("inverting B", k, n))

        return cached(ctx.cache, key, make, {"prompt": cap_b, "what": "edit-friendly inversion"},
                      device=bundle.device)[0]

    @staticmethod
    def _change_map(inputs: Inputs, size, bundle) -> torch.Tensor | None:
        m = inputs.change_map()
        if m is None:
            return None
        f = bundle.vae_scale_factor
        return map_to_grid(m, (size[0] // f, size[1] // f), bundle.device)


TRAIN_SETTINGS = ("clip_model", "clip_pretrained", "alpha", "clip_anchor", "n_tokens",
                  "train_steps", "lr", "lambda_tc", "lambda_clip", "tc_norm", "timestep_sampling",
                  "keep_best", "keep_best_every", "train_seed", "prompt_conflict")

register(DifferenceMethod())
