"""Shared fixtures: tiny models (built once per session), a cache in a temporary folder,
and a JobContext factory. Nothing here touches the network."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_configure(config):
    # The tiny models' ops are small: one thread avoids oversubscription on shared machines
    # (two threads were up to 20x slower per UNet call under load) and keeps results stable.
    try:
        import torch
    except ImportError:  # plugin-only environments
        return
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd():
    from analogon.models import LoadOptions, load_bundle

    return load_bundle("tiny-sd", LoadOptions(device="cpu"))


@pytest.fixture(scope="session")
def tiny_sdxl():
    from analogon.models import LoadOptions, load_bundle

    return load_bundle("tiny-sdxl", LoadOptions(device="cpu"))


@pytest.fixture
def cache(tmp_path):
    from analogon.core.cache import Cache

    return Cache(tmp_path / "cache")


@pytest.fixture
def make_ctx(cache):
    """make_ctx(bundle, seed=0, cancel_after=None) -> JobContext recording its events."""
    from analogon.methods.base import JobContext

    def make(bundle, seed: int = 0, cancel_after: int | None = None):
        events: list[tuple] = []
        state = {"n": 0}

        def progress(stage, step, total):
            events.append(("progress", stage, step, total))
            state["n"] += 1

        def cancelled():
            return cancel_after is not None and state["n"] >= cancel_after

        ctx = JobContext(bundle, cache, seed, progress=progress,
                         preview=lambda img, step: events.append(("preview", step)),
                         cancelled=cancelled)
        ctx.events = events
        return ctx

    return make
