"""Installing the backend from the docker, with no Python of the system's needed.

:class:`Installer` gets ``uv`` (PyPI's wheel for this platform, its SHA-256 pinned in the
release's ``backend/uv.json``, unpacked into the data folder), lets it make a virtual
environment in the user's data folder (:func:`venv_dir`) with a Python of the system's when
one is suitable, else a Python it downloads (kept in the data folder too), and installs into
it the backend wheel that came in the release zip (``backend/`` in the plugin's package folder)
with its locked dependencies (``backend/requirements/lock.txt``) and the PyTorch build for the
machine:

| variant | PyTorch from |
|---|---|
| ``cuda`` | Linux: PyPI (its torch is the CUDA build); Windows: the PyTorch CUDA index |
| ``rocm`` | the PyTorch ROCm index (Linux) |
| ``cpu`` | the PyTorch CPU index (Linux, Windows) or PyPI (macOS) |
| ``apple`` | PyPI (macOS: Metal) |

When the PyTorch index cannot be reached (proxies, firewalls, some countries) PyPI's torch is
installed instead, and the log and the progress say so in plain words. What was installed
(the PyTorch build, where it came from, the Python) is recorded in the environment
(:data:`RECORD`), so that *Update* installs the same build.

Every step is a QProcess or a QtNetwork download (the UI thread never waits); progress says
what is downloaded (MB, MB/s per download and per step, see :class:`Meter`); a log (also
``install.log`` in the data folder); cancel (a fresh install that is cancelled or fails is
removed again); *Update*; *Uninstall*, which removes the environment, the Python, ``uv`` and
its cache (models are kept). Folders are removed in the background after being renamed aside;
whatever a quit Krita left half-deleted is swept at the next start (:func:`sweep`).
*Start backend* then finds ``analogon`` in the environment (:func:`installed_command`, used by
``backend_process.default_command``).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import sys
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent  # the plugin's package folder (analogon_krita/)
WHEEL_RE = re.compile(r"^analogon-(?P<version>[^-]+)-py3-none-any\.whl$")
PYTHON_REQUEST = ">=3.10"  # what `uv venv --python` is asked for
TORCH_PACKAGES = ("torch", "torchvision")
# what comes with torch from its own index and must not come again from the lock
TORCH_COMPANIONS = re.compile(r"^(torch|torchvision|torchaudio|triton|pytorch-triton.*|nvidia-.*|cuda-.*)$")
PYTORCH_INDEX = "https://download.pytorch.org/whl/"
INDEX_SUFFIX = {"cuda": "cu128", "rocm": "rocm6.4", "cpu": "cpu"}
VARIANTS = (("cuda", "NVIDIA GPU (CUDA)"), ("rocm", "AMD GPU (ROCm, Linux)"), ("cpu", "CPU only"),
            ("apple", "Apple silicon (Metal)"))
RECORD = "analogon-install.json"  # in the environment: what was installed, from where
REMOVING = ".removing-"  # a folder renamed aside to be deleted: ".NAME.removing-PID-NS"


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


def owned_dirs(root: Path | None = None) -> list[Path]:
    """What an install puts into the data folder (and Uninstall takes away): the environment,
    a downloaded Python, uv and its download cache. Not the models."""
    root = Path(root) if root else data_dir()
    return [root / "venv", root / "python", root / "uv", root / "uv-cache"]


def _bin(venv: Path, name: str, platform: str | None = None) -> Path:
    if (platform or sys.platform) == "win32":
        return venv / "Scripts" / (name + ".exe")
    return venv / "bin" / name


def venv_python(venv: Path | None = None) -> Path:
    return _bin(venv or venv_dir(), "python")


def installed_command(venv: Path | None = None) -> Path | None:
    """``analogon`` in the installed environment, if there is one."""
    exe = _bin(venv or venv_dir(), "analogon")
    return exe if exe.exists() else None


def read_record(venv: Path | None = None) -> dict:
    """What the last install or update recorded in the environment ({} if nothing)."""
    try:
        data = json.loads((Path(venv or venv_dir()) / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"[.+-]", version))


def bundled_wheel(package_dir: Path = HERE) -> Path | None:
    """The backend wheel that came in the release zip (``backend/`` in the plugin's package
    folder), the newest when there are several."""
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


def size_on_disk(*paths: Path) -> int:
    """Bytes under ``paths`` (files counted once; links not followed)."""
    total = 0
    for top in paths:
        for root, dirs, files in os.walk(top):
            for name in files:
                try:
                    total += os.lstat(os.path.join(root, name)).st_size
                except OSError:
                    pass
    return total


def gigabytes(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else mb(n)


# -- uv: PyPI's wheel, pinned --------------------------------------------------------------------

def uv_pins(package_dir: Path = HERE) -> dict:
    """``backend/uv.json`` of the release (in a checkout: ``packaging/uv.json``): the uv version
    and, per platform, the URL and SHA-256 of PyPI's wheel."""
    for p in (Path(package_dir) / "backend" / "uv.json", Path(package_dir).parent.parent / "packaging" / "uv.json"):
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
    return {}


