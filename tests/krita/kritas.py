"""The two Kritas that the in-Krita tests run in, behind one interface:

- ``krita5``: Debian's ``krita`` 5 installed on this machine (Qt 5, PyQt5, Python 3.11);
- ``krita6``: Debian's ``krita`` 6 in the cached Debian sid root that ``krita6_root.py``
  builds (Qt 6, PyQt6, Python 3.14), run with ``chroot``.

A test keeps everything it hands to Krita (profile, scripts, report) in one folder of its
own. :meth:`Krita.session` makes that folder visible to Krita at the same path (for Krita 6:
a bind mount into the root, unmounted when the block ends, however it ends), so that paths
mean the same on both sides. The backend always runs on this machine: for Krita 6,
:meth:`Krita.backend_command` writes a small script that the plugin starts from inside the
root and that enters this machine's root folder again (``/proc/<pid>/root`` of the test
process) before it execs the backend, so that the process the plugin starts, watches and
stops is the backend itself. The chroot shares the network, so 127.0.0.1 is the same host.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import shutil
from pathlib import Path

import krita6_root

KRITAS = ("krita5", "krita6")


class Krita:
    name = ""
    major = 0

    def unavailable(self, program: str) -> str | None:
        """Why ``program`` (kritarunner, krita) cannot be run here, or None."""
        raise NotImplementedError

    @contextlib.contextmanager
    def session(self, folder: Path):
        yield self

    def command(self, argv: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
        """(argv, environment) for subprocess that run ``argv`` in this Krita with ``env``
        added to an ordinary environment (a None value: that variable unset)."""
        raise NotImplementedError

    def backend_command(self, folder: Path, analogon: str, env: dict[str, str]) -> str:
        """The backend command for the plugin's settings: starts ``analogon`` on this machine
        with this machine's environment plus ``env`` (a None value: that variable unset)."""
        raise NotImplementedError


class Krita5(Krita):
    name, major = "krita5", 5

    def unavailable(self, program):
        if shutil.which(program) is None:
            return f"{program} is not installed (apt-get install krita)"
        return None

    def command(self, argv, env):
        penv = {**os.environ, **env}
        return [shutil.which(argv[0]) or argv[0], *argv[1:]], {k: v for k, v in penv.items() if v is not None}

    def backend_command(self, folder, analogon, env):
        return analogon  # Krita passes its own environment on, which includes ``env``


class Krita6(Krita):
    name, major = "krita6", 6

    def __init__(self):
        self.root: Path | None = None

    def unavailable(self, program):
        reason = krita6_root.unavailable()
        if reason:
            return reason
        if not (krita6_root.root_dir() / "usr" / "bin" / program).exists():
            return f"{program} is missing in the Krita 6 root {krita6_root.root_dir()}"
        return None

    @contextlib.contextmanager
    def session(self, folder):
        with krita6_root.lock(), krita6_root.mounted(krita6_root.root_dir(), binds=[folder]) as root:
            self.root = root
            try:
                yield self
            finally:
                self.root = None

    def command(self, argv, env):
        assert self.root is not None, "Krita 6 runs inside a session"
        inner = {**krita6_root.BASE_ENV, "PYTHONDONTWRITEBYTECODE": "1", **env}
        inner = {k: v for k, v in inner.items() if v is not None}
        return krita6_root.chroot_argv(self.root, argv, inner), dict(os.environ)

    def backend_command(self, folder, analogon, env):
        host_env = {**os.environ, **env}  # a None value in ``env``: that variable unset
        assigns = " ".join(shlex.quote(f"{k}={v}") for k, v in sorted(host_env.items())
                           if v is not None and "\n" not in v and "=" not in k)
        script = Path(folder) / "analogon-on-host"
        script.write_text(
            "#!/bin/sh\n"
            "# Started by the plugin inside the Krita 6 root: runs the backend on the host (the\n"
            "# root folder of the test process), keeping this process id (exec all the way).\n"
            f"exec chroot /proc/{os.getpid()}/root /usr/bin/env -i {assigns} "
            f"{shlex.quote(analogon)} \"$@\"\n")
        script.chmod(0o755)
        return str(script)


def get(name: str) -> Krita:
    return {"krita5": Krita5, "krita6": Krita6}[name]()
