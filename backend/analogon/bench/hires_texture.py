"""Section `hires-texture`: does the high-resolution pass add the model's own fine texture?

The question of ``core.hires`` on a document 4–8× the model's native size, where it can matter:
the objects are k× larger than the model draws them, but their textures keep the period the model
draws at its own size (``render(..., texture_scale=1)``: 12 px on toy128), so at the working size
(the document shrunk to the model's 128 px) the texture lies below the grid. Without the pass a
changed area can only carry the base's texture up (where the fit decided the model recoloured) or
come back as the model's own picture, upscaled (where it decided the model drew: a texture the
model draws at 12 working pixels arrives 4–8× too coarse); the pass redraws the changed area in
tiles of 128 px at (or towards) 1:1, the scale at which the model knows these textures.

The cases (:func:`case_list`, seeded): a toy128 scene (every other one with a distractor that may
overlap it) whose first object changes its texture (four cases in five, every texture pair in
turn) or only its colour (every fifth case). Two groups are controls: a texture taken away ("to
plain": there is nothing for the pass to add, and it must add nothing), and a new colour over the
kept texture (the right texture at 1:1 is the base's own; at strength 0.75 the model redraws the
object, so the fit decides it drew and the base's texture does not come back by itself either).
The edit is PIXELS without an exemplar, the prompt the changed scene's caption (the words name the
texture), the edit map the object's silhouette grown by 2k px (white) on black; 20 DDIM steps at
strength 0.75. The same scenes run at k = 4 and 8 (512 and 1024 px) and each result is finished
(``core.hires.finish``) with the pass ``off``, ``on`` (its automatic refine size: at most 16 × the
native area, 512 × 512: 1:1 at 4×, 2:1 at 8×), ``on-1:1`` (the refine size raised to the
document's, 1:1 at 8× too; at 4× the same as ``on`` and not run twice) and ``auto``.

One case costs about 20 s at 4× and 65 s at 8× on one CPU thread (toy-sd; the pass is nearly all
of it): ``analogon bench hires-texture`` runs 30 cases at both scales in about 45 minutes.

Measures (:func:`measure`), inside the changed object (its visible part less 3k px at every
edge: no outline, no seam):

- ``texture``: 1 when the texture read at 1:1 (``reader.read_fine_texture``: 32-px windows, each
  matched against every texture at the world's own period and any phase, at least 75 % of its
  pixels agreeing) is the truth's; ``windows``: the share of its windows read right;
- ``detail``: the energy of the detail above the working grid (the result less its own working-
  size version carried back up) as a share of the truth's (cases whose new texture is not plain);
- ``intact``: the share of pixels that are still the object's colour (anything between its ink and
  its flat colour): the pass draws whole objects inside its tiles where the prompt names one, and
  their background-coloured gaps and outlines are the cost it can have;
- ``keep``: the share of pixels byte-identical to the source where the map is black (must be 1);
- ``s``: seconds per case (the method's run, the same for every row, plus the way back).

Rows (:func:`summarise`): means with 95 % seeded bootstrap intervals (``quality.interval``) per
scale, path and kind of change, and the paired differences to ``off``. ``new_share`` (the fit's
share of the changed area the model drew) and ``grow`` (refine size / working size) of every case
are in the per-case details, so any rule for ``auto`` can be read off the same runs.
"""
from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import register

SCALES = (4, 8)
MODES = ("off", "on", "on-1:1", "auto")
N_CASES = 30
QUICK_CASES = 5
CONTROL_EVERY = 5  # every fifth case changes the colour only
PIXELS_PARAMS: dict[str, Any] = {"steps": 20, "strength": 0.75, "scheduler": "ddim"}
GROW_MAP = 2  # the map: the silhouette grown by this × k px
READ_INSET = 3  # the read area: the silhouette less this × k px (the outline is 2k px)


