"""Suite `gpu` (``analogon bench --suite gpu``): the methods against diffusers' own pipelines on the
real architectures, side by side in one process — one command, one JSON, one Markdown table.

Models: SD 1.5 and SDXL folders with random weights in fp16 (``analogon build-random``), built
under ``--gpu-dir`` on the first run (drawn on the GPU when there is one) and reused after; or
the embedded tiny models (``--gpu-models tiny``: the check on a CPU); or any specs. Each model is
loaded once (fp16 on CUDA, fp32 on a CPU, SDPA), its preview fit made (as at load), and measured
at its native size (``--size`` overrides) in three comparisons, each run interleaved (A B A B …,
after one warm-up round; medians):

- ``pixels``: PIXELS as shipped (50 Euler steps at strength 0.25: 12 run, CFG 7.5) with an edit map
  over the whole image, against ``StableDiffusion(XL)Img2ImgPipeline`` built with ``from_pipe`` on
  the same components, the same prompt, steps, strength, guidance and scheduler;
- ``dia``: a DIA cache hit (every inversion cached: sampling only, 10 DDIM steps at CFG 3 as
  shipped; the cache is filled first by a cold job at a small inversion budget, which does not
  change what a hit runs), against ``StableDiffusion(XL)Pipeline`` (text-to-image) with the same
  steps, guidance and scheduler;
- ``appearance``: the appearance method as shipped against the authors' arrangement (two fp32
  passes per step over three images with classic attention; ``bench/appearance.py``), both from
  the same cached inversions, on a shortened schedule (``--gpu-appearance-steps``, default 30: the
  per-step costs are what is compared).

Per row: ``ms_per_step`` (the job's time outside the VAE, divided by the steps run: wall on CUDA,
CPU seconds on a CPU), ``step_rate_vs_base`` (the base's ms per step over this row's: ≥ 1 is at
least as fast), the job's seconds and their ratio to the base, the UNet's share (``unet_ms_per_step``),
peak memory (CUDA: the allocator's peak of the process, ``peak_vram_mb``, and above the start;
CPU: the resident set's), UNet calls and batch elements, VAE calls, previews, the machine's load.
On CUDA each UNet call is bracketed by synchronisations to time it (both arms alike).

Budget: built for one modern GPU within 8 minutes, building the two folders included (about a
minute when drawn on the GPU; reused after). On a CPU, run it on the tiny models or at a small
``--size`` as a check of the machinery: the numbers are then not the GPU's.
"""
from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import register_suite

FAMILIES = ("sd15", "sdxl")
TINY = {"sd15": "tiny-sd", "sdxl": "tiny-sdxl"}
PARTS = ("pixels", "dia", "appearance")
PROMPT = "a quiet lake"


def _add_arguments(p) -> None:
    g = p.add_argument_group("suite gpu (--suite gpu)")
    g.add_argument("--gpu-models", default="random",
                   help="random (build or reuse fp16 random-weight SD 1.5 and SDXL folders in "
                        "--gpu-dir), tiny (tiny-sd, tiny-sdxl: a quick check), or comma-separated specs")
    g.add_argument("--gpu-families", default=",".join(FAMILIES),
                   help="families for --gpu-models random|tiny (default sd15,sdxl)")
    g.add_argument("--gpu-dir", default=None,
                   help="where the random-weight folders are built and reused (default: "
                        "$XDG_CACHE_HOME/analogon/random-models)")
    g.add_argument("--gpu-size", "--size", dest="gpu_size", type=int, default=None,
                   help="working size (square side) of every comparison (default: each model's native size)")
    g.add_argument("--gpu-parts", default=",".join(PARTS), help=f"comparisons to run (default {','.join(PARTS)})")
    g.add_argument("--gpu-pixels-steps", type=int, default=None,
                   help="PIXELS / img2img steps of the full schedule (default: shipped, 50; strength 0.25)")
    g.add_argument("--gpu-appearance-steps", type=int, default=None,
                   help="appearance schedule (default 30 with 10 skipped; --quick 8)")
    g.add_argument("--gpu-out", default="out/bench-gpu",
                   help="folder for bench-gpu.json and bench-gpu.md (default out/bench-gpu)")


def default_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "analogon" / "random-models"


def random_folder(family: str, root: Path, device: str | None, log=print) -> Path:
    """The fp16 random-weight folder of ``family`` under ``root``: reused when it is there, built
    (on the GPU when there is one) when not."""
    from ._random_models import build_random

    folder = root / f"{family}-random-fp16"
    if (folder / "model_index.json").is_file():
        log(f"reusing {folder}")
        return folder
    import torch

    where = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return build_random(family, folder, dtype="float16", device=where, log=log)


