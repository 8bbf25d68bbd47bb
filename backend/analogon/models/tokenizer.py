"""Tokenizers built without downloads.

``byte_level_clip_tokenizer`` encodes any string with BOS/EOS and one token per byte (no
merges): enough for the tiny models. ``openai_clip_tokenizer`` rebuilds the exact CLIP BPE
tokenizer that Stable Diffusion uses from the BPE table that open_clip ships in its wheel,
for single-file checkpoints that come without tokenizer files.
"""
from __future__ import annotations

import functools
import gzip
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


@functools.lru_cache(maxsize=1)
def _byte_symbols() -> list[str]:
    # GPT-2/CLIP's reversible byte -> printable unicode table.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    table = {}
    n = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return [table[b] for b in range(256)]


def byte_level_clip_tokenizer(max_length: int = 77):
    from transformers import CLIPTokenizer

    vocab = {BOS: 0, EOS: 1}
    for s in _byte_symbols():
        vocab[s] = len(vocab)
    for s in _byte_symbols():
        vocab[s + "</w>"] = len(vocab)
    return CLIPTokenizer(
        vocab=vocab, merges=[], bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS,
        model_max_length=max_length,
    )


def _open_clip_bpe_path() -> Path:
    import open_clip

    p = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not p.exists():
        raise FileNotFoundError(p)
    return p


def openai_clip_tokenizer(pad_token: str = EOS, max_length: int = 77):
    """The CLIP ViT-L/14 (and OpenCLIP ViT-H) BPE tokenizer, from open_clip's bundled table."""
    from transformers import CLIPTokenizer

    lines = gzip.open(_open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    # CLIP numbers the byte symbols printable bytes first (as GPT-2's bytes_to_unicode lists them)
    table = _byte_symbols()
    printable = [b for b in range(256) if table[b] == chr(b)]
    symbols = [table[b] for b in printable] + [table[b] for b in range(256) if b not in printable]
    words = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {w: i for i, w in enumerate(words)}
    return CLIPTokenizer(
        vocab=vocab, merges=merges, bos_token=BOS, eos_token=EOS,
        pad_token=pad_token, unk_token=EOS, model_max_length=max_length,
    )