def _add_arguments(p) -> None:
    p.add_argument("--hires-texture-model", default="toy-sd",
                   help="model spec of the hires-texture section (default toy-sd)")
    p.add_argument("--hires-texture-seed", type=int, default=0,
                   help="the case set's seed (0: the one the rule was chosen on; 1: reported)")
    p.add_argument("--hires-texture-cases", type=int, default=None,
                   help=f"cases per seed (default {N_CASES}; --quick {QUICK_CASES})")
    p.add_argument("--hires-texture-scales", default=",".join(map(str, SCALES)),
                   help="document sizes as multiples of the native size (default 4,8)")
    p.add_argument("--hires-texture-modes", default=",".join(MODES),
                   help="paths back: off, on, on-1:1 (refined at the document's size), auto")
    p.add_argument("--hires-texture-details", metavar="PATH", default=None,
                   help="write every case's row (and its decision inputs) as JSON here")


# -- the cases ---------------------------------------------------------------------------------

@dataclass
class TextureCase:
    """One edit: ``source``'s first object takes ``after`` for its ``attribute``."""

    name: str
    attribute: str  # texture | colour
    before: str
    after: str
    source: dict[str, Any]
    truth: dict[str, Any]


def case_list(n: int, seed: int, world: str = "toy128") -> list[TextureCase]:
    """``n`` seeded cases (see the module's docstring): texture changes through every pair of
    textures in turn, every fifth case a colour change (the control)."""
    from ..quality.cases import transitions
    from ..toyworld.world import COLOURS, change, objects, random_scene, world_of

    w = world_of(world)
    rng = random.Random(f"hires-texture:{w.name}:{seed}")
    textures = transitions(w.textures, rng)
    colours = transitions(tuple(COLOURS), rng)
    out: list[TextureCase] = []
    n_tex = n_col = 0
    for i in range(n):
        attr = "colour" if i % CONTROL_EVERY == CONTROL_EVERY - 1 else "texture"
        if attr == "texture":
            before, after = textures[n_tex % len(textures)]
            n_tex += 1
        else:
            before, after = colours[n_col % len(colours)]
            n_col += 1
        count = 2 if i % 2 else 1
        while True:
            src = change(random_scene(rng, split="any", world=w, count=count), attr, before)
            truth = change(src, attr, after)
            cols = [[o["colour"] for o in objects(s)] for s in (src, truth)]
            if all(len(set(c)) == len(c) for c in cols):
                break
        out.append(TextureCase(f"{i:02d}-{attr}-{before}-to-{after}" + ("-plus-one" if count > 1 else ""),
                               attr, before, after, src, truth))
    return out


@dataclass
class Document:
    """A case at k × the world's size, textures at 1:1."""

    k: int
    source: np.ndarray  # (H, W, 4) uint8
    truth: np.ndarray  # (H, W, 3) uint8
    map: np.ndarray  # (H, W, 4) uint8: white on the grown silhouette, black elsewhere
    read: np.ndarray  # (H, W) bool: where the changed object is measured
    colour: str  # the changed object's colour in the truth
    texture: str  # ... and texture
    background: str


def document(case: TextureCase, k: int) -> Document:
    from ..toyworld.world import _erode_by, grow_by, render, visible_masks, world_of

    size = world_of(case.source).size * k
    src = render(case.source, size, texture_scale=1)
    tru = render(case.truth, size, texture_scale=1)
    vis = visible_masks(case.source, size)[0]
    mp = np.zeros((size, size, 4), np.uint8)
    mp[..., 3] = 255
    mp[grow_by(vis, GROW_MAP * k), :3] = 255
    rgba = np.concatenate([src, np.full((size, size, 1), 255, np.uint8)], -1)
    return Document(k, rgba, tru, mp, _erode_by(vis, READ_INSET * k), case.truth["colour"],
                    case.truth["texture"], case.truth["background"])


# -- the measures ------------------------------------------------------------------------------

def object_colour_share(img: np.ndarray, region: np.ndarray, colour: str, background: str) -> float:
    """The share of ``region`` whose pixels read as ``colour`` (between its ink and itself),
    against the background's colour and the other colours (``reader._classify``)."""
    from ..toyworld.reader import _COL_NAMES, _classify
    from ..toyworld.world import BACKGROUNDS

    f = np.asarray(img)[..., :3][region].astype(np.float64)
    label = _classify(f, np.array(BACKGROUNDS[background], np.float64))
    return float((label == 1 + _COL_NAMES.index(colour)).mean())


