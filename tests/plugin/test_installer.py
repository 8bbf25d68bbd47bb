"""Installing the backend from the docker with uv: the plan per platform and PyTorch variant,
uv itself from PyPI's pinned wheel (checked), what the progress says while uv downloads, a real
install from a package index on 127.0.0.1 (PyPI's torch when the PyTorch index cannot be
reached, the build recorded for Update), cancel, uninstall and the sweep of what a quit Krita
left half-deleted."""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from analogon_krita.install import installer
from analogon_krita.install.installer import Installer, Meter, Step, detect_variant, lock_without_torch, plan
from conftest import ROOT, wait_until
from local_index import LocalIndex, make_wheel

LOCK = (ROOT / "packaging" / "requirements" / "lock.txt").read_text()
UV = str(Path(sys.executable).parent / "uv")


def args_of(steps, title_part):
    return next(s for s in steps if title_part in s.title).args


@pytest.mark.parametrize("platform,variant,index", [
    ("linux", "cuda", None),  # PyPI's torch is the CUDA build: all from the lock
    ("linux", "rocm", "https://download.pytorch.org/whl/rocm6.4"),
    ("linux", "cpu", "https://download.pytorch.org/whl/cpu"),
    ("win32", "cuda", "https://download.pytorch.org/whl/cu128"),
    ("win32", "cpu", "https://download.pytorch.org/whl/cpu"),
    ("darwin", "apple", None),
])
def test_plan_per_platform_and_variant(tmp_path, platform, variant, index):
    venv = tmp_path / "venv"
    steps = plan("/d/uv", venv, tmp_path / "analogon-0.1.0-py3-none-any.whl", LOCK, variant, platform=platform)
    titles = [s.title for s in steps]
    assert titles[0] == "Creating the Python environment" and titles[-1] == "Checking the installation"
    # no Python of the system's is run: uv makes the environment (with a Python it downloads
    # when there is no suitable one) and installs into it
    assert steps[0].program == "/d/uv" and steps[0].args == ["venv", "--python", ">=3.10", str(venv)]
    py = str(venv / ("Scripts/python.exe" if platform == "win32" else "bin/python"))
    assert all(s.program == "/d/uv" and s.args[:4] == ["pip", "install", "--python", py] for s in steps[1:-1])
    deps = next(s for s in steps if s.title == "Installing the dependencies")
    req_text = next(iter(deps.files.values()))
    if index is None:
        assert not any(t.startswith("Installing PyTorch") for t in titles)
        assert "torch==" in req_text
    else:
        step = next(s for s in steps if s.title == f"Installing PyTorch ({variant})")
        assert step.args[step.args.index("--index-url") + 1] == index and step.record == {"torch_from": index}
        pins = installer.lock_pins(LOCK)
        torch = [f"torch=={pins['torch']}", f"torchvision=={pins['torchvision']}"]
        assert step.args[-2:] == torch
        # PyPI's torch when the PyTorch index cannot be reached
        assert step.fallback.title == "Installing PyTorch from PyPI" and step.fallback.args[-2:] == torch
        assert "--index-url" not in step.fallback.args and step.fallback.record == {"torch_from": "pypi"}
        assert "\ntorch==" not in req_text and "nvidia-" not in req_text and "diffusers==" in req_text
    backend = args_of(steps, "Analogon backend")
    assert {"--no-deps", "--reinstall", "--no-index"} <= set(backend) and backend[-1].endswith(".whl")
    assert steps[-1].program.endswith("analogon.exe" if platform == "win32" else "bin/analogon")
    update = plan("/d/uv", venv, tmp_path / "w.whl", LOCK, variant, platform=platform, update=True)
    assert "Creating the Python environment" not in [s.title for s in update]
    # tests: another PyPI and PyTorch index
    local = plan("/d/uv", venv, tmp_path / "w.whl", LOCK, variant, platform=platform,
                 index_url="http://127.0.0.1:1/simple/", pytorch_index="http://127.0.0.1:2/")
    assert args_of(local, "dependencies")[4:6] == ["--index-url", "http://127.0.0.1:1/simple/"]


def test_lock_without_torch_keeps_everything_else():
    rest = lock_without_torch(LOCK)
    pins = installer.lock_pins(LOCK)
    kept = installer.lock_pins(rest)
    assert "torch" in pins and "torch" not in kept and "torchvision" not in kept
    assert {k: v for k, v in pins.items() if not installer.TORCH_COMPANIONS.match(k)} == kept


