"""Appearance-transfer quality cases on the toy world.

The ``appearance`` kind (shipped in :mod:`.cases`): a structure scene and an appearance scene on
the same background, differing in shape, colour and texture. The truth keeps the structure's
shape, size and background and takes the appearance's colour and texture, so the table's
``change`` column is the appearance-adoption rate and ``keep`` the structure-kept rate, next to
the two trivial baselines (the structure returned, the appearance returned).

The toy model speaks in captions like "a large red striped circle on a grey background": the
domain word is "shape" and the prompt "a {domain}" (the paper's "A photo of a {domain}" is not in
its vocabulary). 50 steps with 16 skipped keep the paper's proportions (32 of 100) at half the cost.
"""
from __future__ import annotations

from .cases import register_method

PARAMS = {"domain": "shape", "prompt": "a {domain}", "steps": 50, "skip_steps": 16}

register_method(
    "appearance", ("appearance",), {"structure": "structure", "appearance": "appearance"},
    params=PARAMS,
    note="appearance runs with domain 'shape', prompt 'a {domain}', 50 steps / 16 skipped (the "
         "toy model's vocabulary; the paper's proportions). change = appearance adopted, keep = "
         "structure kept.",
)
