"""Latent surgery: exemplars pasted into a source latent under their regions (PIXELS §3, Alg. 1
line 10 and Alg. 2 lines 14/20), plus the small pixel-space helpers it needs.

The surgical latent z_surg = M ⊙ z_exemplar + (1 − M) ⊙ z_source is the paper's step-0 latent:
the copy-paste composite whose decoded image has seams, which the progressive denoising then
harmonises. With several exemplars the paste is nested, one region per exemplar, later exemplars
on top of earlier ones (the layer order on the canvas).

Here every image keeps *one fixed noise* ε for the whole loop, and ``SurgicalLatents.at(t)``
gives the surgical composite of the images each noised to timestep t:

    z_t = noised(z_src, ε_src, t)  with  noised(z_k, ε_k, t) pasted under region M_k, k = 1..K

At the loop's first timestep that is PIXELS' step-0 latent; at later timesteps it is the latent
an edit-map reset goes back to (see ``analogon.core.editmap.EditSchedule``). Where an exemplar is
pasted only where its map asks for full change (the authors' rule), resets do not reach the
pasted pixels (but for the map's filtered edge) and ``at(t)`` is the authors' "noised source"
wherever a reset happens; with a lower paste threshold a pasted pixel is held at the *noised
exemplar* until its own start step, so that a partly-changing pixel becomes a partial edit of the
exemplar rather than being reset to the source and losing it.

Noising is one timestep at a time through ``analogon.core.diffusion.noised`` (immune to the
``set_begin_index`` pitfall of some schedulers). Nothing is kept per step, so memory does not
grow with the number of steps; a composite costs one ``add_noise`` (see ``SurgicalLatents``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .compositing import map_to_grid, snap_unit  # noqa: F401  (snap_unit re-exported)
from .diffusion import noised
from .images import over

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), x1/y1 exclusive


# -- maps at latent size: one function for every method (``core.compositing.map_to_grid``) ------

def map_to_latent(m: np.ndarray, latent_size: tuple[int, int], device=None,
                  dtype=torch.float32) -> torch.Tensor:
    """An (H, W) map in [0, 1] to (1, 1, h, w) at ``latent_size`` = (w, h), area-weighted and
    snapped: ``core.compositing.map_to_grid``."""
    return map_to_grid(m, latent_size, device=device, dtype=dtype)


def bbox(m: np.ndarray) -> Box | None:
    """Bounding box of the non-zero pixels of an (H, W) map, or None when it is all zero."""
    ys, xs = np.nonzero(m > 0)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def context_box(box: Box, size: tuple[int, int], margin: float, min_side: int = 32,
                max_aspect: float = 4.0) -> Box:
    """``box`` grown by ``margin`` × its long side on every side (the context the model sees
    around the edit), at least ``min_side`` pixels a side, no more elongated than
    ``max_aspect`` where the image allows, clipped to the image of ``size`` = (W, H)."""
    W, H = size
    x0, y0, x1, y1 = box
    pad = margin * max(x1 - x0, y1 - y0)
    x0, y0, x1, y1 = x0 - pad, y0 - pad, x1 + pad, y1 + pad

    def grow(a: float, b: float, want: float, limit: int) -> tuple[float, float]:
        want = min(want, limit)
        if b - a >= want:
            return a, b
        extra = (want - (b - a)) / 2
        a, b = a - extra, b + extra
        if a < 0:
            a, b = 0, b - a
        if b > limit:
            a, b = a - (b - limit), limit
        return max(0, a), min(limit, b)

    x0, x1 = grow(x0, x1, min_side, W)
    y0, y1 = grow(y0, y1, min_side, H)
    x0, x1 = grow(x0, x1, (y1 - y0) / max_aspect, W)
    y0, y1 = grow(y0, y1, (x1 - x0) / max_aspect, H)
    x0, y0 = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
    x1, y1 = min(W, int(np.ceil(x1))), min(H, int(np.ceil(y1)))
    return x0, y0, x1, y1


def crop(a: np.ndarray, box: Box) -> np.ndarray:
    x0, y0, x1, y1 = box
    return a[y0:y1, x0:x1]


def composite_over(top: np.ndarray, base: np.ndarray) -> np.ndarray:
    """RGBA ``top`` over RGBA ``base`` (same size), straight alpha: the RGB of an exemplar as it
    would look pasted on the source, opaque. The VAE then encodes the exemplar with the source
    around it rather than with black transparent pixels, so nothing dark bleeds into the latent
    at the exemplar's edge (the authors zero-pad instead)."""
    out = over(top, base).copy()
    out[..., 3] = 255
    return out


