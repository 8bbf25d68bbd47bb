"""The word-level vocabulary of the toy world, wrapped as a transformers ``CLIPTokenizer``.

Every word of the vocabulary is one token. ``CLIPTokenizer`` is a byte-pair encoder, so each
word gets a chain of merges that glues its letters back together (r+e, re+d</w>); the
intermediate pieces are in the vocabulary (the BPE model needs them) but never survive a
whole word. Words outside
the vocabulary come out as ``<|unk|>`` pieces. The tokenizer saves with ``save_pretrained``
(vocab.json, merges.txt) and reloads offline like Stable Diffusion's.
"""
from __future__ import annotations

from .world import ALL_TEXTURES, BACKGROUNDS, COLOURS, SHAPES, SIZES, TEXTURES, WORLD128

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
UNK = "<|unk|>"

# Words the captions use, then a few that prompts commonly carry (they map to their own,
# little-trained tokens rather than to the unknown token).
WORDS: tuple[str, ...] = tuple(dict.fromkeys(
    ("a", "and", "on", "background", "shape")
    + SIZES + tuple(COLOURS) + TEXTURES + SHAPES + tuple(BACKGROUNDS)
    + ("an", "the", "of", "with", "in", "photo", "picture", "image", "object", "gray",
       "colour", "color", "texture", "size")
    # toy128's words come last, so that every earlier word keeps its token and its merges.
    + ALL_TEXTURES + WORLD128.backdrops
))


def vocab() -> dict[str, int]:
    """Special tokens, the whole words, then the partial pieces that BPE needs to exist."""
    v = {BOS: 0, EOS: 1, UNK: 2}
    for w in WORDS:
        v[w + "</w>"] = len(v)
    for left, right in merges():
        for piece in (left, right):
            v.setdefault(piece, len(v))
    return v


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word as the tokenizer does it: lowest-ranked pair first."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def merges() -> list[tuple[str, str]]:
    """Merges that encode every word as one piece. Each word, in turn, is encoded with the
    merges so far and completed by new, lower-priority merges; a new merge never changes an
    earlier word, whose own merges always rank higher."""
    out: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for w in WORDS:
        pieces = _bpe(w, ranks)
        while len(pieces) > 1:
            m = (pieces[0], pieces[1])
            ranks[m] = len(out)
            out.append(m)
            pieces = _bpe(w, ranks)
    return out


def build_tokenizer(max_length: int = 77):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        vocab=vocab(), merges=merges(), bos_token=BOS, eos_token=EOS, pad_token=EOS,
        unk_token=UNK, model_max_length=max_length,
    )
