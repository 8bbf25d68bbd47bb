"""Progress previews that cost nothing: latents to RGB without the VAE.

A Stable Diffusion latent is close to a linear image of its picture at 1/8 of the resolution:
each latent pixel's channels, mixed by a 3×C matrix plus a bias, give the colour of its 8×8
block of the decoded picture (the idea behind the "latent previews" of painters' front ends).
The matrix is not borrowed from anywhere: it is fitted once per VAE, by least squares, from a few
decodes of the model's *own* VAE (:func:`fit`; a few small synthetic pictures with flat colour
patches and gradients, encoded and decoded), kept in memory for the VAE and, with a cache, on
disk under the model's key. A fine-tuned model or another VAE gets its own fit.

Cost per preview: one (3×C) matrix product over the latent grid and a bilinear resize — tens of
microseconds at 512², against a VAE decode of ≈ 21 s on one CPU thread (≈ 1.4 guided UNet calls).
The fit itself costs about as much as one 512² decode, once per VAE (``analogon bench`` reports it).

Methods call :func:`preview_latents` every few steps (:func:`every`) with the scheduler's
prediction of the clean latent (``pred_original_sample``): it does nothing when nobody listens,
never calls the VAE, and the full VAE decodes only the result.

What a listener receives is the result-to-be, not the model's whole frame: a
:class:`PreviewFrame` places the projection where the method works on the job's target (its
crop box, if any) and gives it the job's change map as alpha, so that a preview shown as a
layer over the target changes nothing where the map says "keep" (alpha exactly 0 there, with
two preview pixels of margin, so that the listener's bilinear enlargement cannot bleed into
them either).
"""
from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

FIT_VERSION = 1
PREVIEW_LONG_SIDE = 256
_lock = threading.Lock()
_fitted: "weakref.WeakKeyDictionary[torch.nn.Module, LatentPreview]" = weakref.WeakKeyDictionary()
# previews made in this process and the seconds they took (projection and the listener's own
# work, e.g. the server's PNG encode): what ``analogon bench`` reports as a job's preview cost
STATS = {"previews": 0, "seconds": 0.0}


