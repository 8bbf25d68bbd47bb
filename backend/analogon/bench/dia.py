"""Section `dia`: what the inversions of Diffusion Image Analogies cost, and what the cache saves.

Rows (one table; ``part`` says which measurement a row belongs to):

- ``tokens``: the conditioning inversion of one image. UNet forward+backward passes (one batched
  call of ``views`` per iteration), seconds per iteration, memory, at the authors' released
  configuration (10 iterations, BOS trained, no checkpointing) and at our default (200
  iterations) with and without diffusers' block checkpointing. Measured for
  ``--dia-token-iters`` iterations and extrapolated to the full count (``total_s``);
  ``saved_mb_per_it`` = bytes autograd keeps outside checkpointed regions per iteration.
- ``noise/closure``: one L-BFGS closure (a differentiable k-step DDIM + decode) with and without
  gradient checkpointing: UNet forwards (recomputations included) and backwards, seconds,
  activation memory kept for the backward pass (bytes saved by autograd outside checkpointed
  regions: device-independent) and peak memory (CUDA: max allocated; CPU: resident-set growth).
- ``noise/budget``: the reconstruction reached by a budget of L-BFGS closures, from the authors'
  start (B noised to the first timestep) and from DDIM inversion: loss (latent + pixel MSE) and
  PSNR of the decoded reconstruction against B's VAE round trip, UNet passes, seconds. The
  authors' full budget (10 × 20) runs without ``--quick``; their released code also evaluates the
  10-step path once more per outer iteration for its log, up to 10 × (20 + 1) × 10 = 2,100 UNet
  forward+backward passes.
- ``analogy``: a whole `dia` job cold (every inversion), then with every inversion cached (one
  image, and a sweep of 8 variants batched 8 or 1 at a time).

Only the parts named by ``--dia-parts`` are computed: B's encode and round trip, and the
conditioning the noise inversion needs, only for the parts that use them.

Tiny models have random weights: the costs are real for their size, the reconstruction figures
show how the optimiser behaves, not what a trained model reaches.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import time
from typing import Any

import numpy as np

from . import register


def _add_arguments(p) -> None:
    p.add_argument("--dia-model", default="tiny-sd", help="model spec for the dia section (default tiny-sd)")
    p.add_argument("--dia-size", type=int, default=None,
                   help="working size (long side) for the dia section (default: the model's native size)")
    p.add_argument("--dia-token-iters", type=int, default=None,
                   help="token iterations measured before extrapolating (default 20; --quick 5)")
    p.add_argument("--dia-views", type=int, default=None,
                   help="views per token iteration in the analogy part (default: the method's 8)")
    p.add_argument("--dia-noise", default=None, metavar="ITERSxEVALS",
                   help="L-BFGS budget of the analogy part's noise inversion (default 3x10; --quick 1x4; "
                        "0x1 keeps the DDIM inversion)")
    p.add_argument("--dia-sweeps", choices=["on", "off"], default="on",
                   help="the analogy part's sweeps of 8 variants (default on; off on a CPU at full size)")
    p.add_argument("--dia-parts", default=",".join(PARTS),
                   help="comma-separated parts of the dia section to run (default: all); a part "
                        "not asked for is not computed (the analogy part alone inverts nothing "
                        "beyond its own jobs)")


PARTS = ("tokens", "closure", "budget", "analogy")


class _Saved:
    """Bytes autograd keeps for the backward pass while the block runs (outside checkpoints):
    activations only. Each storage is counted once (a tensor saved by several operations, or
    views of one buffer, is one allocation), and the model's weights, which autograd also saves
    (a linear layer keeps its weight for the input's gradient) but which exist anyway, are not
    counted (they once made a 128² step read 32,581 MB)."""

    def __init__(self, *modules):
        self.bytes = 0
        self._params = {p.untyped_storage().data_ptr() for m in modules if m is not None
                        for p in m.parameters()}
        self._seen: set[int] = set()

    def reset(self):
        self.bytes = 0
        self._seen.clear()

    def __enter__(self):
        import torch

        def pack(t):
            try:
                st = t.untyped_storage()
                ptr = st.data_ptr()
                if ptr not in self._params and ptr not in self._seen:
                    self._seen.add(ptr)
                    self.bytes += st.nbytes()
            except (RuntimeError, NotImplementedError):  # tensors without storage
                self.bytes += t.numel() * t.element_size()
            return t

        self._cm = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._cm.__enter__()
        return self

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)


def _image(size_hw: tuple[int, int], seed: int = 0) -> np.ndarray:
    h, w = size_hw
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.zeros((h, w, 4), np.uint8)
    a[..., 0] = xx * 255 // max(1, w - 1)
    a[..., 1] = yy * 255 // max(1, h - 1)
    a[..., 2] = ((xx // 8 + yy // 8) % 2) * 200
    rng = np.random.default_rng(seed)
    y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
    a[y0: y0 + h // 3, x0: x0 + w // 3, :3] = rng.integers(0, 256, 3)
    a[..., 3] = 255
    return a


def _psnr(x, y) -> float:
    mse = float(((x.float() - y.float()) ** 2).mean())  # in [-1, 1]: peak-to-peak 2
    return 99.0 if mse == 0 else 10 * math.log10(4.0 / mse)


def run(opts) -> list[dict[str, Any]]:
    import torch

    from ..core import conditioning_inversion as CI
    from ..core import noise_inversion as NI
    from ..core.cache import Cache
    from ..core.diffusion import make_scheduler, vae_decode, vae_encode
    from ..core.images import to_tensor
    from ..methods import get as get_method
    from ..methods.base import Inputs, JobContext, LayerImage
    from ..models import LoadOptions, load_bundle
    from .pixels import _peak_memory, _sync
    from ._measure import fit_previews, listener, measure

    spec = getattr(opts, "dia_model", None) or "tiny-sd"
    bundle = load_bundle(spec, LoadOptions(device=opts.device))
    if getattr(opts, "dia_size", None):
        bundle.native_size = int(opts.dia_size)
    if bundle.device.type == "cpu":
        torch.set_num_threads(1)  # a shared CPU: one thread each gives steadier medians
    size = bundle.native_size
    steps = 10
    token_iters = getattr(opts, "dia_token_iters", None) or (5 if opts.quick else 20)
    base: dict[str, Any] = {"model": spec, "device": str(bundle.device), "size": f"{size}x{size}",
                            "dtype": str(bundle.unet.dtype).replace("torch.", "")}
    rows: list[dict[str, Any]] = []
    parts = {q.strip() for q in (getattr(opts, "dia_parts", None) or ",".join(PARTS)).split(",") if q.strip()}
    unknown = parts - set(PARTS)
    if unknown:
        raise ValueError(f"unknown dia part(s) {', '.join(sorted(unknown))}; known: {', '.join(PARTS)}")
    dev = bundle.device
    img = _image((size, size))
    # only what the parts asked for: B's tensor for the inversions, its latent for the noise
    # inversion, its VAE round trip for the budget's PSNR (the analogy part needs none of them)
    x = to_tensor(img, (size, size), device=dev) if parts & {"tokens", "closure", "budget"} else None
    z = vae_encode(bundle, x).float() if parts & {"closure", "budget"} else None
    roundtrip = vae_decode(bundle, z) if "budget" in parts else None

    # -- tokens -----------------------------------------------------------------------------
    cond = None
    token_cases = (("authors (10 it, BOS, no ckpt)", 10, True, False),
                   ("ours (200 it, no ckpt)", 200, False, False),
                   ("ours (200 it)", 200, False, True))
    for name, full, train_bos, ckpt in token_cases if "tokens" in parts else ():
        s = CI.ConditioningInversionSettings(iterations=min(token_iters, full), train_bos=train_bos,
                                             steps=steps, stop_loss=0.0, checkpointing=ckpt)
        box: dict[str, Any] = {}
        saved = _Saved(*CI.model_modules(bundle))

        def go(count: bool = False):
            # the memory run is one iteration: saved bytes and the peak are per iteration
            with saved if count else contextlib.nullcontext():
                r = CI.invert_conditioning(bundle, x, dataclasses.replace(s, iterations=1) if count else s)
            if not count:
                box["r"] = r
            _sync(bundle)

        # timed on its own: the memory probes (a polling thread, tracemalloc) slow Python down
        t = time.perf_counter()
        go()
        sec = time.perf_counter() - t
        mem = _peak_memory(bundle, lambda: go(count=True))
        r = box["r"]
        per_it = sec / max(1, r.iterations)
        cond = r.cond
        rows.append({**base, "part": "tokens", "config": name, "iterations": full,
                     "unet_fwd_bwd": full, "batch": s.views, "s_per_it": round(per_it, 4),
                     "total_s": round(per_it * full, 2),
                     "loss": round(r.eval_after, 4), "loss_start": round(r.eval_before, 4),
                     "saved_mb_per_it": round(saved.bytes / 2**20, 1),
                     **{k: round(v, 1) for k, v in mem.items()}})
    if cond is None and parts & {"closure", "budget"}:  # the noise inversion's conditioning
        cond = CI.invert_conditioning(bundle, x, CI.ConditioningInversionSettings(
            iterations=token_iters, steps=steps)).cond

    # -- one closure, checkpointing on/off ---------------------------------------------------
    sched = make_scheduler(bundle, "ddim", steps)
    for ckpt in (False, True) if "closure" in parts else ():
        s = NI.NoiseInversionSettings(steps=steps, checkpointing=ckpt)
        xt = torch.randn_like(z).requires_grad_(True)
        counter = NI.Counter()
        saved = _Saved(*CI.model_modules(bundle))

        def closure(count: bool = False):
            with CI.frozen(*CI.model_modules(bundle)), (saved if count else contextlib.nullcontext()):
                x0, _ = NI.ddim_path(bundle, sched, xt, sched.timesteps, cond, grad=True,
                                     checkpointing=ckpt, counter=counter)
                loss = NI.reconstruction_loss(bundle, x0, z, x, s, grad=True)
            torch.autograd.grad(loss, xt)
            _sync(bundle)

        closure()  # warm-up
        times = []
        for _ in range(max(1, opts.repeat)):  # timed on their own: memory probes slow Python down
            counter.forward = counter.backward = 0
            t = time.perf_counter()
            closure()
            times.append(time.perf_counter() - t)
        sec = statistics.median(times)
        fwd, bwd = counter.forward, counter.backward
        saved.reset()
        mem = _peak_memory(bundle, lambda: closure(count=True))
        counter.forward, counter.backward = fwd, bwd
        rows.append({**base, "part": "noise/closure", "config": f"checkpointing {'on' if ckpt else 'off'}",
                     "unet_fwd": counter.forward, "unet_bwd": counter.backward,
                     "seconds": round(sec, 3), "saved_mb": round(saved.bytes / 2**20, 1),
                     **{k: round(v, 1) for k, v in mem.items()}})

    # -- reconstruction per budget --------------------------------------------------------------
    budgets = [(0, 1), (1, 4), (2, 4), (3, 10), (4, 8)]
    for init in ("noised", "ddim_inversion") if "budget" in parts else ():
        for it, ev in budgets + ([(10, 20)] if init == "noised" and not opts.quick else []):
            s = NI.NoiseInversionSettings(steps=steps, iterations=it, evaluations=ev, init=init,
                                          stop_loss=0.0)
            t = time.perf_counter()
            r = NI.invert_noise(bundle, z, x, cond, s)
            _sync(bundle)
            sec = time.perf_counter() - t
            rows.append({**base, "part": "noise/budget", "config": f"{init} {it}x{ev}"
                         + (" (authors)" if (init, it, ev) == ("noised", 10, 20) else "")
                         + (" (ours)" if (init, it, ev) == ("ddim_inversion", 3, 10) else ""),
                         "closures": r.closures, "unet_fwd": r.unet_forward, "unet_bwd": r.unet_backward,
                         "seconds": round(sec, 2), "loss": round(r.loss_final, 4),
                         "latent_mse": round(float(((r.reconstruction - z) ** 2).mean()), 5),
                         "psnr_vs_vae_db": round(_psnr(vae_decode(bundle, r.reconstruction), roundtrip), 2),
                         "psnr_vs_image_db": round(_psnr(vae_decode(bundle, r.reconstruction), x), 2)})

    # -- a whole job: cold, then cached --------------------------------------------------------
    method = get_method("dia")
    a = _image((size, size), 1)
    a2 = a.copy()
    a2[size // 4: size // 2, size // 4: size // 2, :3] = (240, 30, 30)
    inputs = Inputs({"a": LayerImage(a, "bench-a"), "a_prime": LayerImage(a2, "bench-a2"),
                     "b": LayerImage(img, "bench-b")})
    cache = Cache(None)
    fit_previews(bundle) if "analogy" in parts else None  # once per VAE, as at model load
    n_it, n_ev = (1, 4) if opts.quick else (3, 10)
    if getattr(opts, "dia_noise", None):
        n_it, n_ev = (int(v) for v in opts.dia_noise.lower().split("x"))
    quick_inv = dict(token_iterations=token_iters, noise_iterations=n_it, noise_evaluations=n_ev)
    if getattr(opts, "dia_views", None):
        quick_inv["views"] = int(opts.dia_views)
    configs = [("cold (all inversions)", dict(quick_inv)), ("cached, 1 image", dict(quick_inv))]
    if getattr(opts, "dia_sweeps", "on") != "off":
        configs += [
            ("cached, sweep 8 batched 8", dict(quick_inv, sweep=True, sweep_batch=8,
                                               sweep_strengths=[0, .25, .5, .75, 1, 1.25, 1.5, 2])),
            ("cached, sweep 8 one by one", dict(quick_inv, sweep=True, sweep_batch=1,
                                                sweep_strengths=[0, .25, .5, .75, 1, 1.25, 1.5, 2]))]
    for name, params in configs if "analogy" in parts else ():
        p = method.Params(**params)
        row, res = measure(bundle, lambda: method.run(JobContext(bundle, cache, 0, preview=listener), inputs, p))
        sec = row.pop("wall_s")
        rows.append({**base, "part": "analogy", "config": name, "images": len(res.images),
                     "seconds": round(sec, 3), "s_per_image": round(sec / len(res.images), 3),
                     "token_iterations": token_iters, **row})
    if "analogy" in parts:  # the plain pipeline doing the same sampling: 10-step DDIM, CFG 3, one image
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        pipe = (StableDiffusionXLPipeline if bundle.is_sdxl else StableDiffusionPipeline).from_pipe(bundle.pipe)
        pipe.set_progress_bar_config(disable=True)
        p = method.Params()
        lat = torch.randn((1, 4, size // bundle.vae_scale_factor, size // bundle.vae_scale_factor),
                          generator=torch.Generator().manual_seed(0)).to(dev, bundle.unet.dtype)

        def txt2img():
            pipe.scheduler = make_scheduler(bundle, "ddim", p.steps)
            with torch.no_grad():
                pipe(prompt="a photo", height=size, width=size, num_inference_steps=p.steps,
                     guidance_scale=p.guidance, latents=lat, output_type="np")

        row, _ = measure(bundle, txt2img)
        sec = row.pop("wall_s")
        rows.append({**base, "part": "analogy", "config": "diffusers txt2img (same steps, CFG)",
                     "images": 1, "seconds": round(sec, 3), "s_per_image": round(sec, 3), **row})
        hit = next((r for r in rows if r.get("config") == "cached, 1 image"), None)
        if hit is not None and row.get("cpu_s"):
            hit["vs_txt2img_cpu"] = round(hit["cpu_s"] / row["cpu_s"], 3)
    return rows


register("dia", run, "Diffusion Image Analogies: inversion cost vs the authors' settings, cache hits",
         _add_arguments)
