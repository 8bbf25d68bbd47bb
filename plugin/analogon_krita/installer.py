"""Installing the backend from the docker.

:class:`Installer` finds a Python ≥ 3.10 (on Windows through the ``py`` launcher), creates a
virtual environment in the user's data folder (:func:`venv_dir`), and installs into it the
backend wheel that came in the release zip (``backend/`` beside this module) with its locked
dependencies (``backend/requirements/lock.txt``) and the PyTorch build for the machine:

| variant | PyTorch from |
|---|---|
| ``cuda`` | Linux: PyPI (its torch is the CUDA build); Windows: the PyTorch CUDA index |
| ``rocm`` | the PyTorch ROCm index (Linux) |
| ``cpu`` | the PyTorch CPU index (Linux, Windows) or PyPI (macOS) |
| ``apple`` | PyPI (macOS: Metal) |

Every step is a QProcess (the UI thread never waits); progress, a log (also written to
``install.log`` in the data folder), cancel (a fresh install that is cancelled or fails is
removed again), *Update* (the wheel and the lock into the existing environment) and
*Uninstall*. *Start backend* then finds ``analogon`` in that environment
(:func:`installed_command`, used by ``backend_process.default_command``).
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
WHEEL_RE = re.compile(r"^analogon-(?P<version>[^-]+)-py3-none-any\.whl$")
MIN_PYTHON = (3, 10)
TORCH_PACKAGES = ("torch", "torchvision")
# what comes with torch from its own index and must not come again from the lock
TORCH_COMPANIONS = re.compile(r"^(torch|torchvision|torchaudio|triton|pytorch-triton.*|nvidia-.*|cuda-.*)$")
PYTORCH_INDEX = "https://download.pytorch.org/whl/"
INDEX_SUFFIX = {"cuda": "cu128", "rocm": "rocm6.4", "cpu": "cpu"}
VARIANTS = (("cuda", "NVIDIA GPU (CUDA)"), ("rocm", "AMD GPU (ROCm, Linux)"), ("cpu", "CPU only"),
            ("apple", "Apple silicon (Metal)"))


# -- where things are -------------------------------------------------------------------------

def data_dir() -> Path:
    """The user's data folder for Analogon (the same as the backend's ``discovery.data_dir``)."""
    env = os.environ.get("ANALOGON_DATA_DIR")
    if env:
        return Path(env)
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local") / "analogon"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "analogon"
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "analogon"


def venv_dir() -> Path:
    return data_dir() / "venv"


def _bin(venv: Path, name: str) -> Path:
    if sys.platform == "win32":
        return venv / "Scripts" / (name + ".exe")
    return venv / "bin" / name


def venv_python(venv: Path | None = None) -> Path:
    return _bin(venv or venv_dir(), "python")


def installed_command(venv: Path | None = None) -> Path | None:
    """``analogon`` in the installed environment, if there is one."""
    exe = _bin(venv or venv_dir(), "analogon")
    return exe if exe.exists() else None


def _version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"[.+-]", version))


def bundled_wheel(package_dir: Path = HERE) -> Path | None:
    """The backend wheel that came in the release zip (``backend/`` beside this module), the
    newest when there are several."""
    folder = Path(package_dir) / "backend"
    found = [(m.group("version"), p) for p in folder.glob("analogon-*.whl") if (m := WHEEL_RE.match(p.name))]
    if not found:
        return None
    return max(found, key=lambda vp: _version_key(vp[0]))[1]


def bundled_lock(package_dir: Path = HERE) -> Path | None:
    p = Path(package_dir) / "backend" / "requirements" / "lock.txt"
    return p if p.exists() else None


def wheel_version(wheel: Path) -> str:
    m = WHEEL_RE.match(Path(wheel).name)
    return m.group("version") if m else ""


# -- what to install --------------------------------------------------------------------------

def python_candidates(platform: str | None = None) -> list[list[str]]:
    """Commands that may start a suitable Python, best first."""
    platform = platform or sys.platform
    if platform == "win32":
        return [["py", "-3.12"], ["py", "-3.11"], ["py", "-3.10"], ["py", "-3.13"], ["py", "-3"],
                ["python"], ["python3"]]
    out = [["python3.12"], ["python3.11"], ["python3.10"], ["python3.13"], ["python3"], ["python"]]
    if platform == "darwin":
        out += [["/opt/homebrew/bin/python3"], ["/usr/local/bin/python3"],
                ["/Library/Frameworks/Python.framework/Versions/Current/bin/python3"]]
    return out


def no_python_help(platform: str | None = None) -> str:
    platform = platform or sys.platform
    if platform == "win32":
        how = ("Install Python 3.12 from python.org (tick \u201cpy launcher\u201d), or from the "
               "Microsoft Store, then press Install again.")
    elif platform == "darwin":
        how = "Install Python 3.12 from python.org or with Homebrew (brew install python@3.12)."
    else:
        how = ("Install Python 3.10 or newer with its venv module, e.g. on Debian/Ubuntu: "
               "sudo apt install python3 python3-venv; on Fedora: sudo dnf install python3.")
    return "No Python 3.10 or newer was found. " + how


def detect_variant(platform: str | None = None, machine: str | None = None, which=shutil.which,
                   exists=os.path.exists) -> str:
    """The PyTorch build for this machine: an NVIDIA driver (nvidia-smi) means CUDA, ROCm on
    Linux means ROCm, a Mac means Apple; else CPU."""
    import platform as _platform

    platform = platform or sys.platform
    machine = (machine or _platform.machine()).lower()
    if platform == "darwin":
        return "apple" if machine in ("arm64", "aarch64") else "cpu"
    if which("nvidia-smi") or (platform == "win32" and exists(r"C:\Windows\System32\nvidia-smi.exe")):
        return "cuda"
    if platform.startswith("linux") and (which("rocminfo") or exists("/opt/rocm")):
        return "rocm"
    return "cpu"


def torch_index(variant: str, platform: str | None = None) -> str | None:
    """The index PyTorch comes from, or None for PyPI (with the rest of the lock file)."""
    platform = platform or sys.platform
    if variant == "apple" or platform == "darwin":
        return None
    if variant == "cuda" and platform.startswith("linux"):
        return None  # PyPI's Linux torch is the CUDA build
    return PYTORCH_INDEX + INDEX_SUFFIX.get(variant, "cpu")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins(text: str) -> dict[str, str]:
    """name -> version for the unconditional pins of a lock file."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)\s*$", line.strip())
        if m:
            out[_norm(m.group(1))] = m.group(2)
    return out