def _models(opts) -> list[tuple[str, str]]:
    """(label, spec) per model to measure."""
    choice = getattr(opts, "gpu_models", "random") or "random"
    families = [f.strip() for f in (getattr(opts, "gpu_families", None) or ",".join(FAMILIES)).split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown famil(ies) {', '.join(unknown)}; known: {', '.join(FAMILIES)}")
    if choice == "tiny":
        return [(f, TINY[f]) for f in families]
    if choice == "random":
        root = Path(getattr(opts, "gpu_dir", None) or default_dir()).expanduser()
        return [(f, str(random_folder(f, root, opts.device))) for f in families]
    return [(spec, spec) for spec in (s.strip() for s in choice.split(",")) if spec]


def _edit_map(size: int) -> np.ndarray:
    """A grey ramp over the whole image (0.3 at the left to 1 at the right): every pixel may
    change, so PIXELS works on the whole picture as img2img does (nothing to crop)."""
    m = np.zeros((size, size, 4), np.uint8)
    m[..., :3] = np.linspace(0.3 * 255, 255, size, dtype=np.float32).astype(np.uint8)[None, :, None]
    m[..., 3] = 255
    return m


def _loop_s(row: dict[str, Any], cuda: bool) -> float:
    """A run's time outside the VAE: wall on CUDA, CPU seconds on a CPU."""
    total = row["wall_s"] if cuda else row["cpu_s"]
    return max(0.0, total - row.get("vae_enc_s", 0.0) - row.get("vae_dec_s", 0.0))


def _rows(bundle, label: str, part: str, runs: dict[str, list[dict[str, Any]]], base: str,
          steps_run: dict[str, int], extra: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    from ._measure import load_columns, summary

    cuda = bundle.device.type == "cuda"
    size = bundle.native_size

    def loop_ms(name):
        vals = sorted(_loop_s(r, cuda) for r in runs[name])
        return 1000 * vals[len(vals) // 2] / max(1, steps_run[name])

    out = []
    for name, rs in runs.items():
        last = rs[-1]
        peaks = {k: max(r[k] for r in rs if r.get(k) is not None)
                 for k in ("peak_mem_mb", "peak_alloc_mb", "peak_rss_mb") if any(r.get(k) is not None for r in rs)}
        row: dict[str, Any] = {
            "model": label, "part": part, "case": name, "device": str(bundle.device),
            "dtype": str(bundle.unet.dtype).replace("torch.", ""), "size": f"{size}x{size}",
            "steps_run": steps_run[name], "runs": len(rs),
            "ms_per_step": round(loop_ms(name), 2),
            "step_rate_vs_base": round(loop_ms(base) / loop_ms(name), 3) if base in runs and loop_ms(name) else None,
            "unet_ms_per_step": round(1000 * summary(rs, "unet_s") / max(1, steps_run[name]), 2),
            "seconds": round(summary(rs, "wall_s"), 3), "cpu_s": round(summary(rs, "cpu_s"), 3),
            "vs_base": round(summary(rs, "wall_s") / summary(runs[base], "wall_s"), 3) if base in runs else None,
            "base": base,
            "peak_vram_mb": round(peaks["peak_alloc_mb"], 1) if "peak_alloc_mb" in peaks else None,
            "peak_rss_mb": round(peaks["peak_rss_mb"], 1) if "peak_rss_mb" in peaks else None,
            "peak_above_start_mb": round(peaks.get("peak_mem_mb", 0.0), 1),
            "unet_calls": last["unet_calls"], "unet_elems": last["unet_elems"],
            "vae_enc": last["vae_enc"], "vae_dec": last["vae_dec"], "previews": last.get("previews"),
        }
        if not cuda:
            row["cpu_vs_base"] = round(summary(rs, "cpu_s") / summary(runs[base], "cpu_s"), 3) if base in runs else None
        row.update((extra or {}).get(name, {}))
        row.update(load_columns(rs))
        out.append(row)
    return out


def _pixels(bundle, label, opts, run_cases) -> list[dict[str, Any]]:
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline
    from PIL import Image

    from ..core.cache import Cache
    from ..core.diffusion import make_scheduler
    from ..methods import get as get_method
    from ..methods.base import Inputs, JobContext, LayerImage
    from ..samples import scene
    from ._measure import listener
    from .pixels import _sync

    method = get_method("pixels")
    steps = getattr(opts, "gpu_pixels_steps", None) or method.Params().steps
    p = method.Params(steps=steps, prompt=PROMPT)  # every other setting as shipped
    size = bundle.native_size
    src, emap = scene(size, size, 0), _edit_map(size)
    cls = StableDiffusionXLImg2ImgPipeline if bundle.is_sdxl else StableDiffusionImg2ImgPipeline
    pipe = cls.from_pipe(bundle.pipe)
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.ascontiguousarray(src[..., :3]))

    def img2img():
        pipe.scheduler = make_scheduler(bundle, p.scheduler, p.steps)
        with torch.no_grad():
            pipe(prompt=p.prompt, negative_prompt=p.negative_prompt or None, image=image, strength=p.strength,
                 num_inference_steps=p.steps, guidance_scale=p.guidance,
                 generator=torch.Generator().manual_seed(0), output_type="np")
        _sync(bundle)

    def pixels():
        ctx = JobContext(bundle, Cache(None, memory_items=0), 0, preview=listener)
        method.run(ctx, Inputs({"source": LayerImage(src, "s"), "edit_map": [LayerImage(emap, "m")]}), p)
        _sync(bundle)

    base = "diffusers img2img"
    runs = run_cases([(base, img2img), ("PIXELS, as shipped", pixels)])
    n = int(p.steps * p.strength)
    return _rows(bundle, label, "pixels", runs, base, {name: n for name in runs})


def _dia(bundle, label, opts, run_cases) -> list[dict[str, Any]]:
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from ..core.cache import Cache
    from ..core.diffusion import make_scheduler
    from ..methods import get as get_method
    from ..methods.base import Inputs, JobContext, LayerImage
    from ._measure import listener
    from .dia import _image
    from .pixels import _sync

    method = get_method("dia")
    # sampling as shipped; the inversions that fill the cache at a small budget (a hit runs the
    # same sampling whatever the budget that made its inversions)
    p = method.Params(token_iterations=2, views=1, noise_iterations=0, noise_evaluations=1)
    size = bundle.native_size
    a = _image((size, size), 1)
    a2 = a.copy()
    a2[size // 4: size // 2, size // 4: size // 2, :3] = (240, 30, 30)
    inputs = Inputs({"a": LayerImage(a, "gpu-a"), "a_prime": LayerImage(a2, "gpu-a2"),
                     "b": LayerImage(_image((size, size)), "gpu-b")})
    cache = Cache(None)
    t = time.perf_counter()
    method.run(JobContext(bundle, cache, 0), inputs, p)  # cold: fills the cache (not timed here)
    cold_s = time.perf_counter() - t
    pipe = (StableDiffusionXLPipeline if bundle.is_sdxl else StableDiffusionPipeline).from_pipe(bundle.pipe)
    pipe.set_progress_bar_config(disable=True)
    f = bundle.vae_scale_factor
    lat = torch.randn((1, 4, size // f, size // f), generator=torch.Generator().manual_seed(0)).to(
        bundle.device, bundle.unet.dtype)

    def txt2img():
        pipe.scheduler = make_scheduler(bundle, "ddim", p.steps)
        with torch.no_grad():
            pipe(prompt=PROMPT, height=size, width=size, num_inference_steps=p.steps,
                 guidance_scale=p.guidance, latents=lat, output_type="np")
        _sync(bundle)

    def hit():
        method.run(JobContext(bundle, cache, 0, preview=listener), inputs, p)
        _sync(bundle)

    base = "diffusers txt2img"
    name = "DIA cache hit, as shipped"
    runs = run_cases([(base, txt2img), (name, hit)])
    return _rows(bundle, label, "dia", runs, base, {n: p.steps for n in runs},
                 {name: {"cold_fill_s": round(cold_s, 2)}})


def _appearance(bundle, label, opts, run_cases) -> list[dict[str, Any]]:
    from . import appearance as A

    steps = getattr(opts, "gpu_appearance_steps", None) or (8 if opts.quick else 30)
    fns, info = A.arms(bundle, steps, ["authors-like", "ours"])
    base = A.CASES["authors-like"]
    runs = run_cases([(base, fns["authors-like"]), (A.CASES["ours"], fns["ours"])])
    extra = {A.CASES[c]: {"weights_mb": round(info["weights_mb"][c], 1),
                          "dtype": "float32" if c == "authors-like" else str(bundle.unet.dtype).replace("torch.", "")}
             for c in ("authors-like", "ours")}
    rows = _rows(bundle, label, "appearance", runs, base, {n: info["steps_run"] for n in runs}, extra)
    for r in rows:
        r["footprint_mb"] = round(r["weights_mb"] + r["peak_above_start_mb"], 1)
    return rows


def targets(rows: list[dict[str, Any]], cuda: bool) -> list[dict[str, Any]]:
    """The issue's GPU targets read off the rows (only where the rows are there)."""
    out = []
    for r in rows:
        if r["part"] == "pixels" and r["case"] == "PIXELS, as shipped":
            out.append({"model": r["model"], "what": "PIXELS step rate / diffusers img2img's",
                        "value": r["step_rate_vs_base"], "target": ">= 0.98",
                        "met": r["step_rate_vs_base"] is not None and r["step_rate_vs_base"] >= 0.98})
            if cuda and r["model"] == "sdxl" and r["size"] == "1024x1024":
                out.append({"model": r["model"], "what": "SDXL PIXELS peak VRAM at 1024² (MB)",
                            "value": r["peak_vram_mb"], "target": "<= 9216",
                            "met": r["peak_vram_mb"] is not None and r["peak_vram_mb"] <= 9216})
        if r["part"] == "appearance" and r["case"] == "ours, as shipped":
            speed = round(1 / r["vs_base"], 3) if r.get("vs_base") else None
            out.append({"model": r["model"], "what": "appearance speed-up over the authors' arrangement",
                        "value": speed, "target": ">= 1.8", "met": speed is not None and speed >= 1.8})
    return out


def markdown(result: dict[str, Any]) -> str:
    """The suite's one table, with what it ran on."""
    m = result["machine"]
    head = (f"`analogon bench --suite gpu` on {m.get('gpu') or m.get('cpu') or 'this machine'} "
            f"(torch {m.get('torch')}, {result['started']}; {result['seconds']} s in all)\n\n")
    cols = ["model", "part", "case", "size", "dtype", "steps run", "ms / step", "step rate vs base",
            "job s", "vs base", "peak VRAM / RSS MB", "above start MB", "UNet calls (elements)",
            "VAE enc / dec", "load"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result["rows"]:
        peak = r.get("peak_vram_mb") if r.get("peak_vram_mb") is not None else r.get("peak_rss_mb")
        vals = [r["model"], r["part"], r["case"], r["size"], r["dtype"], r["steps_run"], r["ms_per_step"],
                r["step_rate_vs_base"], r["seconds"], r["vs_base"], peak, r["peak_above_start_mb"],
                f"{r['unet_calls']} ({r['unet_elems']})", f"{r['vae_enc']} / {r['vae_dec']}", r.get("load_1m")]
        lines.append("| " + " | ".join("" if v is None else str(v) for v in vals) + " |")
    if result.get("targets"):
        lines += ["", "| model | target | value | wanted | met |", "|---|---|---|---|---|"]
        lines += [f"| {t['model']} | {t['what']} | {t['value']} | {t['target']} | {'yes' if t['met'] else 'no'} |"
                  for t in result["targets"]]
    return head + "\n".join(lines) + "\n"


def run_suite(opts) -> dict[str, Any]:
    import torch

    from ..models import LoadOptions, load_bundle
    from . import machine_info
    from ._measure import fit_previews, interleaved, measure

    parts = [q.strip() for q in (getattr(opts, "gpu_parts", None) or ",".join(PARTS)).split(",") if q.strip()]
    unknown = [q for q in parts if q not in PARTS]
    if unknown:
        raise ValueError(f"unknown part(s) {', '.join(unknown)}; known: {', '.join(PARTS)}")
    t0 = time.perf_counter()
    result: dict[str, Any] = {"suite": "gpu", "machine": machine_info(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "rows": [], "models": {}}
    for label, spec in _models(opts):
        t = time.perf_counter()
        bundle = load_bundle(spec, LoadOptions(device=opts.device))
        load_s = time.perf_counter() - t
        if bundle.device.type == "cpu":
            torch.set_num_threads(1)  # as the other sections: one thread, steadier medians
        if getattr(opts, "gpu_size", None):
            bundle.native_size = int(opts.gpu_size)
        fit = fit_previews(bundle)  # as at model load (and the weights made resident)
        result["models"][label] = {"spec": spec, "load_s": round(load_s, 2), "dtype": str(bundle.unet.dtype),
                                   "size": bundle.native_size, **fit}

        def run_cases(cases):
            return interleaved(cases, opts.repeat, lambda fn: measure(bundle, fn)[0],
                               warmup=not getattr(opts, "no_warmup", False))

        for part in parts:
            print(f"-- {label}: {part}", flush=True)
            result["rows"] += {"pixels": _pixels, "dia": _dia, "appearance": _appearance}[part](
                bundle, label, opts, run_cases)
        del bundle
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["targets"] = targets(result["rows"], torch.cuda.is_available() and opts.device != "cpu")
    result["markdown"] = markdown(result)
    out = Path(getattr(opts, "gpu_out", None) or "out/bench-gpu")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench-gpu.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "bench-gpu.md").write_text(result["markdown"])
    print(result["markdown"])
    print(f"wrote {out / 'bench-gpu.json'} and {out / 'bench-gpu.md'}")
    return result


register_suite("gpu", run_suite, "SD 1.5 and SDXL (random weights, fp16) against diffusers' pipelines "
               "and the authors' arrangement: time per step, peak VRAM, calls", _add_arguments)