def detail_energy(img: np.ndarray, region: np.ndarray, work: tuple[int, int]) -> float:
    """Σ over ``region`` of the squared luminance detail above the ``work`` grid (the picture
    less its own area average on that grid, carried back up)."""
    from .resolution import _down, _lum

    H, W = img.shape[:2]
    lum = _lum(np.asarray(img))
    d = lum - _down(_down(lum, work), (W, H))
    return float((d[region].astype(np.float64) ** 2).sum())


def measure(doc: Document, result: np.ndarray, work: tuple[int, int]) -> dict[str, Any]:
    """The measures of the module's docstring for the finished document ``result``."""
    from ..toyworld.reader import read_fine_texture

    res = np.asarray(result)[..., :3]
    read, windows = read_fine_texture(res, doc.read, doc.colour)
    black = doc.map[..., 0] == 0
    row: dict[str, Any] = {
        "read": read, "texture": float(read == doc.texture),
        "windows": round(float(np.mean([r == doc.texture for r in windows])), 4) if windows else None,
        "intact": round(object_colour_share(res, doc.read, doc.colour, doc.background), 4),
        "keep": round(float((res[black] == doc.source[..., :3][black]).all(-1).mean()), 6),
    }
    own = detail_energy(doc.truth, doc.read, work)
    row["detail"] = round(detail_energy(res, doc.read, work) / own, 4) if doc.texture != "plain" and own > 0 else None
    return row


# -- the runs ----------------------------------------------------------------------------------

def run_case(bundle, case: TextureCase, index: int, seed: int, k: int,
             modes: tuple[str, ...]) -> list[dict[str, Any]]:
    """One case at k × native: the method once, then each path back; a row per path."""
    from ..core.cache import Cache
    from ..core.compositing import fit_change
    from ..core.hires import HiresSettings, finish, refine_size
    from ..methods import get as get_method
    from ..methods.base import Inputs, JobContext, LayerImage
    from ..toyworld.world import caption

    doc = document(case, k)
    method = get_method("pixels")
    inputs = Inputs({"source": LayerImage(doc.source, "source"), "edit_map": [LayerImage(doc.map, "map")]})
    params = method.Params(prompt=caption(case.truth), **PIXELS_PARAMS)
    job_seed = 1000 * seed + index
    t0 = time.perf_counter()
    gen = method.generate(JobContext(bundle, Cache(None), job_seed), inputs, params)
    gen_s = time.perf_counter() - t0
    first = gen.images[0]
    out = np.asarray(first.rgba)[..., :3]
    work = (out.shape[1], out.shape[0])
    box = first.box or (0, 0, doc.source.shape[1], doc.source.shape[0])
    region = (box[2] - box[0], box[3] - box[1])
    base = first.base if first.base is not None else doc.source[box[1]:box[3], box[0]:box[2]]
    size = refine_size(region, work, bundle.native_size, HiresSettings(mode="on"), bundle.vae_scale_factor)
    full = refine_size(region, work, bundle.native_size,
                       HiresSettings(mode="on", max_pixels=region[0] * region[1]), bundle.vae_scale_factor)
    common = {"case": case.name, "seed": seed, "k": k, "attribute": case.attribute, "before": case.before,
              "after": case.after, "native": bundle.native_size, "work": list(work),
              "new_share": round(fit_change(out, base).new_share(), 4),
              "grow": round(size[0] / work[0], 3) if size else None, "gen_s": round(gen_s, 2)}
    rows = []
    for mode in modes:
        if mode == "on-1:1" and full == size:
            continue  # the automatic refine size is already the document's own: the same as "on"
        update: dict[str, Any] = {"hires": "on" if mode == "on-1:1" else mode}
        if mode == "on-1:1":
            update["hires_max_pixels"] = region[0] * region[1]
        p = params.model_copy(update=update)
        t0 = time.perf_counter()
        res = finish(JobContext(bundle, Cache(None), job_seed), method, inputs, p, copy.deepcopy(gen))
        secs = time.perf_counter() - t0
        hi = res.info["return"].get("hires")
        rows.append({**common, "mode": mode, "ran": hi is not None,
                     "tiles": hi["tiles"] if hi else 0, "refine": hi["size"] if hi else None,
                     "finish_s": round(secs, 2), "s": round(gen_s + secs, 2),
                     **measure(doc, res.images[0].rgba, work)})
    return rows


