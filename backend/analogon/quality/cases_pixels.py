"""PIXELS quality cases on the toy world.

- ``exemplar`` (shipped in :mod:`.cases`): a swatch of the new colour/texture over the object's
  box, a hard silhouette map; the result should take the swatch's look inside the silhouette and
  keep everything else.
- ``exemplar_soft`` (here): the same edit with the map a painter would paint: white on the
  object, a grey halo fading to black over a few pixels around it (the paper's gradient maps).
  Outside the halo nothing may change; inside it the seam should be smooth.

``seam_excess(result, case)`` measures seam quality at the map's gradient: the mean absolute
Laplacian of the result in the grey halo minus that of the ground truth there (0 = as smooth as
the truth; a pasted edge or a halo of noise shows as excess high-frequency energy).
"""
from __future__ import annotations

import numpy as np

from .cases import Case, exemplar_case_list, register_kind, register_method

HALO = 4  # pixels of grey ramp around the silhouette


def _ramp_map(silhouette: np.ndarray, halo: int = HALO) -> np.ndarray:
    """White on the silhouette, falling linearly to black ``halo`` pixels away (8-connected)."""
    dist = np.full(silhouette.shape, halo + 1, np.float32)
    dist[silhouette] = 0
    cur = silhouette.copy()
    for d in range(1, halo + 1):
        g = cur.copy()
        g[1:] |= cur[:-1]
        g[:-1] |= cur[1:]
        g[:, 1:] |= cur[:, :-1]
        g[:, :-1] |= cur[:, 1:]
        g[1:, 1:] |= cur[:-1, :-1]
        g[:-1, :-1] |= cur[1:, 1:]
        g[1:, :-1] |= cur[:-1, 1:]
        g[:-1, 1:] |= cur[1:, :-1]
        dist[g & ~cur] = d
        cur = g
    v = np.clip(1.0 - dist / (halo + 1), 0.0, 1.0)
    return np.round(v * 255).astype(np.uint8)


@register_kind("exemplar_soft")
def exemplar_soft_cases(n: int, seed: int, world: str = "toy64") -> list[Case]:
    return exemplar_case_list(
        "exemplar_soft", n, seed, edit_map_for=_ramp_map,
        keep_region_for=lambda src, edit_map: edit_map == 0,
        extra_info=lambda edit_map: {"halo": (edit_map > 0) & (edit_map < 255)}, world=world)


def _laplacian(img: np.ndarray) -> np.ndarray:
    a = img.astype(np.float32)
    lap = np.zeros_like(a)
    lap[1:-1, 1:-1] = (4 * a[1:-1, 1:-1] - a[:-2, 1:-1] - a[2:, 1:-1] - a[1:-1, :-2] - a[1:-1, 2:])
    return np.abs(lap).mean(-1) / 255.0


def seam_excess(result: np.ndarray, case: Case) -> float:
    """Mean |Laplacian| of the result in the grey halo minus the truth's (lower is better)."""
    halo = case.info.get("halo")
    if halo is None:
        m = case.slots["edit_map"]
        halo = (m > 0) & (m < 255)
    if not halo.any():
        return 0.0
    res = np.asarray(result)[..., :3]
    return float(_laplacian(res)[halo].mean() - _laplacian(case.truth_image)[halo].mean())


register_method(
    "pixels", ("exemplar", "exemplar_soft"),
    {"source": "source", "exemplar": "exemplar", "edit_map": "edit_map"},
    note="The swatch is pasted where the map is white; the soft cases' grey halo lets the "
         "scene adapt to it.",
)
