"""Section `pixels`: a PIXELS pass against plain img2img on the same components.

Both sides start from the same source image and run the same scheduler, steps, strength,
guidance and prompt, and both include the VAE encode and decode:
- ``img2img``: diffusers' own ``StableDiffusion(XL)Img2ImgPipeline`` built with ``from_pipe`` on
  the bundle's components (the baseline the paper's overhead claim is about);
- ``pixels map``: the pixels method with a graded (radial) edit map and no exemplar;
- ``pixels map+exemplar``: the same with one exemplar placed on the canvas (one more VAE encode).

Reported per case (``bench._measure``): the median wall and CPU seconds of ``--repeat`` runs
(after one warm-up unless ``--no-warmup``, cases interleaved) and their ratios to img2img (the
paper reports a small overhead) with the machine's load over the runs (``load_1m``, ``load_max``),
``beyond_enc_ratio``: the CPU-time ratio with every VAE encode
taken out on both sides (PIXELS must encode each exemplar as well: what is left is the loop and
the decode), the ratio of the best runs, UNet and VAE calls (and the seconds inside them), the
true peak memory of a run (CUDA: the allocator's peak; CPU: the resident set's high-water mark
above the start, and the whole process's), and the time of PIXELS' in-loop work per step (the
edit-map reset to the surgical composite) next to one guided UNet call (``--pixels-step-costs``
off skips these extra calls). A PIXELS job includes the shared return path (``Method.run`` =
``generate`` + ``core.hires.finish``). The per-image latent cache is off so that PIXELS encodes
every time, like the pipeline.
"""
from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np

from . import register
from ._memory import PeakMemory


def _add_arguments(p) -> None:
    p.add_argument("--pixels-model", default="tiny-sd",
                   help="model spec for the pixels section (default tiny-sd; a local SD 1.5 / SDXL "
                        "folder or checkpoint on a GPU measures the real architectures)")
    p.add_argument("--pixels-steps", type=int, default=None,
                   help="steps of the full schedule (default 20, --quick 8); strength 0.75")
    p.add_argument("--pixels-step-costs", choices=["on", "off"], default="on",
                   help="also time the per-step reset against one guided UNet call (default on)")
    p.add_argument("--pixels-size", type=int, default=None,
                   help="working size (square side) of the pixels section (default: the model's "
                        "native size); the model runs at this size, no high-resolution pass")
    p.add_argument("--pixels-cases", default=",".join(CASES),
                   help=f"comma-separated cases to run (default: all of {','.join(CASES)}); the "
                        "ratios need img2img")


CASES = {"img2img": "img2img", "map": "pixels map", "exemplar": "pixels map+exemplar"}


def cases_from(text: str | None, known: dict[str, str]) -> list[str]:
    """The cases named in a comma-separated option, in the table's order (ValueError on a stranger)."""
    asked = [c.strip() for c in (text or ",".join(known)).split(",") if c.strip()]
    unknown = [c for c in asked if c not in known]
    if unknown or not asked:
        raise ValueError(f"unknown case(s) {', '.join(unknown) or '(none)'}; known: {', '.join(known)}")
    return [c for c in known if c in asked]


def _peak_memory(bundle, fn) -> dict[str, float]:
    with PeakMemory(bundle.device) as mem:
        fn()
    return mem.as_row()


def _sync(bundle):
    import torch

    if bundle.device.type == "cuda":
        torch.cuda.synchronize()


