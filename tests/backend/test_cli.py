"""The `analogon` command: run (options from the schema), demo, doctor, bench, hooks, serve."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import types
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from pydantic import Field

from analogon import cli, methods
from analogon.methods.base import Method, MethodParams, Role
from test_engine_methods import EchoMethod


class FailMethod(Method):
    id = "test-fail"
    title = "Test fail"
    Params = MethodParams
    roles = (Role("source", "Source"),)
    target_role = "source"

    def generate(self, ctx, inputs, params):
        raise RuntimeError("this method always fails")


class KindsParams(MethodParams):
    flag: bool = Field(True, description="A switch.")
    name: str | None = Field(None, description="Optional text.")
    weights: list[float] = Field(default_factory=lambda: [1.0], description="A list.")
    ratio: float = Field(0.5, ge=0, le=1, description="A ratio.")


class KindsMethod(Method):
    id = "test-kinds"
    title = "Kinds"
    Params = KindsParams
    roles = (Role("source", "Source"), Role("output", "Clashes with -o"))
    target_role = "source"


@pytest.fixture
def registered():
    ms = [methods.register(m) for m in (EchoMethod(), FailMethod(), KindsMethod())]
    yield {m.id: m for m in ms}
    for m in ms:
        methods.unregister(m.id)


def write_png(path: Path, rgba: np.ndarray) -> Path:
    Image.fromarray(rgba, "RGBA").save(path)
    return path


def read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGBA"))


def solid(w, h, rgb, a=255):
    out = np.zeros((h, w, 4), np.uint8)
    out[..., :3] = rgb
    out[..., 3] = a
    return out


def test_method_parser_from_schema(registered):
    p = cli.method_parser(registered["test-kinds"])
    a = p.parse_args(["-o", "x.png", "--no-flag", "--name", "hi", "--weights", "[0.5, 2]",
                      "--ratio", "0.25", "--image-output", "o.png", "--source", "s.png"])
    assert (a.param__flag, a.param__name, a.param__weights, a.param__ratio) == (False, "hi", [0.5, 2], 0.25)
    assert a.role__output == "o.png" and a.role__source == "s.png" and a.output == "x.png"
    a = p.parse_args(["-o", "x.png"])
    assert a.param__flag is None and a.param__ratio is None  # unset: the method's defaults apply
    p = cli.method_parser(registered["test-echo"])
    with pytest.raises(SystemExit):
        p.parse_args(["-o", "x.png", "--fail", "sometimes"])  # not one of the choices
    a = p.parse_args(["-o", "x.png", "--exemplar", "a.png", "--exemplar", "b.png@1,2,0.5", "--steps", "4"])
    assert a.role__exemplar == ["a.png", "b.png@1,2,0.5"] and a.param__steps == 4
    help_text = p.format_help()
    assert "--steps INT" in help_text and ">=1 <=50" in help_text and "default 3" in help_text


def test_parse_image_arg():
    assert cli.parse_image_arg("a.png") == (Path("a.png"), None)
    assert cli.parse_image_arg("dir/a@b.png@3,-4") == (Path("dir/a@b.png"), {"x": 3, "y": -4, "scale": 1.0})
    assert cli.parse_image_arg("a.png@1,2,0.5") == (Path("a.png"), {"x": 1, "y": 2, "scale": 0.5})
    assert cli.parse_image_arg("me@home.png") == (Path("me@home.png"), None)


def test_run_writes_result(registered, tmp_path, capsys):
    src = write_png(tmp_path / "src.png", solid(20, 12, (10, 20, 30)))
    ex = write_png(tmp_path / "ex.png", solid(4, 4, (200, 0, 0)))
    out = tmp_path / "out" / "result.png"
    rc = cli.main(["run", "test-echo", "--source", str(src), "--exemplar", f"{ex}@3,2", "--steps", "2",
                   "--shift", "5", "--seed", "9", "--cache-dir", "", "-o", str(out), "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["seed"] == 9 and report["params"]["shift"] == 5 and report["outputs"] == [str(out)]
    img = read_png(out)
    assert img.shape == (12, 20, 4)
    assert (img[2:6, 3:7, :3] == (200, 0, 0)).all() and (img[8:, 10:, :3] == (15, 25, 35)).all()


def test_run_writes_the_layer_with_only_the_change(registered, tmp_path, capsys):
    src = write_png(tmp_path / "src.png", solid(20, 12, (10, 20, 30)))
    emap = solid(20, 12, (0, 0, 0))
    emap[:, 10:, :3] = 255  # the right half may change
    emap = write_png(tmp_path / "map.png", emap)
    out = tmp_path / "result.png"
    rc = cli.main(["run", "test-echo", "--source", str(src), "--edit-map", str(emap), "--shift", "5",
                   "--cache-dir", "", "-o", str(out), "--layer", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    layer_path = tmp_path / "result.layer.png"
    assert report["outputs"] == [str(out), str(layer_path)]
    layer, img = read_png(layer_path), read_png(out)
    assert (layer[:, :10] == 0).all() and (layer[:, 10:, 3] == 255).all()
    assert (layer[:, 10:, :3] == (15, 25, 35)).all() and (img[:, :10, :3] == (10, 20, 30)).all()


def test_run_errors_are_readable(registered, tmp_path, capsys):
    src = write_png(tmp_path / "src.png", solid(8, 8, (1, 2, 3)))
    rc = cli.main(["run", "test-echo", "--source", str(src), "--steps", "99", "-o", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert rc == 1 and "steps" in err and "invalid_params" in err and "Traceback" not in err
    rc = cli.main(["run", "test-echo", "--source", str(tmp_path / "missing.png"), "-o", str(tmp_path / "o.png")])
    assert rc == 1 and "missing.png" in capsys.readouterr().err
    rc = cli.main(["run", "test-echo", "--source", str(src), "--model", str(tmp_path / "nope.safetensors"),
                   "-o", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert rc == 1 and "nope.safetensors" in err
    assert cli.main(["run", "no-such-method", "-o", "x.png"]) == 1
    assert "No method called" in capsys.readouterr().err
    assert cli.main(["run", "--list"]) == 0
    assert "test-echo" in capsys.readouterr().out


def test_demo_reports_failures_without_stopping(registered, tmp_path, capsys):
    out = tmp_path / "demo"
    rc = cli.main(["demo", "-o", str(out), "--methods", "test-fail,test-echo", "--cache-dir", ""])
    assert rc == 0
    table = json.loads((out / "timings.json").read_text())
    by_id = {e["method"]: e for e in table["methods"]}
    assert by_id["test-fail"]["status"] == "failed" and "always fails" in by_id["test-fail"]["error"]
    assert by_id["test-echo"]["status"] == "ok" and by_id["test-echo"]["params"]["steps"] == 2
    assert table["model"] in ("tiny-sd", "toy-sd")
    result = read_png(out / "test-echo.png")
    assert result.shape[:2] == (table["size"], table["size"])
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size[0] > 3 * 128 and sheet.size[1] >= 2 * 128
    md = (out / "timings.md").read_text()
    assert "| test-fail | failed |" in md and "| test-echo | ok |" in md


def test_demo_inputs_cover_every_required_role(registered):
    from analogon.samples import analogy_set

    m = registered["test-echo"]
    images, source = cli.demo_inputs(m, 64)
    assert set(images) == {"source", "exemplar", "edit_map"}
    ex = images["exemplar"][0]
    assert isinstance(ex, dict) and ex["x"] > 0  # placed as a patch
    emap = source.load(images["edit_map"])
    assert emap[ex["y"] + 10, ex["x"] + 10, 0] == 255 and emap[0, 63, 0] == 0  # white under it
    a = analogy_set(64)
    assert np.array_equal(a["a"], analogy_set(64)["a"])  # deterministic
    assert not np.array_equal(a["a"], a["b"]) and not np.array_equal(a["a"], a["a_prime"])


def test_doctor(capsys):
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    for word in ("torch", "diffusers", "device:", "krita:", "krita plugin installed", "methods:"):
        assert word in out


def test_bench_hooks(monkeypatch, capsys, tmp_path):
    calls = []
    fake = types.ModuleType("analogon.quality")
    fake.main = lambda argv: calls.append(("quality", argv)) or 0
    monkeypatch.setitem(sys.modules, "analogon.quality", fake)
    import analogon

    monkeypatch.setattr(analogon, "quality", fake, raising=False)
    assert cli.main(["bench", "--quality", "--fast"]) == 0
    assert calls == [("quality", ["--fast"])]
    monkeypatch.setitem(sys.modules, "analogon.quality", None)
    monkeypatch.delattr(analogon, "quality")
    assert cli.main(["bench", "--quality"]) == 1
    assert "analogon.quality" in capsys.readouterr().err
    fake_train = types.ModuleType("analogon.toyworld.train")
    fake_train.main = lambda argv: calls.append(("train", argv)) or 0
    monkeypatch.setitem(sys.modules, "analogon.toyworld.train", fake_train)
    try:
        import analogon.toyworld as tw

        monkeypatch.setattr(tw, "train", fake_train, raising=False)
    except ImportError:
        fake_pkg = types.ModuleType("analogon.toyworld")
        fake_pkg.train = fake_train
        monkeypatch.setitem(sys.modules, "analogon.toyworld", fake_pkg)
        monkeypatch.setattr(analogon, "toyworld", fake_pkg, raising=False)
    assert cli.main(["train-toy", "--steps", "3"]) == 0
    assert calls[-1] == ("train", ["--steps", "3"])


def test_bench_io_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert cli.main(["bench", "--list"]) == 0
    assert "io" in capsys.readouterr().out
    assert cli.main(["bench", "io", "--io-sizes", "32,64", "--repeat", "1", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    rows = data["sections"]["io"]["rows"]
    assert [r["size"] for r in rows[:2]] == ["32x32", "64x64"]
    for r in rows[:2]:
        for k in ("png_codec_ms", "png_up_ms", "png_down_ms", "raw_up_ms", "raw_down_ms"):
            assert r[k] > 0
    assert rows[2]["to_queued_ms"] <= rows[2]["to_done_ms"]
    assert "cpu_count" in data["machine"]
    assert "png_up_ms" in capsys.readouterr().out
    assert cli.main(["bench", "nope"]) == 2


def test_serve_writes_private_server_json(tmp_path):
    state = tmp_path / "state"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "analogon.cli", "serve", "--port", "0", "--state-dir", str(state),
         "--cache-dir", "", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        sj = state / "server.json"
        deadline = time.monotonic() + 120
        while not sj.exists():
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert stat.S_IMODE(sj.stat().st_mode) == 0o600
        info = json.loads(sj.read_text())
        assert info["url"].startswith("http://127.0.0.1:") and not info["url"].endswith(":0")
        assert info["pid"] == proc.pid and len(info["token"]) >= 32
        for _ in range(100):
            try:
                h = httpx.get(info["url"] + "/v1/health", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert h.status_code == 200
        assert httpx.get(info["url"] + "/v1/methods").status_code == 401
        r = httpx.get(info["url"] + "/v1/models", headers={"Authorization": f"Bearer {info['token']}"})
        assert r.status_code == 200 and r.json()["default"] == "tiny-sd"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0
    assert not (state / "server.json").exists()


def test_serve_refuses_remote_host_without_flag(capsys):
    assert cli.main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 1
    assert "--allow-remote" in capsys.readouterr().err


def test_contact_sheet_labels_use_only_glyphs_the_font_has():
    from analogon.cli import _printable

    assert _printable("difference ×1, λ=0.5, A′ → B′") == "difference x1, lambda=0.5, A' -> B'"
    assert _printable("café").isascii()
