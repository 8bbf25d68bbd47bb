"""Krita 6 for the in-Krita tests: a minimal Debian *sid* root with ``krita`` 6 and
``python3-pyqt6`` from Debian's *experimental* suite (Qt 6, PyQt6, Python 3.14), which need a
newer base than the Debian 12 that CI and the development machines run.

    python tests/krita/krita6_root.py build    # build it (or reuse the cached one), print its path
    python tests/krita/krita6_root.py check    # print its path, or why there is none (exit 1)
    python tests/krita/krita6_root.py run [--bind PATH]... -- CMD [ARG]...

The root is built once into a cache folder outside the checkout (``$ANALOGON_KRITA6_CACHE``,
else ``/var/cache/analogon/krita6`` as root, else ``~/.cache/analogon/krita6``), in a folder
named after a hash of the recipe below: changing the recipe builds a new root (and removes the
old one). Building needs root, ``debootstrap`` (installed with apt-get when missing) and the
Debian mirror; ``build`` says so and exits 0 when one of them is missing, so that ``make
test`` goes on and the Krita 6 tests skip with that reason. The tests themselves never build
and never reach the network: they use a root that is already there (:func:`unavailable`).

While a command runs inside, ``/proc``, a private ``/dev/shm`` and the folders asked for
with ``bind`` are mounted at the same paths inside the root; they are
unmounted when the command ends, whatever the reason (``try``/``finally``; while they are
mounted, SIGTERM and SIGHUP raise ``SystemExit`` so that they unwind too). Mounts that a killed
run left behind are found in ``/proc/self/mountinfo`` and unmounted before the next use, under
an exclusive lock on the cache folder. The standard library only.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

MIRROR = os.environ.get("ANALOGON_DEBIAN_MIRROR", "http://deb.debian.org/debian")

# Everything that decides what the root contains. Any change here builds a new root.
RECIPE = {
    "debootstrap": ["--variant=minbase", "sid"],
    "sources": ["deb {mirror} experimental main"],
    # The mirror's experimental release files are past their validity date.
    "apt_options": ["-o", "Acquire::Check-Valid-Until=false"],
    "install": {"target_release": "experimental",
                "packages": ["krita", "python3-pyqt6", "fonts-dejavu-core"]},
    "version": 1,
}
STAMP = ".analogon-krita6-recipe"
PKG_APT = ["apt-get", *RECIPE["apt_options"]]


def log(msg: str) -> None:
    print(f"krita6-root: {msg}", file=sys.stderr, flush=True)


def recipe_hash() -> str:
    text = json.dumps(RECIPE, sort_keys=True) + MIRROR
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_dir() -> Path:
    env = os.environ.get("ANALOGON_KRITA6_CACHE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/analogon/krita6")
    return Path.home() / ".cache" / "analogon" / "krita6"


def root_dir() -> Path:
    return cache_dir() / f"root-{recipe_hash()}"


def is_built(root: Path | None = None) -> bool:
    root = root or root_dir()
    try:
        return (root / STAMP).read_text().strip() == recipe_hash()
    except OSError:
        return False


def _mirror_reachable(timeout: float = 10.0) -> str | None:
    """None when the mirror answers, else why not."""
    url = MIRROR.rstrip("/") + "/dists/sid/Release"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return None
    except Exception as e:  # any failure means: cannot build here
        return f"the Debian mirror {MIRROR} is not reachable ({e})"


def _cannot_mount() -> str | None:
    """None when this process may mount (a container without CAP_SYS_ADMIN may not)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="analogon-mount-probe-") as d:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "probe", d],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            return f"mounting is not permitted here ({proc.stderr.strip() or proc.returncode})"
        subprocess.run(["umount", d], check=True)
    return None


def unavailable(building: bool = False) -> str | None:
    """None when the Krita 6 root can be used (or, with ``building``, built); else the reason."""
    if not sys.platform.startswith("linux"):
        return "the Krita 6 root is a Linux chroot"
    if os.geteuid() != 0:
        return "the Krita 6 root needs root (chroot and mounts); run the tests as root"
    reason = _cannot_mount()
    if reason:
        return "the Krita 6 root needs mounts: " + reason
    if not building:
        if is_built():
            return None
        return (f"the Krita 6 root is not built at {root_dir()}: run `make krita6-root` "
                "(python3 tests/krita/krita6_root.py build) as root")
    if is_built():
        return None
    if shutil.which("debootstrap") is None and shutil.which("apt-get") is None:
        return "debootstrap is not installed and there is no apt-get to install it"
    return _mirror_reachable()


