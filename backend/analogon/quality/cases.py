"""The quality cases: fixed, seeded toy-world inputs with a known right answer.

A *kind* of case is a builder ``(n, seed) -> list[Case]``; a method is registered with the
kinds it is measured on, how its roles map onto the cases' slots, and (optionally) the
parameters the bench uses for it. A method engineer adds a line to ``METHODS`` below, or calls
:func:`register_method` / :func:`register_kind` from their own module.

Kinds shipped here:

- ``analogy``: A and A′ differ in one attribute; B differs from A in at least two others but
  shares the changed attribute's "before" value; the truth is B with that attribute changed.
- ``exemplar``: a source scene, an exemplar (a swatch: the object's box filled with a new
  colour or texture) and an edit map that is the object's silhouette (white), black
  elsewhere; the truth is the scene with the object's colour/texture changed, and everything
  outside the map should stay as it was.
- ``appearance``: a structure scene and an appearance scene on the same background with a
  different shape, colour and texture; the truth keeps the structure's shape, size and
  position and takes the appearance's colour and texture.

Every kind builds for a world (``build(kind, n, seed, world="toy64" | "toy128")``), at that
world's size, and every case knows its world (``Case.world``). toy64's cases are the ones
the project has always measured (the same bytes for the same seed). On toy128 the edited
object is the scene's first object (the *subject*); a scene may hold a second object, a
*distractor* that must come back as it was (its shape, colour and texture are in ``kept``
as ``second.shape`` ...); analogy cases cycle through every changeable attribute (background
and backdrop included) and through its before -> after pairs (``info["transition"]``), so that
30 cases show every attribute changed 5 times with 5 different transitions.
"""
from __future__ import annotations

import inspect
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..toyworld.world import (ATTRIBUTES, OBJECT_SLOTS, SUPERSAMPLE, WORLD64, WORLDS, World,
                              background_image, change, grow_by, layout_ok, objects, random_scene,
                              render, visible_masks, world_of)

SIZE = 64  # toy64's native size (the size of its cases)
WORLD_NAMES = tuple(WORLDS)  # the worlds cases can be drawn in


@dataclass
class Case:
    kind: str
    name: str
    slots: dict[str, np.ndarray]  # slot name -> RGB uint8 (H, W, 3), or L uint8 (H, W) for maps
    truth: dict[str, Any]  # the ground-truth scene
    changed: dict[str, str]  # attribute -> value the result should show
    kept: tuple[str, ...]  # attributes that should stay as in the truth
    baselines: dict[str, str]  # baseline name -> the slot returned unchanged
    target: str  # the slot that is being edited
    keep_region: np.ndarray | None = None  # bool (H, W): pixels that should not change
    info: dict[str, Any] = field(default_factory=dict)
    world: str = "toy64"  # the world the case is drawn in: its size, and how it is read

    @property
    def size(self) -> int:
        return world_of(self.world).size

    @property
    def truth_image(self) -> np.ndarray:
        return render(self.truth, self.size)


# (n, seed) -> cases, or (n, seed, world=...) -> cases for a builder that knows the worlds
KindBuilder = Callable[..., list[Case]]
KINDS: dict[str, KindBuilder] = {}


def register_kind(name: str) -> Callable[[KindBuilder], KindBuilder]:
    def deco(fn: KindBuilder) -> KindBuilder:
        KINDS[name] = fn
        return fn

    return deco


@dataclass
class MethodCases:
    kinds: tuple[str, ...]
    # role name of the method -> slot name of the case (roles not named here and not equal
    # to a slot name get nothing)
    roles: dict[str, str] = field(default_factory=dict)
    # parameters the bench passes (validated by the method's Params); {} = its defaults
    params: dict[str, Any] = field(default_factory=dict)
    # why the cases run as they do, printed under the table (the settings themselves are
    # printed after it from ``params``: do not repeat them here)
    note: str = ""
    # further rows of the same method with the same parameters and more inputs: row name ->
    # extra roles (role name -> slot name), e.g. the masks a painter would give
    variants: dict[str, dict[str, str]] = field(default_factory=dict)


