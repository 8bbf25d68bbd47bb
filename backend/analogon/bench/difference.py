"""Section `difference`: what learning DIFF tokens costs, and what a cache hit saves.

For each model (``--difference-model``, default tiny-sd and tiny-sdxl) one analogy runs cold
(captions typed, CLIP deltas, DIFF training, DDIM inversion of B, sampling) and then again
with the same A, A′ and settings but another seed (DIFF tokens and B's inversion come from the
cache: only sampling runs). Reported per run:

- ``train_steps``, ``unet_fwd_bwd``: UNet forward+backward calls of the training (each a batch
  of two: the +DIFF branch on A′ and the −DIFF branch on A), ``unet_calls``: all UNet calls;
- ``train_s``, ``ms_per_step``: training time; ``invert_s``, ``sample_s``, ``total_s``;
- ``peak_mb``: on CUDA ``torch.cuda.max_memory_allocated`` above what was allocated before; on
  CPU the peak growth of the resident set, sampled every millisecond.

Times are single runs (training dominates and is long at real settings); on a shared CPU
threads are set to one for steadier numbers.
"""
from __future__ import annotations

import time
from typing import Any

from . import register
from ._memory import PeakMemory


def _add_arguments(p) -> None:
    p.add_argument("--difference-model", default="tiny-sd,tiny-sdxl",
                   help="comma-separated model specs for the difference section "
                        "(default tiny-sd,tiny-sdxl; an SD 2.1 folder on a GPU measures the paper's)")
    p.add_argument("--difference-train-steps", type=int, default=None,
                   help="DIFF training steps (default 50, --quick 10; the method's default is 1000)")
    p.add_argument("--difference-steps", type=int, default=None,
                   help="sampling steps of the whole schedule (default 20, --quick 8); strength 0.8")


class _Phases:
    """Seconds spent per progress stage."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._stage, self._t = None, time.perf_counter()

    def __call__(self, stage, step, total):
        now = time.perf_counter()
        if self._stage is not None:
            self.seconds[self._stage] = self.seconds.get(self._stage, 0.0) + now - self._t
        self._stage, self._t = stage, now

    def close(self):
        self("", None, None)


def _one(method, bundle, cache, inputs, params, seed) -> dict[str, Any]:
    from ..methods.base import JobContext

    calls = [0]
    hook = bundle.unet.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    phases = _Phases()
    ctx = JobContext(bundle, cache, seed, progress=phases)
    try:
        t0 = time.perf_counter()
        with PeakMemory(bundle.device) as mem:
            res = method.run(ctx, inputs, params)
        total = time.perf_counter() - t0
        phases.close()
        peak = mem.peak_mb * 2**20
    finally:
        hook.remove()
    tr = res.info["train"]
    s = phases.seconds
    row = {
        "run": "cache hit" if tr["cached"] else "cold",
        "train_steps": 0 if tr["cached"] else params.train_steps,
        "unet_fwd_bwd": 0 if tr["cached"] else tr["unet_batches"],
        "unet_calls": calls[0],
        "train_s": round(s.get("learning DIFF tokens", 0.0), 3),
        "ms_per_step": (round(1000 * s.get("learning DIFF tokens", 0.0) / params.train_steps, 1)
                        if not tr["cached"] else None),
        "invert_s": round(s.get("inverting B", 0.0), 3),
        "sample_s": round(s.get("sampling B′", 0.0), 3),
        "total_s": round(total, 3),
        "peak_mb": round(peak / 2**20, 1),
    }
    return row


def run(opts) -> list[dict[str, Any]]:
    import torch

    from ..core.cache import Cache
    from ..core.images import as_rgba
    from ..methods.base import Inputs, LayerImage
    from ..methods.difference import DifferenceMethod
    from ..models import LoadOptions, load_bundle
    from ..samples import analogy_set

    specs = [s.strip() for s in opts.difference_model.split(",") if s.strip()]
    train_steps = opts.difference_train_steps or (10 if opts.quick else 50)
    steps = opts.difference_steps or (8 if opts.quick else 20)
    method = DifferenceMethod()
    rows: list[dict[str, Any]] = []
    for spec in specs:
        bundle = load_bundle(spec, LoadOptions(device=opts.device))
        if bundle.device.type == "cpu":
            torch.set_num_threads(1)  # a shared CPU: one thread gives steadier numbers
        size = bundle.native_size
        s = analogy_set(size)
        inputs = Inputs({"a": LayerImage(as_rgba(s["a"]), "bench-a"),
                         "a_prime": LayerImage(as_rgba(s["a_prime"]), "bench-a-prime"),
                         "b": LayerImage(as_rgba(s["b"]), "bench-b")})
        params = method.Params(caption_a="a red square", caption_a_prime="a blue square",
                               caption_b="a circle", captioner="user_only",
                               train_steps=train_steps, steps=steps, strength=0.8)
        cache = Cache(None)
        for seed in (0, 1):  # cold, then a cache hit
            row = {"model": spec, "size": size, "checkpointing": False,
                   **_one(method, bundle, cache, inputs, params, seed)}
            rows.append(row)
        # cold again with the UNet's blocks checkpointed in the training's backward pass
        ckpt = params.model_copy(update={"checkpointing": True})
        rows.append({"model": spec, "size": size, "checkpointing": True,
                     **_one(method, bundle, Cache(None), inputs, ckpt, 0)})
        del bundle
    return rows


register("difference", run, "Difference Inversion: DIFF training cost and cache-hit time",
         _add_arguments)