@pytest.mark.parametrize("platform,machine,tools,paths,expect", [
    ("linux", "x86_64", {"nvidia-smi"}, set(), "cuda"),
    ("linux", "x86_64", {"rocminfo"}, set(), "rocm"),
    ("linux", "x86_64", set(), {"/opt/rocm"}, "rocm"),
    ("linux", "x86_64", set(), set(), "cpu"),
    ("win32", "AMD64", set(), {r"C:\Windows\System32\nvidia-smi.exe"}, "cuda"),
    ("win32", "AMD64", {"rocminfo"}, set(), "cpu"),
    ("darwin", "arm64", set(), set(), "apple"),
    ("darwin", "x86_64", set(), set(), "cpu"),
])
def test_detect_variant(platform, machine, tools, paths, expect):
    assert detect_variant(platform, machine, which=lambda t: t in tools and "/bin/" + t,
                          exists=lambda p: p in paths) == expect


@pytest.mark.parametrize("platform,env,expect", [
    ("win32", {"LOCALAPPDATA": "C:/Users/p/AppData/Local"}, "C:/Users/p/AppData/Local/analogon/venv"),
    ("darwin", {}, "{home}/Library/Application Support/analogon/venv"),
    ("linux", {}, "{home}/.local/share/analogon/venv"),
])
def test_venv_in_the_data_folder(tmp_path, monkeypatch, platform, env, expect):
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("XDG_DATA_HOME", "ANALOGON_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(sys, "platform", platform)
    assert installer.venv_dir() == Path(expect.format(home=tmp_path))


# -- uv from PyPI's wheel --------------------------------------------------------------------------

@pytest.mark.parametrize("platform,machine,key", [
    ("linux", "x86_64", "linux-x86_64"), ("linux", "aarch64", "linux-aarch64"),
    ("darwin", "arm64", "macos-arm64"), ("darwin", "x86_64", "macos-x86_64"), ("win32", "AMD64", "windows-x86_64"),
])
def test_every_platform_has_a_pinned_uv_wheel(platform, machine, key):
    pins = installer.uv_pins()  # the checkout's packaging/uv.json (the release: backend/uv.json)
    assert installer.platform_key(platform, machine) == key
    pin = pins["wheels"][key]
    assert re.fullmatch(r"[0-9a-f]{64}", pin["sha256"])
    assert pin["url"].startswith("https://files.pythonhosted.org/") and f"/uv-{pins['version']}-py3-none-" in pin["url"]


def run_installer(inst: Installer, action, timeout=240):
    results, progress, log = [], [], []
    inst.finished.connect(lambda ok, msg: results.append((ok, msg)))
    inst.progress.connect(lambda p, t: progress.append((p, t)))
    inst.logLine.connect(log.append)
    action()
    assert wait_until(lambda: results, timeout), "the installer did not finish: " + "\n".join(log[-20:])
    return results[0], progress, log


def fake_uv_wheel(folder: Path) -> Path:
    return make_wheel(folder, "uv", "0.0.1", files={"uv/__init__.py": b""},
                      data_scripts={"uv": b"#!/bin/sh\necho 'uv 0.0.1 (fake)'\n"})


@pytest.mark.parametrize("good", [True, False], ids=["checked", "tampered"])
def test_uv_comes_from_the_pinned_wheel_and_is_checked(kapp, tmp_path, good):
    wheel = fake_uv_wheel(tmp_path / "pypi")
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest() if good else "0" * 64
    with LocalIndex(tmp_path / "pypi") as pypi:
        pins = {"version": "0.0.1", "wheels": {installer.platform_key(): {"url": pypi.file_url(wheel.name), "sha256": sha}}}
        inst = Installer(venv=tmp_path / "data" / "venv", wheel=tmp_path / "analogon-0.1.0-py3-none-any.whl",
                         pins=pins)
        uv, steps = inst._uv_steps()
        assert uv == str(tmp_path / "data" / "uv" / "0.0.1" / "uv") and len(steps) == 1
        assert steps[0].title == "Getting uv 0.0.1, the tool that installs the backend"
        (ok, msg), progress, _ = run_installer(inst, lambda: inst.run_steps(steps), 30)
    if good:
        assert ok and subprocess.run([uv], capture_output=True, text=True).stdout.strip() == "uv 0.0.1 (fake)"
        assert any(re.search(r"Getting uv 0\.0\.1.*: [\d.]+ MB of [\d.]+ MB, [\d.]+ MB/s", t) for _, t in progress), progress
        assert inst._uv_steps() == (uv, [])  # there now: not fetched again
    else:
        assert not ok and "does not match the checksum" in msg and not Path(uv).exists()


def test_an_unreachable_pypi_for_uv_says_so(kapp, tmp_path):
    pins = {"version": "0.0.1", "wheels": {installer.platform_key(): {"url": "http://127.0.0.1:9/uv.whl", "sha256": "0" * 64}}}
    inst = Installer(venv=tmp_path / "venv", wheel=tmp_path / "analogon-0.1.0-py3-none-any.whl", pins=pins)
    (ok, msg), _, _ = run_installer(inst, lambda: inst.run_steps(inst._uv_steps()[1]), 30)
    assert not ok and msg.startswith("Could not download uv, the tool that installs the backend, from PyPI (")
    assert "Check the internet connection" in msg


# -- what the progress says ----------------------------------------------------------------------

def test_the_meter_says_what_is_downloaded_in_mb_and_mb_per_second():
    m = Meter(100.0)
    assert m.text(101.0) == "1 s" and m.fraction() == 0
    assert m.line("Resolved 40 packages in 2.1s", 102.0) is False
    assert m.line("Downloading torch (800.0MiB)", 102.0) and m.line("Downloading pillow (4.5MiB)", 102.0)
    assert m.text(142.0) == "downloading torch (839 MB) and 1 more, 40 s"
    assert m.line(" Downloaded pillow", 103.0)
    assert m.text(142.0) == "downloading torch (839 MB), 40 s; 4.7 MB downloaded at 0.1 MB/s"
    f1 = m.fraction()
    assert m.line(" Downloaded torch", 162.0)
    assert m.text(162.0) == "844 MB downloaded at 14 MB/s (last: torch 839 MB at 14 MB/s)"
    f2 = m.fraction()
    assert m.line("Prepared 2 packages in 60s", 162.0)
    f3 = m.fraction()
    assert m.text(170.0) == "844 MB downloaded at 12 MB/s (last: torch 839 MB at 14 MB/s); unpacking into the environment, 70 s"
    assert m.line("Installed 40 packages in 9s", 171.0)
    assert 0 < f1 < f2 <= 0.8 < f3 < m.fraction() < 1
    own = Meter(0.0)  # a download of ours (uv) counts its bytes
    own.bytes_so_far(30_000_000, 60_000_000)
    assert own.text(2.0) == "30 MB of 60 MB, 15 MB/s" and own.fraction() == 0.5


# -- a real install from a package index on 127.0.0.1 -------------------------------------------

@pytest.fixture
def pypi(tmp_path):
    """PyPI on 127.0.0.1 with what a small lock needs: torch and torchvision stand-ins and a
    dependency."""
    folder = tmp_path / "pypi"
    make_wheel(folder, "torch", "2.9.0")
    make_wheel(folder, "torchvision", "0.24.0")
    make_wheel(folder, "tinydep", "1.0")
    with LocalIndex(folder) as index:
        yield index


@pytest.mark.slow
def test_install_with_uv_pypi_torch_when_the_pytorch_index_is_unreachable(kapp, release, tmp_path, pypi,
                                                                          monkeypatch):
    """With this Python (no download), uv from the test environment, PyPI on 127.0.0.1 and the
    PyTorch index on a closed port: PyTorch comes from PyPI, said in plain words; the build is
    recorded; Start backend finds the result; Update keeps the build; Uninstall asks nothing
    here (the docker asks) and takes everything but the models."""
    if not Path(UV).exists():
        pytest.skip("uv is not installed in the test environment (pip install uv)")
    _, wheel = release
    monkeypatch.setenv("ANALOGON_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("UV_HTTP_RETRIES", "0")
    monkeypatch.setattr(installer, "detect_variant", lambda *a, **k: "cuda")  # Update must not ask it
    lock = tmp_path / "lock.txt"
    lock.write_text("tinydep==1.0\ntorch==2.9.0\ntorchvision==0.24.0\n")
    options = dict(wheel=wheel, lock=lock, uv=UV, python=sys.executable, index_url=pypi.url,
                   pytorch_index="http://127.0.0.1:9/whl/")
    inst = Installer(**options)
    (ok, msg), progress, log = run_installer(inst, lambda: inst.install("cpu"))
    venv = tmp_path / "data" / "venv"
    assert ok, "\n".join(log[-30:])
    assert msg == f"Installed the Analogon backend {installer.wheel_version(wheel)} in {venv}."
    texts = [t for _, t in progress]
    note = next(t for t in texts if t.startswith("The PyTorch download server could not be reached"))
    assert "Connection refused" in note and "Installing PyTorch from PyPI instead" in note
    assert any(t.startswith("Installing PyTorch from PyPI") for t in texts)
    percents = [p for p, _ in progress]
    assert percents == sorted(percents) and percents[-1] == 100 and max(percents[:-1]) < 100
    record = installer.read_record(venv)
    assert record["torch"] == "cpu" and record["torch_from"] == "pypi"
    assert record["backend"] == installer.wheel_version(wheel) and "CPython" in record["python"]
    assert inst.installed() and inst.installed_version() == installer.wheel_version(wheel)
    probe = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch, tinydep; print(torch.VERSION)"],
                           capture_output=True, text=True)
    assert probe.stdout.strip() == "2.9.0", probe.stderr
    assert any("/simple/torch/" in r for r in pypi.requests)
    logfile = (tmp_path / "data" / "install.log").read_text()
    assert "Using CPython" in logfile and "could not be reached" in logfile
    assert wait_until(lambda: not (tmp_path / "data" / "uv-cache").exists(), 10)  # its downloads go
    from analogon_krita.link import backend_process

    assert backend_process.default_command() == str(venv / "bin" / "analogon")
    # Update: the recorded build (cpu), although this machine now "detects" CUDA
    inst2 = Installer(**options)
    assert inst2.installed_variant() == "cpu"
    (ok, msg), progress2, log2 = run_installer(inst2, lambda: inst2.update())
    assert ok, "\n".join(log2[-20:])
    assert any(t.startswith("Installing PyTorch (cpu)") for _, t in progress2)
    assert not any(" venv " in line for line in log2 if line.startswith("$"))
    # Uninstall takes the environment and what came with it, not the models
    (tmp_path / "data" / "models").mkdir()
    (tmp_path / "data" / "python").mkdir()
    assert inst2.disk_usage() > 0
    assert inst2.uninstall() and not venv.exists() and not (tmp_path / "data" / "python").exists()
    assert (tmp_path / "data" / "models").exists()
    assert wait_until(lambda: not installer.leftovers(tmp_path / "data"), 20)


def test_no_suitable_python_names_the_cause(kapp, tmp_path, monkeypatch):
    if not Path(UV).exists():
        pytest.skip("uv is not installed in the test environment")
    monkeypatch.setenv("UV_PYTHON_DOWNLOADS", "never")
    inst = Installer(venv=tmp_path / "venv", wheel=tmp_path / "analogon-0.1.0-py3-none-any.whl", uv=UV,
                     python="3.99", log_path=tmp_path / "log")
    inst._fresh = True
    steps = plan(UV, inst.venv, inst.wheel, None, "cpu", python="3.99")[:1]
    (ok, msg), _, _ = run_installer(inst, lambda: inst.run_steps(steps), 60)
    assert not ok and msg.startswith("Creating the Python environment failed: No interpreter found for Python 3.99")
    assert not (tmp_path / "venv").exists()


def test_cancel_stops_the_step_and_leaves_no_half_made_environment(kapp, tmp_path):
    venv = tmp_path / "venv"
    inst = Installer(venv=venv, wheel=tmp_path / "analogon-0.1.0-py3-none-any.whl", log_path=tmp_path / "log")
    started = tmp_path / "started"
    inst._fresh = True
    steps = [Step("Creating the Python environment", sys.executable, ["-c", f"import pathlib; pathlib.Path({str(venv)!r}).mkdir()"]),
             Step("A long download", sys.executable, ["-c", f"import pathlib, time; pathlib.Path({str(started)!r}).touch(); "
                                                           "print('Downloading torch (846.0MiB)', flush=True); time.sleep(120)"], 5)]
    results, progress = [], []
    inst.finished.connect(lambda ok, msg: results.append((ok, msg)))
    inst.progress.connect(lambda p, t: progress.append(t))
    inst.run_steps(steps)
    assert wait_until(lambda: started.exists() and any("downloading torch (887 MB)" in t for t in progress), 30)
    inst.cancel()
    assert wait_until(lambda: results, 30)
    assert results == [(False, "Cancelled.")] and not inst.running
    assert wait_until(lambda: not venv.exists() and not installer.leftovers(tmp_path), 10)
    assert "Downloading torch" in (tmp_path / "log").read_text()


def test_a_failing_step_ends_the_install_with_its_cause_and_the_log(kapp, tmp_path):
    inst = Installer(venv=tmp_path / "venv", wheel=tmp_path / "analogon-0.1.0-py3-none-any.whl",
                     log_path=tmp_path / "log")
    results = []
    inst.finished.connect(lambda ok, msg: results.append((ok, msg)))
    inst.run_steps([Step("Installing the dependencies", sys.executable,
                         ["-c", "import sys; print('error: No solution found when resolving dependencies:');"
                                "print('  cause: torch==9 is not available'); sys.exit(1)"])])
    assert wait_until(lambda: results, 30)
    ok, msg = results[0]
    assert not ok and msg == (f"Installing the dependencies failed: torch==9 is not available. "
                              f"See the log: {tmp_path / 'log'}")
    assert "No solution found" in (tmp_path / "log").read_text()


def test_leftovers_of_a_quit_krita_are_swept_at_the_next_start(kapp, tmp_path):
    half = tmp_path / f".venv{installer.REMOVING}123-456"
    (half / "lib").mkdir(parents=True)
    (half / "lib" / "big.bin").write_bytes(b"x" * 1000)
    keep = tmp_path / "models"
    keep.mkdir()
    assert installer.leftovers(tmp_path) == [half]
    Installer(venv=tmp_path / "venv", log_path=tmp_path / "log")  # the next start
    assert wait_until(lambda: not half.exists(), 10) and keep.exists()


def test_test_site_packages_step_lets_the_new_environment_see_them(tmp_path):
    """The tests-only option: right after the environment is made, a .pth file in it puts the
    given folders before its own site-packages; the lock is then left to them."""
    venv, extra = tmp_path / "venv", tmp_path / "extra"
    extra.mkdir()
    (extra / "only_in_extra.py").write_text("WHERE = 'extra'\n")
    (extra / "in_both.py").write_text("WHERE = 'extra'\n")
    wheel = tmp_path / "analogon-0.1.0-py3-none-any.whl"
    assert not any("tests only" in s.title for s in plan(UV, venv, wheel, LOCK, "cpu"))
    steps = plan(UV, venv, wheel, LOCK, "cpu", test_site_packages=[str(extra)])
    titles = [s.title for s in steps]
    assert titles == ["Creating the Python environment", "Seeing the test environment's packages (tests only)",
                      "Installing the Analogon backend", "Checking the installation"]
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    step = steps[1]
    assert step.program == str(venv / "bin" / "python")
    subprocess.run([step.program, *step.args], check=True)
    [own] = venv.glob("lib/python3*/site-packages")
    (own / "in_both.py").write_text("WHERE = 'venv'\n")
    out = subprocess.run([step.program, "-c", "import only_in_extra, in_both; print(only_in_extra.WHERE, in_both.WHERE)"],
                         capture_output=True, text=True, env={"PATH": os.environ.get("PATH", "")})
    assert out.stdout.split() == ["extra", "extra"], out.stderr


def test_the_environment_keeps_krita_python_out_and_uv_in_the_data_folder(kapp, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/krita/lib/python")
    env = Installer(venv=tmp_path / "venv", log_path=tmp_path / "log").environment()
    assert not env.contains("PYTHONPATH")
    assert env.value("UV_CACHE_DIR") == str(tmp_path / "uv-cache")
    assert env.value("UV_PYTHON_INSTALL_DIR") == str(tmp_path / "python")
    assert not env.contains("UV_PYTHON_DOWNLOADS")  # a Python is downloaded where none fits
    # the system's certificate store, as behind a proxy with its own authority
    assert env.value("UV_SYSTEM_CERTS") == "1"
    assert [d.name for d in installer.owned_dirs(tmp_path)] == ["venv", "python", "uv", "uv-cache"]
