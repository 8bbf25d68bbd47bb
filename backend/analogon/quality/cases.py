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
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..toyworld.world import ATTRIBUTES, RADIUS, change, random_scene, render

SIZE = 64  # toy-sd's native size


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

    @property
    def truth_image(self) -> np.ndarray:
        return render(self.truth, SIZE)


KindBuilder = Callable[[int, int], list[Case]]
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


# -- helpers ------------------------------------------------------------------------------

def _other(rng: random.Random, attribute: str, value: str) -> str:
    return rng.choice([v for v in ATTRIBUTES[attribute] if v != value])


def _object_box(scene: dict[str, Any], pad: float = 0.06) -> np.ndarray:
    """Bool (SIZE, SIZE): the object's bounding square, padded."""
    r = RADIUS[scene["size"]] + pad
    yy, xx = (np.mgrid[0:SIZE, 0:SIZE] + 0.5) / SIZE
    return (np.abs(xx - scene["x"]) <= r) & (np.abs(yy - scene["y"]) <= r)


CHANGEABLE = ("colour", "shape", "texture", "size", "background")


# -- kinds --------------------------------------------------------------------------------

@register_kind("analogy")
def analogy_cases(n: int, seed: int) -> list[Case]:
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
            info={"a": a, "a_prime": a_prime, "b": b, "attribute": attr},
        ))
    return out


def _swatch(scene: dict[str, Any], region: np.ndarray) -> np.ndarray:
    """The scene's background with the object's colour and texture filling ``region``."""
    from ..toyworld.world import BACKGROUNDS, COLOURS, SHADE, _texture_ink

    img = np.empty((SIZE, SIZE, 3), np.float64)
    img[:] = BACKGROUNDS[scene["background"]]
    base = np.array(COLOURS[scene["colour"]], np.float64)
    ink = _texture_ink(scene["texture"], SIZE)
    paint = np.where(ink[..., None], base * SHADE, base)
    img[region] = paint[region]
    return np.rint(img).astype(np.uint8)


def _object_mask(scene: dict[str, Any], grow: int = 1) -> np.ndarray:
    from ..toyworld.world import BACKGROUNDS

    img = render(scene, SIZE).astype(np.float64)
    m = np.sqrt(((img - np.array(BACKGROUNDS[scene["background"]])) ** 2).sum(-1)) > 24
    for _ in range(grow):
        g = m.copy()
        g[1:] |= m[:-1]
        g[:-1] |= m[1:]
        g[:, 1:] |= m[:, :-1]
        g[:, :-1] |= m[:, 1:]
        m = g
    return m


def _silhouette(scene: dict[str, Any]) -> np.ndarray:
    """L uint8 (SIZE, SIZE): the object white on black."""
    return np.where(_object_mask(scene, grow=0), 255, 0).astype(np.uint8)


def exemplar_case_list(kind: str, n: int, seed: int,
                       edit_map_for: Callable[[np.ndarray], np.ndarray],
                       keep_region_for: Callable[[dict[str, Any], np.ndarray], np.ndarray],
                       extra_info: Callable[[np.ndarray], dict[str, Any]] | None = None) -> list[Case]:
    """Exemplar cases: a swatch of the new colour or texture over the object's box as the
    exemplar; the edit map is made from the object's silhouette by ``edit_map_for``. Every kind
    draws from its own seeded stream."""
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
            info={"source": src, "attribute": attr, **(extra_info(edit_map) if extra_info else {})},
        ))
    return out


@register_kind("exemplar")
def exemplar_cases(n: int, seed: int) -> list[Case]:
    """The exemplar is a swatch (a square of the new colour or texture over the object's
    box), the edit map is the object's silhouette: the result should take the swatch's look
    inside the silhouette and keep the shape, and leave everything outside the map alone."""
    return exemplar_case_list(
        "exemplar", n, seed,
        edit_map_for=lambda silhouette: np.where(silhouette, 255, 0).astype(np.uint8),
        keep_region_for=lambda src, edit_map: ~_object_mask(src, grow=3))


@register_kind("appearance")
def appearance_cases(n: int, seed: int) -> list[Case]:
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


def build(kind: str, n: int, seed: int) -> list[Case]:
    if kind not in KINDS:
        raise KeyError(f"no quality case kind called {kind!r}; kinds: {', '.join(KINDS)}")
    return KINDS[kind](n, seed)
