"""Section `first`: the first job on a freshly loaded model against the steady state.

The model is loaded the way the server loads it — a ``ModelManager`` whose load hook starts the
latent-preview fit in a background thread (``core.previews.prepare``) — and a PIXELS job with a
preview listener (the server's PNG) is run at once, as a painter's first click does; then
``--first-jobs`` more jobs, the steady state (median). Two loads, one after the other, in each of
``--repeat`` rounds (each round with an empty cache folder; the rows give the medians over the
rounds, ``first_ratios`` each round's ratio):

- ``no fit on disk``: the first load of this VAE ever (an empty cache folder): the fit runs beside
  the first job, which does not wait for it and sends previews once it is ready;
- ``fit on disk``: every later load (a new process, or another model with the same VAE): the
  projection is read back from the cache folder, no VAE call. The second load starts from what a
  new process knows (``previews.forget``) with the weights loaded again.

The job is PIXELS with an edit map at the shipped defaults (``--first-steps`` shortens the
schedule). Reported per load: the first job's wall and CPU seconds and the steady state's (median
of the later jobs), ``first_ratio`` / ``first_cpu_ratio`` (first / steady), the fit's source and
wall seconds and in how many rounds it was ready when the first job ended, the previews of the first job
and of a steady one, the step of the first job's first preview, the VAE calls of the jobs
themselves (a background fit's are not the job's), and the machine's load. On a CPU the process
CPU seconds of the first job include the fit's (another thread); its wall time is what the
painter waits.
"""
from __future__ import annotations

import gc
import os
import statistics
import tempfile
import time
from typing import Any

from . import register


def _add_arguments(p) -> None:
    p.add_argument("--first-model", default="tiny-sd", help="model spec for the first section (default tiny-sd)")
    p.add_argument("--first-size", type=int, default=None,
                   help="working size (square side) of the first section's jobs (default: the model's native size)")
    p.add_argument("--first-steps", type=int, default=None,
                   help="PIXELS steps of the full schedule (default: shipped, 50; --quick 12)")
    p.add_argument("--first-jobs", type=int, default=None,
                   help="jobs after the first, for the steady state (default 3; --quick 2)")
    p.add_argument("--first-cache", default=None, metavar="DIR",
                   help="where each round's cache folder is made (default: a temporary folder); "
                        "each round starts from an empty one, so that its first load fits")


