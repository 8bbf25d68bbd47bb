"""Appearance-transfer quality cases on the toy world.

The ``appearance`` kind (shipped in :mod:`.cases`): a structure scene and an appearance scene on
the same background, differing in shape, colour and texture. The truth keeps the structure's
shape, size and background and takes the appearance's colour and texture, so the table's
``change`` column is the appearance-adoption rate and ``keep`` the structure-kept rate, next to
the two trivial baselines (the structure returned, the appearance returned) and two plain
img2img baselines on the structure image (``pixels`` with no exemplar and no edit map, the same
strength, steps and seed as the transfer):

- ``img2img, same prompt``: the transfer's prompt, unguided, as the transfer runs. It sees what the
  transfer sees except the appearance image, so the gap between the two is what the attention
  swap, guidance and AdaIN add.
- ``img2img, look in words``: the appearance's colour and texture written into the prompt
  ("a red striped shape"), guided at 7.5: what a painter would try without this method.

The toy model speaks in captions like "a large red striped circle on a grey background": the
domain word is "shape" and the prompt "a {domain}" (the paper's "A photo of a {domain}" is not in
its vocabulary). 50 steps with 16 skipped keep the paper's proportions (32 of 100) at half the cost.
"""
from __future__ import annotations

from .cases import register_baseline, register_method

PARAMS = {"domain": "shape", "prompt": "a {domain}", "steps": 50, "skip_steps": 16}

_IMG2IMG = {"steps": PARAMS["steps"], "strength": 1 - PARAMS["skip_steps"] / PARAMS["steps"],
            "scheduler": "ddim"}
register_baseline("appearance", "img2img, same prompt", "pixels", {"source": "structure"},
                  {**_IMG2IMG, "prompt": PARAMS["prompt"].format(domain=PARAMS["domain"]),
                   "guidance": 1.0})
register_baseline("appearance", "img2img, look in words", "pixels", {"source": "structure"},
                  {**_IMG2IMG, "guidance": 7.5},
                  params_for=lambda c: {"prompt": f"a {c.changed['colour']} "
                                                  f"{c.changed['texture']} {PARAMS['domain']}"})

register_method(
    "appearance", ("appearance",), {"structure": "structure", "appearance": "appearance"},
    params=PARAMS,
    variants={"masks given": {"structure_mask": "structure_object",
                              "appearance_mask": "appearance_object"}},
    note="The toy model's vocabulary has no \"photo\", so the domain word is its own; the "
         "paper's proportion of skipped steps at half the steps. change = appearance adopted, "
         "keep = structure kept.",
)
