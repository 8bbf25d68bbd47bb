"""The declared dependencies match the code: every module of the package imports, every
third-party package it imports is declared in pyproject.toml, and the lock file pins every
declared dependency within its declared range.

This runs in the test environment against the declared dependency list (building a fresh
virtual environment from the lock file costs minutes and gigabytes; the Makefile's venv is
installed from that lock file, so the import test does run against exactly its pins)."""
from __future__ import annotations

import ast
import importlib
import importlib.metadata as md
import pkgutil
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "backend" / "analogon"
LOCK = ROOT / "packaging" / "requirements" / "lock.txt"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> dict[str, str]:
    """normalised distribution name -> the requirement as declared."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {_norm(re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0]): d for d in deps}


def _modules() -> list[str]:
    import analogon

    assert Path(analogon.__file__).resolve().parent == PACKAGE.resolve(), \
        "tests must import this checkout's backend (PYTHONPATH=backend)"
    return ["analogon"] + [m.name for m in pkgutil.walk_packages(analogon.__path__, "analogon.")]


def test_every_module_imports():
    names = _modules()
    assert len(names) > 40 and "analogon.models.discovery" in names
    failed = {}
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - collect them all
            failed[name] = f"{type(e).__name__}: {e}"
    assert not failed, failed


def _third_party_imports() -> dict[str, set[str]]:
    """top-level import name -> the files that import it (absolute imports only)."""
    out: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = [node.module.split(".")[0]]
            else:
                continue
            for top in tops:
                if top not in sys.stdlib_module_names and top != "analogon":
                    out.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return out


def test_every_imported_package_is_declared():
    imports = _third_party_imports()
    assert {"torch", "diffusers", "huggingface_hub", "httpx"} <= set(imports)
    dists = md.packages_distributions()
    declared = _declared()
    missing = {}
    for top, files in sorted(imports.items()):
        names = {_norm(d) for d in dists.get(top, [])}
        if not names:
            missing[top] = f"not installed (imported by {sorted(files)[0]})"
        elif not names & set(declared):
            missing[top] = f"{sorted(names)} not in pyproject's dependencies (imported by {sorted(files)[0]})"
    assert not missing, missing


def _lock() -> dict[str, list[tuple[str, str]]]:
    """normalised name -> [(version, marker)] from the lock file."""
    out: dict[str, list[tuple[str, str]]] = {}
    for line in LOCK.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)\s*(?:;\s*(.*))?$", line)
        if m:
            out.setdefault(_norm(m.group(1)), []).append((m.group(2), m.group(3) or ""))
    return out


def test_lock_file_pins_every_declared_dependency_in_range():
    from packaging.markers import Marker
    from packaging.requirements import Requirement

    lock = _lock()
    assert lock, "the lock file has no pins"
    envs = [{"python_full_version": v, "python_version": v.rsplit(".", 1)[0], "sys_platform": p,
             "platform_system": s, "platform_machine": m, "implementation_name": "cpython",
             "platform_python_implementation": "CPython", "os_name": "nt" if p == "win32" else "posix"}
            for v in ("3.10.12", "3.11.2", "3.12.3") for p, s, m in
            (("linux", "Linux", "x86_64"), ("win32", "Windows", "AMD64"), ("darwin", "Darwin", "arm64"))]
    problems = []
    for name, req in _declared().items():
        r = Requirement(req)
        for env in envs:
            pins = [v for v, marker in lock.get(name, []) if not marker or Marker(marker).evaluate(env)]
            if len(pins) != 1:
                problems.append(f"{name}: {len(pins)} pins for {env['sys_platform']} {env['python_full_version']}")
            elif not r.specifier.contains(pins[0], prereleases=True):
                problems.append(f"{name}=={pins[0]} is outside {req}")
    assert not problems, problems

