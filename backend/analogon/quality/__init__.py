"""`analogon bench --quality`: every method on fixed, seeded toy-world cases, scored by the
attribute reader against the ground-truth render.

For each registered method and each kind of case it is measured on (see :mod:`.cases`), the
table shows
- change: share of the changed attributes the result shows (e.g. the new colour),
- keep: share of the other attributes that stayed as in the truth,
- all: share of cases where every attribute is right,
- adopt: share of cases where the result, inside the white part of the edit map, has the
  exemplar's colour and texture (cases with an edit map: PIXELS' exemplar kinds),
- dist: mean absolute pixel difference to the ground-truth render (0..1, lower is better),
- outside: mean absolute difference to the target outside the edit region (exemplar cases),
- mask IoU (printed under the table): where a method reports the masks it made itself
  (appearance's automatic AdaIN masks, ``info["auto_masks"]``), their intersection over union
  with the world's object masks, and the share of cases at 0.5 or more,
next to baselines that need no model (the target returned unchanged, the example returned)
and the ground truth itself (the reader's ceiling); under each kind, the change rate of each
attribute. Methods that are not installed are skipped with a note. Jobs run through the same
engine as the server (``analogon.engine``).

The cases are drawn in the world of the model (``models.toy.model_world``: toy128 for a model
trained on it, toy64 for any other) unless ``world`` says which; on toy128 the reader reads
every object and matches them to the truth's (``reader.match_objects``), so that a change is
checked on the object that should show it and a distractor must keep its look.
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

from ..toyworld.reader import match_objects, read
from ..toyworld.world import WORLD64, background_image, world_of
from . import cases as cases_mod
from .cases import KINDS, METHODS, OBJECT_ATTRS, SIZE, Case, value_of


def _load_method_cases() -> None:
    """Per-method case modules (``cases_<method>.py`` in this package) register themselves."""
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(__path__):
        if mod.name.startswith("cases_"):
            importlib.import_module(f"{__name__}.{mod.name}")


_load_method_cases()

__all__ = ["main", "run_quality", "score_case", "adopts", "format_table"]


def _rgb(img: np.ndarray, size: int = SIZE) -> np.ndarray:
    """An RGB(A) result as RGB uint8 at ``size`` (the case's world size)."""
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[..., :3]
    if a.shape[0] != size or a.shape[1] != size:
        from PIL import Image

        a = np.asarray(Image.fromarray(a).resize((size, size), Image.Resampling.LANCZOS))
    return a


READ_KEYS = ("shape", "colour", "size", "texture", "background")


def _checks(case: Case, r: dict[str, Any]) -> tuple[dict[str, bool], dict[str, Any]]:
    """Per attribute key of the case (changed and kept), whether the reading ``r`` shows the
    truth's value; and what was read of the first object and the scene.

    toy64: the first object read and the background, as always. Other worlds: the read
    objects are matched to the truth's (by colour, then the nearest centre), so that an
    object key (``colour``, ``second.shape``) is checked on the object it names."""
    want = {**{k: value_of(case.truth, k) for k in case.kept}, **case.changed}
    if world_of(case.world) is WORLD64:
        return {k: r.get(k) == v for k, v in want.items()}, {k: r.get(k) for k in READ_KEYS}
    slots = ["", *cases_mod.distractors(case.truth)]
    pairs = match_objects(r, case.truth)
    out = {}
    for k, v in want.items():
        slot, _, name = k.rpartition(".")
        if name in ("background", "backdrop"):
            out[k] = r.get(name, "plain") == v
        else:
            found = pairs[slots.index(slot)][1]
            out[k] = found is not None and found.get(name) == v
    first = pairs[0][1] or {}
    seen = {k: first.get(k) for k in OBJECT_ATTRS}
    seen.update(background=r.get("background"), backdrop=r.get("backdrop"),
                objects=len(r["objects"]))
    return out, seen


def adopts(case: Case, result: np.ndarray) -> float | None:
    """1.0 when the result, inside the white part of the case's edit map, shows the truth's
    (the exemplar's) colour and texture, else 0.0; None for a case without an edit map.
    The white part of the result is pasted on the truth's bare background and read; the
    largest object found there is compared."""
    m = case.slots.get("edit_map")
    if m is None:
        return None
    white = np.asarray(m) >= 255
    if white.ndim == 3:
        white = white.all(-1)
    if not white.any():
        return None
    w = world_of(case.world)
    region = background_image(case.truth, w.size).copy()
    region[white] = _rgb(result, w.size)[white]
    found = read(region, w)["objects"]
    if not found:
        return 0.0
    got = found[0]
    return float(got["colour"] == case.truth["colour"] and got["texture"] == case.truth["texture"])


def mask_iou(case: Case, info: dict[str, Any]) -> dict[str, float]:
    """Intersection over union of each automatic mask a method reports with the world's object
    mask in the case's ``<role>_object`` slot. The masks: ``info["auto_masks"]``, ``{role: rows
    of 0/1 on a grid}`` (a row a list or a "0"/"1" string; appearance's AdaIN masks on the
    latent grid), or the whole image where the method found none
    (``info["adain_masks"][role] == "whole"``). {} when the case has no such slot or the method
    made no mask."""
    out: dict[str, float] = {}
    grids = dict(info.get("auto_masks") or {})
    for role, source in (info.get("adain_masks") or {}).items():
        if source == "whole" and role not in grids:
            grids[role] = [[1]]
    for role, grid in grids.items():
        truth = case.slots.get(f"{role}_object")
        if truth is None:
            continue
        t = np.asarray(truth) > 127
        g = np.array([[c == "1" for c in r] if isinstance(r, str) else r for r in grid], dtype=bool)
        rows = (np.arange(t.shape[0]) * g.shape[0]) // t.shape[0]
        cols = (np.arange(t.shape[1]) * g.shape[1]) // t.shape[1]
        m = g[rows][:, cols]  # the grid at the case's size, nearest
        union = int((m | t).sum())
        out[role] = float((m & t).sum() / union) if union else 1.0
    return out


def score_case(case: Case, result: np.ndarray) -> dict[str, Any]:
    """Reader-based scores of one result image against the case's truth, in the case's
    world."""
    w = world_of(case.world)
    res = _rgb(result, w.size)
    ok, seen = _checks(case, read(res, w))
    change_ok = [ok[k] for k in case.changed]
    keep_ok = [ok[k] for k in case.kept]
    out: dict[str, Any] = {
        "change": float(np.mean(change_ok)) if change_ok else 1.0,
        "change_by": {k: float(ok[k]) for k in case.changed},
        "keep": float(np.mean(keep_ok)) if keep_ok else 1.0,
        "keep_by": {k: float(ok[k]) for k in case.kept},
        "all": float(all(change_ok) and all(keep_ok)),
        "dist": float(np.abs(res.astype(np.float32) - case.truth_image.astype(np.float32)).mean()
                      / 255.0),
        "read": seen,
    }
    adopt = adopts(case, res)
    if adopt is not None:
        out["adopt"] = adopt
    if case.keep_region is not None and case.keep_region.any():
        tgt = case.slots[case.target].astype(np.float32)
        out["outside"] = float(np.abs(res.astype(np.float32) - tgt)[case.keep_region].mean() / 255.0)
    return out


INTERVAL_RESAMPLES = 2000


def interval(values: list[float], level: float = 0.95) -> list[float]:
    """The ``level`` percentile-bootstrap interval of the mean of ``values`` (cases
    resampled with replacement, a fixed generator: the same cases give the same interval)."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return [float(v.mean()), float(v.mean())] if len(v) else [float("nan")] * 2
    rng = np.random.default_rng(0)
    means = v[rng.integers(0, len(v), (INTERVAL_RESAMPLES, len(v)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return [round(float(lo), 4), round(float(hi), 4)]


def _aggregate(scores: list[dict[str, Any]]) -> dict[str, Any]:
    if not scores:
        return {"cases": 0}
    out: dict[str, Any] = {"cases": len(scores)}
    intervals: dict[str, list[float]] = {}
    for k in ("change", "keep", "adopt", "all", "dist", "outside"):
        vals = [s[k] for s in scores if k in s]
        if vals:
            out[k] = float(np.mean(vals))
            intervals[k] = interval(vals)
    out["interval"] = intervals
    # the automatic masks' IoU (methods that report masks), mean and share at 0.5 or more
    ious: dict[str, list[float]] = {}
    for s in scores:
        for k, v in s.get("mask_iou", {}).items():
            ious.setdefault(k, []).append(v)
    if ious:
        out["mask_iou"] = {k: float(np.mean(v)) for k, v in ious.items()}
        out["mask_iou_half"] = {k: float(np.mean([x >= 0.5 for x in v])) for k, v in ious.items()}
    # adoption rate of each changed attribute (an appearance case changes two), and how
    # often each kept attribute was kept
    for key in ("change_by", "keep_by"):
        by: dict[str, list[float]] = {}
        for s in scores:
            for k, v in s.get(key, {}).items():
                by.setdefault(k, []).append(v)
        out[key] = {k: float(np.mean(v)) for k, v in by.items()}
    return out


# -- running methods ----------------------------------------------------------------------

class _Runner:
    """Runs jobs through the engine with one warm model and a cache: a private one, or the
    folder given (so that a run that changes only sampling settings reuses the inversions
    of an earlier one: they are keyed by content and the settings they depend on)."""

    def __init__(self, model: str, device: str | None, cache_dir: Path | None = None):
        from ..core.cache import Cache
        from ..models import LoadOptions, ModelManager

        self.model = model
        self.tmp = tempfile.TemporaryDirectory(prefix="analogon-quality-")
        self.cache = Cache(Path(cache_dir) if cache_dir else Path(self.tmp.name) / "cache")
        self.models = ModelManager(capacity=1, options=LoadOptions(device=device))
        self.last_info: dict[str, Any] = {}  # the info of the last job run

    def run(self, method_id: str, roles: dict[str, str], params: dict[str, Any], case: Case,
            seed: int) -> np.ndarray:
        from ..engine import execute, prepare

        if method_id == cases_mod.AUTOENCODER:
            self.last_info = {}
            return self.round_trip(case.slots[roles["image"]])
        images, source = case_images(method_id, roles, case)
        job = prepare(method_id, params, images, self.model, seed, self.model, source)
        res = execute(job, source=source, models=self.models, cache=self.cache)
        self.last_info = res.info
        return res.images[0].rgba

    def round_trip(self, rgb: np.ndarray) -> np.ndarray:
        """``rgb`` encoded and decoded by the model's autoencoder at the size the methods work
        at (its native size), back at the image's size."""
        import torch

        from ..core import images as im
        from ..core.diffusion import vae_decode, vae_encode

        bundle = self.models.get(self.model)
        h, w = rgb.shape[:2]
        size = im.native_size((w, h), bundle.native_size, bundle.vae_scale_factor)
        rgba = im.as_rgba(rgb)
        with torch.no_grad():
            z = vae_encode(bundle, im.to_tensor(rgba, size, bundle.device, bundle.vae.dtype))
            out = im.rgb_to_rgba(im.from_tensor(vae_decode(bundle, z)))
        return out if size == (w, h) else im.resize_rgba(out, (w, h))

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


def demo_case(method_id: str, seed: int = 0, world: str | None = None):
    """One toy-world case for ``analogon demo`` on toy-sd: (refs by role, image source), or
    None when the method registered no cases. ``world``: toy-sd's own unless told."""
    spec = METHODS.get(method_id)
    if spec is None or not spec.kinds:
        return None
    if world is None:
        from ..models.toy import model_world

        world = model_world("toy-sd")
    return case_images(method_id, spec.roles,
                       cases_mod.build(spec.kinds[0], 1, seed, world=world)[0])


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


def _truth_summary(case: Case) -> dict[str, Any]:
    """The truth's values of what the reader reads (toy128: the backdrop and the
    distractors' too)."""
    out = {k: case.truth[k] for k in READ_KEYS}
    if world_of(case.world) is not WORLD64:
        out["backdrop"] = case.truth.get("backdrop", "plain")
        for slot in cases_mod.distractors(case.truth):
            out[slot] = {k: case.truth[slot][k] for k in OBJECT_ATTRS}
    return out


def run_quality(methods: list[str] | None = None, kinds: list[str] | None = None, n: int = 10,
                seed: int = 0, model: str = "toy-sd", device: str | None = None,
                params_mode: str = "default", baselines: bool = True,
                log=print, overrides: dict[str, Any] | None = None,
                variants: bool = True, world: str | None = None,
                cache_dir: Path | None = None,
                shard: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """Run the suite; returns the JSON-able report (rows, per-case details, notes).
    ``overrides`` are set on top of every measured method's parameters (not the baselines');
    ``variants`` adds each method's variant rows (the same parameters, more inputs);
    ``world``: the toy world the cases are drawn in (default: the model's,
    :func:`analogon.models.toy.model_world`); ``cache_dir``: a cache folder kept between runs
    (default: a private one, removed at the end); ``shard`` (k, N): run the model on the cases
    whose index is k modulo N only (each case keeps its index's seed), so that a long run can be
    split over processes or sessions and put together with :func:`merge_reports`."""
    from ..errors import AnalogonError
    from ..methods import UNAVAILABLE, all_methods
    from ..models.toy import model_world

    world = world_of(world or model_world(model)).name
    k_shard, n_shards = shard
    if not 0 <= k_shard < n_shards:
        raise ValueError(f"shard {k_shard}/{n_shards}: k must be 0 to N - 1")

    registered = {m.id for m in all_methods()}
    wanted = methods or list(METHODS)
    rows: list[dict[str, Any]] = []
    details: list[dict[str, Any]] = []
    notes: list[str] = []
    used_kinds = kinds or sorted({k for m in wanted if m in METHODS for k in METHODS[m].kinds},
                                 key=list(KINDS).index)
    built: dict[str, list[Case]] = {}
    for k in used_kinds:
        try:
            built[k] = cases_mod.build(k, n, seed, world=world)
        except ValueError as e:  # a kind that has no cases in this world
            notes.append(f"{k}: skipped ({e})")

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
            runner = _Runner(model, device, cache_dir)
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
        mine = [(i, c) for i, c in enumerate(built[kind]) if i % n_shards == k_shard]
        for i, c in mine:
            try:
                out = runner.run(method_id, roles, params_of(c), c, seed + i)
            except Exception as e:  # one broken case must not hide the others
                errors.append(f"{c.name}: {type(e).__name__}: {e}")
                continue
            s = score_case(c, out)
            iou = mask_iou(c, runner.last_info)
            if iou:
                s["mask_iou"] = iou
            scores.append(s)
            details.append({"method": name, "kind": kind, "index": i, "case": c.name,
                            "changed": c.changed,
                            "truth": _truth_summary(c), **s,
                            **({"transition": list(c.info["transition"])}
                               if "transition" in c.info else {})})
        secs = time.time() - t0
        row = {"method": name, "kind": kind, **_aggregate(scores),
               "seconds_per_case": round(secs / max(1, len(mine)), 2), **extra}
        if errors:
            row["errors"] = len(errors)
            notes.append(f"{name}/{kind}: {len(errors)} case(s) failed, e.g. {errors[0]}")
        rows.append(row)
        log(format_row(row))

    def result() -> dict[str, Any]:
        out = {"model": model, "world": world, "seed": seed, "n": n, "params_mode": params_mode,
               "overrides": overrides or {}, "rows": rows, "notes": notes, "cases": details}
        if n_shards > 1:
            out["shard"] = [k_shard, n_shards]
        return out

    try:
        if baselines:
            # baselines that run the model, for the kinds a method here is measured on
            measured = {k for m in wanted if m in METHODS and m in registered
                        for k in METHODS[m].kinds}
            for kind in (k for k in built if k in measured):
                for name, b in cases_mod.MODEL_BASELINES.get(kind, {}).items():
                    if b.method not in registered and b.method != cases_mod.AUTOENCODER:
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


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from the shards of one run (:func:`run_quality`'s ``shard``): every shard
    0 … N − 1 once, the same model, world, seed, cases and settings. The measured rows are
    re-aggregated from the shards' cases (means and intervals over all of them; seconds per
    case weighted by each shard's cases); rows that ran no model are the same in every shard
    and are taken from the first."""
    if not reports:
        raise ValueError("nothing to merge")
    same = ("model", "world", "seed", "n", "params_mode", "overrides")
    first = reports[0]
    for r in reports[1:]:
        for k in same:
            if r.get(k) != first.get(k):
                raise ValueError(f"the reports are not shards of one run: {k} differs "
                                 f"({first.get(k)!r} against {r.get(k)!r})")
    shards = sorted(tuple(r.get("shard", (0, 1))) for r in reports)
    n_shards = shards[0][1]
    if shards != [(k, n_shards) for k in range(n_shards)]:
        raise ValueError(f"shards {['%d/%d' % s for s in shards]} are not each of 0 … "
                         f"{n_shards - 1} out of {n_shards} once")
    order = {(r["method"], r["kind"]): i for i, r in enumerate(first["rows"])}  # as measured
    details = sorted((d for r in reports for d in r["cases"]),
                     key=lambda d: (order.get((d["method"], d["kind"]), len(order)), d["index"]))
    rows: list[dict[str, Any]] = []
    for row in first["rows"]:
        if "seconds_per_case" not in row:  # no model ran: the same in every shard
            rows.append(row)
            continue
        mine = [d for d in details if d["method"] == row["method"] and d["kind"] == row["kind"]]
        parts = [r2 for r in reports for r2 in r["rows"]
                 if r2["method"] == row["method"] and r2["kind"] == row["kind"]]
        counted = sum(p.get("cases", 0) + p.get("errors", 0) for p in parts)
        secs = sum(p["seconds_per_case"] * (p.get("cases", 0) + p.get("errors", 0)) for p in parts)
        extra = {k: v for k, v in row.items()
                 if k not in ("cases", "interval", "mask_iou", "mask_iou_half", "errors",
                              "seconds_per_case", *COLUMNS)}
        merged = {**extra, **_aggregate(mine),
                  "seconds_per_case": round(secs / max(1, counted), 2)}
        errors = sum(p.get("errors", 0) for p in parts)
        if errors:
            merged["errors"] = errors
        rows.append(merged)
    notes = list(dict.fromkeys(n for r in reports for n in r["notes"]))
    return {**{k: first[k] for k in same}, "rows": rows, "notes": notes, "cases": details,
            "merged_from": len(reports)}


PAIRED = ("change", "keep", "adopt", "all", "dist")  # the columns compared case by case


def compare_reports(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Paired differences ``b − a`` per measured row that both reports have (same method and
    kind), over the cases both measured (matched by name: the same seed and cases): for each
    column the mean difference and its 95 % bootstrap interval over those cases — far narrower
    than two runs' own intervals side by side, because each case is compared with itself."""
    if (a.get("world"), a.get("seed")) != (b.get("world"), b.get("seed")):
        raise ValueError("the reports are of different cases (world or seed differ)")

    def by_case(rep):
        out: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        for d in rep["cases"]:
            out.setdefault((d["method"], d["kind"]), {})[d["case"]] = d
        return out

    ca, cb = by_case(a), by_case(b)
    rows = []
    for key in (k for k in cb if k in ca):
        names = [n for n in cb[key] if n in ca[key]]
        row: dict[str, Any] = {"method": key[0], "kind": key[1], "cases": len(names)}
        for col in PAIRED:
            diffs = [cb[key][n][col] - ca[key][n][col] for n in names
                     if col in cb[key][n] and col in ca[key][n]]
            if diffs:
                row[col] = float(np.mean(diffs))
                row[f"{col}_95"] = interval(diffs)
        rows.append(row)
    return rows


def format_comparison(rows: list[dict[str, Any]]) -> list[str]:
    lines = [f"{'paired difference (second − first)':<36s}cases  " + "  ".join(
        f"{c:>20s}" for c in PAIRED)]
    for r in rows:
        cells = []
        for c in PAIRED:
            if c in r:
                lo, hi = r[f"{c}_95"]
                cells.append(f"{r[c]:+.3f} ({lo:+.2f}…{hi:+.2f})".rjust(20))
            else:
                cells.append(f"{'-':>20s}")
        lines.append(f"{r['method'] + ' / ' + r['kind']:<36s}{r['cases']:>5d}  " + "  ".join(cells))
    return lines


# -- output -------------------------------------------------------------------------------

COLUMNS = ("cases", "change", "keep", "adopt", "all", "dist", "outside")


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


def format_mask_iou(rows: list[dict[str, Any]]) -> list[str]:
    """The automatic masks' IoU with the objects (mean, and the share of cases ≥ 0.5), one
    line per row that made masks."""
    return [f"{'  mask IoU ' + r['method']:<36s}" + "  ".join(
        f"{k} {v:.2f} (≥0.5 in {r['mask_iou_half'][k]:.2f})" for k, v in r["mask_iou"].items())
        for r in rows if r.get("mask_iou")]


def format_intervals(rows: list[dict[str, Any]]) -> list[str]:
    """Each measured row's 95 % bootstrap intervals over its cases, one line per row (rows
    whose cases all score alike, such as the ground truth, are left out)."""
    lines = []
    for r in rows:
        iv = {k: v for k, v in r.get("interval", {}).items() if v[0] != v[1]}
        if iv:
            lines.append(f"{'  95% ' + r['method']:<36s}" + "  ".join(
                f"{k} {lo:.2f}-{hi:.2f}" for k, (lo, hi) in iv.items()))
    return lines


def format_change_by(rows: list[dict[str, Any]]) -> list[str]:
    """The change rate of each attribute, one line per row, for a kind whose cases change
    more than one attribute in all; [] otherwise."""
    attrs = list(dict.fromkeys(k for r in rows for k in r.get("change_by", {})))
    if len(attrs) < 2:
        return []
    width = max(8, *(len(a) + 1 for a in attrs))
    head = f"{'  change by attribute':<36s}" + "".join(f"{a:>{width}s}" for a in attrs)
    lines = [head]
    for r in rows:
        by = r.get("change_by", {})
        lines.append(f"{'  ' + r['method']:<36s}" + "".join(
            f"{by[a]:>{width}.3f}" if a in by else f"{'-':>{width}s}" for a in attrs))
    return lines


def format_table(report: dict[str, Any]) -> str:
    head = f"{'method':<24s} {'kind':<11s} " + " ".join(f"{c:>8s}" for c in COLUMNS) + "  per case"
    world = f", world {report['world']}" if report.get("world") else ""
    lines = [f"quality on {report['model']}{world} (seed {report['seed']}, {report['n']} cases "
             "per kind)", head, "-" * len(head)]
    for kind in dict.fromkeys(r["kind"] for r in report["rows"]):
        rows = [r for r in report["rows"] if r["kind"] == kind]
        lines += [format_row(r) for r in rows]
        lines += format_intervals(rows)
        lines += format_mask_iou(rows)
        lines += format_change_by(rows)
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
    ap.add_argument("--world", choices=cases_mod.WORLD_NAMES, default=None,
                    help="the toy world the cases are drawn in (default: the model's; toy128 "
                         "for a model trained on it, else toy64)")
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
    ap.add_argument("--cache", type=Path, default=None, metavar="DIR",
                    help="a cache folder kept between runs: a run that changes only sampling "
                         "settings reuses the inversions of an earlier one (default: a private "
                         "cache, removed at the end)")
    ap.add_argument("--shard", default="0/1", metavar="K/N",
                    help="run the model on every N-th case only, from case K (0-based): a long run "
                         "split over processes or sessions, put together again with --merge")
    ap.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                    help="put the reports of one run's shards together into --json (runs nothing)")
    ap.add_argument("--compare", type=Path, nargs=2, default=None, metavar=("FIRST", "SECOND"),
                    help="paired differences SECOND − FIRST of two reports on the same cases, with "
                         "95 %% intervals over the cases (runs nothing; with --json, written there)")
    ap.add_argument("--json", type=Path, default=None,
                    help="where to write the report (default quality.json)")
    ap.add_argument("--list", action="store_true", help="list kinds and registered methods")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)

    if args.list:
        print("kinds: " + ", ".join(KINDS))
        for mid, spec in METHODS.items():
            print(f"{mid}: {', '.join(spec.kinds)}")
        return 0
    if args.compare:
        try:
            rows = compare_reports(*(json.loads(p.read_text()) for p in args.compare))
        except (OSError, ValueError, KeyError) as e:
            print(f"Cannot compare: {e}", file=sys.stderr)
            return 2
        print("\n".join(format_comparison(rows)))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"first": str(args.compare[0]),
                                             "second": str(args.compare[1]), "rows": rows},
                                            indent=2))
        return 0
    args.json = args.json or Path("quality.json")
    if args.merge:
        try:
            report = merge_reports([json.loads(p.read_text()) for p in args.merge])
        except (OSError, ValueError, KeyError) as e:
            print(f"Cannot merge: {e}", file=sys.stderr)
            return 2
        return _write(report, args.json)
    try:
        k_shard, n_shards = (int(x) for x in args.shard.split("/"))
        if not 0 <= k_shard < n_shards:
            raise ValueError
    except ValueError:
        print(f"--shard {args.shard!r}: give K/N with 0 <= K < N, e.g. 0/2", file=sys.stderr)
        return 2
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
                         overrides=overrides, variants=not args.no_variants, world=args.world,
                         cache_dir=args.cache, shard=(k_shard, n_shards))
    if args.model_quality:
        from ..models import LoadOptions, load_bundle
        from ..toyworld.evaluate import measure

        bundle = load_bundle(args.model, LoadOptions(device=args.device))
        report["model_quality"] = measure(bundle.pipe, n=args.model_quality_n, seed=args.seed)
    return _write(report, args.json)


def _write(report: dict[str, Any], path: Path) -> int:
    print()
    print(format_table(report))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {path}")
    return 0
