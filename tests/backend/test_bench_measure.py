"""The benchmark's measuring tools tell the truth: peak memory sees a block that only reuses
memory freed before it, model calls are counted, saved activations exclude the weights."""
from __future__ import annotations

import numpy as np
import torch

from analogon.bench._measure import measure
from analogon.bench._memory import PeakMemory
from analogon.models import load_bundle


def test_peak_memory_sees_reused_memory():
    big = 200 * 2**20

    def alloc():
        a = np.ones(big // 8)  # 200 MiB touched
        return float(a[::4096].sum())

    alloc()  # freed memory the allocator may keep for reuse
    with PeakMemory("cpu", python=False) as m:
        alloc()
    assert m.peak_mb > 150, m.peak_mb
    assert m.rss_peak_mb is not None and m.rss_peak_mb >= m.peak_mb
    with PeakMemory("cpu", python=False) as quiet:
        sum(range(1000))
    assert quiet.peak_mb < 50, quiet.peak_mb


def test_calls_count_unet_and_vae():
    b = load_bundle("tiny-sd", None)
    from analogon.core.diffusion import vae_decode, vae_encode

    x = torch.zeros(2, 3, 64, 64)

    def work():
        z = vae_encode(b, x)
        cond = torch.zeros(3, 77, b.unet.config.cross_attention_dim)
        with torch.no_grad():
            b.unet(torch.cat([z, z[:1]]), 10, encoder_hidden_states=cond)
        return vae_decode(b, z[:1])

    row, out = measure(b, work)
    assert (row["unet_calls"], row["unet_elems"]) == (1, 3)
    assert (row["vae_enc"], row["vae_enc_elems"], row["vae_dec"], row["vae_dec_elems"]) == (1, 2, 1, 1)
    assert row["cpu_s"] > 0 and row["previews"] == 0
    assert "encode" not in b.vae.__dict__ and "decode" not in b.vae.__dict__  # unwrapped after


def test_saved_activations_exclude_weights():
    from analogon.bench.dia import _Saved

    lin = torch.nn.Linear(512, 512)  # 1 MiB of weights, saved by autograd for the input's grad
    x = torch.randn(4, 512, requires_grad=True)
    with _Saved(lin) as s:
        y = lin(x).relu()
    y.sum().backward()
    # what is kept: the input (8 KiB) and the relu's output (8 KiB); not the weight (1 MiB)
    assert 8 * 1024 <= s.bytes <= 3 * 8 * 1024, s.bytes
    with _Saved() as counted_all:
        lin(x).relu().sum().backward()
    assert counted_all.bytes > 2**20  # without the model given, the weight is counted: the old bug


def test_cases_option_parses_and_refuses_strangers():
    import pytest

    from analogon.bench.pixels import CASES, cases_from

    assert cases_from(None, CASES) == list(CASES)
    assert cases_from("exemplar, img2img", CASES) == ["img2img", "exemplar"]  # the table's order
    with pytest.raises(ValueError, match="nope"):
        cases_from("map,nope", CASES)


def _bench_rows(tmp_path, *argv):
    import json

    from analogon.bench import main

    path = tmp_path / "b.json"
    assert main([*argv, "--repeat", "1", "--no-warmup", "--json", str(path)]) == 0
    return json.loads(path.read_text())["sections"]


def test_scaling_options_set_the_working_size_and_the_cases(tmp_path):
    # the options the scaling table runs with: a working size and one case per section
    s = _bench_rows(tmp_path, "pixels", "appearance", "decode", "--model", "tiny-sd",
                    "--pixels-size", "96", "--pixels-cases", "map", "--pixels-steps", "4",
                    "--pixels-step-costs", "off", "--appearance-size", "96", "--appearance-cases", "ours",
                    "--appearance-steps", "4", "--decode-sizes", "64,96")
    (px,) = s["pixels"]["rows"]
    assert (px["case"], px["size"], px["ratio"]) == ("pixels map", "96x96", None)
    assert px["unet_elems"] == 2 * px["steps_run"] and px["vae_dec"] == 1
    (ap,) = s["appearance"]["rows"]
    assert (ap["case"], ap["size"], ap["latent"], ap["cpu_ratio"]) == ("ours, as shipped", "96x96", "12x12", None)
    # the inversions were cached before the timed run: the run is the loop (and, as shipped, the
    # one call of the automatic AdaIN masks), no encode
    assert ap["unet_calls"] in (ap["steps_run"], ap["steps_run"] + 1) and ap["vae_enc"] == 0
    dec = s["decode"]["rows"]
    assert [(r["size"], r["case"]) for r in dec] == [("64x64", "shipped"), ("64x64", "tiled"),
                                                     ("96x96", "shipped"), ("96x96", "tiled")]
    assert all(r["vae_dec"] == 1 and r["est_mb"] > 0 for r in dec)
    assert [r["plan"] for r in dec] == ["whole", "tiled"] * 2 and "max_diff" in dec[1]


def test_calls_count_only_the_measuring_threads_calls():
    import threading

    b = load_bundle("tiny-sd", None)
    from analogon.core.diffusion import vae_decode, vae_encode

    x = torch.zeros(1, 3, 64, 64)
    started, stop = threading.Event(), threading.Event()

    def elsewhere():  # e.g. a preview fit in the background
        while not stop.is_set():
            vae_decode(b, vae_encode(b, x))
            started.set()

    t = threading.Thread(target=elsewhere)
    t.start()
    try:
        started.wait(30)
        row, _ = measure(b, lambda: [vae_encode(b, x) for _ in range(3)])
    finally:
        stop.set()
        t.join()
    assert (row["vae_enc"], row["vae_dec"]) == (3, 0)


def test_interleaved_runs_alternate_the_cases_and_record_the_load():
    from analogon.bench._measure import interleaved, load_columns, summary

    order: list[str] = []
    cases = [("A", lambda: order.append("A")), ("B", lambda: order.append("B"))]
    n = iter(range(100))
    runs = interleaved(cases, 3, lambda fn: (fn(), {"wall_s": float(next(n)), "load_1m": 1.5})[1])
    assert order == ["A", "B"] + ["A", "B"] * 3  # a warm-up round, then A B A B A B
    assert [r["wall_s"] for r in runs["A"]] == [0.0, 2.0, 4.0] and summary(runs["B"], "wall_s") == 3.0
    assert load_columns(runs["A"]) == {"load_1m": 1.5, "load_max": 1.5}
    order.clear()
    interleaved(cases, 1, lambda fn: fn() or {}, warmup=False)
    assert order == ["A", "B"]
    row, _ = measure(load_bundle("tiny-sd", None), lambda: None)
    assert row["load_1m"] >= 0  # the machine's load beside every measured run


def test_appearance_rows_run_what_they_are_labelled(tmp_path, monkeypatch):
    """'as shipped' is the method's defaults (γ 0.75, masked AdaIN, FreeU), 'paper' the paper's
    attention (γ 0) with whole-image AdaIN: the settings the method really received."""
    from analogon.methods.appearance import AppearanceTransfer, AppearanceParams

    got: list[AppearanceParams] = []
    real = AppearanceTransfer.generate

    def spy(self, ctx, inputs, params):
        got.append(params)
        return real(self, ctx, inputs, params)

    monkeypatch.setattr(AppearanceTransfer, "generate", spy)
    s = _bench_rows(tmp_path, "appearance", "--appearance-cases", "paper,ours,authors-like",
                    "--appearance-steps", "12")
    rows = {r["case"]: r for r in s["appearance"]["rows"]}
    assert list(rows) == ["authors-like", "ours, paper's settings", "ours, as shipped"]
    skip = round(12 * 0.32)
    paper, shipped = got  # one timed run each, in the table's order
    assert shipped.model_dump() == AppearanceParams(steps=12, skip_steps=skip).model_dump()
    assert shipped.query_preservation == 0.75 and shipped.adain == "masked" and shipped.freeu
    assert paper.model_dump() == AppearanceParams(steps=12, skip_steps=skip, query_preservation=0.0,
                                                  adain="whole").model_dump()
    # the structure's queries make the shipped batch larger on swapped steps
    assert rows["ours, as shipped"]["unet_elems"] > rows["ours, paper's settings"]["unet_elems"]
    assert rows["authors-like"]["batch_elements_per_step"] == 6
    for r in rows.values():
        assert r["load_1m"] >= 0 and r["peak_rss_mb"] > 0 and r["peak_rss_mb"] >= r["peak_mem_mb"]
    assert rows["ours, as shipped"]["speedup_cpu"] > 0 and rows["ours, as shipped"]["process_mem_ratio"] > 0


def test_dia_computes_only_the_parts_asked_for(tmp_path, monkeypatch):
    from analogon.core import conditioning_inversion as CI

    inverted: list[int] = []
    real = CI.invert_conditioning
    monkeypatch.setattr(CI, "invert_conditioning",
                        lambda *a, **kw: (inverted.append(1), real(*a, **kw))[1])
    s = _bench_rows(tmp_path, "dia", "--dia-parts", "analogy", "--dia-sweeps", "off",
                    "--dia-token-iters", "1", "--dia-views", "1", "--dia-noise", "0x1")
    configs = [r["config"] for r in s["dia"]["rows"]]
    assert configs == ["cold (all inversions)", "cached, 1 image", "diffusers txt2img (same steps, CFG)"]
    assert len(inverted) == 3  # A, A' and B of the cold job; nothing for parts not asked for


def test_first_job_section_reports_the_fit_at_load_and_the_steady_state(tmp_path):
    s = _bench_rows(tmp_path, "first", "--first-steps", "10", "--first-jobs", "2",
                    "--first-cache", str(tmp_path / "cache"))
    cold, warm = s["first"]["rows"]
    assert (cold["load"], cold["fit_source"]) == ("no fit on disk", "fitted")
    assert (warm["load"], warm["fit_source"]) == ("fit on disk", "disk")
    for r in (cold, warm):
        assert r["steady_previews"] >= 1 and r["fit_error"] is None
        # the jobs' own VAE calls: one encode, one decode (the fit's, in its thread, are not theirs)
        assert (r["first_vae_enc"], r["first_vae_dec"], r["steady_vae_enc"], r["steady_vae_dec"]) == (1, 1, 1, 1)
        assert r["first_s"] > 0 and r["steady_s"] > 0 and r["first_ratio"] > 0 and r["load_1m"] >= 0
        assert r["rounds"] == 1 and r["first_ratios"] == [r["first_ratio"]]
    assert (tmp_path / "cache" / "round-0").is_dir()
