"""Progress previews that cost nothing: latents to RGB without the VAE.

A Stable Diffusion latent is close to a linear image of its picture at 1/8 of the resolution:
each latent pixel's channels, mixed by a 3×C matrix plus a bias, give the colour of its 8×8
block of the decoded picture (the idea behind the "latent previews" of painters' front ends).
The matrix is not borrowed from anywhere: it is fitted once per VAE, by least squares, from a few
decodes of the model's *own* VAE (:func:`fit`; a few small synthetic pictures with flat colour
patches and gradients, encoded and decoded). A fine-tuned model or another VAE gets its own fit.

When the fit happens: when a model loads (:func:`prepare`, the model manager's load hook in the
server), in a background thread, never inside a job. With a cache folder the fit is kept on disk
under a digest of the VAE's *content* (:func:`vae_digest`: the VAE's safetensors file when it came
from one, else its parameters' bytes), so it is done once per VAE, ever: every later load — another
process, another model with the same VAE — reads it back (a few hundred bytes) and makes no VAE
call. On a CPU the fit itself (the VAE's encodes and decodes, not the digest or the read from
disk) runs at a lower priority (:data:`FIT_NICE`, Linux) so that a job running beside it keeps
the processor.

A VAE whose projection is on disk and whose digest is known without hashing a file (a stat,
or a VAE small enough to hash in milliseconds) is read at load, before the first job; otherwise
a job that arrives before the fit is ready **does not wait for it**: it sends progress as usual
and no preview until the fit is ready (:func:`ready`), then previews as every later job does. The
first job on a model is therefore as fast as the hundredth (``analogon bench first``); only the
first job ever on a new VAE starts its previews a little later.

Cost per preview: one (3×C) matrix product over the latent grid and a bilinear resize — tens of
microseconds at 512², against a VAE decode of ≈ 21 s on one CPU thread (≈ 1.4 guided UNet calls).
The fit itself costs a few small encodes and decodes, once per VAE (``analogon bench`` reports it).

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

import hashlib
import json
import logging
import os
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

FIT_VERSION = 2  # 2: kept under the VAE's content digest (1: under the model's key)
PREVIEW_LONG_SIDE = 256
FIT_NICE = 10  # on a CPU the fit thread runs this much nicer than the process (Linux, per thread)
_lock = threading.Lock()
# per VAE module: its projection once ready, and the fit started for it (see prepare)
_fitted: "weakref.WeakKeyDictionary[torch.nn.Module, LatentPreview]" = weakref.WeakKeyDictionary()
_fits: "weakref.WeakKeyDictionary[torch.nn.Module, Fit]" = weakref.WeakKeyDictionary()
# the stat identity of a VAE's source (its file, or a single-file checkpoint) -> its content digest
_digests: dict[tuple, str] = {}
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


# -- the VAE's identity: a digest of its content ----------------------------------------------

def _vae_files(bundle) -> list[Path] | None:
    """The safetensors file(s) the bundle's VAE was read from: a diffusers folder's
    ``vae/diffusion_pytorch_model.safetensors`` (or its shards), the file the loader reads (it
    asks for no variant). None for a VAE built in code or taken from a single-file checkpoint."""
    if getattr(bundle, "source", None) == "single_file":
        return None
    folder = getattr(getattr(bundle.vae, "config", None), "_name_or_path", None)
    if not folder or not os.path.isdir(folder):
        return None
    folder = Path(folder)
    one = folder / "diffusion_pytorch_model.safetensors"
    if one.is_file():
        return [one]
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    paths = [folder / name for name in shards]
    return paths if paths and all(q.is_file() for q in paths) else None


def _stat(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


def _hash_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def _hash_parameters(vae) -> str:
    """SHA-256 over the VAE's tensors (names, shapes, values as float32: the same weights read in
    float16 or float32 give one digest), in name order."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in sorted(vae.state_dict().items()):
            t = t.detach().cpu()
            t = (t.float() if t.is_floating_point() else t).contiguous()
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _digest_entry(cache, identity: tuple) -> str:
    return cache.key("vae-digest", "stat", identity=list(identity))


