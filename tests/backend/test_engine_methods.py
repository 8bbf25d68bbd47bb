"""Test-only methods for the engine and server tests (registered by the tests that use them),
plus a check that they describe themselves the way the panel reads methods."""
from __future__ import annotations

import threading
import time
from typing import Literal

import numpy as np
from pydantic import Field

from analogon.errors import AnalogonError
from analogon.methods.base import (
    Inputs, JobContext, Method, MethodParams, MethodResult, ResultImage, Role,
)


class EchoParams(MethodParams):
    steps: int = Field(3, ge=1, le=50, description="Number of fake denoising steps.")
    delay: float = Field(0.0, ge=0.0, le=5.0, description="Seconds per step.")
    fail: Literal["", "analogon", "crash"] = Field("", description="Fail on purpose at step 1.")
    shift: int = Field(0, ge=0, le=255, description="Added to every colour channel.")


class EchoMethod(Method):
    """Returns the source, brightened by ``shift``, pasted over with the exemplars; reports
    progress each step, a preview at the last step, and honours cancel via ctx.progress."""

    id = "test-echo"
    title = "Test echo"
    description = "A test method."
    Params = EchoParams
    roles = (
        Role("source", "Source"),
        Role("exemplar", "Exemplar", multiple=True, required=False, canvas="source"),
    )
    target_role = "source"
    demo_params = {"steps": 2}

    def __init__(self):
        self.calls: list[dict] = []
        self.started = threading.Event()

    def generate(self, ctx: JobContext, inputs: Inputs, params: EchoParams) -> MethodResult:
        self.calls.append({"seed": ctx.seed, "params": params.model_dump(), "model": ctx.model.spec,
                           "exemplars": [li.rgba.copy() for li in inputs.all("exemplar")]})
        self.started.set()
        src = inputs.get("source").rgba
        out = src.copy()
        out[..., :3] = np.clip(out[..., :3].astype(int) + params.shift, 0, 255).astype(np.uint8)
        for ex in inputs.all("exemplar"):
            a = ex.rgba[..., 3] > 0
            out[a] = ex.rgba[a]
        for i in range(params.steps):
            ctx.progress("denoise", i + 1, params.steps)
            if i == 0 and params.fail == "analogon":
                raise AnalogonError("test_failure", "The test method failed on purpose.", {"step": 1})
            if i == 0 and params.fail == "crash":
                raise RuntimeError("boom at step 1")
            if params.delay:
                time.sleep(params.delay)
        ctx.preview(out[..., :3], params.steps)
        return MethodResult([ResultImage(out, label="echo")], info={"note": "echoed"})


def test_echo_method_describes_itself():
    d = EchoMethod().describe()
    assert d["id"] == "test-echo" and d["target_role"] == "source"
    names = [r["name"] for r in d["roles"]]
    assert names == ["source", "exemplar", "edit_map", "mask"]
    steps = d["params"]["properties"]["steps"]
    assert steps["minimum"] == 1 and steps["maximum"] == 50 and steps["default"] == 3
    assert steps["description"]
