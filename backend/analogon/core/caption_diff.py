"""Which words of a prompt name what an edit changes, read from the captions alone.

Difference Inversion adds learned DIFF tokens to B's caption. When that caption still names B's
old value of the attribute that changes ("a red circle" for a red → blue edit), the DIFF tokens
cannot rewrite that word (the text encoder is causal and they come after it); they only compete
with it in cross-attention. This module finds the conflicting words so that the prompts can drop
them, or take the DIFF in their place:

- the **change** is the word difference of the two captions: words of cap_A that cap_A′ does not
  have (*removed*: A's old value) and words of cap_A′ that cap_A does not have (*added*), as
  multisets, in order; the words both share are the *context*;
- **B's own value** of the changed attribute: for every removed word (or, when the captions only
  add words, every added word), the word of cap_B that plays its part. A word that is the removed
  word itself is it; otherwise the candidate (a word of cap_B that is neither context nor an added
  word) whose single-word text feature is nearest (cosine) to the changed words' features in the
  model's own CLIP text space, provided it is nearer to them than to every context word. Colour
  words sit near colour words there, shape words near shape words: no list of attributes or
  values is written anywhere, the model's text space says which words belong together.

Nothing here knows any particular world's vocabulary.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

_WORD = re.compile(r"[\w'’-]+", re.UNICODE)

# (texts) -> (N, dim) text features; the same space for every call
Features = Callable[[Sequence[str]], torch.Tensor]


def words(text: str) -> list[str]:
    """Lower-case words of ``text`` in order (punctuation is not a word)."""
    return [w.lower() for w in _WORD.findall(text or "")]


@dataclass
class CaptionChange:
    removed: list[str]  # in cap_A, not in cap_A′ (A's old value)
    added: list[str]  # in cap_A′, not in cap_A (the new value)
    context: list[str]  # in both

    @property
    def empty(self) -> bool:
        return not self.removed and not self.added


def _minus(a: list[str], b: list[str]) -> list[str]:
    left = Counter(b)
    out = []
    for w in a:
        if left[w] > 0:
            left[w] -= 1
        else:
            out.append(w)
    return out


def caption_change(cap_a: str, cap_a_prime: str) -> CaptionChange:
    wa, wp = words(cap_a), words(cap_a_prime)
    removed = _minus(wa, wp)
    return CaptionChange(removed, _minus(wp, wa), _minus(wa, removed))


@dataclass
class PromptCut:
    """A prompt split around the words that conflict with the change.

    ``prefix`` + ``suffix`` is the prompt without the conflicting words; ``suffix`` is what
    followed the first of them (empty when nothing was cut: the DIFF then goes at the end)."""

    prefix: str
    suffix: str
    dropped: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join(w for w in (self.prefix, self.suffix) if w)


def cut(prompt: str, drop_at: Sequence[int]) -> PromptCut:
    """``prompt`` without its words at the indices ``drop_at`` (indices into :func:`words`)."""
    ws = words(prompt)
    drop = sorted(set(i for i in drop_at if 0 <= i < len(ws)))
    if not drop:
        return PromptCut(" ".join(ws), "", [])
    first = drop[0]
    keep = [i for i in range(len(ws)) if i not in drop]
    return PromptCut(" ".join(ws[i] for i in keep if i < first),
                     " ".join(ws[i] for i in keep if i > first), [ws[i] for i in drop])


def indices_of(prompt_words: list[str], targets: list[str]) -> list[int]:
    """Indices of ``targets`` in ``prompt_words`` (each target once, first free occurrence)."""
    used: set[int] = set()
    out = []
    for t in targets:
        for i, w in enumerate(prompt_words):
            if w == t and i not in used:
                used.add(i)
                out.append(i)
                break
    return out


def own_value_indices(cap_b: str, change: CaptionChange, features: Features | None) -> list[int]:
    """Indices (into ``words(cap_b)``) of B's own value of the changed attribute (module doc)."""
    wb = words(cap_b)
    queries = change.removed or change.added
    if not queries or not wb:
        return []
    chosen = set(indices_of(wb, change.removed))
    missing = len(change.removed) - len(chosen) if change.removed else len(queries)
    if missing <= 0 or features is None:
        return sorted(chosen)
    context, added = set(change.context), set(change.added)
    cand = [i for i, w in enumerate(wb) if i not in chosen and w not in context and w not in added]
    if not cand:
        return sorted(chosen)
    ctx_words = sorted(context)
    with torch.no_grad():
        f = features(list(queries) + [wb[i] for i in cand] + ctx_words).float()
        f = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    q = f[:len(queries)]
    c = f[len(queries):len(queries) + len(cand)]
    k = f[len(queries) + len(cand):]
    # how near each candidate is to the changed words, and how near to the unchanged context
    near = (c @ q.T).max(dim=1).values
    ctx = (c @ k.T).max(dim=1).values if len(ctx_words) else torch.full_like(near, -2.0)
    order = torch.argsort(near, descending=True).tolist()
    for j in order:
        if missing <= 0:
            break
        if float(near[j]) > float(ctx[j]):
            chosen.add(cand[j])
            missing -= 1
    return sorted(chosen)


@dataclass
class ConflictPrompts:
    """The three prompts with the conflicting words cut out (see :func:`conflict_prompts`)."""

    a: PromptCut
    a_prime: PromptCut
    b: PromptCut
    change: CaptionChange

    def describe(self) -> dict:
        return {"removed": self.change.removed, "added": self.change.added,
                "b_dropped": self.b.dropped, "prompt_a": self.a.text,
                "prompt_a_prime": self.a_prime.text, "prompt_b": self.b.text}


def conflict_prompts(cap_a: str, cap_a_prime: str, cap_b: str,
                     features: Features | None) -> ConflictPrompts:
    """prompt_A without the removed words, prompt_A′ without the added words, prompt_B without
    the removed words and B's own value of the changed attribute."""
    ch = caption_change(cap_a, cap_a_prime)
    wa, wp = words(cap_a), words(cap_a_prime)
    return ConflictPrompts(
        cut(cap_a, indices_of(wa, ch.removed)),
        cut(cap_a_prime, indices_of(wp, ch.added)),
        cut(cap_b, own_value_indices(cap_b, ch, features)),
        ch,
    )
