"""Installing the backend from the docker: the plan per platform and PyTorch variant, finding
Python, a real install of the release's wheel into a private folder (pip offline: the wheel
without its dependencies), cancel, uninstall, and Start backend finding the result."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from analogon_krita import installer
from analogon_krita.installer import Installer, Step, detect_variant, lock_without_torch, plan
from conftest import ROOT, wait_until

LOCK = (ROOT / "packaging" / "requirements" / "lock.txt").read_text()


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
    steps = plan(["py", "-3.11"] if platform == "win32" else ["python3"], venv, tmp_path / "analogon-0.1.0-py3-none-any.whl",
                 LOCK, variant, platform=platform)
    titles = [s.title for s in steps]
    assert titles[0] == "Creating the Python environment" and titles[-1] == "Checking the installation"
    assert steps[0].program == ("py" if platform == "win32" else "python3")
    assert steps[0].args[-3:] == ["-m", "venv", str(venv)]
    py = str(venv / ("Scripts/python.exe" if platform == "win32" else "bin/python"))
    assert all(s.program == py for s in steps[1:-1])
    deps = next(s for s in steps if s.title == "Installing the dependencies")
    req_text = next(iter(deps.files.values()))
    if index is None:
        assert not any(t.startswith("Installing PyTorch") for t in titles)
        assert "torch==" in req_text
    else:
        torch_args = args_of(steps, "Installing PyTorch")
        assert torch_args[torch_args.index("--index-url") + 1] == index
        pins = installer.lock_pins(LOCK)
        assert f"torch=={pins['torch']}" in torch_args and f"torchvision=={pins['torchvision']}" in torch_args
        assert "\ntorch==" not in req_text and "nvidia-" not in req_text and "diffusers==" in req_text
    backend = args_of(steps, "Analogon backend")
    assert "--no-deps" in backend and backend[-1].endswith(".whl")
    assert steps[-1].program.endswith("analogon.exe" if platform == "win32" else "bin/analogon")
    update = plan([], venv, tmp_path / "w.whl", LOCK, variant, platform=platform, update=True)
    assert "Creating the Python environment" not in [s.title for s in update]


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


def test_python_candidates_and_help_per_platform(monkeypatch):
    assert installer.python_candidates("win32")[0] == ["py", "-3.12"]
    assert all(c[0] == "py" for c in installer.python_candidates("win32")[:5])
    assert ["python3"] in installer.python_candidates("linux")
    assert ["/opt/homebrew/bin/python3"] in installer.python_candidates("darwin")
    assert "py launcher" in installer.no_python_help("win32")
    assert "python3-venv" in installer.no_python_help("linux")
    assert "brew" in installer.no_python_help("darwin")


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


def run_installer(inst: Installer, action, timeout=240):
    results, progress, log = [], [], []
    inst.finished.connect(lambda ok, msg: results.append((ok, msg)))
    inst.progress.connect(lambda p, t: progress.append((p, t)))
    inst.logLine.connect(log.append)
    action()
    assert wait_until(lambda: results, timeout), "the installer did not finish: " + "\n".join(log[-20:])
    return results[0], progress, log


@pytest.mark.slow
def test_install_the_release_wheel_then_start_backend_finds_it(kapp, release, tmp_path, monkeypatch):
    """A real run: find this Python, make a venv, install the zip's wheel (offline, without its
    dependencies: the backend's command line answers --version without them)."""
    _, wheel = release
    monkeypatch.setenv("ANALOGON_DATA_DIR", str(tmp_path / "data"))
    empty_lock = tmp_path / "lock.txt"
    empty_lock.write_text("# nothing to install\n")
    inst = Installer(wheel=wheel, lock=empty_lock, offline=True, candidates=[["no-such-python-3"], [sys.executable]])
    assert not inst.installed()
    (ok, msg), progress, log = run_installer(inst, lambda: inst.install("cpu"))
    assert ok, "\n".join(log[-30:])
    venv = tmp_path / "data" / "venv"
    assert inst.venv == venv and inst.installed() and inst.installed_version() == installer.wheel_version(wheel)
    out = subprocess.run([str(venv / "bin" / "analogon"), "--version"], capture_output=True, text=True)
    assert out.stdout.strip() == f"analogon {installer.wheel_version(wheel)}"
    percents = [p for p, _ in progress]
    assert percents == sorted(percents) and percents[-1] == 100 and max(percents[:-1]) < 100
    assert any("Installing the Analogon backend" in t for _, t in progress)
    logfile = (tmp_path / "data" / "install.log").read_text()
    assert f"Python: {sys.executable}" in logfile and "Successfully installed analogon" in logfile
    # Start backend uses it
    from analogon_krita import backend_process

    assert backend_process.default_command() == str(venv / "bin" / "analogon")
    # Update re-installs the wheel into the same environment
    inst2 = Installer(wheel=wheel, lock=empty_lock, offline=True)
    (ok, msg), _, log2 = run_installer(inst2, lambda: inst2.update("cpu"))
    assert ok and not any("-m venv" in line for line in log2)
    # Uninstall
    assert inst2.uninstall() and not venv.exists()
    assert backend_process.default_command() != str(venv / "bin" / "analogon")