def paste_region(alpha: np.ndarray, change: np.ndarray | None, alpha_threshold: float,
                 paste_threshold: float, latent_size: tuple[int, int], device=None) -> torch.Tensor:
    """Where an exemplar is pasted, as a bool (1, 1, h, w) at latent size.

    Decided in pixels, where the painter sees it: the exemplar's opacity is at least
    ``alpha_threshold`` and its change map at least ``paste_threshold`` (no map: change
    everywhere). A latent pixel is pasted when most of its footprint is (filtered value ≥ ½), so
    that a small exemplar under a soft-edged map is not lost to the map's filtering."""
    px = paste_pixels(alpha, change, alpha_threshold, paste_threshold)
    return map_to_latent(px.astype(np.float32), latent_size, device=device) >= 0.5


def paste_pixels(alpha: np.ndarray, change: np.ndarray | None, alpha_threshold: float,
                 paste_threshold: float) -> np.ndarray:
    """The pixels an exemplar is pasted on (bool (H, W)): the rule of :func:`paste_region`.
    The opacity comes as 8-bit alpha, so it is compared to the nearest level: a layer at
    exactly 50 % (Krita stores 127 or 128 of 255) passes a threshold of 0.5."""
    px = alpha >= alpha_threshold - 0.5 / 255
    if change is not None:
        px = px & (change >= paste_threshold - 1e-4)
    return px


# -- the surgical latent ------------------------------------------------------------------------

@dataclass
class Paste:
    """One exemplar in latent space: its clean latent, its fixed noise, its region (bool)."""

    latent: torch.Tensor  # (1, C, h, w)
    noise: torch.Tensor  # (1, C, h, w)
    region: torch.Tensor  # (1, 1, h, w) bool


def surgery(base: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``base`` with each (latent, region) pasted in order, later ones on top."""
    out = base
    for latent, region in layers:
        out = torch.where(region.to(out.device), latent.to(out.dtype), out)
    return out


class SurgicalLatents:
    """The source and its exemplars, each with one fixed noise, composited at any timestep.

    ``add_noise`` is elementwise and linear in (x₀, ε) with per-timestep scalars, so the
    composite of the noised images equals the noised composite of the clean latents with the
    composite of their noises, bit for bit. Both composites are made once; a step then costs one
    ``add_noise``, as in plain img2img."""

    def __init__(self, scheduler, source: torch.Tensor, source_noise: torch.Tensor,
                 pastes: list[Paste] | tuple[Paste, ...] = ()):
        self.scheduler = scheduler
        self.source = source
        self.source_noise = source_noise
        self.pastes = list(pastes)
        self._x0 = surgery(source, [(p.latent, p.region) for p in self.pastes])
        self._eps = surgery(source_noise, [(p.noise, p.region) for p in self.pastes])

    def clean(self) -> torch.Tensor:
        """The surgical latent without noise (decode it to see the copy-paste composite)."""
        return self._x0

    def noise(self) -> torch.Tensor:
        """The fixed noise of every latent pixel: its own image's noise."""
        return self._eps

    def noised_source(self, t) -> torch.Tensor:
        return noised(self.scheduler, self.source, self.source_noise, t)

    def at(self, t) -> torch.Tensor:
        """The surgical composite of the images noised to timestep ``t``."""
        return noised(self.scheduler, self._x0, self._eps, t)