METHODS: dict[str, MethodCases] = {
    "dia": MethodCases(("analogy",), {"a": "a", "a_prime": "a_prime", "b": "b"}),
    "difference": MethodCases(("analogy",), {"a": "a", "a_prime": "a_prime", "b": "b"}),
    "pixels": MethodCases(("exemplar",), {"source": "source", "exemplar": "exemplar",
                                          "edit_map": "edit_map"}),
    "appearance": MethodCases(("appearance",), {"structure": "structure",
                                                "appearance": "appearance"}),
}


def register_method(method_id: str, kinds: tuple[str, ...] | list[str],
                    roles: dict[str, str] | None = None, params: dict[str, Any] | None = None,
                    note: str = "", variants: dict[str, dict[str, str]] | None = None) -> None:
    METHODS[method_id] = MethodCases(tuple(kinds), dict(roles or {}), dict(params or {}), note,
                                     {k: dict(v) for k, v in (variants or {}).items()})


@dataclass
class ModelBaseline:
    """A baseline that needs the model: another method run on the case's slots (plain img2img
    is ``pixels`` with no exemplar and no edit map). ``params_for`` adds per-case parameters
    (e.g. a prompt that describes the case's truth in words)."""

    method: str
    roles: dict[str, str]
    params: dict[str, Any] = field(default_factory=dict)
    params_for: Callable[[Case], dict[str, Any]] | None = None

    def params_of(self, case: Case) -> dict[str, Any]:
        return {**self.params, **(self.params_for(case) if self.params_for else {})}


# kind -> baseline name -> baseline; run next to the methods measured on that kind
MODEL_BASELINES: dict[str, dict[str, ModelBaseline]] = {}


def register_baseline(kind: str, name: str, method_id: str, roles: dict[str, str],
                      params: dict[str, Any] | None = None,
                      params_for: Callable[[Case], dict[str, Any]] | None = None) -> None:
    MODEL_BASELINES.setdefault(kind, {})[name] = ModelBaseline(method_id, dict(roles),
                                                               dict(params or {}), params_for)


# the "method" of a baseline that is the model's autoencoder alone: its ``image`` slot encoded
# and decoded at the working size, the floor of any method that redraws the whole image
AUTOENCODER = "autoencoder"


def register_round_trip(kind: str, name: str, slot: str) -> None:
    """A baseline that is ``slot`` through the autoencoder and nothing else."""
    register_baseline(kind, name, AUTOENCODER, {"image": slot})


# -- helpers ------------------------------------------------------------------------------

def _other(rng: random.Random, attribute: str, value: str, world: World = WORLD64) -> str:
    values = ATTRIBUTES[attribute] if world is WORLD64 else world.attributes[attribute]
    return rng.choice([v for v in values if v != value])


def _object_box(scene: dict[str, Any], pad: float = 0.06) -> np.ndarray:
    """Bool (size, size) at the scene's world size: the (first) object's bounding square,
    padded."""
    w = world_of(scene)
    side = w.size
    r = w.radius[scene["size"]] + pad
    yy, xx = (np.mgrid[0:side, 0:side] + 0.5) / side
    return (np.abs(xx - scene["x"]) <= r) & (np.abs(yy - scene["y"]) <= r)


CHANGEABLE = ("colour", "shape", "texture", "size", "background")  # toy64's
OBJECT_ATTRS = ("shape", "colour", "size", "texture")
DISTRACTOR_KEPT = ("shape", "colour", "texture")  # what a distractor must keep (per object)


def changeable(world: str | World = "toy64") -> tuple[str, ...]:
    """The attributes a case may change in ``world``: the first object's four and the
    background (toy128: and the backdrop)."""
    w = world_of(world)
    return CHANGEABLE if w is WORLD64 else CHANGEABLE + tuple(
        k for k in w.attributes if k not in CHANGEABLE)


def transitions(values: tuple[str, ...], rng: random.Random) -> list[tuple[str, str]]:
    """Every (before, after) pair of distinct ``values``, ordered so that the first ones
    already spread over every value at both ends: the values are shuffled once, then for
    each step d = 1 .. V-1, every value v gives (v, the value d places after it)."""
    vals = list(values)
    rng.shuffle(vals)
    k = len(vals)
    return [(vals[v], vals[(v + d) % k]) for d in range(1, k) for v in range(k)]