def test_no_suitable_python_says_what_to_install(kapp, release, tmp_path):
    old = tmp_path / "python-old"
    old.write_text("#!/bin/sh\necho 'too old 3.8.10 /usr/bin/python3.8'\n")
    old.chmod(old.stat().st_mode | stat.S_IEXEC)
    inst = Installer(venv=tmp_path / "venv", wheel=release[1], candidates=[[str(old)], ["no-such-python"]])
    (ok, msg), _, _ = run_installer(inst, lambda: inst.install("cpu"))
    assert not ok and msg.startswith("No Python 3.10 or newer was found") and not (tmp_path / "venv").exists()


def test_cancel_stops_the_step_and_leaves_no_half_made_environment(kapp, release, tmp_path):
    venv = tmp_path / "venv"
    inst = Installer(venv=venv, wheel=release[1], log_path=tmp_path / "log")
    started = tmp_path / "started"
    inst._fresh = True
    steps = [Step("Creating the Python environment", sys.executable, ["-c", f"import pathlib; pathlib.Path({str(venv)!r}).mkdir()"]),
             Step("A long download", sys.executable, ["-c", f"import pathlib, time; pathlib.Path({str(started)!r}).touch(); "
                                                           "print('Collecting torch', flush=True); time.sleep(120)"], 5, 10)]
    results = []
    inst.finished.connect(lambda ok, msg: results.append((ok, msg)))
    inst.run_steps(steps)
    assert wait_until(lambda: started.exists(), 30)
    inst.cancel()
    assert wait_until(lambda: results, 30)
    assert results == [(False, "Cancelled.")] and not inst.running
    assert wait_until(lambda: not venv.exists(), 10)
    assert "Collecting torch" in (tmp_path / "log").read_text()


def test_a_failing_step_ends_the_install_with_the_log(kapp, release, tmp_path):
    inst = Installer(venv=tmp_path / "venv", wheel=release[1], log_path=tmp_path / "log")
    results = []
    inst.finished.connect(lambda ok, msg: results.append((ok, msg)))
    inst.run_steps([Step("Installing the dependencies", sys.executable,
                         ["-c", "import sys; print('ERROR: No matching distribution found for torch==9'); sys.exit(1)"])])
    assert wait_until(lambda: results, 30)
    ok, msg = results[0]
    assert not ok and "Installing the dependencies failed (exit code 1)" in msg and str(tmp_path / "log") in msg
    assert "No matching distribution" in (tmp_path / "log").read_text()


def test_test_site_packages_step_lets_the_new_environment_see_them(tmp_path):
    """The tests-only option: right after the environment is made, a .pth file in it puts the
    given folders before its own site-packages; without the option there is no such step."""
    venv, extra = tmp_path / "venv", tmp_path / "extra"
    extra.mkdir()
    (extra / "only_in_extra.py").write_text("WHERE = 'extra'\n")
    (extra / "in_both.py").write_text("WHERE = 'extra'\n")
    wheel = tmp_path / "analogon-0.1.0-py3-none-any.whl"
    assert not any("tests only" in s.title for s in plan([sys.executable], venv, wheel, LOCK, "cpu", offline=True))
    steps = plan([sys.executable], venv, wheel, LOCK, "cpu", offline=True, test_site_packages=[str(extra)])
    titles = [s.title for s in steps]
    assert titles[:2] == ["Creating the Python environment", "Seeing the test environment's packages (tests only)"]
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    step = steps[1]
    assert step.program == str(venv / "bin" / "python")
    subprocess.run([step.program, *step.args], check=True)
    [own] = venv.glob("lib/python3*/site-packages")
    (own / "in_both.py").write_text("WHERE = 'venv'\n")
    out = subprocess.run([step.program, "-c", "import only_in_extra, in_both; print(only_in_extra.WHERE, in_both.WHERE)"],
                         capture_output=True, text=True, env={"PATH": os.environ.get("PATH", "")})
    assert out.stdout.split() == ["extra", "extra"], out.stderr