def lock_without_torch(text: str) -> str:
    """The lock file less what comes with PyTorch from its own index."""
    keep = []
    skipping = False
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==", line)
        if m:
            skipping = bool(TORCH_COMPANIONS.match(_norm(m.group(1))))
        elif not line.startswith(" "):
            skipping = False
        if not skipping:
            keep.append(line)
    return "\n".join(keep) + "\n"


@dataclass
class Step:
    title: str
    program: str
    args: list[str]
    weight: float = 1.0
    expect_lines: int = 0  # pip: about how many "Collecting"/"Installing" lines (progress)
    files: dict[str, str] = field(default_factory=dict)  # written before the step runs


TEST_SITE_PTH = "analogon-test-site-packages.pth"


def plan(python: list[str], venv: Path, wheel: Path, lock_text: str | None, variant: str,
         platform: str | None = None, update: bool = False, offline: bool = False,
         upgrade_pip: bool = True, test_site_packages: list[str] | tuple[str, ...] = ()) -> list[Step]:
    """The commands that install (or update) the backend. ``python``: the command that starts
    the base Python (unused for an update). ``offline``: pip uses no index (tests).

    ``test_site_packages`` is for tests only (the docker never sets it): folders that the new
    environment sees before its own site-packages (a ``.pth`` file written right after it is
    created), so that an offline install in a test finds PyTorch and the other locked
    dependencies already installed (pip reports them as satisfied) instead of downloading
    gigabytes. The backend wheel itself is still installed into the environment."""
    platform = platform or sys.platform
    py = str(_bin(venv, "python")) if platform == sys.platform else str(
        venv / ("Scripts/python.exe" if platform == "win32" else "bin/python"))
    pip = [py, "-m", "pip"]
    quiet = ["--disable-pip-version-check", "--no-input", "--progress-bar", "off"]
    no_index = ["--no-index"] if offline else []
    steps: list[Step] = []
    if not update:
        steps.append(Step("Creating the Python environment", python[0], python[1:] + ["-m", "venv", str(venv)], 1))
    if test_site_packages:
        # a .pth line that starts with "import" is run: it puts the folders just before the
        # environment's own site-packages, whose pip and setuptools (from ensurepip) would
        # otherwise shadow the newer ones that the locked packages ask for
        # (no comprehension in it: site runs it with exec in a function's scope)
        line = ("import os, sys; real = list(map(os.path.realpath, sys.path)); own = os.path.realpath(%r); "
                "i = real.index(own) if own in real else len(sys.path); sys.path[i:i] = %r\n")
        code = ("import sys, sysconfig, pathlib; lib = sysconfig.get_paths()['purelib']; "
                f"pathlib.Path(lib, {TEST_SITE_PTH!r}).write_text({line!r} % (lib, sys.argv[1:]))")
        steps.append(Step("Seeing the test environment's packages (tests only)", py,
                          ["-c", code, *map(str, test_site_packages)], 0.5))
    if upgrade_pip and not offline:
        steps.append(Step("Updating pip", pip[0], pip[1:] + ["install", *quiet, "--upgrade", "pip"], 1, 3))
    if lock_text is not None:
        pins = lock_pins(lock_text)
        index = torch_index(variant, platform)
        deps_text = lock_text
        if index is not None and all(p in pins for p in TORCH_PACKAGES):
            torch_reqs = [f"{p}=={pins[p].split('+')[0]}" for p in TORCH_PACKAGES]
            steps.append(Step(f"Installing PyTorch ({variant})", pip[0], pip[1:] + [
                "install", *quiet, *no_index, *torch_reqs] + ([] if offline else ["--index-url", index]), 6, 20))
            deps_text = lock_without_torch(lock_text)
        req = str(venv / "analogon-requirements.txt")
        n = sum(1 for line in deps_text.splitlines() if "==" in line and not line.startswith("#"))
        steps.append(Step("Installing the dependencies", pip[0], pip[1:] + [
            "install", *quiet, *no_index, "-r", req], 10 if n > 10 else 1, 2 * n, files={req: deps_text}))
    steps.append(Step("Installing the Analogon backend", pip[0], pip[1:] + [
        "install", *quiet, "--no-deps", "--force-reinstall", *no_index, str(wheel)], 1, 3))
    exe = str(venv / ("Scripts/analogon.exe" if platform == "win32" else "bin/analogon"))
    steps.append(Step("Checking the installation", exe, ["--version"], 0.5))
    return steps


