"""Captions for images: the user's own words, a captioning model, or hard-prompt discovery.

Three sources, in order of precedence:

1. **User captions** always win: a caption typed in the panel is used as it is and no model
   is loaded for that image.
2. **A captioning model** from transformers: BLIP (``BlipForConditionalGeneration``) or BLIP-2
   (``Blip2ForConditionalGeneration``), chosen by the folder's/repo's ``config.json``; from a
   local folder or the Hugging Face cache (the network only when ``HF_HUB_OFFLINE`` is not
   set). Difference Inversion's paper captions with BLIP-2.
3. **PEZ** (Wen et al., "Hard prompts made easy", NeurIPS 2023): a prompt of ``n`` real
   vocabulary tokens optimised so that its CLIP text embedding matches the image's CLIP image
   embedding. Continuous embeddings are kept and updated, but the loss is always computed on
   their nearest vocabulary embeddings (cosine), and that gradient is applied to the
   continuous ones (straight-through). The best projected prompt seen is returned. PEZ's
   published defaults: 16 tokens, 3000 steps, AdamW lr 0.1, weight decay 0.1.

Captions are cached by (source, model, image SHA, settings) through the job cache.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError, ModelError

CAPTIONERS = ("user_only", "blip", "pez")
DEFAULT_CAPTION_MODEL = "Salesforce/blip2-opt-2.7b"


class Captioner(Protocol):
    """Anything that turns RGB(A) uint8 images into one caption each."""

    id: str

    def caption(self, images: Sequence[np.ndarray]) -> list[str]:
        ...


def _network_allowed() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes")


# -- BLIP / BLIP-2 ---------------------------------------------------------------------------

class BlipCaptioner:
    """A transformers BLIP or BLIP-2 captioning model from a hub id or a local folder."""

    def __init__(self, model: str = DEFAULT_CAPTION_MODEL, device="cpu", dtype=torch.float32,
                 max_new_tokens: int = 30):
        from transformers import AutoConfig, AutoProcessor

        self.id = f"blip:{model}"
        self.device, self.dtype = torch.device(device), dtype
        self.max_new_tokens = max_new_tokens
        folder = Path(os.path.expanduser(model))
        src = str(folder) if folder.is_dir() else model
        local_only = folder.is_dir() or not _network_allowed()
        if not folder.is_dir() and model.startswith(("/", ".", "~")):
            raise InputError("captioner_not_found", f"No captioning model folder at {folder}. "
                             "Type the captions yourself, or choose PEZ.")
        try:
            cfg = AutoConfig.from_pretrained(src, local_files_only=True)
        except OSError:
            if local_only:
                raise self._missing(model) from None
            try:
                cfg = AutoConfig.from_pretrained(src)
            except OSError:
                raise self._missing(model) from None
        kind = getattr(cfg, "model_type", "")
        if kind == "blip":
            from transformers import BlipForConditionalGeneration as cls
        elif kind == "blip-2":
            from transformers import Blip2ForConditionalGeneration as cls
        else:
            raise InputError("captioner_unsupported", f"{model} is a {kind or 'unknown'} model, "
                             "not a BLIP or BLIP-2 captioning model.", {"model": model})
        try:
            self.model = cls.from_pretrained(src, dtype=dtype, local_files_only=local_only)
            self.processor = AutoProcessor.from_pretrained(src, local_files_only=local_only)
        except OSError:
            raise self._missing(model) from None
        self.model.to(self.device).eval().requires_grad_(False)

    @staticmethod
    def _missing(model: str) -> ModelError:
        return ModelError(
            "captioner_not_available",
            f"The captioning model {model} is not on this computer, so A, A′ and B cannot be "
            "captioned automatically. Type the three captions in the panel (they always win), "
            "choose PEZ, or point 'Captioning model' at a local BLIP/BLIP-2 folder"
            + ("" if _network_allowed() else " (downloads are off: HF_HUB_OFFLINE is set)") + ".",
            {"model": model},
        )

    @torch.no_grad()
    def caption(self, images: Sequence[np.ndarray]) -> list[str]:
        from PIL import Image

        pil = [Image.fromarray(np.ascontiguousarray(np.asarray(i)[..., :3])) for i in images]
        inputs = self.processor(images=pil, return_tensors="pt").to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]


_BLIP_LOCK = threading.Lock()
_BLIP_WARM: dict[tuple, BlipCaptioner] = {}


def blip_captioner(model: str, device, dtype) -> BlipCaptioner:
    """A BLIP captioner, kept warm (one at a time)."""
    key = (model, str(device), str(dtype))
    with _BLIP_LOCK:
        if key in _BLIP_WARM:
            return _BLIP_WARM[key]
    cap = BlipCaptioner(model, device, dtype)
    with _BLIP_LOCK:
        _BLIP_WARM.clear()
        _BLIP_WARM[key] = cap
    return cap


# -- PEZ ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PezSettings:
    n_tokens: int = 16
    steps: int = 3000
    lr: float = 0.1
    weight_decay: float = 0.1
    seed: int = 0
    init: str = "random"  # "random": PEZ's own start; "similar": the words nearest the image
    tidy: bool = True  # order the words and leave out those that add nothing (see tidy_words)
    tidy_tolerance: float = 0.002


@dataclass
class PezResult:
    text: str
    ids: list[int]
    similarity: float  # cosine between the prompt's and the image's CLIP features
    history: list[float]


def pez_prompt(space, images: Sequence[np.ndarray], settings: PezSettings = PezSettings(),
               on_step: Callable[[int, int], None] | None = None) -> PezResult:
    """Hard-prompt discovery (PEZ) for ``images`` (one prompt for all of them) in ``space``."""
    target = F.normalize(space.image_features(images).to(space.device), dim=-1)
    table = space.token_embedding().weight.detach()
    cand = space.candidate_ids()
    vocab = table[cand].float()
    vocab_n = F.normalize(vocab, dim=-1)
    g = torch.Generator(device="cpu").manual_seed(settings.seed)
    if settings.init == "similar":
        start = nearest_words(space, target, cand, settings.n_tokens)
    else:
        start = cand[torch.randint(len(cand), (settings.n_tokens,), generator=g).to(cand.device)]
    soft = table[start].float().clone().requires_grad_(True)
    opt = torch.optim.AdamW([soft], lr=settings.lr, weight_decay=settings.weight_decay)
    best_sim, best_ids, history = -2.0, start.tolist(), []

    for step in range(settings.steps):
        with torch.no_grad():
            nearest = (F.normalize(soft, dim=-1) @ vocab_n.T).argmax(dim=-1)
        hard = vocab[nearest].clone().requires_grad_(True)
        feats = F.normalize(space.features_with_tokens("", hard), dim=-1)
        sim = (feats @ target.T).mean()
        loss = 1.0 - sim
        (grad,) = torch.autograd.grad(loss, [hard])
        opt.zero_grad(set_to_none=True)
        soft.grad = grad.to(soft.dtype)
        opt.step()
        s = float(sim.detach())
        history.append(s)
        if s > best_sim:
            best_sim, best_ids = s, cand[nearest].tolist()
        if on_step is not None:
            on_step(step + 1, settings.steps)
    text = space.decode(best_ids)
    if settings.tidy:
        tidied, sim = tidy_words(space, target, text.split(), settings.tidy_tolerance)
        if tidied != text:  # else the prompt's own similarity stands (no re-tokenised drift)
            text, best_sim = tidied, sim
    return PezResult(text, best_ids, best_sim, history)


@torch.no_grad()
def _similarity(space, target: torch.Tensor, texts: list[str], chunk: int = 256) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), chunk):
        f = F.normalize(space.text_features(texts[i:i + chunk]).to(target.device), dim=-1)
        out.append((f @ target.T).mean(dim=-1))
    return torch.cat(out)


@torch.no_grad()
def nearest_words(space, target: torch.Tensor, cand: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` candidate tokens whose one-word prompts are nearest the image (repeated in turn
    when there are fewer than ``n``): a start that already names what the image shows."""
    texts = [space.decode([int(i)]) for i in cand.tolist()]
    sim = _similarity(space, target, texts)
    top = torch.argsort(sim, descending=True)[:n].to(cand.device)
    reps = -(-n // max(1, len(top)))
    return cand[top].repeat(reps)[:n]


@torch.no_grad()
def tidy_words(space, target: torch.Tensor, ws: list[str], tol: float = 0.002
               ) -> tuple[str, float]:
    """A PEZ word bag as a caption: ordered greedily (each next word the one whose prefix reads
    nearest the image: the text tower is causal and position-aware, so order matters; PEZ's own
    order is kept where it reads nearer), then
    words left out one at a time while all that is left out costs less than ``tol`` of similarity
    (repeats and stray words go; words that carry the image stay). Returns (text, similarity)."""
    pool = list(ws)
    if not pool:
        return "", -2.0
    seq: list[str] = []
    while pool:
        uniq = list(dict.fromkeys(pool))
        sims = _similarity(space, target, [" ".join(seq + [w]) for w in uniq])
        w = uniq[int(sims.argmax())]
        seq.append(w)
        pool.remove(w)
    sims = _similarity(space, target, [" ".join(seq), " ".join(ws)])
    if float(sims[1]) > float(sims[0]):  # PEZ's own order reads better: keep it
        seq = list(ws)
    cur = float(sims.max())
    floor = cur - tol  # all the leaving-out together costs at most ``tol``
    while len(seq) > 1:
        trials = [seq[:i] + seq[i + 1:] for i in range(len(seq))]
        sims = _similarity(space, target, [" ".join(t) for t in trials])
        j = int(sims.argmax())
        if float(sims[j]) < floor:
            break
        seq, cur = trials[j], float(sims[j])
    return " ".join(seq), cur


class PezCaptioner:
    """PEZ hard prompts as captions, one image at a time."""

    def __init__(self, space, settings: PezSettings = PezSettings(),
                 on_step: Callable[[int, int], None] | None = None):
        self.space = space
        self.settings = settings
        self.on_step = on_step
        self.id = f"pez:{space.describe()}"

    def caption(self, images: Sequence[np.ndarray]) -> list[str]:
        return [pez_prompt(self.space, [img], self.settings, self.on_step).text for img in images]


# -- resolution with precedence and caching ------------------------------------------------------

def resolve_captions(
    user: dict[str, str],
    images: dict[str, tuple[np.ndarray, str]],
    kind: str,
    make_captioner: Callable[[], Captioner],
    cache=None,
    settings: dict | None = None,
    titles: dict[str, str] | None = None,
) -> tuple[dict[str, str], dict[str, str]]:
    """Captions for every role in ``images`` (role -> (rgba, sha)): the user's when given (not
    blank), else the captioner's (cached by captioner id, image SHA and ``settings``).

    Returns (captions, sources) where a source is "user", "cache" or the captioner's id.
    With ``kind == "user_only"`` a missing caption is an InputError naming the fields."""
    if kind not in CAPTIONERS:
        raise InputError("bad_captioner", f"Unknown captioner {kind!r}; one of {CAPTIONERS}.")
    titles = titles or {}
    captions: dict[str, str] = {}
    sources: dict[str, str] = {}
    todo = []
    for role in images:
        text = (user.get(role) or "").strip()
        if text:
            captions[role], sources[role] = text, "user"
        else:
            todo.append(role)
    if not todo:
        return captions, sources
    if kind == "user_only":
        names = ", ".join(titles.get(r, r) for r in todo)
        raise InputError("captions_missing", f"Type a caption for {names}, or choose a captioner "
                         "(BLIP or PEZ) to write them.", {"missing": todo})
    captioner: Captioner | None = None
    for role in todo:
        rgba, sha = images[role]
        key = None
        if cache is not None:
            key = cache.key("caption", kind, sha=sha, settings=settings or {})
            entry = cache.get_entry(key)
            if entry is not None and "caption" in entry[1]:
                captions[role], sources[role] = entry[1]["caption"], "cache"
                continue
        if captioner is None:
            captioner = make_captioner()
        text = captioner.caption([rgba])[0]
        captions[role], sources[role] = text, captioner.id
        if cache is not None and key is not None:
            cache.put(key, {"present": torch.ones(1)}, {"caption": text, "captioner": captioner.id})
    return captions, sources