# ---------------------------------------------------------------------------------- mounts

def _mountpoints() -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # the mount point is field 5, with spaces etc. octal-escaped
            point = line.split()[4]
            out.append(point.encode().decode("unicode_escape"))
    return out


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first."""
    p = os.path.realpath(path)
    found = [m for m in _mountpoints() if m == p or m.startswith(p.rstrip("/") + "/")]
    return sorted(set(found), key=lambda m: (-m.count("/"), m))


def _umount(point: str) -> None:
    if subprocess.run(["umount", point], capture_output=True).returncode != 0:
        time.sleep(0.5)  # a process inside may just be exiting
        if subprocess.run(["umount", point], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", point], capture_output=True)


def umount_all(root: Path) -> None:
    for point in mounts_under(root):
        _umount(point)
    left = mounts_under(root)
    if left:
        raise RuntimeError(f"could not unmount {left}")


def _mount(args: list[str]) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


@contextlib.contextmanager
def lock(exclusive: bool = True):
    """An flock on the cache folder, so that two runs never build or mount at once."""
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _signals_unwind():
    """SIGTERM and SIGHUP raise SystemExit while the block runs (in the main thread, where
    they would otherwise end the process at once), so that ``finally`` clauses unmount."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    old = {}
    for s in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(s) is signal.SIG_DFL:
            old[s] = signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _char_device(path: Path) -> bool:
    import stat

    try:
        return stat.S_ISCHR(os.stat(path).st_mode)
    except OSError:
        return False


@contextlib.contextmanager
def mounted(root: Path, binds: list[str | os.PathLike] = (), readonly: list[str | os.PathLike] = ()):
    """``/proc``, a ``/dev/shm`` of its own (and the host's ``/dev`` where the root has no
    device nodes) and each of ``binds``/``readonly`` (host folders, mounted at the same path
    inside the root) for the duration of the block.
    The caller holds :func:`lock`. Every mount is made private first so that nothing mounted
    inside the root propagates back to the host."""
    root = Path(root)
    umount_all(root)  # left behind by a run that was killed
    created: list[Path] = []
    with _signals_unwind(), _unmounting(root, created):
        _mount(["-t", "proc", "proc", str(root / "proc")])
        if not _char_device(root / "dev" / "null"):  # debootstrap could not make the nodes
            _mount(["--bind", "/dev", str(root / "dev")])
            _mount(["--make-private", str(root / "dev")])
        (root / "dev" / "shm").mkdir(exist_ok=True)
        _mount(["-t", "tmpfs", "-o", "mode=1777,size=1g", "shm", str(root / "dev" / "shm")])
        for path, ro in [(b, False) for b in binds] + [(b, True) for b in readonly]:
            src = Path(path).resolve()
            dst = root / src.relative_to("/")
            missing = []
            p = dst
            while not p.exists():
                missing.append(p)
                p = p.parent
            dst.mkdir(parents=True, exist_ok=True)
            created.extend(reversed(missing))
            _mount(["--bind", str(src), str(dst)])
            _mount(["--make-private", str(dst)])
            if ro:
                _mount(["-o", "remount,bind,ro", str(dst)])
        yield root


@contextlib.contextmanager
def _unmounting(root: Path, created: list[Path]):
    try:
        yield
    finally:
        umount_all(root)
        for p in reversed(created):  # the empty mount points we made, deepest first
            with contextlib.suppress(OSError):
                p.rmdir()


def chroot_argv(root: Path, argv: list[str], env: dict[str, str]) -> list[str]:
    """The command line that runs ``argv`` inside ``root`` with exactly ``env``."""
    return ["chroot", str(root), "/usr/bin/env", "-i", *[f"{k}={v}" for k, v in env.items()], *argv]


BASE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8", "HOME": "/root"}


# ---------------------------------------------------------------------------------- build