def _identity(bundle) -> tuple | None:
    """What a VAE's digest is remembered under (None: a VAE built in code, always hashed)."""
    files = _vae_files(bundle)
    if files is not None:
        return ("file", *(_stat(q) for q in files))
    if str(getattr(bundle, "key", "")).startswith("file:"):
        return ("model", bundle.key, str(bundle.vae.dtype))
    return None


QUICK_HASH_PARAMETERS = 20_000_000  # a VAE built in code this small is hashed in milliseconds


def _digest_is_cheap(bundle, cache) -> bool:
    """Whether :func:`vae_digest` answers without reading a file or hashing large tensors."""
    identity = _identity(bundle)
    if identity is None:
        return sum(t.numel() for t in bundle.vae.parameters()) <= QUICK_HASH_PARAMETERS
    return identity in _digests or (cache is not None
                                    and cache.get(_digest_entry(cache, identity)) is not None)


def vae_digest(bundle, cache=None) -> str:
    """What the bundle's VAE *is*, as a string: ``file:<sha256>`` of the safetensors file(s) it
    came from, else ``params:<sha256>`` of its parameters. A file's digest is remembered under
    the file's path, size, mtime and inode (and a single-file checkpoint's under the model's key
    and the VAE's dtype) — in this process and, with a cache, on disk — so that hashing happens
    once per file, not once per load."""
    files = _vae_files(bundle)
    identity = _identity(bundle)  # None: built in code (its parameters may change with the code)
    if identity is not None:
        hit = _digests.get(identity)
        if hit is None and cache is not None:
            entry = cache.get(_digest_entry(cache, identity))
            if entry is not None and "sha256" in entry:
                hit = entry["sha256"].numpy().tobytes().decode("ascii", "replace")
        if hit is not None:
            _digests[identity] = hit
            return hit
    digest = "file:" + _hash_files(files) if files is not None else "params:" + _hash_parameters(bundle.vae)
    if identity is not None:
        _digests[identity] = digest
        if cache is not None:
            cache.put(_digest_entry(cache, identity),
                      {"sha256": torch.frombuffer(bytearray(digest.encode("ascii")), dtype=torch.uint8)})
    return digest


def _cache_key(cache, bundle) -> str:
    vae = bundle.vae.config
    return cache.key("latent-preview", vae_digest(bundle, cache), version=FIT_VERSION,
                     latent_channels=int(vae.latent_channels), scaling=float(vae.scaling_factor),
                     shift=float(getattr(vae, "shift_factor", None) or 0.0))


# -- the fit, at model load ---------------------------------------------------------------------

@dataclass
class Fit:
    """A preview fit for one VAE, started by :func:`prepare`: ``wait()`` for it; ``source`` says
    where the projection came from ("disk": the cache, "fitted": the VAE's own decodes)."""

    done: threading.Event = field(default_factory=threading.Event)
    source: str | None = None
    error: str | None = None
    seconds: float = 0.0  # from start to ready (wall)
    digest_seconds: float = 0.0  # of which: the VAE's digest
    thread: threading.Thread | None = field(default=None, repr=False)

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    @property
    def ready(self) -> bool:
        return self.done.is_set() and self.error is None


def _lower_priority() -> None:
    """Make the calling thread (and the worker threads it starts) nicer: Linux keeps a niceness
    per thread. Raising it needs no privilege; elsewhere nothing happens."""
    if not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + FIT_NICE))
    except (OSError, AttributeError):
        pass


def _from_disk(bundle, cache, state: Fit) -> tuple[str, LatentPreview | None]:
    """The cache's key for the bundle's VAE and the projection stored under it, if any."""
    t = time.perf_counter()
    key = _cache_key(cache, bundle)
    state.digest_seconds = time.perf_counter() - t
    entry = cache.get_entry(key)
    if entry is None:
        return key, None
    t_, meta = entry
    state.source = "disk"
    return key, LatentPreview(t_["weight"].float(), t_["bias"].float(), bundle.vae_scale_factor,
                              float(meta.get("error", float("nan"))),
                              float(meta.get("baseline_error", float("nan"))), 0.0)