# -- running it ------------------------------------------------------------------------------

from .qt import QObject, QProcess, QProcessEnvironment, pyqtSignal  # noqa: E402


class Installer(QObject):
    """Signals: ``progress(percent, text)``, ``logLine(text)``, ``finished(ok, message)``."""

    progress = pyqtSignal(int, str)
    logLine = pyqtSignal(str)
    finished = pyqtSignal(bool, str)

    def __init__(self, venv: Path | None = None, wheel: Path | None = None, lock: Path | None = None,
                 parent: QObject | None = None, offline: bool = False, upgrade_pip: bool = True,
                 candidates: list[list[str]] | None = None, log_path: Path | None = None,
                 test_site_packages: list[str] | tuple[str, ...] = ()):
        """``offline``, ``candidates`` and ``test_site_packages`` are for tests (see :func:`plan`)."""
        super().__init__(parent)
        self.venv = Path(venv) if venv else venv_dir()
        self.wheel = Path(wheel) if wheel else bundled_wheel()
        self.lock = Path(lock) if lock else bundled_lock()
        self.offline = offline
        self.upgrade_pip = upgrade_pip
        self.candidates = candidates
        self.test_site_packages = tuple(test_site_packages)
        self.log_path = log_path or (self.venv.parent / "install.log")
        self.running = False
        self.python: list[str] | None = None
        self._proc: QProcess | None = None
        self._steps: list[Step] = []
        self._index = 0
        self._lines = 0
        self._fresh = False
        self._cancelled = False
        self._pending: list[list[str]] = []
        self._variant = "cpu"
        self.status = ""  # the latest progress text (the docker's lead shows it)
        self.progress.connect(lambda _percent, text: setattr(self, "status", text))

    # -- state --------------------------------------------------------------------------
    def installed(self) -> bool:
        return installed_command(self.venv) is not None

    def installed_version(self) -> str:
        """The version in the environment (from its dist-info), or ""."""
        for lib in (self.venv / "lib").glob("python*/site-packages") if sys.platform != "win32" else \
                [self.venv / "Lib" / "site-packages"]:
            for d in lib.glob("analogon-*.dist-info"):
                return d.name[len("analogon-"):-len(".dist-info")]
        return ""

    # -- actions ------------------------------------------------------------------------
    def install(self, variant: str | None = None):
        """A fresh environment (an existing one is replaced) with the bundled backend."""
        if self.running:
            return
        if self.wheel is None or not self.wheel.exists():
            return self._done(False, "This copy of the plugin carries no backend wheel: install the "
                                     "release zip (analogon_krita-VERSION.zip) with Krita's Import "
                                     "Python Plugin from File.")
        self._variant = variant or detect_variant()
        self._begin()
        if self.venv.exists():
            self._log(f"removing the old environment {self.venv}")
            _remove_later(self.venv)
        self._fresh = True
        self._pending = list(self.candidates or python_candidates())
        self._find_python()

    def update(self, variant: str | None = None):
        """The bundled backend (and the lock's versions) into the existing environment."""
        if self.running:
            return
        if not self.installed():
            return self.install(variant)
        if self.wheel is None or not self.wheel.exists():
            return self._done(False, "This copy of the plugin carries no backend wheel.")
        self._variant = variant or detect_variant()
        self._begin()
        self._fresh = False
        self.run_steps(plan([], self.venv, self.wheel, self._lock_text(), self._variant, update=True,
                            offline=self.offline, upgrade_pip=self.upgrade_pip))

    def uninstall(self) -> bool:
        """Remove the environment (moved aside at once, deleted in the background)."""
        if self.running or not self.venv.exists():
            return False
        _remove_later(self.venv)
        self._log(f"uninstalled {self.venv}")
        self.progress.emit(0, "Uninstalled.")
        return True

    def cancel(self):
        if not self.running:
            return
        self._cancelled = True
        self._pending = []
        if self._proc is not None:
            self._proc.kill()  # finished() follows, and ends the run
        else:
            self._done(False, "Cancelled.")

    # -- internals ----------------------------------------------------------------------
    def _lock_text(self) -> str | None:
        return self.lock.read_text(encoding="utf-8") if self.lock and self.lock.exists() else None

    def _begin(self):
        self.running = True
        self._cancelled = False
        self._index = 0
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} backend {wheel_version(self.wheel)} into "
                  f"{self.venv} (PyTorch: {self._variant})")

    def _log(self, text: str):
        try:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(text.rstrip("\n") + "\n")
        except OSError:
            pass
        self.logLine.emit(text)

    def _process(self) -> QProcess:
        proc = QProcess(self)
        env = QProcessEnvironment.systemEnvironment()
        for k in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):  # Krita's own Python must not leak in
            env.remove(k)
        env.insert("PYTHONUNBUFFERED", "1")
        env.insert("PIP_DISABLE_PIP_VERSION_CHECK", "1")
        proc.setProcessEnvironment(env)
        proc.setProcessChannelMode(QProcess.ProcessChannelMode.MergedChannels)
        return proc

    def _find_python(self):
        if self._cancelled:
            return self._done(False, "Cancelled.")
        if not self._pending:
            return self._done(False, no_python_help())
        cmd = self._pending.pop(0)
        self.progress.emit(0, f"Looking for Python ({' '.join(cmd)})\u2026")
        proc = self._process()
        self._proc = proc
        out = bytearray()
        proc.readyReadStandardOutput.connect(lambda: out.extend(bytes(proc.readAllStandardOutput().data())))

        def done(*_):
            if self._proc is not proc:
                return
            self._proc = None
            out.extend(bytes(proc.readAllStandardOutput().data()))
            text = out.decode("utf-8", "replace").strip().splitlines()
            ok = proc.exitStatus() == QProcess.ExitStatus.NormalExit and proc.exitCode() == 0 and text \
                and text[-1].startswith("ok ")
            proc.deleteLater()
            if ok:
                self.python = cmd
                self._log(f"Python: {' '.join(cmd)} ({text[-1][3:]})")
                self.run_steps(plan(cmd, self.venv, self.wheel, self._lock_text(), self._variant,
                                    offline=self.offline, upgrade_pip=self.upgrade_pip,
                                    test_site_packages=self.test_site_packages))
            else:
                if text:
                    self._log(f"{' '.join(cmd)}: {text[-1]}")
                self._find_python()

        proc.finished.connect(done)
        proc.errorOccurred.connect(lambda err: done() if err == QProcess.ProcessError.FailedToStart else None)
        probe = ("import sys, venv, ensurepip; v = sys.version_info; "
                 f"print(('ok ' if v[:2] >= {MIN_PYTHON!r} else 'too old ') + sys.version.split()[0] + ' ' + sys.executable)")
        proc.start(cmd[0], cmd[1:] + ["-c", probe])

    def run_steps(self, steps: list[Step]):
        """Run ``steps`` one after another (``install``/``update`` plan them)."""
        self.running = True
        self._steps = steps
        self._index = -1
        self._next()

    def _percent(self, fraction: float = 0.0) -> int:
        total = sum(s.weight for s in self._steps) or 1.0
        done = sum(s.weight for s in self._steps[: self._index]) + fraction * self._steps[self._index].weight
        return max(0, min(100, int(100 * done / total)))

    def _next(self):
        self._index += 1
        if self._cancelled:
            return self._done(False, "Cancelled.")
        if self._index >= len(self._steps):
            return self._done(True, f"Installed the Analogon backend {wheel_version(self.wheel)} in {self.venv}.")
        step = self._steps[self._index]
        for path, text in step.files.items():
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text, encoding="utf-8")
        self._lines = 0
        self.progress.emit(self._percent(), step.title + "\u2026")
        self._log(f"$ {step.program} {' '.join(step.args)}")
        proc = self._process()
        self._proc = proc
        buf = bytearray()

        def read():
            buf.extend(bytes(proc.readAllStandardOutput().data()))
            while b"\n" in buf:
                line, _, rest = bytes(buf).partition(b"\n")
                buf[:] = rest
                self._on_line(step, line.decode("utf-8", "replace").rstrip("\r"))

        def failed_to_start(err):
            if err == QProcess.ProcessError.FailedToStart and self._proc is proc:
                self._proc = None
                self._done(False, f"{step.title} failed: cannot run {step.program}.")

        def finished(code, status=None):
            if self._proc is not proc:
                return
            read()
            if buf:
                self._on_line(step, bytes(buf).decode("utf-8", "replace"))
            self._proc = None
            proc.deleteLater()
            if self._cancelled:
                return self._done(False, "Cancelled.")
            if proc.exitStatus() != QProcess.ExitStatus.NormalExit or code != 0:
                return self._done(False, f"{step.title} failed (exit code {code}). See the log: {self.log_path}")
            self._next()

        proc.readyReadStandardOutput.connect(read)
        proc.errorOccurred.connect(failed_to_start)
        proc.finished.connect(finished)
        proc.start(step.program, step.args)

    def _on_line(self, step: Step, line: str):
        if not line.strip():
            return
        self._log(line)
        if step.expect_lines and line.lstrip().startswith(("Collecting", "Downloading", "Installing",
                                                           "Requirement already", "Successfully", "Using cached")):
            self._lines += 1
            self.progress.emit(self._percent(min(0.95, self._lines / step.expect_lines)), step.title + "\u2026")

    def _done(self, ok: bool, message: str):
        if self._fresh and not ok and self.venv.exists():
            self._log(f"removing the unfinished environment {self.venv}")
            _remove_later(self.venv)
        self.running = False
        self._fresh = False
        self._log(message)
        self.progress.emit(100 if ok else 0, message)
        self.finished.emit(ok, message)


_SHARED: "Installer | None" = None


def shared() -> Installer:
    """The installer of this Krita: one, whichever window's docker or settings dialog shows it
    (an install goes on when the dialog that started it is closed)."""
    global _SHARED
    if _SHARED is None:
        _SHARED = Installer()
    return _SHARED


def _remove_later(folder: Path) -> None:
    """Move ``folder`` aside at once (so that a new one can be made in its place) and delete it
    in a background thread (a venv with PyTorch is gigabytes: never on the UI thread)."""
    folder = Path(folder)
    aside = folder.with_name(f".{folder.name}.removing-{os.getpid()}-{time.monotonic_ns()}")
    try:
        folder.rename(aside)
    except OSError:
        aside = folder
    threading.Thread(target=shutil.rmtree, args=(aside,), kwargs={"ignore_errors": True},
                     name="analogon-remove-venv", daemon=True).start()