def run(opts) -> list[dict[str, Any]]:
    import torch

    from ..core import previews as P
    from ..core.cache import Cache
    from ..methods import get as get_method
    from ..methods.base import Inputs, JobContext, LayerImage
    from ..models import LoadOptions, ModelManager
    from ..samples import radial_map, scene
    from ._measure import listener, load_average, measure, resident

    spec = getattr(opts, "first_model", None) or "tiny-sd"
    n_steady = getattr(opts, "first_jobs", None) or (2 if opts.quick else 3)
    method = get_method("pixels")
    steps = getattr(opts, "first_steps", None) or (12 if opts.quick else method.Params().steps)
    params = method.Params(steps=steps)  # every other setting as shipped
    tmp = None
    folder = getattr(opts, "first_cache", None)
    if folder is None:
        tmp = tempfile.TemporaryDirectory(prefix="analogon-bench-first-")
        folder = tmp.name
    rows: list[dict[str, Any]] = []
    raw: list[dict[str, Any]] = []
    try:
        if not getattr(opts, "no_warmup", False):
            # the process's own one-time costs (lazy imports, thread pools, the allocator's first
            # growth) are paid by a job on another load of the model, without a listener (so no
            # fit): the rows then show what a model's load and its preview fit cost its first job
            warm = ModelManager(1, LoadOptions(device=opts.device)).get(spec)
            if warm.device.type == "cpu":
                torch.set_num_threads(1)
            if getattr(opts, "first_size", None):
                warm.native_size = int(opts.first_size)
            n = warm.native_size
            method.run(JobContext(warm, Cache(None, memory_items=0), 0),
                       Inputs({"source": LayerImage(scene(n, n, 0), "s"),
                               "edit_map": [LayerImage(radial_map(n, n), "m")]}), params)
            del warm
            gc.collect()
        for rnd, state in [(r, st) for r in range(max(1, opts.repeat))
                           for st in ("no fit on disk", "fit on disk")]:
            P.forget()  # what a new process knows: nothing in memory, the disk as it is
            cache = Cache(os.path.join(folder, f"round-{rnd}"))
            fits: list[P.Fit] = []
            manager = ModelManager(1, LoadOptions(device=opts.device),
                                   on_load=lambda b: fits.append(P.prepare(b, cache)))
            t = time.perf_counter()
            bundle = manager.get(spec)
            load_s = time.perf_counter() - t
            if bundle.device.type == "cpu":
                torch.set_num_threads(1)  # as the other sections: one thread for the jobs
            resident(bundle)  # memory-mapped weights read once: not the first job's cost
            if getattr(opts, "first_size", None):
                bundle.native_size = int(opts.first_size)
            size = bundle.native_size
            src = scene(size, size, 0)
            emap = radial_map(size, size)
            steps_seen: list[list[int | None]] = []

            def job():
                seen: list[int | None] = []
                steps_seen.append(seen)

                def listen(rgb, step):
                    seen.append(step)
                    listener(rgb, step)

                ctx = JobContext(bundle, Cache(None, memory_items=0), 0, preview=listen)
                method.run(ctx, Inputs({"source": LayerImage(src, "s"), "edit_map": [LayerImage(emap, "m")]}),
                           params)

            fit = fits[0] if fits else P.prepare(bundle, cache)
            first, _ = measure(bundle, job)
            fit_ready_at_end = fit.ready
            first_previews = [s for s in steps_seen[-1] if s is not None]
            fit.wait()
            steady = [measure(bundle, job)[0] for _ in range(max(1, n_steady))]
            steady_previews = [s for s in steps_seen[-1] if s is not None]

            def med(key):
                return statistics.median(r[key] for r in steady)

            raw.append({
                "model": spec, "device": str(bundle.device), "threads": torch.get_num_threads(),
                "size": f"{size}x{size}", "steps_run": round(steps * params.strength), "load": state,
                "load_s": round(load_s, 3), "first_s": first["wall_s"], "steady_s": round(med("wall_s"), 3),
                "first_ratio": round(first["wall_s"] / med("wall_s"), 3) if med("wall_s") else None,
                "first_cpu_s": first["cpu_s"], "steady_cpu_s": round(med("cpu_s"), 3),
                "first_cpu_ratio": round(first["cpu_s"] / med("cpu_s"), 3) if med("cpu_s") else None,
                "steady_jobs": len(steady),
                "fit_source": fit.source, "fit_s": round(fit.seconds, 3),
                "fit_digest_s": round(fit.digest_seconds, 3), "fit_ready_at_first_end": fit_ready_at_end,
                "fit_error": fit.error,
                "first_previews": len(first_previews), "steady_previews": len(steady_previews),
                "first_preview_step": first_previews[0] if first_previews else None,
                "first_vae_enc": first["vae_enc"], "first_vae_dec": first["vae_dec"],
                "steady_vae_enc": steady[-1]["vae_enc"], "steady_vae_dec": steady[-1]["vae_dec"],
                "load_1m": first.get("load_1m"), "load_now": round(load_average() or 0.0, 2),
            })
            del bundle, manager, fits, fit
            gc.collect()
    finally:
        if tmp is not None:
            tmp.cleanup()
    # one row per load: medians over the rounds (the first job is one sample per round)
    for state in ("no fit on disk", "fit on disk"):
        mine = [r for r in raw if r["load"] == state]
        row = dict(mine[-1])
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                vals = [r[key] for r in mine if isinstance(r.get(key), (int, float))]
                row[key] = round(statistics.median(vals), 3) if vals else None
        row["rounds"] = len(mine)
        row["fit_ready_at_first_end"] = sum(bool(r["fit_ready_at_first_end"]) for r in mine)
        row["first_ratios"] = [r["first_ratio"] for r in mine]
        row["first_preview_step"] = statistics.median(
            [r["first_preview_step"] for r in mine if r["first_preview_step"] is not None] or [0]) or None
        rows.append(row)
    return rows


register("first", run, "the first job on a freshly loaded model (previews fitted in the background) "
         "against the steady state", _add_arguments)