def platform_key(platform: str | None = None, machine: str | None = None) -> str:
    """``linux-x86_64``, ``linux-aarch64``, ``macos-x86_64``, ``macos-arm64``, ``windows-x86_64``."""
    import platform as _platform

    platform = platform or sys.platform
    machine = (machine or _platform.machine()).lower()
    machine = {"amd64": "x86_64", "x64": "x86_64", "arm64": "arm64" if platform == "darwin" else "aarch64",
               "aarch64": "arm64" if platform == "darwin" else "aarch64"}.get(machine, machine)
    system = "windows" if platform == "win32" else "macos" if platform == "darwin" else "linux"
    return f"{system}-{machine}"


def uv_path(version: str, root: Path | None = None, platform: str | None = None) -> Path:
    return (Path(root) if root else data_dir()) / "uv" / version / (
        "uv.exe" if (platform or sys.platform) == "win32" else "uv")


def extract_uv(wheel: Path, dest: Path) -> Path:
    """The ``uv`` binary out of PyPI's wheel (``uv-VERSION.data/scripts/uv``) into ``dest``."""
    with zipfile.ZipFile(wheel) as z:
        member = next((n for n in z.namelist() if re.match(r"^uv-[^/]+\.data/scripts/uv(\.exe)?$", n)), None)
        if member is None:
            raise ValueError(f"{Path(wheel).name} holds no uv binary")
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        with z.open(member) as src, open(part, "wb") as out:
            shutil.copyfileobj(src, out)
    part.chmod(part.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    part.replace(dest)
    return dest


# -- what to install --------------------------------------------------------------------------

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


def torch_index(variant: str, platform: str | None = None, base: str = PYTORCH_INDEX) -> str | None:
    """The index PyTorch comes from, or None for PyPI (with the rest of the lock file)."""
    platform = platform or sys.platform
    if variant == "apple" or platform == "darwin":
        return None
    if variant == "cuda" and platform.startswith("linux"):
        return None  # PyPI's Linux torch is the CUDA build
    return base + INDEX_SUFFIX.get(variant, "cpu")


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
    files: dict[str, str] = field(default_factory=dict)  # written before the step runs
    fetch: tuple[str, str, str] | None = None  # (url, sha256, binary): a download, not a process
    fallback: "Step | None" = None  # run instead when this one fails (PyPI's torch)
    record: dict = field(default_factory=dict)  # what the record says when this step did the work


TEST_SITE_PTH = "analogon-test-site-packages.pth"
UNREACHABLE = re.compile(r"error sending request|dns error|failed to lookup|connection refused|timed out|"
                         r"could not connect|tcp connect error|network is unreachable|failed to fetch",
                         re.IGNORECASE)


def plan(uv: str, venv: Path, wheel: Path, lock_text: str | None, variant: str,
         platform: str | None = None, update: bool = False, python: str = PYTHON_REQUEST,
         index_url: str | None = None, pytorch_index: str = PYTORCH_INDEX,
         test_site_packages: list[str] | tuple[str, ...] = ()) -> list[Step]:
    """The commands that install (or update) the backend with ``uv``. ``python``: what ``uv
    venv`` is asked for (a system Python that fits, else one it downloads). ``index_url``
    stands in for PyPI, ``pytorch_index`` for the PyTorch index (tests: 127.0.0.1).

    ``test_site_packages`` is for tests only (the docker never sets it): folders that the new
    environment sees before its own site-packages (a ``.pth`` file written right after it is
    created), so that a test finds PyTorch and the other locked dependencies already installed
    instead of downloading gigabytes; the lock is then not installed. The backend wheel itself
    is still installed into the environment."""
    platform = platform or sys.platform
    py = str(_bin(venv, "python", platform))
    pip = ["pip", "install", "--python", py]
    pypi = ["--index-url", index_url] if index_url else []
    steps: list[Step] = []
    if not update:
        steps.append(Step("Creating the Python environment", uv, ["venv", "--python", python, str(venv)], 1))
    if test_site_packages:
        # a .pth line that starts with "import" is run: it puts the folders just before the
        # environment's own site-packages
        # (no comprehension in it: site runs it with exec in a function's scope)
        line = ("import os, sys; real = list(map(os.path.realpath, sys.path)); own = os.path.realpath(%r); "
                "i = real.index(own) if own in real else len(sys.path); sys.path[i:i] = %r\n")
        code = ("import sys, sysconfig, pathlib; lib = sysconfig.get_paths()['purelib']; "
                f"pathlib.Path(lib, {TEST_SITE_PTH!r}).write_text({line!r} % (lib, sys.argv[1:]))")
        steps.append(Step("Seeing the test environment's packages (tests only)", py,
                          ["-c", code, *map(str, test_site_packages)], 0.5))
    elif lock_text is not None:
        pins = lock_pins(lock_text)
        index = torch_index(variant, platform, pytorch_index)
        deps_text = lock_text
        if index is not None and all(p in pins for p in TORCH_PACKAGES):
            torch_reqs = [f"{p}=={pins[p].split('+')[0]}" for p in TORCH_PACKAGES]
            from_pypi = Step("Installing PyTorch from PyPI", uv, pip + [*pypi, *torch_reqs], 6,
                             record={"torch_from": "pypi"})
            steps.append(Step(f"Installing PyTorch ({variant})", uv, pip + ["--index-url", index, *torch_reqs], 6,
                              fallback=from_pypi, record={"torch_from": index}))
            deps_text = lock_without_torch(lock_text)
        req = str(venv / "analogon-requirements.txt")
        n = sum(1 for line in deps_text.splitlines() if "==" in line and not line.startswith("#"))
        steps.append(Step("Installing the dependencies", uv, pip + [*pypi, "-r", req], 10 if n > 10 else 1,
                          files={req: deps_text}))
    steps.append(Step("Installing the Analogon backend", uv, pip + ["--no-deps", "--reinstall", "--no-index",
                                                                   str(wheel)], 1))
    steps.append(Step("Checking the installation", str(_bin(venv, "analogon", platform)), ["--version"], 0.5))
    return steps


# -- progress: what uv says it downloads -------------------------------------------------------

_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "kB": 1e3, "MB": 1e6, "GB": 1e9}


