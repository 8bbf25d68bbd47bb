"""`analogon bench --quality`: every method on fixed, seeded toy-world cases, scored by the
attribute reader against the ground-truth render.

For each registered method and each kind of case it is measured on (see :mod:`.cases`), the
table shows
- change: share of the changed attributes the result shows (e.g. the new colour),
- keep: share of the other attributes that stayed as in the truth,
- all: share of cases where every attribute is right,
- dist: mean absolute pixel difference to the ground-truth render (0..1, lower is better),
- outside: mean absolute difference to the target outside the edit region (exemplar cases),
next to baselines that need no model (the target returned unchanged, the example returned)
and the ground truth itself (the reader's ceiling). Methods that are not installed are skipped
with a note. Jobs run through the same engine as the server (``analogon.engine``).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..toyworld.reader import read
from . import cases as cases_mod
from .cases import KINDS, METHODS, SIZE, Case


def _load_method_cases() -> None:
    """Per-method case modules (``cases_<method>.py`` in this package) register themselves."""
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(__path__):
        if mod.name.startswith("cases_"):
            importlib.import_module(f"{__name__}.{mod.name}")


_load_method_cases()

__all__ = ["main", "run_quality", "score_case", "format_table"]


def _rgb(img: np.ndarray) -> np.ndarray:
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[..., :3]
    if a.shape[0] != SIZE or a.shape[1] != SIZE:
        from PIL import Image

        a = np.asarray(Image.fromarray(a).resize((SIZE, SIZE), Image.Resampling.LANCZOS))
    return a


def score_case(case: Case, result: np.ndarray) -> dict[str, Any]:
    """Reader-based scores of one result image against the case's truth."""
    res = _rgb(result)
    r = read(res)
    change_ok = [r.get(k) == v for k, v in case.changed.items()]
    keep_ok = [r.get(k) == case.truth[k] for k in case.kept]
    out: dict[str, Any] = {
        "change": float(np.mean(change_ok)) if change_ok else 1.0,
        "change_by": {k: float(ok) for k, ok in zip(case.changed, change_ok)},
        "keep": float(np.mean(keep_ok)) if keep_ok else 1.0,
        "all": float(all(change_ok) and all(keep_ok)),
        "dist": float(np.abs(res.astype(np.float32) - case.truth_image.astype(np.float32)).mean()
                      / 255.0),
        "read": {k: r.get(k) for k in ("shape", "colour", "size", "texture", "background")},
    }
    if case.keep_region is not None and case.keep_region.any():
        tgt = case.slots[case.target].astype(np.float32)
        out["outside"] = float(np.abs(res.astype(np.float32) - tgt)[case.keep_region].mean() / 255.0)
    return out


def _aggregate(scores: list[dict[str, Any]]) -> dict[str, Any]:
    if not scores:
        return {"cases": 0}
    out: dict[str, Any] = {"cases": len(scores)}
    for k in ("change", "keep", "all", "dist", "outside"):
        vals = [s[k] for s in scores if k in s]
        if vals:
            out[k] = float(np.mean(vals))
    # adoption rate of each changed attribute (an appearance case changes two)
    by: dict[str, list[float]] = {}
    for s in scores:
        for k, v in s.get("change_by", {}).items():
            by.setdefault(k, []).append(v)
    out["change_by"] = {k: float(np.mean(v)) for k, v in by.items()}
    return out


# -- running methods ----------------------------------------------------------------------

class _Runner:
    """Runs jobs through the engine with one warm model and a private cache."""

    def __init__(self, model: str, device: str | None):
        from ..core.cache import Cache
        from ..models import LoadOptions, ModelManager

        self.model = model
        self.tmp = tempfile.TemporaryDirectory(prefix="analogon-quality-")
        self.cache = Cache(Path(self.tmp.name) / "cache")
        self.models = ModelManager(capacity=1, options=LoadOptions(device=device))

    def run(self, method_id: str, roles: dict[str, str], params: dict[str, Any], case: Case,
            seed: int) -> np.ndarray:
        from ..engine import execute, prepare

        images, source = case_images(method_id, roles, case)
        job = prepare(method_id, params, images, self.model, seed, self.model, source)
        res = execute(job, source=source, models=self.models, cache=self.cache)
        return res.images[0].rgba

    def close(self) -> None:
        self.tmp.cleanup()


def case_images(method_id: str, roles: dict[str, str], case: Case):
    """A case's slots as a method's image refs: (refs by role, the engine's image source).
    ``roles`` maps role names to slot names where they differ."""
    from ..engine import MemorySource
    from ..methods import get

    source = MemorySource()
    images: dict[str, Any] = {}
    for role in get(method_id).all_roles():
        slot = roles.get(role.name, role.name)
        if slot in case.slots:
            sha = source.add(case.slots[slot])
            images[role.name] = [sha] if role.multiple else sha
    return images, source


