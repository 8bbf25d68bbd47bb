"""`analogon bench`: benchmark sections that print tables and write JSON. Never asserts timings.

A section is a module in this package that calls :func:`register` at import time::

    from analogon.bench import register

    def run(opts) -> list[dict]:          # rows of one table
        ...
    register("pixels", run, "PIXELS: seconds per pass at 512 and 1024")

Method engineers add ``bench/<method>.py``; ``analogon bench --list`` shows them all.

A suite (``analogon bench --suite NAME``) is one prepared run across models and methods that
writes its own JSON and Markdown table (:func:`register_suite`; ``bench/gpu.py``).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import pkgutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass
class Section:
    name: str
    run: Callable[[argparse.Namespace], list[dict[str, Any]]]
    help: str = ""
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None


SECTIONS: dict[str, Section] = {}
SUITES: dict[str, Section] = {}


def register(name: str, run: Callable[[argparse.Namespace], list[dict[str, Any]]], help: str = "",
             add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> Section:
    SECTIONS[name] = Section(name, run, help, add_arguments)
    return SECTIONS[name]


def register_suite(name: str, run: Callable[[argparse.Namespace], dict[str, Any]], help: str = "",
                   add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> Section:
    SUITES[name] = Section(name, run, help, add_arguments)
    return SUITES[name]


def discover() -> dict[str, Section]:
    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_"):
            try:
                importlib.import_module(f"{__name__}.{mod.name}")
            except Exception as e:  # a broken section must not hide the others
                print(f"bench: section module {mod.name} failed to import: {e}", file=sys.stderr)
    return SECTIONS


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu_count": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # pragma: no cover
        pass
    return info


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)"
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in cells])


def main(argv: list[str] | None = None) -> int:
    sections = discover()
    p = argparse.ArgumentParser(prog="analogon bench", description="Benchmarks: tables and JSON.")
    p.add_argument("sections", nargs="*", help=f"sections to run (default: all): {', '.join(sections)}")
    p.add_argument("--list", action="store_true", help="list the sections")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    p.add_argument("--repeat", type=int, default=None,
                   help="repeats per measurement, median reported (default 3; 1 with --quick)")
    p.add_argument("--device", help="device for sections that load models")
    p.add_argument("--model", metavar="SPEC",
                   help="model for every section that loads one (overrides each --SECTION-model), "
                        "e.g. a full-size folder from `analogon build-random sd15 DIR`")
    p.add_argument("--no-warmup", action="store_true",
                   help="no warm-up run before the timed ones (full-size models on a CPU)")
    p.add_argument("--quality", action="store_true", help="run the quality suite instead (analogon.quality)")
    p.add_argument("--suite", choices=sorted(SUITES) or None, default=None,
                   help="run a prepared suite instead of sections: "
                        + "; ".join(f"{n}: {s.help}" for n, s in SUITES.items()))
    for s in list(sections.values()) + list(SUITES.values()):
        if s.add_arguments is not None:
            s.add_arguments(p)
    opts = p.parse_args(argv)
    if opts.repeat is None:
        opts.repeat = 1 if opts.quick else 3
    if opts.model:
        for k in list(vars(opts)):
            if k.endswith("_model") and k != "model":
                setattr(opts, k, opts.model)
    if opts.list:
        for s in sections.values():
            print(f"{s.name:12s} {s.help}")
        for s in SUITES.values():
            print(f"--suite {s.name:4s} {s.help}")
        return 0
    if opts.suite:
        if opts.sections:
            print("analogon bench: --suite runs alone (no sections with it)", file=sys.stderr)
            return 2
        result = SUITES[opts.suite].run(opts)
        if opts.json:
            Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
            Path(opts.json).write_text(json.dumps(result, indent=2, default=str))
            print(f"wrote {opts.json}")
        return 0
    names = opts.sections or list(sections)
    unknown = [n for n in names if n not in sections]
    if unknown:
        print(f"analogon bench: unknown section(s) {', '.join(unknown)}; known: {', '.join(sections)}",
              file=sys.stderr)
        return 2
    result: dict[str, Any] = {"machine": machine_info(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "sections": {}}
    for n in names:
        print(f"== {n}: {sections[n].help}", flush=True)
        t0 = time.perf_counter()
        rows = sections[n].run(opts)
        result["sections"][n] = {"rows": rows, "seconds": round(time.perf_counter() - t0, 2)}
        print(format_table(rows), flush=True)
        print()
    if opts.json:
        Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {opts.json}")
    return 0