def _bytes(text: str) -> int:
    m = re.match(r"([\d.]+)\s*([KMG]?i?B|kB)", text.strip())
    return int(float(m.group(1)) * _UNITS.get(m.group(2), 1)) if m else 0


def mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB" if n >= 1e7 else f"{n / 1e6:.1f} MB"


class Meter:
    """The downloads of one step as uv reports them (``Downloading torch (846.0MiB)``, then
    `` Downloaded torch``; ``Prepared``/``Installed N packages``) or as a download of ours
    counts them (:meth:`bytes_so_far`): what the progress says (:meth:`text`) and how far the
    step is (:meth:`fraction`)."""

    def __init__(self, now: float):
        self.t0 = now
        self.running: dict[str, tuple[int, float]] = {}  # name -> (bytes, started)
        self.done_bytes = 0
        self.total_bytes = 0  # announced so far
        self.downloads = 0
        self.last = ""  # the latest finished download, with its speed
        self.phase = ""  # "" / "installing" / "installed"
        self.live: tuple[int, int] | None = None  # (bytes, total) of a download we make

    def line(self, text: str, now: float) -> bool:
        s = text.strip()
        m = re.match(r"^Downloading (\S+) \((.+)\)$", s)
        if m:
            size = _bytes(m.group(2))
            self.running[m.group(1)] = (size, now)
            self.total_bytes += size
            return True
        m = re.match(r"^Downloaded (\S+)$", s)
        if m and m.group(1) in self.running:
            size, t0 = self.running.pop(m.group(1))
            self.done_bytes += size
            self.downloads += 1
            self.last = f"{m.group(1)} {mb(size)} at {mb(size / max(now - t0, 1e-3))}/s"
            return True
        if re.match(r"^Prepared \d+ packages?", s):
            self.phase = "installing"
            return True
        if re.match(r"^(Installed|Uninstalled) \d+ packages?", s) or s.startswith("Audited"):
            self.phase = "installed"
            return True
        return False

    def bytes_so_far(self, received: int, total: int):
        self.live = (received, total)

    def fraction(self) -> float:
        if self.live is not None:
            received, total = self.live
            return min(0.99, received / total) if total else 0.0
        if self.phase == "installed":
            return 0.99
        if self.phase == "installing":
            return 0.85
        if self.total_bytes:
            return 0.8 * self.done_bytes / self.total_bytes
        return 0.0

    def text(self, now: float) -> str:
        elapsed = max(now - self.t0, 1e-3)
        if self.live is not None:
            received, total = self.live
            rate = received / elapsed
            return f"{mb(received)} of {mb(total)}, {mb(rate)}/s" if total else f"{mb(received)}, {mb(rate)}/s"
        bits = []
        if self.running:
            name, (size, t0) = max(self.running.items(), key=lambda kv: kv[1][0])
            more = f" and {len(self.running) - 1} more" if len(self.running) > 1 else ""
            bits.append(f"downloading {name} ({mb(size)}){more}, {now - t0:.0f} s")
        if self.downloads:
            bits.append(f"{mb(self.done_bytes)} downloaded at {mb(self.done_bytes / elapsed)}/s"
                        + (f" (last: {self.last})" if self.last and not self.running else ""))
        if self.phase == "installing":
            bits.append(f"unpacking into the environment, {elapsed:.0f} s")
        if not bits:
            bits.append(f"{elapsed:.0f} s")
        return "; ".join(bits)