GROUPS = ("texture", "to plain", "colour", "all")


def group_of(row: dict[str, Any]) -> str:
    """A case's kind of change: a new texture, a texture taken away (to plain: the pass must add
    none), or a new colour with the texture kept."""
    if row["attribute"] == "colour":
        return "colour"
    return "to plain" if row["after"] == "plain" else "texture"


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Means and 95 % intervals per (k, mode, kind of change: :data:`GROUPS`), with the paired
    differences to ``off`` (the same cases)."""
    from ..quality import interval

    off = {(r["k"], r["case"]): r for r in rows if r["mode"] == "off"}
    out = []
    keys = dict.fromkeys((r["k"], r["mode"], group) for r in rows for group in (group_of(r), "all"))
    for k, mode, group in sorted(keys, key=lambda t: (t[0], MODES.index(t[1]) if t[1] in MODES else 9,
                                                       GROUPS.index(t[2]))):
        sel = [r for r in rows if r["k"] == k and r["mode"] == mode and group in (group_of(r), "all")]
        row: dict[str, Any] = {"k": k, "mode": mode, "changes": group, "cases": len(sel),
                               "ran": round(float(np.mean([r["ran"] for r in sel])), 3)}
        for m in ("texture", "windows", "detail", "intact", "keep", "s"):
            vals = [r[m] for r in sel if r.get(m) is not None]
            if vals:
                row[m] = round(float(np.mean(vals)), 4)
                row[f"{m}_ci"] = interval(vals)
        if mode != "off":
            for m in ("texture", "intact"):
                d = [r[m] - off[(r["k"], r["case"])][m] for r in sel if (r["k"], r["case"]) in off]
                if d:
                    row[f"d_{m}"] = round(float(np.mean(d)), 4)
                    row[f"d_{m}_ci"] = interval(d)
        row["keep_min"] = min(r["keep"] for r in sel)
        out.append(row)
    return out


def run(opts) -> list[dict[str, Any]]:
    from ..models import LoadOptions, load_bundle

    n = opts.hires_texture_cases or (QUICK_CASES if opts.quick else N_CASES)
    scales = [int(v) for v in opts.hires_texture_scales.split(",")]
    modes = tuple(opts.hires_texture_modes.split(","))
    unknown = set(modes) - set(MODES)
    if unknown:
        raise SystemExit(f"hires-texture: unknown path(s) {', '.join(sorted(unknown))}; known: {', '.join(MODES)}")
    bundle = load_bundle(opts.hires_texture_model, LoadOptions(device=opts.device))
    seed = opts.hires_texture_seed
    cases = case_list(n, seed)
    rows: list[dict[str, Any]] = []
    for k in scales:
        for i, case in enumerate(cases):
            got = run_case(bundle, case, i, seed, k, modes)
            rows += got
            print(f"  {k}x {case.name}: " + ", ".join(
                f"{r['mode']} {r['read']} ({r['intact']:.2f}, {r['s']:.1f} s)" for r in got), flush=True)
    if opts.hires_texture_details:
        path = Path(opts.hires_texture_details)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"seed": seed, "cases": n, "model": opts.hires_texture_model,
                                    "pixels": PIXELS_PARAMS, "rows": rows}, indent=1))
    return summarise(rows)


register("hires-texture", run, "the high-resolution pass where it can matter: documents 4-8x the "
         "model's size with its own fine texture at 1:1; texture read, detail, intact, keep, seconds",
         _add_arguments)
