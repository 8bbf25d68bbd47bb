"""Installing the backend from the docker (see :class:`Installer`)."""
from __future__ import annotations

import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
WHEEL_RE = re.compile(r"^analogon-(?P<version>[^-]+)-py3-none-any\.whl$")


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
