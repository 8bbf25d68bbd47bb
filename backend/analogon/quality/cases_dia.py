"""Diffusion Image Analogies on the toy world's ``analogy`` cases (shipped in :mod:`.cases`), the
same cases as Difference Inversion so that the two sit side by side in one table.

A and A′ differ in one attribute; B′ should take the change and keep B's other attributes.
toy-sd is small (64², a CLIP whose vocabulary is the toy world's words), so fewer learnt tokens
carry a caption's worth ("a large red striped circle on a grey background" is 8 words): 8 tokens,
40 AdamW iterations at lr 0.02 (a toy CLIP's embeddings are coarser than ViT-L's; 120 gave the
same figures on 30 cases, docs/benchmarks-dia.md), B's noise with the method's default L-BFGS
budget, λ = 1 and CFG 3 (the method's defaults).
These settings were chosen, not tuned (figures in docs/benchmarks-dia.md); re-tune them with
``analogon bench --quality --methods dia`` when toy-sd changes.
"""
from __future__ import annotations

from .cases import register_method

PARAMS = {"n_tokens": 8, "token_iterations": 40, "token_lr": 0.02, "steps": 10,
          "analogy_strength": 1.0, "guidance": 3.0}

register_method(
    "dia", ("analogy",), {"a": "a", "a_prime": "a_prime", "b": "b"}, PARAMS,
    note="Fewer tokens and iterations than the paper's, for toy-sd's small CLIP "
         "(docs/benchmarks-dia.md).",
)
