"""The engine: params validation, role checks, placement, finalize, seeds."""
from __future__ import annotations

import numpy as np
import pytest

from analogon import engine, methods
from analogon.core.cache import Cache
from analogon.errors import AnalogonError, JobCancelled
from analogon.methods.base import MethodParams
from analogon.models import LoadOptions, ModelManager
from test_engine_methods import EchoMethod


@pytest.fixture
def echo():
    m = methods.register(EchoMethod())
    yield m
    methods.unregister(m.id)


@pytest.fixture(scope="module")
def models():
    return ModelManager(1, LoadOptions(device="cpu"))


def _img(w, h, rgb=(100, 100, 100), a=255):
    out = np.zeros((h, w, 4), np.uint8)
    out[..., :3] = rgb
    out[..., 3] = a
    return out


def test_params_validated_with_defaults(echo):
    job = engine.prepare("test-echo", {"steps": 5}, {"source": "a" * 64}, None, 7, "tiny-sd")
    assert job.params.steps == 5 and job.params.delay == 0.0 and job.seed == 7 and job.model == "tiny-sd"
    for bad in ({"steps": 0}, {"steps": 51}, {"steps": "many"}, {"nope": 1}, [1, 2]):
        with pytest.raises(AnalogonError) as e:
            engine.prepare("test-echo", bad, {"source": "a" * 64}, None, None, "tiny-sd")
        assert e.value.code == "invalid_params" and e.value.status == 422
    with pytest.raises(AnalogonError) as e:
        engine.prepare("test-echo", {"steps": 99}, {"source": "a" * 64}, None, None, "tiny-sd")
    assert e.value.detail[0]["loc"] == ["steps"] and "steps" in e.value.message


def test_roles_checked(echo):
    sha = "b" * 64
    cases = [
        ({}, "source"),  # missing required
        ({"source": sha, "colour": sha}, "colour"),  # unknown role
        ({"source": [sha, sha]}, "source"),  # list for a single role
        ({"source": "not-a-sha"}, "source"),
        ({"source": {"sha": sha, "x": "left"}}, "source"),
        ({"source": sha, "exemplar": [{"sha": sha, "scale": 0}]}, "exemplar"),
    ]
    for images, role in cases:
        with pytest.raises(AnalogonError) as e:
            engine.prepare("test-echo", {}, images, None, None, "tiny-sd")
        assert e.value.code == "invalid_images" and e.value.detail["role"] == role, images
    job = engine.prepare("test-echo", {}, {"source": [sha], "exemplar": sha}, None, None, "tiny-sd")
    assert isinstance(job.refs["source"], engine.ImageRef) and isinstance(job.refs["exemplar"], list)


def test_unknown_method_and_seed():
    with pytest.raises(AnalogonError) as e:
        engine.prepare("no-such-method", {}, {}, None, None, "tiny-sd")
    assert e.value.code == "unknown_method" and e.value.status == 404


def test_random_seed_reported(echo):
    seeds = {engine.prepare("test-echo", {}, {"source": "a" * 64}, None, None, "tiny-sd").seed
             for _ in range(5)}
    assert len(seeds) > 1 and all(0 <= s < 2**32 for s in seeds)
    for bad in (-1, 2**40, 1.5, "7", True):
        with pytest.raises(AnalogonError):
            engine.prepare("test-echo", {}, {"source": "a" * 64}, None, bad, "tiny-sd")


def test_missing_image_in_source(echo):
    src = engine.MemorySource()
    with pytest.raises(AnalogonError) as e:
        engine.prepare("test-echo", {}, {"source": "c" * 64}, None, None, "tiny-sd", source=src)
    assert e.value.code == "image_not_found" and e.value.detail["missing"] == ["c" * 64]


def test_execute_places_exemplars_and_finalizes(echo, models, tmp_path):
    src = engine.MemorySource()
    source = _img(32, 24, (10, 20, 30))
    ex = _img(8, 8, (250, 0, 0))
    emap = np.zeros((24, 32, 4), np.uint8)
    emap[:, 16:] = 255  # right half may change
    s_src, s_ex, s_map = src.add(source), src.add(ex), src.add(emap)
    job = engine.prepare(
        "test-echo", {"steps": 2, "shift": 5},
        {"source": s_src, "exemplar": [{"sha": s_ex, "x": 20, "y": 4, "scale": 0.5},
                                       {"sha": s_ex, "x": 2, "y": 2}],
         "edit_map": s_map},
        "tiny-sd", 11, "tiny-sd", source=src)
    events = []
    res = engine.execute(job, source=src, models=models, cache=Cache(None),
                         progress=lambda *a: events.append(a))
    call = echo.calls[-1]
    assert call["seed"] == 11 and call["model"] == "tiny-sd"
    placed = call["exemplars"][0]
    assert placed.shape == (24, 32, 4)
    assert (placed[4:8, 20:24, 3] == 255).all() and placed[..., 3].sum() == 16 * 255
    out = res.images[0].rgba
    # left half: edit map black -> bit-identical to the source, even under an exemplar
    assert np.array_equal(out[:, :16], source[:, :16])
    # right half: changed by the method (shift), exemplar pasted where placed
    assert (out[12:, 16:, :3] == (15, 25, 35)).all()
    assert (out[4:8, 20:24, :3] == (250, 0, 0)).all()
    assert res.seed == 11 and res.params == {**MethodParams().model_dump(), "steps": 2, "delay": 0.0, "fail": "", "shift": 5}
    assert res.info == {"note": "echoed", "return": {"box": [0, 0, 32, 24], "working_size": [32, 24],
                                                     "changed_pixels": 16 * 24}}
    assert set(res.timings) >= {"run", "total"}
    layer = res.images[0].layer  # only the change: transparent where the map is black
    assert (layer[:, :16] == 0).all() and (layer[:, 16:, 3] == 255).all()
    assert np.array_equal(layer[:, 16:], out[:, 16:])
    assert ("denoise", 2, 2) in events


def test_execute_cancel_and_errors(echo, models):
    src = engine.MemorySource()
    s = src.add(_img(16, 16))
    job = engine.prepare("test-echo", {"steps": 3}, {"source": s}, None, 0, "tiny-sd", source=src)
    with pytest.raises(JobCancelled):
        engine.execute(job, source=src, models=models, cache=Cache(None), cancelled=lambda: True)
    job = engine.prepare("test-echo", {"fail": "analogon"}, {"source": s}, None, 0, "tiny-sd", source=src)
    with pytest.raises(AnalogonError) as e:
        engine.execute(job, source=src, models=models, cache=Cache(None))
    assert e.value.code == "test_failure"
    job = engine.prepare("test-echo", {}, {"source": s}, "/nonexistent/model.safetensors", 0,
                         "tiny-sd", source=src)
    with pytest.raises(AnalogonError) as e:
        engine.execute(job, source=src, models=models, cache=Cache(None))
    assert e.value.code == "model_not_found" and "model.safetensors" in e.value.message


def test_an_image_reference_is_exactly_a_sha256_digest():
    sha = "ab" * 32
    assert engine.parse_ref(sha, "source").sha == sha
    for bad in (sha + "\n", " " + sha, sha.upper(), sha[:-1], sha + "0"):
        with pytest.raises(AnalogonError) as e:
            engine.parse_ref(bad, "source")
        assert e.value.code == "invalid_images"