def demo_case(method_id: str, seed: int = 0):
    """One toy-world case for ``analogon demo`` on toy-sd: (refs by role, image source), or
    None when the method registered no cases."""
    spec = METHODS.get(method_id)
    if spec is None or not spec.kinds:
        return None
    return case_images(method_id, spec.roles, cases_mod.build(spec.kinds[0], 1, seed)[0])


def _method_params(method_id: str, spec_params: dict[str, Any], mode: str) -> dict[str, Any]:
    from ..methods import get

    base: dict[str, Any] = {}
    if mode == "demo":
        base = dict(getattr(get(method_id), "demo_params", {}) or {})
    base.update(spec_params)
    return base


def method_note(method_id: str, why: str, params: dict[str, Any]) -> str:
    """A measured method's note: why its cases run as they do (the case module's words), then
    the settings that ran, written from the parameters themselves (overrides included), so that
    the two can never disagree."""
    settings = ", ".join(f"{k}={v}" for k, v in params.items()) or "the method's defaults"
    return f"{method_id}: {why + ' ' if why else ''}Settings: {settings}."


def run_quality(methods: list[str] | None = None, kinds: list[str] | None = None, n: int = 10,
                seed: int = 0, model: str = "toy-sd", device: str | None = None,
                params_mode: str = "default", baselines: bool = True,
                log=print, overrides: dict[str, Any] | None = None,
                variants: bool = True) -> dict[str, Any]:
    """Run the suite; returns the JSON-able report (rows, per-case details, notes).
    ``overrides`` are set on top of every measured method's parameters (not the baselines');
    ``variants`` adds each method's variant rows (the same parameters, more inputs)."""
    from ..errors import AnalogonError
    from ..methods import UNAVAILABLE, all_methods

    registered = {m.id for m in all_methods()}
    wanted = methods or list(METHODS)
    rows: list[dict[str, Any]] = []
    details: list[dict[str, Any]] = []
    notes: list[str] = []
    used_kinds = kinds or sorted({k for m in wanted if m in METHODS for k in METHODS[m].kinds},
                                 key=list(KINDS).index)
    built: dict[str, list[Case]] = {k: cases_mod.build(k, n, seed) for k in used_kinds}

    if baselines:
        for kind, cs in built.items():
            truth_scores = [score_case(c, c.truth_image) for c in cs]
            rows.append({"method": "ground truth", "kind": kind, **_aggregate(truth_scores)})
            for name in cs[0].baselines if cs else ():
                sc = [score_case(c, c.slots[c.baselines[name]]) for c in cs]
                rows.append({"method": name, "kind": kind, **_aggregate(sc)})

    runner: _Runner | None = None

    def warm_runner() -> bool:
        """Load the model once; False (with a note) when it cannot be loaded."""
        nonlocal runner
        if runner is None:
            runner = _Runner(model, device)
        try:
            runner.models.get(model)
        except AnalogonError as e:
            notes.append(f"model {model}: {e.message} Methods were not run.")
            return False
        return True

    def measure(name: str, kind: str, method_id: str, roles: dict[str, str],
                params_of, extra: dict[str, Any]) -> None:
        scores, errors = [], []
        t0 = time.time()
        for i, c in enumerate(built[kind]):
            try:
                out = runner.run(method_id, roles, params_of(c), c, seed + i)
            except Exception as e:  # one broken case must not hide the others
                errors.append(f"{c.name}: {type(e).__name__}: {e}")
                continue
            s = score_case(c, out)
            scores.append(s)
            details.append({"method": name, "kind": kind, "case": c.name, "changed": c.changed,
                            "truth": {k: c.truth[k] for k in
                                      ("shape", "colour", "size", "texture", "background")},
                            **s})
        secs = time.time() - t0
        row = {"method": name, "kind": kind, **_aggregate(scores),
               "seconds_per_case": round(secs / max(1, len(built[kind])), 2), **extra}
        if errors:
            row["errors"] = len(errors)
            notes.append(f"{name}/{kind}: {len(errors)} case(s) failed, e.g. {errors[0]}")
        rows.append(row)
        log(format_row(row))

    def result() -> dict[str, Any]:
        return {"model": model, "seed": seed, "n": n, "params_mode": params_mode,
                "overrides": overrides or {}, "rows": rows, "notes": notes, "cases": details}

    try:
        if baselines:
            # baselines that run the model, for the kinds a method here is measured on
            measured = {k for m in wanted if m in METHODS and m in registered
                        for k in METHODS[m].kinds}
            for kind in (k for k in built if k in measured):
                for name, b in cases_mod.MODEL_BASELINES.get(kind, {}).items():
                    if b.method not in registered:
                        notes.append(f"{name}: skipped ({b.method} is not installed)")
                        continue
                    if not warm_runner():
                        return result()
                    measure(name, kind, b.method, b.roles, b.params_of,
                            {"baseline": True, "params": b.params})
        for mid in wanted:
            spec = METHODS.get(mid)
            if spec is None:
                notes.append(f"{mid}: no quality cases registered (analogon.quality.cases)")
                continue
            if mid not in registered:
                why = UNAVAILABLE.get(mid, "not registered")
                notes.append(f"{mid}: skipped ({why})")
                continue
            params = {**_method_params(mid, spec.params, params_mode), **(overrides or {})}
            notes.append(method_note(mid, spec.note, params))
            for kind in spec.kinds:
                if kind not in built:
                    continue
                if not warm_runner():
                    return result()
                measure(mid, kind, mid, spec.roles, lambda c, p=params: p, {"params": params})
                if not variants:
                    continue
                for vname, vroles in spec.variants.items():
                    measure(f"{mid}, {vname}", kind, mid, {**spec.roles, **vroles},
                            lambda c, p=params: p, {"params": params, "variant": vname})
    finally:
        if runner is not None:
            runner.close()
    return result()