def _run(cmd: list[str], output: Path | None = None, **kw) -> None:
    """Run ``cmd``; with ``output``, its output goes to that file (the build log), and the
    end of the log is shown when it fails."""
    log("$ " + " ".join(shlex.quote(c) for c in cmd))
    if output is None:
        subprocess.run(cmd, check=True, **kw)
        return
    with open(output, "ab") as f:
        f.write(("$ " + " ".join(cmd) + "\n").encode())
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, **kw)
    if proc.returncode != 0:
        tail = Path(output).read_text(errors="replace").splitlines()[-40:]
        log(f"failed (exit code {proc.returncode}); the end of {output}:\n" + "\n".join(tail))
        raise subprocess.CalledProcessError(proc.returncode, cmd)


def _remove_tree(path: Path) -> None:
    """Remove a root folder, never through a mount (that would delete host files)."""
    if not path.exists():
        return
    umount_all(path)
    if mounts_under(path):
        raise RuntimeError(f"refusing to remove {path}: something is still mounted in it")
    _run(["rm", "-rf", "--one-file-system", str(path)])


def _ensure_debootstrap() -> None:
    if shutil.which("debootstrap"):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if subprocess.run(["apt-get", "install", "-y", "-qq", "debootstrap"], env=env).returncode != 0:
        _run(["apt-get", "update", "-qq"], env=env)
        _run(["apt-get", "install", "-y", "-qq", "debootstrap"], env=env)


def build() -> Path:
    """Build the root unless it is there; return its path. Raises on a failed build."""
    with lock():
        root = root_dir()
        if is_built(root):
            return root
        t0 = time.monotonic()
        _ensure_debootstrap()
        work = cache_dir() / f"build-{recipe_hash()}"
        _remove_tree(work)  # a build that was interrupted
        out = cache_dir() / "build.log"
        out.write_text("")
        log(f"building the Krita 6 root (a few minutes; the log is {out})")
        try:
            _run(["debootstrap", *RECIPE["debootstrap"], str(work), MIRROR], out)
            lists = work / "etc" / "apt" / "sources.list.d"
            lists.mkdir(parents=True, exist_ok=True)
            (lists / "analogon-experimental.list").write_text(
                "\n".join(s.format(mirror=MIRROR) for s in RECIPE["sources"]) + "\n")
            env = dict(BASE_ENV, DEBIAN_FRONTEND="noninteractive")
            inst = RECIPE["install"]
            with mounted(work):
                _run(chroot_argv(work, [*PKG_APT, "update", "-qq"], env), out)
                _run(chroot_argv(work, [*PKG_APT, "install", "-y", "-qq", "-t", inst["target_release"],
                                        *inst["packages"]], env), out)
                _run(chroot_argv(work, ["apt-get", "clean"], env), out)
                versions = subprocess.run(
                    chroot_argv(work, ["dpkg-query", "-W", "krita", "python3-pyqt6", "python3"], env),
                    check=True, capture_output=True, text=True).stdout
            (work / STAMP).write_text(recipe_hash() + "\n")
            (work / (STAMP + ".versions")).write_text(versions)
        except BaseException:
            with contextlib.suppress(Exception):
                _remove_tree(work)
            raise
        for old in cache_dir().glob("root-*"):  # roots of earlier recipes
            if old != root:
                _remove_tree(old)
        _remove_tree(root)
        work.rename(root)
        log(f"built {root} in {time.monotonic() - t0:.0f} s:\n{versions.strip()}")
        return root


# ---------------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="build the root unless it is there")
    sub.add_parser("check", help="print the root's path, or why it cannot be used")
    r = sub.add_parser("run", help="run a command inside the root")
    r.add_argument("--bind", action="append", default=[], help="a host folder to mount at the same path")
    r.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    if args.cmd == "build":
        reason = unavailable(building=True)
        if reason:
            log(f"note: not building, {reason}; the Krita 6 tests will be skipped")
            return 0
        print(build())
        return 0
    reason = unavailable()
    if reason:
        log(reason)
        return 1
    if args.cmd == "check":
        print(root_dir())
        return 0
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("run: no command")
    env = dict(BASE_ENV, TERM=os.environ.get("TERM", "dumb"))
    with lock(), mounted(root_dir(), binds=args.bind) as root:
        return subprocess.run(chroot_argv(root, cmd, env)).returncode


if __name__ == "__main__":
    sys.exit(main())