def schedule(kind: str, attrs: tuple[str, ...], n: int, seed: int,
             world: str | World = "toy128") -> list[tuple[str, str, str]]:
    """The (attribute, before, after) of ``n`` cases: case i changes ``attrs[i % A]`` by that
    attribute's next pair of :func:`transitions` (drawn from its own seeded stream), so that
    every attribute is changed in turn and no transition repeats before all have been
    shown (30 cases of 6 attributes: 5 transitions each)."""
    w = world_of(world)
    rng = random.Random(f"{kind}-transitions:{w.name}:{seed}")
    pairs = {k: transitions(w.attributes[k], rng) for k in attrs}
    out = []
    for i in range(n):
        attr = attrs[i % len(attrs)]
        before, after = pairs[attr][(i // len(attrs)) % len(pairs[attr])]
        out.append((attr, before, after))
    return out


def distractors(scene: dict[str, Any]) -> tuple[str, ...]:
    """The slots of a scene's objects after the first ("second", "third")."""
    return tuple(k for k in OBJECT_SLOTS if scene.get(k))


def kept_distractors(scene: dict[str, Any]) -> tuple[str, ...]:
    return tuple(f"{slot}.{k}" for slot in distractors(scene) for k in DISTRACTOR_KEPT)


def _colours_distinct(scene: dict[str, Any]) -> bool:
    colours = [o["colour"] for o in objects(scene)]
    return len(set(colours)) == len(colours)


def value_of(scene: dict[str, Any], key: str) -> Any:
    """A case's attribute key in a scene: ``"colour"`` (the first object's, or the scene's
    background/backdrop) or ``"second.colour"`` (a later object's)."""
    slot, _, name = key.rpartition(".")
    obj = scene[slot] if slot else scene
    if name == "backdrop":
        return obj.get("backdrop", "plain")
    return obj[name]


# -- kinds --------------------------------------------------------------------------------

# whole-image methods redraw B (or the structure) through the autoencoder: "unchanged" that has
# been through it is the distance any of them starts from
register_round_trip("analogy", "B through the autoencoder", "b")
register_round_trip("appearance", "structure through the autoencoder", "structure")


@register_kind("analogy")
def analogy_cases(n: int, seed: int, world: str = "toy64") -> list[Case]:
    w = world_of(world)
    if w is not WORLD64:
        return _analogy_layered(n, seed, w)
    rng = random.Random(f"analogy:{seed}")
    out = []
    for i in range(n):
        attr = CHANGEABLE[i % len(CHANGEABLE)]
        a = random_scene(rng, split="any")
        after = _other(rng, attr, a[attr])
        a_prime = change(a, attr, after)
        while True:
            b = random_scene(rng, split="any")
            b = change(b, attr, a[attr])
            differs = [k for k in CHANGEABLE if k != attr and b[k] != a[k]]
            if len(differs) >= 2:
                break
        truth = change(b, attr, after)
        out.append(Case(
            kind="analogy", name=f"analogy-{i:02d}-{attr}-{a[attr]}-to-{after}",
            slots={"a": render(a, SIZE), "a_prime": render(a_prime, SIZE), "b": render(b, SIZE)},
            truth=truth, changed={attr: after},
            kept=tuple(k for k in CHANGEABLE if k != attr),
            baselines={"B unchanged": "b", "A′ returned": "a_prime"}, target="b",
            info={"a": a, "a_prime": a_prime, "b": b, "attribute": attr,
                  "transition": (attr, a[attr], after)},
        ))
    return out


def _analogy_layered(n: int, seed: int, w: World) -> list[Case]:
    """toy128's analogy cases: case i changes attribute ``i % A`` (A = every changeable
    attribute) by that attribute's next (before, after) pair (:func:`schedule`). A and A′
    hold one object; B shares A's "before" value, differs from A in at least two other
    attributes, and every other case holds a distractor (a second object, which may overlap
    the first) whose value of a changed object attribute is not the "before" one, so that the
    analogy names one object of B."""
    rng = random.Random(f"analogy:{w.name}:{seed}")
    attrs = changeable(w)
    out = []
    for i, (attr, before, after) in enumerate(schedule("analogy", attrs, n, seed, w)):
        with_distractor = (i + i // len(attrs)) % 2 == 1
        while True:
            a = change(random_scene(rng, split="any", world=w, count=1), attr, before)
            a_prime = change(a, attr, after)
            if layout_ok(a) and layout_ok(a_prime):
                break
        while True:
            b = change(random_scene(rng, split="any", world=w, count=2 if with_distractor else 1),
                       attr, before)
            truth = change(b, attr, after)
            differs = [k for k in attrs if k != attr and value_of(b, k) != value_of(a, k)]
            if len(differs) < 2 or not (layout_ok(b) and layout_ok(truth)):
                continue
            if not (_colours_distinct(b) and _colours_distinct(truth)):
                continue
            if attr in OBJECT_ATTRS and any(b[s][attr] == before for s in distractors(b)):
                continue
            break
        extra = distractors(b)
        out.append(Case(
            kind="analogy",
            name=f"analogy-{i:02d}-{attr}-{before}-to-{after}" + ("-plus-one" if extra else ""),
            slots={"a": render(a), "a_prime": render(a_prime), "b": render(b)},
            truth=truth, changed={attr: after},
            kept=tuple(k for k in attrs if k != attr) + kept_distractors(b),
            baselines={"B unchanged": "b", "A′ returned": "a_prime"}, target="b",
            info={"a": a, "a_prime": a_prime, "b": b, "attribute": attr,
                  "transition": (attr, before, after), "distractors": extra},
            world=w.name,
        ))
    return out


def _paint(obj: dict[str, Any], w: World) -> np.ndarray:
    """Float (size, size, 3): the whole image in ``obj``'s colour and texture, as the
    renderer draws an object's inside (ink supersampled and box-filtered)."""
    from ..toyworld.world import COLOURS, SHADE, _texture_ink

    side = w.size
    ink = _texture_ink(obj["texture"], side * SUPERSAMPLE, w.name)
    cover = ink.reshape(side, SUPERSAMPLE, side, SUPERSAMPLE).mean(axis=(1, 3))
    base = np.array(COLOURS[obj["colour"]], np.float64)
    return base * (1.0 - cover[..., None] * (1.0 - SHADE))


def _swatch(scene: dict[str, Any], region: np.ndarray) -> np.ndarray:
    """The scene's background with the object's colour and texture filling ``region``."""
    from ..toyworld.world import BACKGROUNDS, COLOURS, SHADE, _texture_ink

    w = world_of(scene)
    if w is not WORLD64:
        img = background_image(scene).astype(np.float64)
        img[region] = _paint(scene, w)[region]
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)
    img = np.empty((SIZE, SIZE, 3), np.float64)
    img[:] = BACKGROUNDS[scene["background"]]
    base = np.array(COLOURS[scene["colour"]], np.float64)
    ink = _texture_ink(scene["texture"], SIZE)
    paint = np.where(ink[..., None], base * SHADE, base)
    img[region] = paint[region]
    return np.rint(img).astype(np.uint8)


COVERAGE = 0.15  # toy128: a pixel at least this much covered by the object is the object's


def _object_mask(scene: dict[str, Any], grow: int = 1) -> np.ndarray:
    """Bool (size, size): where the scene's (first) object shows, grown by ``grow`` pixels.
    toy64: where the render differs from the background; toy128: where the object's visible
    part (not what lies in front of it) covers a pixel by at least ``COVERAGE``."""
    from ..toyworld.world import BACKGROUNDS

    w = world_of(scene)
    if w is WORLD64:
        img = render(scene, SIZE).astype(np.float64)
        m = np.sqrt(((img - np.array(BACKGROUNDS[scene["background"]])) ** 2).sum(-1)) > 24
    else:
        side = w.size
        vis = visible_masks(scene, side * SUPERSAMPLE)[0]
        m = vis.reshape(side, SUPERSAMPLE, side, SUPERSAMPLE).mean(axis=(1, 3)) >= COVERAGE
    return grow_by(m, grow)


def _silhouette(scene: dict[str, Any]) -> np.ndarray:
    """L uint8 (size, size): the (first) object white on black."""
    return np.where(_object_mask(scene, grow=0), 255, 0).astype(np.uint8)


def exemplar_case_list(kind: str, n: int, seed: int,
                       edit_map_for: Callable[[np.ndarray], np.ndarray],
                       keep_region_for: Callable[[dict[str, Any], np.ndarray], np.ndarray],
                       extra_info: Callable[[np.ndarray], dict[str, Any]] | None = None,
                       world: str = "toy64") -> list[Case]:
    """Exemplar cases: a swatch of the new colour or texture over the object's box as the
    exemplar; the edit map is made from the object's silhouette by ``edit_map_for``. Every kind
    draws from its own seeded stream (one per world). On toy128 the cases alternate colour and
    texture through their (before, after) pairs (:func:`transitions`), and every other scene
    holds a distractor, outside the edit but maybe overlapping it, that must stay as it was;
    the colour/texture pairs come from :func:`schedule`."""
    w = world_of(world)
    if w is not WORLD64:
        return _exemplar_layered(kind, n, seed, w, edit_map_for, keep_region_for, extra_info)
    rng = random.Random(f"{kind}:{seed}")
    out = []
    for i in range(n):
        attr = ("colour", "texture")[i % 2]
        src = random_scene(rng, split="any")
        after = _other(rng, attr, src[attr])
        truth = change(src, attr, after)
        edit_map = edit_map_for(_object_mask(src))
        out.append(Case(
            kind=kind, name=f"{kind}-{i:02d}-{attr}-{src[attr]}-to-{after}",
            slots={"source": render(src, SIZE), "exemplar": _swatch(truth, _object_box(src)),
                   "edit_map": edit_map},
            truth=truth, changed={attr: after},
            kept=tuple(k for k in CHANGEABLE if k != attr),
            baselines={"source unchanged": "source", "exemplar returned": "exemplar"},
            target="source", keep_region=keep_region_for(src, edit_map),
            info={"source": src, "attribute": attr, "transition": (attr, src[attr], after),
                  **(extra_info(edit_map) if extra_info else {})},
        ))
    return out


def _exemplar_layered(kind: str, n: int, seed: int, w: World,
                      edit_map_for: Callable[[np.ndarray], np.ndarray],
                      keep_region_for: Callable[[dict[str, Any], np.ndarray], np.ndarray],
                      extra_info: Callable[[np.ndarray], dict[str, Any]] | None) -> list[Case]:
    rng = random.Random(f"{kind}:{w.name}:{seed}")
    attrs = ("colour", "texture")
    out = []
    for i, (attr, before, after) in enumerate(schedule(kind, attrs, n, seed, w)):
        with_distractor = (i + i // len(attrs)) % 2 == 1
        while True:
            src = change(random_scene(rng, split="any", world=w,
                                      count=2 if with_distractor else 1), attr, before)
            truth = change(src, attr, after)
            if _colours_distinct(src) and _colours_distinct(truth):
                break
        edit_map = edit_map_for(_object_mask(src))
        extra = distractors(src)
        out.append(Case(
            kind=kind,
            name=f"{kind}-{i:02d}-{attr}-{before}-to-{after}" + ("-plus-one" if extra else ""),
            slots={"source": render(src), "exemplar": _swatch(truth, _object_box(src)),
                   "edit_map": edit_map},
            truth=truth, changed={attr: after},
            kept=tuple(k for k in changeable(w) if k != attr) + kept_distractors(src),
            baselines={"source unchanged": "source", "exemplar returned": "exemplar"},
            target="source", keep_region=keep_region_for(src, edit_map),
            info={"source": src, "attribute": attr, "transition": (attr, before, after),
                  "distractors": extra, **(extra_info(edit_map) if extra_info else {})},
            world=w.name,
        ))
    return out


@register_kind("exemplar")
def exemplar_cases(n: int, seed: int, world: str = "toy64") -> list[Case]:
    """The exemplar is a swatch (a square of the new colour or texture over the object's
    box), the edit map is the object's silhouette: the result should take the swatch's look
    inside the silhouette and keep the shape, and leave everything outside the map alone."""
    return exemplar_case_list(
        "exemplar", n, seed,
        edit_map_for=lambda silhouette: np.where(silhouette, 255, 0).astype(np.uint8),
        keep_region_for=lambda src, edit_map: ~_object_mask(src, grow=3), world=world)


@register_kind("appearance")
def appearance_cases(n: int, seed: int, world: str = "toy64") -> list[Case]:
    w = world_of(world)
    if w is not WORLD64:
        return _appearance_layered(n, seed, w)
    rng = random.Random(f"appearance:{seed}")
    out = []
    for i in range(n):
        s = random_scene(rng, split="any")
        t = random_scene(rng, split="any")
        t = change(t, "background", s["background"])
        t = change(t, "shape", _other(rng, "shape", s["shape"]))
        t = change(t, "colour", _other(rng, "colour", s["colour"]))
        t = change(t, "texture", _other(rng, "texture", s["texture"]))
        truth = change(change(s, "colour", t["colour"]), "texture", t["texture"])
        out.append(Case(
            kind="appearance", name=f"appearance-{i:02d}-{s['shape']}-gets-{t['colour']}-{t['texture']}",
            slots={"structure": render(s, SIZE), "appearance": render(t, SIZE),
                   # the objects' silhouettes, as a painter would mask them
                   "structure_object": _silhouette(s), "appearance_object": _silhouette(t)},
            truth=truth, changed={"colour": t["colour"], "texture": t["texture"]},
            kept=("shape", "size", "background"),
            baselines={"structure unchanged": "structure", "appearance returned": "appearance"},
            target="structure", info={"structure": s, "appearance": t},
        ))
    return out


def _appearance_layered(n: int, seed: int, w: World) -> list[Case]:
    """toy128's appearance cases: one object in each scene (which object's look goes where is
    then not in doubt), on the same background and backdrop."""
    rng = random.Random(f"appearance:{w.name}:{seed}")
    out = []
    for i in range(n):
        s = random_scene(rng, split="any", world=w, count=1)
        while True:
            t = random_scene(rng, split="any", world=w, count=1)
            t = change(change(t, "background", s["background"]), "backdrop", s["backdrop"])
            t = change(t, "shape", _other(rng, "shape", s["shape"], w))
            t = change(t, "colour", _other(rng, "colour", s["colour"], w))
            t = change(t, "texture", _other(rng, "texture", s["texture"], w))
            if layout_ok(t):
                break
        truth = change(change(s, "colour", t["colour"]), "texture", t["texture"])
        out.append(Case(
            kind="appearance",
            name=f"appearance-{i:02d}-{s['shape']}-gets-{t['colour']}-{t['texture']}",
            slots={"structure": render(s), "appearance": render(t),
                   "structure_object": _silhouette(s), "appearance_object": _silhouette(t)},
            truth=truth, changed={"colour": t["colour"], "texture": t["texture"]},
            kept=("shape", "size", "background", "backdrop"),
            baselines={"structure unchanged": "structure", "appearance returned": "appearance"},
            target="structure", info={"structure": s, "appearance": t}, world=w.name,
        ))
    return out


def knows_worlds(builder: KindBuilder) -> bool:
    """Whether a kind's builder takes ``world=`` (builders of (n, seed) build toy64 only)."""
    try:
        return "world" in inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return False


def build(kind: str, n: int, seed: int, world: str = "toy64") -> list[Case]:
    """``n`` cases of ``kind`` drawn with ``seed`` in ``world`` (toy64 or toy128)."""
    if kind not in KINDS:
        raise KeyError(f"no quality case kind called {kind!r}; kinds: {', '.join(KINDS)}")
    w = world_of(world)
    builder = KINDS[kind]
    if knows_worlds(builder):
        return builder(n, seed, world=w.name)
    if w is not WORLD64:
        raise ValueError(f"the case kind {kind!r} builds toy64 cases only (its builder takes "
                         f"no world=)")
    return builder(n, seed)