def _obtain(bundle, cache, state: Fit, background: bool = False) -> LatentPreview:
    """The projection from the cache (no VAE call), else fitted now and stored; in a background
    thread on a CPU the fit (not the cache's read) runs at a lower priority."""
    key = None
    if cache is not None:
        key, stored = _from_disk(bundle, cache, state)
        if stored is not None:
            return stored
    if background and getattr(bundle.device, "type", "cpu") == "cpu":
        _lower_priority()
    p = fit(bundle)
    state.source = "fitted"
    if key is not None:
        cache.put(key, p.to_tensors(), {"error": p.error, "baseline_error": p.baseline_error,
                                        "seconds": p.seconds})
    return p


def _run(bundle, cache, state: Fit, background: bool) -> None:
    t0 = time.perf_counter()
    try:
        p = _obtain(bundle, cache, state, background)
        with _lock:
            _fitted[bundle.vae] = p
    except Exception as e:  # a model without previews still runs its jobs
        state.error = f"{type(e).__name__}: {e}"
        log.warning("latent previews unavailable for %s: %s", getattr(bundle, "spec", "?"), state.error)
    finally:
        state.seconds = time.perf_counter() - t0
        state.done.set()


def _offloaded(bundle) -> bool:
    """Whether accelerate's offload hooks move the models between devices on each call (the
    ``cpu_offload`` load option): a VAE call from another thread would then move the UNet away
    in the middle of a job's step."""
    return any(hasattr(m, "_hf_hook") for m in (bundle.vae, getattr(bundle, "unet", None)) if m is not None)


def prepare(bundle, cache=None, background: bool = True) -> Fit:
    """At model load: have the VAE's projection ready for the jobs to come — read from the cache
    or fitted, in a background thread unless ``background`` is False (or the models are offloaded
    between devices: then here and now, a few small VAE calls before the first job). Returns the
    fit (one per VAE: a second call returns the first's, running or done)."""
    vae = bundle.vae
    with _lock:
        state = _fits.get(vae)
        if state is not None and (not state.done.is_set() or vae in _fitted or state.error):
            return state
        state = Fit()
        if vae in _fitted:  # fitted by hand (previewer) before any load hook
            state.source = "memory"
            state.done.set()
            _fits[vae] = state
            return state
        _fits[vae] = state
    if background and cache is not None and _digest_is_cheap(bundle, cache):
        # Known VAE: read its projection now (a stat and a small file), so that even the
        # first job, arriving at once, has previews; only hashing and fitting go to a thread.
        t0 = time.perf_counter()
        try:
            _, stored = _from_disk(bundle, cache, state)
        except Exception:  # a damaged entry: the background path fits again
            stored = None
        if stored is not None:
            with _lock:
                _fitted[vae] = stored
            state.seconds = time.perf_counter() - t0
            state.done.set()
            return state
    if background and not _offloaded(bundle):
        state.thread = threading.Thread(target=_run, args=(bundle, cache, state, True),
                                        name="analogon-preview-fit", daemon=True)
        state.thread.start()
    else:
        _run(bundle, cache, state, False)
    return state


def ready(bundle) -> LatentPreview | None:
    """The VAE's projection if it is ready; None while its fit runs (never waits)."""
    return _fitted.get(bundle.vae)


def previewer(bundle, cache=None) -> LatentPreview:
    """The projection for the bundle's VAE, waiting for it: read or fitted now unless a fit is
    already under way (then its remainder). For the bench and tests; jobs use :func:`ready`."""
    hit = _fitted.get(bundle.vae)
    if hit is not None:
        return hit
    state = prepare(bundle, cache, background=False)
    state.wait()
    hit = _fitted.get(bundle.vae)
    if hit is None:
        raise RuntimeError(f"latent preview fit failed: {state.error}")
    return hit


def forget(bundle=None) -> None:
    """Drop what this process knows (one VAE's projection and fit, or everything including the
    remembered digests): what a new process starts with. The disk cache is left alone."""
    with _lock:
        if bundle is None:
            _fitted.clear()
            _fits.clear()
            _digests.clear()
        else:
            _fitted.pop(bundle.vae, None)
            _fits.pop(bundle.vae, None)


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
    when no one listens, nor while the VAE's fit is not ready (it never waits for it). Never calls
    the VAE: the fit runs in its own thread (:func:`prepare`)."""
    if latents is None or not wants(ctx):
        return
    p = ready(ctx.model)
    if p is None:  # the fit is under way (or the model was loaded without the load hook)
        prepare(ctx.model, ctx.cache)
        return
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