def run(opts) -> list[dict[str, Any]]:
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

    from ..core.cache import Cache
    from ..core.diffusion import make_scheduler
    from ..methods import get as get_method
    from ..methods.base import Inputs, JobContext, LayerImage
    from ..models import LoadOptions, load_bundle
    from ..samples import exemplar_patch, halo_map, radial_map, scene
    from ..core.images import place
    from PIL import Image

    from ._measure import fit_previews, interleaved, listener, load_columns, measure

    spec = getattr(opts, "pixels_model", None) or "tiny-sd"
    steps = getattr(opts, "pixels_steps", None) or (8 if opts.quick else 20)
    strength, guidance, scheduler, prompt, seed = 0.75, 7.5, "euler", "a quiet lake", 0
    repeat = max(1, opts.repeat)
    chosen = cases_from(getattr(opts, "pixels_cases", None), CASES)
    bundle = load_bundle(spec, LoadOptions(device=opts.device))
    if getattr(opts, "pixels_size", None):
        bundle.native_size = int(opts.pixels_size)  # the working size: no high-resolution pass
    size = bundle.native_size
    fit = fit_previews(bundle)  # once per VAE, as at model load

    src = scene(size, size, 0)
    emap = radial_map(size, size)
    ex_small = exemplar_patch(size * 3 // 8, size * 3 // 8)
    ex = place(ex_small, (size, size), size // 3, size // 3)
    ex_map = halo_map(ex[..., 3], max(2, size // 10))

    method = get_method("pixels")
    params = method.Params(steps=steps, strength=strength, guidance=guidance, scheduler=scheduler,
                           prompt=prompt, crop_to_edit=False)
    cls = StableDiffusionXLImg2ImgPipeline if bundle.is_sdxl else StableDiffusionImg2ImgPipeline
    pipe = cls.from_pipe(bundle.pipe)
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.ascontiguousarray(src[..., :3]))
    if bundle.device.type == "cpu":
        torch.set_num_threads(1)  # a shared CPU: one thread each gives steadier medians

    def img2img():
        pipe.scheduler = make_scheduler(bundle, scheduler, steps)
        with torch.no_grad():
            pipe(prompt=prompt, image=image, strength=strength, num_inference_steps=steps,
                 guidance_scale=guidance, generator=torch.Generator().manual_seed(seed), output_type="np")
        _sync(bundle)

    def pixels(with_exemplar: bool):
        def go():
            d = {"source": LayerImage(src, "s")}
            if with_exemplar:
                d["exemplar"] = [LayerImage(ex, "e")]
                d["edit_map"] = [LayerImage(ex_map, "m")]
            else:
                d["edit_map"] = [LayerImage(emap, "m")]
            ctx = JobContext(bundle, Cache(None, memory_items=0), seed, preview=listener)
            method.run(ctx, Inputs(d), params)
            _sync(bundle)
        return go

    fns = {"img2img": img2img, "map": pixels(False), "exemplar": pixels(True)}
    cases = [(CASES[c], fns[c]) for c in chosen]
    runs = interleaved(cases, repeat, lambda fn: measure(bundle, fn)[0],
                       warmup=not getattr(opts, "no_warmup", False))

    def med(name, key):
        return statistics.median(r[key] for r in runs[name])

    step_costs = getattr(opts, "pixels_step_costs", "on") != "off"
    hook_ms, unet_ms = _step_costs(bundle, method, params, src, ex, ex_map, repeat) if step_costs else (None, None)
    base = "img2img" in runs
    base_wall, base_cpu = (med("img2img", "wall_s"), med("img2img", "cpu_s")) if base else (None, None)
    base_noenc = base_cpu - med("img2img", "vae_enc_s") if base else 0
    rows = []
    for name, fn in cases:
        last = dict(runs[name][-1])
        row: dict[str, Any] = {
            "model": spec, "device": str(bundle.device), "threads": torch.get_num_threads(),
            "size": f"{size}x{size}", "steps_run": min(int(steps * strength), steps), "case": name,
            "seconds": round(med(name, "wall_s"), 4),
            "ratio": round(med(name, "wall_s") / base_wall, 3) if base else None,
            "best_ratio": round(min(r["wall_s"] for r in runs[name]) / min(r["wall_s"] for r in runs["img2img"]), 3)
            if base else None,
            "cpu_s": round(med(name, "cpu_s"), 3),
            "cpu_ratio": round(med(name, "cpu_s") / base_cpu, 3) if base else None,
            "beyond_enc_ratio": round((med(name, "cpu_s") - med(name, "vae_enc_s")) / base_noenc, 3)
            if base_noenc > 0 else None,
        }
        row.update({k: v for k, v in last.items() if k not in ("wall_s", "cpu_s", "load_1m")})
        for key in ("peak_mem_mb", "peak_rss_mb", "peak_alloc_mb"):  # the largest of the runs
            vals = [r[key] for r in runs[name] if r.get(key) is not None]
            if vals:
                row[key] = round(max(vals), 1)
        row.update(load_columns(runs[name]))
        if name == cases[0][0]:
            row.update(fit)
        if name != "img2img" and hook_ms is not None:
            row.update(reset_ms_per_step=round(hook_ms, 3), unet_ms_per_step=round(unet_ms, 2))
        rows.append(row)
    return rows


def _step_costs(bundle, method, params, src, ex, ex_map, repeat: int) -> tuple[float, float]:
    """Per denoising step: the edit-map reset with the surgical composite (the whole of PIXELS'
    work inside the loop) and one guided UNet call, timed apart on the real shapes."""
    import torch

    from ..core.diffusion import encode_prompt, img2img_timesteps, init_noise, make_scheduler, predict_noise
    from ..core.editmap import EditSchedule
    from ..core.surgery import Paste, SurgicalLatents
    from ..methods.base import Inputs, LayerImage
    from ..methods.pixels import encode_cached, plan_job
    from ..methods.base import JobContext
    from ..core.cache import Cache

    plan = plan_job(bundle, Inputs({"source": LayerImage(src, "s"), "exemplar": [LayerImage(ex, "e")],
                                    "edit_map": [LayerImage(ex_map, "m")]}), params)
    ctx = JobContext(bundle, Cache(None, memory_items=0), 0)
    z = encode_cached(ctx, plan.source_crop, plan.work)
    pp = plan.passes[0]
    sched = make_scheduler(bundle, params.scheduler, params.steps)
    ts = img2img_timesteps(sched, params.steps, params.strength)
    g = torch.Generator().manual_seed(0)
    surg = SurgicalLatents(sched, z, init_noise(bundle, z.shape, g),
                           [Paste(encode_cached(ctx, e.rgb, plan.work), init_noise(bundle, z.shape, g), e.region)
                            for e in pp.exemplars])
    schedule = EditSchedule(pp.change, len(ts), params.threshold)
    lat = surg.at(ts[0])
    cond, uncond = encode_prompt(bundle, params.prompt, params.negative_prompt, image_hw=(plan.work[1], plan.work[0]))
    n = max(3, repeat) * len(ts)
    _sync(bundle)
    t = time.perf_counter()
    for k in range(n):
        i = k % len(ts)
        out = schedule.apply(i, lat, lambda: surg.at(ts[i]))
    _sync(bundle)
    hook = (time.perf_counter() - t) / n * 1000
    m = max(3, repeat)
    with torch.no_grad():
        predict_noise(bundle, out, ts[0], cond, uncond, params.guidance, scheduler=sched)
        _sync(bundle)
        t = time.perf_counter()
        for _ in range(m):
            predict_noise(bundle, out, ts[0], cond, uncond, params.guidance, scheduler=sched)
        _sync(bundle)
    unet = (time.perf_counter() - t) / m * 1000
    return hook, unet


register("pixels", run, "PIXELS vs plain img2img (same components, steps, strength): time ratio, peak memory",
         _add_arguments)