@dataclass
class LatentPreview:
    """rgb = weight · z + bias per latent pixel, in [-1, 1] (z: the scaled latents the UNet sees)."""

    weight: torch.Tensor  # (3, C) float32
    bias: torch.Tensor  # (3,) float32
    factor: int  # pixels per latent pixel (the VAE's scale factor)
    error: float = float("nan")  # mean absolute error against the VAE's decode, 0–255 levels
    baseline_error: float = float("nan")  # the same for the best constant colour (what a fit beats)
    seconds: float = 0.0  # time the fit took (0 when read from the cache)

    def project(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents → (B, 3, h, w) RGB in [-1, 1] at latent resolution (float32)."""
        z = latents.detach().float().cpu()
        out = torch.einsum("oc,bchw->bohw", self.weight, z) + self.bias.view(1, 3, 1, 1)
        return out.clamp(-1.0, 1.0)

    def rgb(self, latents: torch.Tensor, long_side: int = PREVIEW_LONG_SIDE) -> np.ndarray:
        """The first latent of the batch as an (H, W, 3) uint8 picture: the projection, resized
        bilinearly to at most ``long_side`` pixels (never beyond the VAE's own resolution)."""
        x = self.project(latents[:1])
        h, w = x.shape[-2:]
        s = min(float(self.factor), long_side / max(h, w))
        if s > 1.0:
            size = (max(1, round(h * s)), max(1, round(w * s)))
            x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return ((x[0] + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "bias": self.bias}


def fit_images(size: int, n: int = 3, seed: int = 0) -> np.ndarray:
    """``n`` synthetic RGB pictures (n, size, size, 3) uint8 that span the colour space: a grid of
    flat patches of random colours (saturated and grey ones) with smooth gradients between rows."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), np.uint8)
    cells = 4
    c = size // cells
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(1, size - 1)
    for k in range(n):
        img = np.empty((size, size, 3), np.float32)
        for i in range(cells):
            for j in range(cells):
                col = rng.integers(0, 256, 3).astype(np.float32)
                if rng.random() < 0.25:  # some greys, from black to white
                    col[:] = col[0]
                img[i * c:(i + 1) * c, j * c:(j + 1) * c] = col
        if k % 2 == 1:  # gradients across the patches
            grad = np.stack([xx, yy, 1 - xx], -1) * 255.0
            img = 0.5 * img + 0.5 * grad
        out[k] = np.clip(img, 0, 255).astype(np.uint8)
    return out


@torch.no_grad()
def fit(bundle, images: np.ndarray | None = None, size: int | None = None) -> LatentPreview:
    """Fit the projection on the bundle's own VAE: encode a few pictures (distribution means),
    decode them, and regress each decoded 8×8 block's mean colour on its latent pixel."""
    from .diffusion import vae_decode, vae_encode

    t0 = time.perf_counter()
    f = bundle.vae_scale_factor
    if images is None:
        size = size or max(4 * f, min(128, bundle.native_size))
        size = max(2 * f, size // f * f)
        images = fit_images(size)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    z = torch.cat([vae_encode(bundle, x[i:i + 1]) for i in range(len(x))]).float()
    dec = torch.cat([vae_decode(bundle, z[i:i + 1]) for i in range(len(z))]).float().cpu()
    target = torch.nn.functional.avg_pool2d(dec, f)  # (n, 3, h, w): the decode per latent pixel
    zc = z.cpu()
    if zc.shape[-1] > 4 and zc.shape[-2] > 4:  # the decoder's borders are not what it does inside
        zc, target = zc[..., 1:-1, 1:-1], target[..., 1:-1, 1:-1]
    c = zc.shape[1]
    X = zc.permute(0, 2, 3, 1).reshape(-1, c).double()
    Y = target.permute(0, 2, 3, 1).reshape(-1, 3).double()
    X1 = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    ridge = 1e-4 * torch.eye(c + 1, dtype=X.dtype)
    ridge[-1, -1] = 0.0
    sol = torch.linalg.solve(X1.T @ X1 + ridge, X1.T @ Y)  # (C+1, 3)
    weight, bias = sol[:c].T.float().contiguous(), sol[c].float().contiguous()
    pred = (X1 @ sol).clamp(-1, 1)
    err = float((pred - Y).abs().mean() * 127.5)
    base = float((Y - Y.mean(0)).abs().mean() * 127.5)
    return LatentPreview(weight, bias, f, err, base, time.perf_counter() - t0)


def _cache_key(cache, bundle) -> str:
    vae = bundle.vae.config
    return cache.key("latent-preview", bundle.key, version=FIT_VERSION,
                     latent_channels=int(vae.latent_channels),
                     scaling=float(vae.scaling_factor), dtype=str(bundle.vae.dtype))


def previewer(bundle, cache=None) -> LatentPreview:
    """The projection for the bundle's VAE: fitted on first use (once per VAE), then kept in
    memory for the VAE and, when a cache is given, on disk under the model's key."""
    vae = bundle.vae
    with _lock:
        hit = _fitted.get(vae)
        if hit is not None:
            return hit
        key = _cache_key(cache, bundle) if cache is not None else None
        entry = cache.get_entry(key) if key is not None else None
        if entry is not None:
            t, meta = entry
            p = LatentPreview(t["weight"].float(), t["bias"].float(), bundle.vae_scale_factor,
                              float(meta.get("error", float("nan"))),
                              float(meta.get("baseline_error", float("nan"))), 0.0)
        else:
            p = fit(bundle)
            if key is not None:
                cache.put(key, p.to_tensors(), {"error": p.error, "baseline_error": p.baseline_error,
                                                "seconds": p.seconds})
        _fitted[vae] = p
        return p


prepare = previewer  # at model load: ``previews.prepare(bundle, cache)`` fits before any job


KEEP_MARGIN = 2  # preview pixels of alpha 0 around every "keep" pixel of the change map


@dataclass
class PreviewFrame:
    """The job's target as previews show it: its size, its change map (None: all may change)
    and the box the method's picture covers (set by a method that works on a crop)."""

    size: tuple[int, int]  # (width, height) of the target
    change: np.ndarray | None  # (H, W) float in [0, 1], the target's full resolution
    box: tuple[int, int, int, int] | None = None  # (x0, y0, x1, y1) on the target
    long_side: int = PREVIEW_LONG_SIDE
    _alpha: np.ndarray | None = field(default=None, init=False, repr=False)

    @property
    def scale(self) -> float:
        return min(1.0, self.long_side / max(self.size))

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the composed preview."""
        w, h = self.size
        return max(1, round(h * self.scale)), max(1, round(w * self.scale))

    def alpha(self) -> np.ndarray:
        """(h, w) uint8 at the preview's size: the change map's mean over each preview pixel,
        0 within KEEP_MARGIN preview pixels of any pixel the map keeps exactly (computed once)."""
        if self._alpha is None:
            h, w = self.shape
            if self.change is None:
                self._alpha = np.full((h, w), 255, np.uint8)
            else:
                c = np.clip(np.asarray(self.change, np.float32), 0.0, 1.0)
                mean = np.asarray(Image.fromarray(c, "F").resize((w, h), Image.Resampling.BOX))
                # a preview pixel that covers any exact 0 ("keep") is 0; the keep area grows
                # by the margin
                full = np.asarray(Image.fromarray(((c > 0) * 255).astype(np.uint8))
                                  .resize((w, h), Image.Resampling.BOX)) == 255
                for _ in range(KEEP_MARGIN):
                    grown = full.copy()
                    grown[1:, :] &= full[:-1, :]
                    grown[:-1, :] &= full[1:, :]
                    grown[:, 1:] &= full[:, :-1]
                    grown[:, :-1] &= full[:, 1:]
                    full = grown
                self._alpha = np.where(full, np.rint(mean * 255), 0).astype(np.uint8)
        return self._alpha

    def compose(self, rgb: np.ndarray) -> np.ndarray:
        """The method's picture (its box, any size) as an (h, w, 4) uint8 preview of the whole
        target: placed in its box, with the change map as alpha (0 outside the box)."""
        h, w = self.shape
        out = np.zeros((h, w, 4), np.uint8)
        x0, y0, x1, y1 = self.box or (0, 0, *self.size)
        s = self.scale
        bx0, by0 = round(x0 * s), round(y0 * s)
        bx1, by1 = max(bx0 + 1, round(x1 * s)), max(by0 + 1, round(y1 * s))
        bx1, by1 = min(bx1, w), min(by1, h)
        if bx1 <= bx0 or by1 <= by0:
            return out
        pic = Image.fromarray(np.ascontiguousarray(np.asarray(rgb, np.uint8)[..., :3]))
        out[by0:by1, bx0:bx1, :3] = np.asarray(
            pic.resize((bx1 - bx0, by1 - by0), Image.Resampling.BILINEAR))
        alpha = np.zeros((h, w), np.uint8)
        alpha[by0:by1, bx0:bx1] = self.alpha()[by0:by1, bx0:bx1]
        out[..., 3] = alpha
        return out


def every(n_steps: int, previews: int = 8) -> int:
    """A preview every this many steps: about ``previews`` per loop, at least every step."""
    return max(1, -(-n_steps // max(1, previews)))


def wants(ctx) -> bool:
    return getattr(ctx, "wants_preview", False)


def preview_latents(ctx, latents: torch.Tensor, step: int | None = None) -> None:
    """Send the projection of ``latents`` (the first of the batch) as the job's preview; nothing
    when no one listens. Never calls the VAE (beyond the one-time fit)."""
    if latents is None or not wants(ctx):
        return
    p = previewer(ctx.model, ctx.cache)
    t = time.perf_counter()
    ctx.preview(p.rgb(latents), step)
    STATS["previews"] += 1
    STATS["seconds"] += time.perf_counter() - t


def step_previews(ctx, n_steps: int, previews: int = 8):
    """For ``core.diffusion.sample``'s ``on_prediction``: a preview of the predicted clean latent
    every few steps (not after the last: the result follows)."""
    k = every(n_steps, previews)

    def cb(i: int, x0: torch.Tensor | None) -> None:
        if x0 is not None and (i + 1) % k == 0 and i + 1 < n_steps:
            preview_latents(ctx, x0, i + 1)

    return cb
