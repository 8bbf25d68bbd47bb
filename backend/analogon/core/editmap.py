"""Edit maps as per-pixel start times: the mechanism PIXELS introduced, usable by any sampler.

A change map c in [0, 1] (user convention: brighter = more change) is turned into a keep map
k = 1 − c at latent resolution (bilinear). The denoising loop runs N steps; before step i the
latent is reset to the noised source wherever k > θ_i, with thresholds θ_i rising from 0 to
below 1. A pixel with change c is therefore held at the source for the first ≈ N·(1 − c) steps
and then denoised freely: it effectively runs at strength c (times the loop's own strength).
Pixels with c = 0 are reset at every step and, after the loop, set to the source latent exactly.

The authors' maps use white = keep (Differential Diffusion's convention); we convert here, at the
boundary, and nowhere else.
"""
from __future__ import annotations

import math
from typing import Callable, Literal

import numpy as np
import torch

ThresholdKind = Literal["linear", "quadratic", "cubic", "log", "sigmoid"]
THRESHOLD_KINDS: tuple[str, ...] = ("linear", "quadratic", "cubic", "log", "sigmoid")


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def threshold(kind: str, i: int, n: int) -> float:
    """θ_i for step i of n. Every kind is monotone, θ_0 = 0, and θ stays in [0, 1).

    The sigmoid σ(6·i/N − 3) is rescaled so that it starts at 0 like the others (the authors'
    raw form starts at σ(−3) ≈ 0.047, which would free pixels with change < 5% at step 0)."""
    if n <= 0:
        raise ValueError("n must be positive")
    r = i / n
    if kind == "linear":
        return r
    if kind == "quadratic":
        return r * r
    if kind == "cubic":
        return r ** 3
    if kind == "log":
        return math.log1p(i) / math.log1p(n)
    if kind == "sigmoid":
        lo, hi = _sigmoid(-3.0), _sigmoid(3.0)
        return (_sigmoid(6.0 * r - 3.0) - lo) / (hi - lo)
    raise ValueError(f"unknown threshold kind {kind!r}; one of {THRESHOLD_KINDS}")


def thresholds(kind: str, n: int) -> np.ndarray:
    return np.array([threshold(kind, i, n) for i in range(n)], dtype=np.float32)


class EditSchedule:
    """Per-step keep masks for a change map over ``n_steps`` remaining denoising steps.

    ``change`` is (1, 1, h, w) at latent size (see ``analogon.core.compositing.map_to_grid``), or
    None for "change everywhere" (no resets)."""

    def __init__(self, change: torch.Tensor | None, n_steps: int, kind: str = "linear"):
        if kind not in THRESHOLD_KINDS:
            raise ValueError(f"unknown threshold kind {kind!r}")
        self.n = int(n_steps)
        self.kind = kind
        self.change = change
        self.keep = None if change is None else (1.0 - change.clamp(0, 1))
        self.theta = thresholds(kind, max(1, self.n))

    @property
    def active(self) -> bool:
        return self.keep is not None

    def keep_mask(self, i: int) -> torch.Tensor | None:
        """Boolean (1, 1, h, w): where the latent is reset to the noised source before step i."""
        if self.keep is None:
            return None
        return self.keep > float(self.theta[min(i, self.n - 1)])

    def apply(self, i: int, latents: torch.Tensor, noised_source: torch.Tensor | Callable[[], torch.Tensor]) -> torch.Tensor:
        """Reset the latent to the noised source where the keep map exceeds θ_i."""
        m = self.keep_mask(i)
        if m is None:
            return latents
        if callable(noised_source):
            noised_source = noised_source()
        return torch.where(m.to(latents.device), noised_source.to(latents.dtype), latents)

    def finish(self, latents: torch.Tensor, source_latent: torch.Tensor) -> torch.Tensor:
        """After the loop: pixels with no change at all are the clean source latent exactly."""
        if self.keep is None:
            return latents
        m = (self.keep >= 1.0).to(latents.device)
        return torch.where(m, source_latent.to(latents.dtype), latents)

    def start_step(self) -> torch.Tensor | None:
        """Per latent pixel, the first step at which it is no longer reset (for inspection/tests)."""
        if self.keep is None:
            return None
        steps = torch.full_like(self.keep, float(self.n))
        for i in reversed(range(self.n)):
            steps = torch.where(self.keep > float(self.theta[i]), steps, torch.full_like(steps, float(i)))
        return steps
