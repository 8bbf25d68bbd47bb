"""`analogon bench --suite gpu`: one command measures every comparison side by side and writes one
JSON and one Markdown table (checked here on the tiny models, on the CPU)."""
from __future__ import annotations

import json

import pytest


def test_the_gpu_suite_runs_every_comparison_and_writes_json_and_markdown(tmp_path):
    from analogon.bench import main

    out = tmp_path / "out"
    assert main(["--suite", "gpu", "--gpu-models", "tiny", "--gpu-families", "sd15", "--size", "64",
                 "--repeat", "2", "--no-warmup", "--gpu-pixels-steps", "10", "--gpu-appearance-steps", "6",
                 "--gpu-out", str(out), "--json", str(tmp_path / "also.json")]) == 0
    result = json.loads((out / "bench-gpu.json").read_text())
    assert json.loads((tmp_path / "also.json").read_text())["rows"] == result["rows"]
    rows = {(r["part"], r["case"]): r for r in result["rows"]}
    assert list(rows) == [("pixels", "diffusers img2img"), ("pixels", "PIXELS, as shipped"),
                          ("dia", "diffusers txt2img"), ("dia", "DIA cache hit, as shipped"),
                          ("appearance", "authors-like"), ("appearance", "ours, as shipped")]
    img2img, pixels = rows["pixels", "diffusers img2img"], rows["pixels", "PIXELS, as shipped"]
    # the same denoising as the pipeline: int(10 × the shipped strength) of 10 steps, guided
    from analogon.methods.pixels import PixelsParams

    run = int(10 * PixelsParams().strength)
    assert run >= 2 and pixels["steps_run"] == img2img["steps_run"] == run
    assert (pixels["unet_calls"], pixels["unet_elems"]) == (img2img["unet_calls"], img2img["unet_elems"]) == (run, 2 * run)
    assert (pixels["vae_enc"], pixels["vae_dec"]) == (1, 1) and pixels["previews"] >= 1
    txt, hit = rows["dia", "diffusers txt2img"], rows["dia", "DIA cache hit, as shipped"]
    assert (hit["unet_calls"], hit["unet_elems"], hit["vae_enc"]) == (txt["unet_calls"], txt["unet_elems"], 0)
    authors, ours = rows["appearance", "authors-like"], rows["appearance", "ours, as shipped"]
    assert authors["unet_calls"] == 2 * authors["steps_run"] and authors["vae_dec"] == 3
    assert ours["unet_calls"] < authors["unet_calls"] and ours["dtype"] == "float32"
    for r in result["rows"]:
        assert r["runs"] == 2 and r["ms_per_step"] > 0 and r["seconds"] > 0 and r["load_1m"] >= 0
        assert r["peak_rss_mb"] > 0  # on a CPU the process's resident set
        base = rows[r["part"], r["base"]]
        assert r["step_rate_vs_base"] == pytest.approx(base["ms_per_step"] / r["ms_per_step"], rel=0.02)
    md = (out / "bench-gpu.md").read_text()
    assert md == result["markdown"] and md.count("\n| sd15 | pixels |") == 2 and md.count("\n| sd15 |") == 6 + 2
    assert "| model | target |" in md and {t["what"] for t in result["targets"]} == {
        "PIXELS step rate / diffusers img2img's", "appearance speed-up over the authors' arrangement"}


def test_random_folders_are_reused_and_built_in_fp16(tmp_path, monkeypatch):
    from analogon.bench import _random_models, gpu
    from analogon.models import load_bundle

    there = tmp_path / "sd15-random-fp16"
    there.mkdir()
    (there / "model_index.json").write_text("{}")
    monkeypatch.setattr(_random_models, "build_random", lambda *a, **kw: pytest.fail("rebuilt"))
    assert gpu.random_folder("sd15", tmp_path, None, log=lambda *_: None) == there
    monkeypatch.undo()
    # a build with small configs (the tiny model's) in fp16, drawn on a given device
    tiny = load_bundle("tiny-sd", None)
    configs = tmp_path / "configs"
    tiny.pipe.save_pretrained(str(configs))
    out = _random_models.build_random("sd15", tmp_path / "built", dtype="float16", config_dir=configs,
                                      device="cpu", log=lambda *_: None)
    assert "float16" in (out / "RANDOM_WEIGHTS.txt").read_text()
    b = load_bundle(str(out), None)  # loads as any folder, in the dtype asked for (fp32 on a CPU)
    assert b.family == "sd1" and str(b.unet.dtype) == "torch.float32"
    from safetensors import safe_open

    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype.is_floating_point
        assert str(f.get_tensor(next(iter(f.keys()))).dtype) == "torch.float16"
