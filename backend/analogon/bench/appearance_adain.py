"""Section `appearance-adain`: can AdaIN alone carry the appearance's texture on toy-sd?

Cross-Image Attention moves the look two ways: the attention swap, and AdaIN on the latents
(``core.adain``: the structure's object takes the per-channel mean and spread of the
appearance's object). The quality runs find the colour transferred and the texture not
(docs/benchmarks-appearance.md). This section asks the question with nothing else in the way:
no noise, no inversion, no attention — the *clean* latents of the quality run's appearance cases
(``quality.cases``, kind ``appearance``, the model's world), the world's own object masks, and one
decode. Paths:

- ``decoded``: the structure encoded and decoded (the control: its own texture comes back);
- ``adain``: masked AdaIN with the objects' masks on the latent grid (a cell is the object's when
  at least half of it is);
- ``adain-interior``: the same with the cells wholly inside each object only (no outline mixed
  in);
- ``mean``: the structure's object shifted to the appearance's per-channel mean (no spread).

Each result is read as the quality run reads the method's (``quality.score_case``): the change
of colour and of texture, keep (shape, size, background, backdrop), *all*; means with 95 %
bootstrap intervals over the cases.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from . import register

PATHS = ("decoded", "adain", "adain-interior", "mean")
N_CASES = 30
QUICK_CASES = 4


def _add_arguments(ap) -> None:
    ap.add_argument("--appearance-adain-model", default="toy-sd",
                    help="model whose autoencoder is used (default toy-sd)")
    ap.add_argument("--appearance-adain-cases", type=int, default=None,
                    help=f"appearance cases (default {N_CASES}; {QUICK_CASES} with --quick)")
    ap.add_argument("--appearance-adain-seed", type=int, default=0)


def latent_mask(silhouette: np.ndarray, grid: tuple[int, int], interior: bool = False):
    """The object's mask on the latent grid (1, 1, h, w): cells at least half inside, or (with
    ``interior``) wholly inside."""
    import torch
    import torch.nn.functional as F

    m = torch.from_numpy((np.asarray(silhouette) > 127).astype(np.float32))[None, None]
    share = F.adaptive_avg_pool2d(m, grid)
    return (share >= 1.0 - 1e-6).float() if interior else (share >= 0.5).float()


def transfer(z_s, z_a, mask_s, mask_a, path: str):
    """The structure's latent with the appearance's statistics by ``path``."""
    from ..core.adain import adain, channel_stats

    if path == "decoded":
        return z_s
    if path == "mean":
        s_mean, _ = channel_stats(z_s, mask_s)
        a_mean, _ = channel_stats(z_a, mask_a)
        return (z_s.float() + (a_mean - s_mean) * mask_s).to(z_s.dtype)
    return adain(z_s, z_a, mask_s, mask_a)


def run(opts) -> list[dict[str, Any]]:
    import torch

    from ..core import images as im
    from ..core.diffusion import vae_decode, vae_encode
    from ..models import LoadOptions, load_bundle
    from ..models.toy import model_world
    from ..quality import interval, score_case
    from ..quality import cases as cases_mod

    n = opts.appearance_adain_cases or (QUICK_CASES if opts.quick else N_CASES)
    spec = opts.appearance_adain_model
    bundle = load_bundle(spec, LoadOptions(device=opts.device))
    cases = cases_mod.build("appearance", n, opts.appearance_adain_seed, world=model_world(spec))
    scores: dict[str, list[dict[str, Any]]] = {p: [] for p in PATHS}
    t0 = time.perf_counter()
    for c in cases:
        size = (c.slots["structure"].shape[1], c.slots["structure"].shape[0])

        def encode(slot: str):
            return vae_encode(bundle, im.to_tensor(c.slots[slot], size, bundle.device,
                                                   bundle.vae.dtype))

        z_s, z_a = encode("structure"), encode("appearance")
        grid = tuple(z_s.shape[-2:])
        masks = {inner: [latent_mask(c.slots[f"{role}_object"], grid, inner).to(z_s.device)
                         for role in ("structure", "appearance")] for inner in (False, True)}
        for path in PATHS:
            m_s, m_a = masks[path == "adain-interior"]
            with torch.no_grad():
                rgb = im.from_tensor(vae_decode(bundle, transfer(z_s, z_a, m_s, m_a, path)))
            scores[path].append(score_case(c, np.asarray(rgb)[..., :3]))
    secs = (time.perf_counter() - t0) / max(1, len(cases))
    rows = []
    for path in PATHS:
        row: dict[str, Any] = {"section": "appearance-adain", "path": path, "model": spec,
                               "seed": opts.appearance_adain_seed, "cases": len(scores[path])}
        columns = {"colour": [s["change_by"]["colour"] for s in scores[path]],
                   "texture": [s["change_by"]["texture"] for s in scores[path]],
                   **{k: [s[k] for s in scores[path]] for k in ("keep", "all")}}
        for k, vals in columns.items():
            lo, hi = interval(vals)
            row[k] = round(float(np.mean(vals)), 3)
            row[f"{k}_95"] = f"{lo:.2f}-{hi:.2f}"
        row["dist"] = round(float(np.mean([s["dist"] for s in scores[path]])), 4)
        row["s_per_case"] = round(secs, 3)
        rows.append(row)
    return rows


register("appearance-adain", run, "AdaIN alone on clean toy-sd latents with the objects' masks: "
         "does it carry the appearance's colour and texture? (quality-run reading)",
         _add_arguments)