# -- running it ------------------------------------------------------------------------------

from ..qt import (QNetworkAccessManager, QNetworkReply, QNetworkRequest, QObject, QProcess,  # noqa: E402
                 QProcessEnvironment, QTimer, QUrl, pyqtSignal, to_bytes)


class Installer(QObject):
    """Signals: ``progress(percent, text)``, ``logLine(text)``, ``finished(ok, message)``,
    ``started()`` (a run begins: the log pane starts afresh)."""

    progress = pyqtSignal(int, str)
    logLine = pyqtSignal(str)
    finished = pyqtSignal(bool, str)
    started = pyqtSignal()

    def __init__(self, venv: Path | None = None, wheel: Path | None = None, lock: Path | None = None,
                 parent: QObject | None = None, log_path: Path | None = None, uv: str | None = None,
                 python: str = PYTHON_REQUEST, index_url: str | None = None,
                 pytorch_index: str = PYTORCH_INDEX, pins: dict | None = None,
                 test_site_packages: list[str] | tuple[str, ...] = ()):
        """``uv`` (a uv binary to use instead of fetching the pinned one), ``python``,
        ``index_url``, ``pytorch_index``, ``pins`` and ``test_site_packages`` are for tests (see
        :func:`plan`)."""
        super().__init__(parent)
        self.venv = Path(venv) if venv else venv_dir()
        self.root = self.venv.parent  # the data folder: the Python, uv and its cache go there too
        self.wheel = Path(wheel) if wheel else bundled_wheel()
        self.lock = Path(lock) if lock else bundled_lock()
        self.uv = uv
        self.python = python
        self.index_url = index_url
        self.pytorch_index = pytorch_index
        self.pins = pins if pins is not None else uv_pins()
        self.test_site_packages = tuple(test_site_packages)
        self.log_path = log_path or (self.root / "install.log")
        self.running = False
        self.status = ""  # the latest progress text (the docker's lead shows it)
        self.record: dict = {}
        self._proc: QProcess | None = None
        self._reply = None
        self._net: QNetworkAccessManager | None = None
        self._steps: list[Step] = []
        self._index = 0
        self._fresh = False
        self._cancelled = False
        self._variant = "cpu"
        self._meter: Meter | None = None
        self._tick = QTimer(self)
        self._tick.setInterval(1000)
        self._tick.timeout.connect(self._show_step)
        self.progress.connect(lambda _percent, text: setattr(self, "status", text))
        sweep(self.root)

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

    def installed_variant(self) -> str:
        """The PyTorch build the environment was installed with ("" unknown)."""
        return str(read_record(self.venv).get("torch", ""))

    def leftover_dirs(self) -> list[Path]:
        """Folders of an install (a Python, uv, its cache) that are there without an environment."""
        return [d for d in owned_dirs(self.root)[1:] if d.exists()]

    def disk_usage(self) -> int:
        """Bytes an Uninstall frees (the environment, a downloaded Python, uv, its cache)."""
        return size_on_disk(*[d for d in owned_dirs(self.root) if d.exists()])

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
            remove_later(self.venv)
        self._fresh = True
        self._run(update=False)

    def update(self, variant: str | None = None):
        """The bundled backend (and the lock's versions) into the existing environment, with
        the PyTorch build it was installed with (unless ``variant`` says another)."""
        if self.running:
            return
        if not self.installed():
            return self.install(variant)
        if self.wheel is None or not self.wheel.exists():
            return self._done(False, "This copy of the plugin carries no backend wheel.")
        self._variant = variant or self.installed_variant() or detect_variant()
        self._begin()
        self._fresh = False
        self._run(update=True)

    def uninstall(self) -> bool:
        """Remove the environment, a downloaded Python, uv and its cache (each moved aside at
        once, deleted in the background; a quit Krita's leftovers go at the next start)."""
        if self.running:
            return False
        gone = [d for d in owned_dirs(self.root) if d.exists()]
        for d in gone:
            remove_later(d)
        if gone:
            self._log(f"uninstalled: {', '.join(map(str, gone))}")
            self.progress.emit(0, "Uninstalled.")
        return bool(gone)

    def cancel(self):
        if not self.running:
            return
        self._cancelled = True
        if self._proc is not None:
            self._proc.kill()  # finished() follows, and ends the run
        elif self._reply is not None:
            self._reply.abort()
        else:
            self._done(False, "Cancelled.")

    # -- internals ----------------------------------------------------------------------
    def _lock_text(self) -> str | None:
        return self.lock.read_text(encoding="utf-8") if self.lock and self.lock.exists() else None

    def _begin(self):
        self.running = True
        self._cancelled = False
        self._index = 0
        self.record = {"torch": self._variant, "torch_from": "pypi", "backend": wheel_version(self.wheel)}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.started.emit()
        self._log(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} backend {wheel_version(self.wheel)} into "
                  f"{self.venv} (PyTorch: {self._variant})")

    def _uv_steps(self) -> tuple[str, list[Step]]:
        """The uv to run, and the download of the pinned one when it is not there yet."""
        if self.uv:
            return self.uv, []
        version = str(self.pins.get("version", ""))
        exe = uv_path(version or "unknown", self.root)
        if exe.exists():
            return str(exe), []
        pin = (self.pins.get("wheels") or {}).get(platform_key())
        if not pin:
            found = shutil.which("uv")
            if found:
                return found, []
            return str(exe), [Step("Getting uv", "", [], 0, fetch=("", "", str(exe)))]
        return str(exe), [Step(f"Getting uv {version}, the tool that installs the backend", "", [], 1,
                               fetch=(pin["url"], pin["sha256"], str(exe)))]

    def _run(self, update: bool):
        uv, first = self._uv_steps()
        self.record["python_request"] = self.python
        self.run_steps(first + plan(uv, self.venv, self.wheel, self._lock_text(), self._variant, update=update,
                                    python=self.python, index_url=self.index_url,
                                    pytorch_index=self.pytorch_index, test_site_packages=self.test_site_packages))

    def _log(self, text: str):
        try:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(text.rstrip("\n") + "\n")
        except OSError:
            pass
        self.logLine.emit(text)

    def environment(self) -> "QProcessEnvironment":
        """What each step runs with: Krita's own Python settings left out, uv's Python
        downloads and cache in the data folder, and the system's certificates trusted (a
        company proxy that re-signs HTTPS with its own authority is trusted by the system,
        not by uv's built-in list)."""
        env = QProcessEnvironment.systemEnvironment()
        for k in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):  # Krita's own Python must not leak in
            env.remove(k)
        for k, v in (("PYTHONUNBUFFERED", "1"), ("NO_COLOR", "1"), ("UV_CACHE_DIR", str(self.root / "uv-cache")),
                     ("UV_PYTHON_INSTALL_DIR", str(self.root / "python")), ("UV_PYTHON_INSTALL_BIN", "0")):
            env.insert(k, v)
        if not env.contains("UV_SYSTEM_CERTS") and not env.contains("UV_NATIVE_TLS"):
            env.insert("UV_SYSTEM_CERTS", "1")
        return env

    def _process(self) -> QProcess:
        proc = QProcess(self)
        proc.setProcessEnvironment(self.environment())
        proc.setProcessChannelMode(QProcess.ProcessChannelMode.MergedChannels)
        return proc

    def run_steps(self, steps: list[Step]):
        """Run ``steps`` one after another (``install``/``update`` plan them)."""
        self.running = True
        self._steps = steps
        self._index = -1
        self._tick.start()
        self._next()

    def _percent(self, fraction: float = 0.0) -> int:
        total = sum(s.weight for s in self._steps) or 1.0
        done = sum(s.weight for s in self._steps[: self._index]) + fraction * self._steps[self._index].weight
        return max(0, min(99, int(100 * done / total)))

    def _show_step(self):
        """The progress of the running step (each second too, so that a long wait moves)."""
        if not self.running or self._meter is None or not (0 <= self._index < len(self._steps)):
            return
        step, now = self._steps[self._index], time.monotonic()
        self.progress.emit(self._percent(self._meter.fraction()), f"{step.title}: {self._meter.text(now)}")

    def _next(self):
        self._index += 1
        if self._cancelled:
            return self._done(False, "Cancelled.")
        if self._index >= len(self._steps):
            self._write_record()
            remove_later(self.root / "uv-cache")  # gigabytes of downloads, not needed any more
            return self._done(True, f"Installed the Analogon backend {wheel_version(self.wheel)} in {self.venv}.")
        self._start(self._steps[self._index])

    def _start(self, step: Step):
        self._meter = Meter(time.monotonic())
        self.progress.emit(self._percent(), step.title + "\u2026")
        if step.fetch is not None:
            return self._fetch(step)
        for path, text in step.files.items():
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text, encoding="utf-8")
        self._log(f"$ {step.program} {' '.join(step.args)}")
        proc = self._process()
        self._proc = proc
        buf = bytearray()
        tail: list[str] = []

        def read():
            buf.extend(bytes(proc.readAllStandardOutput().data()))
            while b"\n" in buf:
                line, _, rest = bytes(buf).partition(b"\n")
                buf[:] = rest
                self._on_line(line.decode("utf-8", "replace").rstrip("\r"), tail)

        def failed_to_start(err):
            if err == QProcess.ProcessError.FailedToStart and self._proc is proc:
                self._proc = None
                self._done(False, f"{step.title} failed: cannot run {step.program}.")

        def finished(code, status=None):
            if self._proc is not proc:
                return
            read()
            if buf:
                self._on_line(bytes(buf).decode("utf-8", "replace"), tail)
            self._proc = None
            proc.deleteLater()
            if self._cancelled:
                return self._done(False, "Cancelled.")
            if proc.exitStatus() != QProcess.ExitStatus.NormalExit or code != 0:
                return self._failed(step, code, tail)
            self.record.update(step.record)
            self._next()

        proc.readyReadStandardOutput.connect(read)
        proc.errorOccurred.connect(failed_to_start)
        proc.finished.connect(finished)
        proc.start(step.program, step.args)

    def _on_line(self, line: str, tail: list[str]):
        if not line.strip():
            return
        self._log(line)
        tail.append(line.strip())
        del tail[:-20]
        m = re.match(r"^Using (\S+ [\d.]+\S*) interpreter at: (.+)$", line.strip())
        if m:  # which Python the environment has (a system one, or one uv downloaded)
            self.record["python"] = f"{m.group(1)} ({m.group(2)})"
        if self._meter is not None and self._meter.line(line, time.monotonic()):
            self._show_step()

    def _failed(self, step: Step, code: int, tail: list[str]):
        cause = next((t for t in reversed(tail) if t.lower().startswith("cause:")), "") or \
            next((t for t in reversed(tail) if t.lower().startswith(("error", "\u00d7"))), tail[-1] if tail else "")
        cause = re.sub(r"^(cause|error):\s*", "", cause, flags=re.IGNORECASE)
        if step.fallback is not None:
            if UNREACHABLE.search("\n".join(tail)):
                note = (f"The PyTorch download server could not be reached ({cause}). Installing PyTorch "
                        "from PyPI instead: the same version; on Linux it is the CUDA build, a larger "
                        "download, which runs on the CPU too.")
            else:
                note = (f"Installing PyTorch from the PyTorch download server failed ({cause}). "
                        "Trying PyPI's PyTorch instead.")
            self._log(note)
            self._steps[self._index] = step.fallback
            self.progress.emit(self._percent(), note)
            return self._start(step.fallback)
        why = f": {cause}" if cause else f" (exit code {code})"
        self._done(False, f"{step.title} failed{why}. See the log: {self.log_path}")

    # -- the one download of ours: uv ---------------------------------------------------
    def _fetch(self, step: Step):
        url, sha256, dest = step.fetch
        if not url:
            return self._done(False, "This plugin has no uv for this computer "
                                     f"({platform_key()}): install uv (https://docs.astral.sh/uv/) "
                                     "and press Install again.")
        self._log(f"downloading {url}")
        if self._net is None:
            self._net = QNetworkAccessManager(self)
        request = QNetworkRequest(QUrl(url))
        reply = self._net.get(request)
        self._reply = reply
        data = bytearray()
        reply.readyRead.connect(lambda: data.extend(to_bytes(reply.readAll())))

        shown = [0.0]

        def on_progress(received, total):
            self._meter.bytes_so_far(int(received), int(total) if total and total > 0 else 0)
            now = time.monotonic()
            if now - shown[0] >= 0.25 or received == total:  # a few times a second, and the end
                shown[0] = now
                self._show_step()

        def done():
            if self._reply is not reply:
                return
            self._reply = None
            data.extend(to_bytes(reply.readAll()))
            error = reply.error() != QNetworkReply.NetworkError.NoError
            message = reply.errorString()
            reply.deleteLater()
            if self._cancelled:
                return self._done(False, "Cancelled.")
            if error:
                return self._done(False, f"Could not download uv, the tool that installs the backend, from "
                                         f"PyPI ({message}). Check the internet connection (a proxy?), "
                                         "then press Install again.")
            got = hashlib.sha256(bytes(data)).hexdigest()
            if got != sha256:
                self._log(f"SHA-256 {got}, expected {sha256}")
                return self._done(False, "The downloaded uv does not match the checksum this plugin "
                                         "carries, so it is not used. Press Install again; if this "
                                         "happens again, please report it.")
            wheel = Path(dest).with_name("uv.whl")
            try:
                wheel.parent.mkdir(parents=True, exist_ok=True)
                wheel.write_bytes(bytes(data))
                extract_uv(wheel, Path(dest))
                wheel.unlink()
            except (OSError, ValueError, zipfile.BadZipFile) as e:
                return self._done(False, f"Could not unpack uv: {e}")
            self._log(f"uv {self.pins.get('version', '')} in {dest} (SHA-256 {got})")
            self._next()

        reply.downloadProgress.connect(on_progress)
        reply.finished.connect(done)

    def _write_record(self):
        try:
            (self.venv / RECORD).write_text(json.dumps(self.record, indent=1, sort_keys=True), encoding="utf-8")
        except OSError as e:
            self._log(f"could not write {self.venv / RECORD}: {e}")

    def _done(self, ok: bool, message: str):
        self._tick.stop()
        if self._fresh and not ok and self.venv.exists():
            self._log(f"removing the unfinished environment {self.venv}")
            remove_later(self.venv)
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


