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
    assert (ap["case"], ap["size"], ap["latent"], ap["cpu_ratio"]) == ("ours", "96x96", "12x12", None)
    # the inversions were cached before the timed run: the run is the loop alone, no encode
    assert ap["unet_calls"] == ap["steps_run"] and ap["vae_enc"] == 0
    dec = s["decode"]["rows"]
    assert [(r["size"], r["case"]) for r in dec] == [("64x64", "shipped"), ("64x64", "tiled"),
                                                     ("96x96", "shipped"), ("96x96", "tiled")]
    assert all(r["vae_dec"] == 1 and r["est_mb"] > 0 for r in dec)
    assert [r["plan"] for r in dec] == ["whole", "tiled"] * 2 and "max_diff" in dec[1]