# -- output -------------------------------------------------------------------------------

COLUMNS = ("cases", "change", "keep", "all", "dist", "outside")


def format_row(row: dict[str, Any]) -> str:
    cells = [f"{row['method']:<24s}", f"{row['kind']:<11s}"]
    for c in COLUMNS:
        v = row.get(c)
        if v is None:
            cells.append(f"{'-':>8s}")
        elif c == "cases":
            cells.append(f"{v:>8d}")
        else:
            cells.append(f"{v:>8.3f}")
    if "seconds_per_case" in row:
        cells.append(f"{row['seconds_per_case']:>8.1f}s")
    return " ".join(cells)


def format_table(report: dict[str, Any]) -> str:
    head = f"{'method':<24s} {'kind':<11s} " + " ".join(f"{c:>8s}" for c in COLUMNS) + "  per case"
    lines = [f"quality on {report['model']} (seed {report['seed']}, {report['n']} cases per kind)",
             head, "-" * len(head)]
    for kind in dict.fromkeys(r["kind"] for r in report["rows"]):
        for r in report["rows"]:
            if r["kind"] == kind:
                lines.append(format_row(r))
        lines.append("")
    for n in report.get("notes", []):
        lines.append("note: " + n)
    if "model_quality" in report:
        from ..toyworld.evaluate import format_table as mq

        lines += ["", mq(report["model_quality"])]
    return "\n".join(lines)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings as a dict; VALUE as JSON where it parses (2, 1.5, false, [1, 2]),
    else the string itself."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set needs KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="analogon bench --quality",
        description="Measure every method on fixed toy-world cases with known ground truth.")
    ap.add_argument("--methods", default="", help="comma-separated method ids (default: all)")
    ap.add_argument("--kinds", default="", help="comma-separated kinds: " + ", ".join(KINDS))
    ap.add_argument("-n", "--cases", type=int, default=10, help="cases per kind (default 10)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="toy-sd", help="model spec (default toy-sd)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--params", choices=("default", "demo"), default="default",
                    help="start from each method's defaults or its fast demo settings")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--no-variants", action="store_true",
                    help="leave out the methods' variant rows (e.g. appearance with the objects' "
                         "masks given)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a parameter of the measured methods (repeatable; VALUE is JSON "
                         "where it parses, else a string), e.g. --set guidance=2 --set adain=off")
    ap.add_argument("--model-quality", action="store_true",
                    help="also measure toy-sd itself: held-out generation and img2img")
    ap.add_argument("--model-quality-n", type=int, default=60)
    ap.add_argument("--json", type=Path, default=Path("quality.json"),
                    help="where to write the report (default quality.json)")
    ap.add_argument("--list", action="store_true", help="list kinds and registered methods")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)

    if args.list:
        print("kinds: " + ", ".join(KINDS))
        for mid, spec in METHODS.items():
            print(f"{mid}: {', '.join(spec.kinds)}")
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] or None
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()] or None
    try:
        overrides = parse_overrides(args.set)
    except ValueError as e:
        print(str(e), file=sys.stderr)
        return 2

    for k in kinds or ():
        if k not in KINDS:
            print(f"No case kind called {k!r}; kinds are {', '.join(KINDS)}.", file=sys.stderr)
            return 2
    report = run_quality(methods, kinds, args.cases, args.seed, args.model, args.device,
                         args.params, not args.no_baselines, log=lambda s: print(s, flush=True),
                         overrides=overrides, variants=not args.no_variants)
    if args.model_quality:
        from ..models import LoadOptions, load_bundle
        from ..toyworld.evaluate import measure

        bundle = load_bundle(args.model, LoadOptions(device=args.device))
        report["model_quality"] = measure(bundle.pipe, n=args.model_quality_n, seed=args.seed)
    print()
    print(format_table(report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {args.json}")
    return 0
