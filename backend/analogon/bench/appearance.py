"""Section `appearance`: the transfer loop of Cross-Image Attention, ours against an arrangement
like the authors' code.

- ``ours, as shipped``: the ``appearance`` method with its shipped defaults (query preservation
  γ = 0.75, masked AdaIN with automatic masks, FreeU): one UNet call per step whose batch holds
  only what the step needs ([out with swapped K/V, out with its own K/V, the reference, and the
  structure's queries on swapped steps]; the output alone on steps without a swap), the references
  read from their stored inversions, SDPA in every layer but the swapped rows (explicit softmax
  for the contrast), the model's dtype. This is what a painter runs.
- ``ours, paper's settings``: the same method with the paper's attention (γ = 0) and whole-image
  AdaIN: the mathematics of the authors-like loop, one arrangement against the other.
- ``authors-like``: two UNet calls per step (swap, no swap) over [out, appearance, structure],
  both references re-denoised, classic attention (diffusers' ``AttnProcessor``: explicit
  softmax) in every layer, float32 — the arrangement of the published code, at the paper's
  settings (γ = 0, FreeU with the authors' operator, whole-image AdaIN).

All run the same schedule, ranges, contrast, guidance, structure injection and FreeU from the same
cached inversions (not timed); authors-like decodes its whole batch of three (as their code does),
ours decodes the result once and sends a preview every few steps to a listener that makes the
server's PNG (``core.previews``: projections, no VAE decode). A fourth arm, ``diffusers img2img``,
is the plain pipeline doing the same denoising (the same DDIM steps from the same start, one
prompt, no guidance): what a step costs without any transfer. Ours includes the shared return
path (``Method.run``).

Runs are interleaved (A B C D A B C D …, after one warm-up round unless ``--no-warmup``) and the
medians reported with the machine's load beside them (``bench._measure``): UNet calls and batch
elements per step, VAE calls, wall and CPU seconds and their ratios to authors-like
(``speedup_cpu`` = authors-like / this row), the ratio to the plain pipeline, previews and their
share of the job, and memory: the largest peak of the runs above the start (``peak_mem_mb``; CUDA:
the allocator's, CPU: the resident set's high-water mark) *and* the process's whole peak
(``peak_rss_mb`` on CPU, ``peak_alloc_mb`` on CUDA), with ``mem_ratio`` / ``process_mem_ratio``
against authors-like. ``--appearance-size`` overrides the working size (e.g. 512 on tiny-sd
puts a 64×64 latent through the swapped layers at their real token counts).
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np

from . import register


def _add_arguments(p) -> None:
    p.add_argument("--appearance-model", default="tiny-sd",
                   help="model spec for the appearance section (default tiny-sd)")
    p.add_argument("--appearance-size", type=int, default=None,
                   help="working size (long side) of the appearance section (default: the model's "
                        "native size)")
    p.add_argument("--appearance-steps", type=int, default=None,
                   help="schedule length (default 100 with skip 32; --quick 20 with skip 6)")
    p.add_argument("--appearance-cases", default=",".join(CASES),
                   help=f"comma-separated cases to run (default: all of {','.join(CASES)}: "
                        "ours = as shipped, paper = ours at the paper's settings); the ratios need "
                        "authors-like (and img2img for vs_img2img)")


CASES = {"authors-like": "authors-like", "paper": "ours, paper's settings", "ours": "ours, as shipped",
         "img2img": "diffusers img2img"}


def _authors_like_loop(bundle, unet32, inv_s, inv_a, p, latent_hw, cond) -> Any:
    """Two fp32 UNet passes per step over [out, app, struct] with classic attention, FreeU as
    ``p`` says, whole-image AdaIN of the output towards the appearance."""
    import torch
    from diffusers.models.attention_processor import AttnProcessor

    from ..core.adain import adain
    from ..core.attention import SwapController, SwapProcessor, decoder_attention_factors
    from ..core.diffusion import make_scheduler, vae_decode
    from ..core.freeu import freeu
    from ..methods.appearance import Schedule

    class Classic:
        """Classic attention everywhere; the swap processor where the controller swaps."""

        def __init__(self, ctl, name):
            self.swap = SwapProcessor(ctl, name)
            self.classic = AttnProcessor()
            self.ctl = ctl

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     temb=None, *args, **kwargs):
            if self.swap.decoder_self and encoder_hidden_states is None and self.ctl.swaps:
                f = self.ctl.factor(hidden_states.shape[1] if hidden_states.ndim == 3
                                    else hidden_states.shape[2] * hidden_states.shape[3])
                if f in self.ctl.swaps:
                    return self.swap(attn, hidden_states, None, attention_mask, temb)
            return self.classic(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    sch = Schedule(p)
    factors = decoder_attention_factors(unet32)
    fine, coarse = factors[0], (factors[1] if len(factors) > 1 else None)
    ctl = SwapController(beta=p.contrast, contrast_mode=p.contrast_mode)
    saved = dict(unet32.attn_processors)
    unet32.set_attn_processor({n: Classic(ctl, n) for n in saved})
    sched = make_scheduler(bundle, "ddim", p.steps)
    c3 = cond.map(lambda t: t.float()).repeat(3)
    x = torch.cat([inv_s.x(p.skip_steps), inv_a.x(p.skip_steps), inv_s.x(p.skip_steps)]).float()
    zs = [inv_s, inv_a, inv_s]
    try:
        with freeu(unet32, p.freeu_operator if p.freeu else None, p.freeu_s1, p.freeu_s2,
                   p.freeu_b1, p.freeu_b2):
            for j in range(sch.n):
                i = p.skip_steps + j
                t = sched.timesteps[i]
                swap_f = [f for f, on in ((fine, sch.fine(j)), (coarse, sch.coarse(j))) if on and f]
                src = 2 if sch.inject(j) else 1
                with torch.no_grad():
                    ctl.set_step(latent_hw, {f: [(0, src)] for f in swap_f})
                    e_swap = unet32(x, t, **c3.unet_kwargs()).sample
                    ctl.set_step(latent_hw, {})
                    e_self = unet32(x, t, **c3.unet_kwargs()).sample
                a = sch.alpha(j)
                e = e_self + a * (e_swap - e_self) if swap_f else e_swap
                x = torch.cat([sched.step(e[k:k + 1], t, x[k:k + 1], eta=1.0,
                                          variance_noise=zs[k].z(i)).prev_sample for k in range(3)])
                if sch.adain(j):
                    x[0:1] = adain(x[0:1], x[1:2])
    finally:
        unet32.set_attn_processor(saved)
    return vae_decode(bundle, x.to(bundle.vae.dtype))  # the authors decode the whole batch


def weights_mb(*modules) -> float:
    """Megabytes of the modules' parameters and buffers (each tensor once)."""
    seen: set[int] = set()
    total = 0
    for m in modules:
        if m is None:
            continue
        for t in list(m.parameters()) + list(m.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total / 2**20


def arms(bundle, steps: int, chosen: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The chosen cases (keys of :data:`CASES`) as functions of no argument on ``bundle`` at its
    working size, with both inversions cached; and what they run (``info``: sizes, the two
    parameter sets, each case's weights in MB)."""
    import torch

    from ..core.attention import SwapController, installed
    from ..core.cache import Cache
    from ..core.diffusion import encode_prompt, make_scheduler
    from ..core.freeu import freeu
    from ..core.images import native_size
    from ..methods import get as get_method
    from ..methods.base import Inputs, JobContext, LayerImage
    from ._measure import listener
    from .pixels import _sync

    skip = round(steps * 0.32)
    size = bundle.native_size
    method = get_method("appearance")
    shipped = method.Params(steps=steps, skip_steps=skip)  # every other setting as shipped
    # the paper's attention (no query preservation) and whole-image AdaIN on both sides (the
    # authors-like loop has no self-segmentation): the same mathematics, two arrangements
    paper = method.Params(steps=steps, skip_steps=skip, query_preservation=0.0, adain="whole")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    s = np.zeros((size, size, 4), np.uint8)
    s[..., 0] = xx * 255 // max(1, size - 1)
    s[..., 1] = yy * 255 // max(1, size - 1)
    s[..., 3] = 255
    a = rng.integers(0, 256, (size, size, 4), dtype=np.uint8)
    a[..., 3] = 255
    cache = Cache(None, memory_items=8)
    inputs = Inputs({"structure": LayerImage(s, "s"), "appearance": LayerImage(a, "a")})

    def ours(p):
        def go():
            method.run(JobContext(bundle, cache, 0, preview=listener), inputs, p)
            _sync(bundle)
        return go

    w, h = native_size((size, size), size, bundle.vae_scale_factor)
    latent_hw = (h // bundle.vae_scale_factor, w // bundle.vae_scale_factor)
    # the inversions, cached before any timed run with FreeU as the runs have it (both settings
    # share them: the inversion does not depend on γ or AdaIN); every run reads them (hits)
    prompt = shipped.prompt.replace("{domain}", shipped.domain)
    cond, uncond = encode_prompt(bundle, prompt, "", image_hw=(h, w))
    ctx = JobContext(bundle, cache, 0)
    sched = make_scheduler(bundle, "ddim", steps)
    p = paper
    ctl = SwapController()
    ctl.set_step(latent_hw, {})
    with installed(bundle.unet, ctl), \
            freeu(bundle.unet, p.freeu_operator if p.freeu else None, p.freeu_s1, p.freeu_s2, p.freeu_b1, p.freeu_b2):
        inv_s, _ = method.inversion(ctx, sched, s, (w, h), cond, uncond, p, prompt, "structure")
        inv_a, _ = method.inversion(ctx, sched, a, (w, h), cond, uncond, p, prompt, "appearance")
    unet32 = None
    if "authors-like" in chosen:
        unet32 = copy.deepcopy(bundle.unet).float() if bundle.unet.dtype != torch.float32 else bundle.unet

    def authors_like():
        _authors_like_loop(bundle, unet32, inv_s, inv_a, paper, latent_hw, cond)
        _sync(bundle)

    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline
    from PIL import Image

    pipe_cls = StableDiffusionXLImg2ImgPipeline if bundle.is_sdxl else StableDiffusionImg2ImgPipeline
    pipe = pipe_cls.from_pipe(bundle.pipe)
    pipe.set_progress_bar_config(disable=True)
    s_img = Image.fromarray(np.ascontiguousarray(s[..., :3]))

    def img2img():
        pipe.scheduler = make_scheduler(bundle, "ddim", steps)
        with torch.no_grad():
            pipe(prompt=prompt, image=s_img, strength=(steps - skip) / steps, num_inference_steps=steps,
                 guidance_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="np")
        _sync(bundle)

    fns = {"authors-like": authors_like, "paper": ours(paper), "ours": ours(shipped), "img2img": img2img}
    others = (bundle.vae, bundle.text_encoder, bundle.text_encoder_2)
    own = weights_mb(bundle.unet, *others)
    info = {"size": (w, h), "latent_hw": latent_hw, "steps_run": steps - skip, "shipped": shipped,
            "paper": paper,
            "weights_mb": {"authors-like": weights_mb(unet32, *others) if unet32 is not None else None,
                           "paper": own, "ours": own, "img2img": own}}
    return {c: fns[c] for c in chosen}, info


def rows_for(bundle, spec: str, runs: dict[str, list[dict[str, Any]]], info: dict[str, Any],
             names: dict[str, str]) -> list[dict[str, Any]]:
    """One row per case from its interleaved runs (medians; memory: the largest peak), with the
    ratios to authors-like and to img2img where those ran. ``names``: case id -> its label."""
    import torch

    from ._measure import load_columns, summary

    def med(n, key):
        return summary(runs[n], key)

    def peak(n, key):
        vals = [r[key] for r in runs[n] if r.get(key) is not None]
        return max(vals) if vals else None

    def ratio(x, y):
        return round(x / y, 3) if x is not None and y else None

    ids = {label: cid for cid, label in names.items()}
    base, plain = CASES["authors-like"], CASES["img2img"]
    n_run = info["steps_run"]
    w, h = info["size"]
    latent_hw = info["latent_hw"]
    rows = []
    for n in runs:
        cid = ids[n]
        last = runs[n][-1]
        dtype = "float32" if cid == "authors-like" else str(bundle.unet.dtype).replace("torch.", "")
        p = {"ours": info["shipped"], "paper": info["paper"], "authors-like": info["paper"]}.get(cid)
        row: dict[str, Any] = {
            "model": spec, "device": str(bundle.device), "threads": torch.get_num_threads(),
            "size": f"{w}x{h}", "latent": f"{latent_hw[1]}x{latent_hw[0]}", "steps_run": n_run,
            "case": n, "dtype": dtype, "runs": len(runs[n]),
            "query_preservation": p.query_preservation if p else None, "adain": p.adain if p else None,
            "freeu": p.freeu if p else None,
            "unet_calls_per_step": round(last["unet_calls"] / n_run, 3),
            "batch_elements_per_step": round(last["unet_elems"] / n_run, 3),
            "seconds": round(med(n, "wall_s"), 3),
            "ratio": ratio(med(n, "wall_s"), med(base, "wall_s")) if base in runs else None,
            "cpu_s": round(med(n, "cpu_s"), 3),
            "cpu_ratio": ratio(med(n, "cpu_s"), med(base, "cpu_s")) if base in runs else None,
            "speedup": ratio(med(base, "wall_s"), med(n, "wall_s")) if base in runs else None,
            "speedup_cpu": ratio(med(base, "cpu_s"), med(n, "cpu_s")) if base in runs else None,
            "vs_img2img_cpu": ratio(med(n, "cpu_s"), med(plain, "cpu_s")) if plain in runs else None,
        }
        row.update({k: v for k, v in last.items() if k not in ("wall_s", "cpu_s", "load_1m")})
        for key in ("peak_mem_mb", "peak_rss_mb", "peak_alloc_mb"):
            if peak(n, key) is not None:
                row[key] = round(peak(n, key), 1)
        wmb = info["weights_mb"].get(cid)
        if wmb is not None and row.get("peak_mem_mb") is not None:  # its weights + what it allocated
            row["weights_mb"] = round(wmb, 1)
            row["footprint_mb"] = round(wmb + row["peak_mem_mb"], 1)
        if base in runs:
            row["mem_ratio"] = ratio(peak(n, "peak_mem_mb"), peak(base, "peak_mem_mb"))
            if bundle.device.type == "cuda":
                bw = info["weights_mb"].get("authors-like")
                if bw is not None and wmb is not None:
                    row["process_mem_ratio"] = ratio(wmb + (peak(n, "peak_mem_mb") or 0),
                                                     bw + (peak(base, "peak_mem_mb") or 0))
            else:
                row["process_mem_ratio"] = ratio(peak(n, "peak_rss_mb"), peak(base, "peak_rss_mb"))
        row.update(load_columns(runs[n]))
        rows.append(row)
    return rows


def run(opts) -> list[dict[str, Any]]:
    import torch

    from ..models import LoadOptions, load_bundle
    from ._measure import fit_previews, interleaved, measure
    from .pixels import cases_from

    spec = getattr(opts, "appearance_model", None) or "tiny-sd"
    steps = getattr(opts, "appearance_steps", None) or (20 if opts.quick else 100)
    chosen = cases_from(getattr(opts, "appearance_cases", None), CASES)
    bundle = load_bundle(spec, LoadOptions(device=opts.device))
    if getattr(opts, "appearance_size", None):
        bundle.native_size = int(opts.appearance_size)
    if bundle.device.type == "cpu":
        torch.set_num_threads(1)  # a shared CPU: one thread each gives steadier medians
    fit = fit_previews(bundle)  # once per VAE, as at model load
    fns, info = arms(bundle, steps, chosen)
    cases = [(CASES[c], fns[c]) for c in chosen]
    runs = interleaved(cases, opts.repeat, lambda fn: measure(bundle, fn)[0],
                       warmup=not getattr(opts, "no_warmup", False))
    rows = rows_for(bundle, spec, runs, info, {c: CASES[c] for c in chosen})
    for row in rows:
        if row["case"] == CASES["ours"]:
            row.update(fit)
    return rows


register("appearance", run, "Cross-Image Attention as shipped and at the paper's settings vs two passes like the authors' code",
         _add_arguments)
