"""Difference Inversion on the toy world's ``analogy`` cases (shipped in :mod:`.cases`), the same
cases as Diffusion Image Analogies so that the two sit side by side in one table.

The cases give only the three images, like the paper's image-only setting: captions are found
with PEZ in toy-sd's own CLIP (whose vocabulary is the toy world's words), the DIFF tokens are
learned with the paper's losses and weights, and B′ is sampled from B's DDIM inversion.
Settings are shorter than the method's defaults (500 steps at lr 5e-3, which reach the
held-out loss of VISII's 1000 at lr 1e-3) so that a case takes seconds on a CPU: 300 steps at
the same lr.
"""
from __future__ import annotations

from .cases import register_method

PARAMS = {
    "captioner": "pez", "pez_tokens": 8, "pez_steps": 300,
    "n_tokens": 5, "train_steps": 300, "lr": 5e-3,
    "b_start": "ddim_inverted", "strength": 0.6, "steps": 25, "guidance": 5.0,
}

register_method(
    "difference", ("analogy",), {"a": "a", "a_prime": "a_prime", "b": "b"}, PARAMS,
    note="Captions by PEZ in toy-sd's own CLIP (the image-only setting); fewer DIFF steps "
         "than the method's default, so that a case takes seconds.",
)