# -- removing gigabytes without waiting -----------------------------------------------------------

def remove_later(folder: Path) -> None:
    """Move ``folder`` aside at once (so that a new one can be made in its place) and delete it
    in a background thread (a venv with PyTorch is gigabytes: never on the UI thread). What a
    quit Krita leaves half-deleted is swept at the next start (:func:`sweep`)."""
    folder = Path(folder)
    if not folder.exists():
        return
    aside = folder.with_name(f".{folder.name}{REMOVING}{os.getpid()}-{time.monotonic_ns()}")
    try:
        folder.rename(aside)
    except OSError:
        aside = folder
    _delete_in_background([aside])


def leftovers(root: Path) -> list[Path]:
    """Folders in ``root`` that were renamed aside for deletion and are still there."""
    try:
        return [p for p in Path(root).iterdir() if p.name.startswith(".") and REMOVING in p.name and p.is_dir()]
    except OSError:
        return []


def sweep(root: Path) -> list[Path]:
    """Finish the deletions an earlier Krita began (in the background); the folders it found."""
    found = leftovers(root)
    if found:
        _delete_in_background(found)
    return found


def _delete_in_background(folders: list[Path]) -> threading.Thread:
    t = threading.Thread(target=lambda: [shutil.rmtree(f, ignore_errors=True) for f in folders],
                         name="analogon-remove", daemon=True)
    t.start()
    return t
