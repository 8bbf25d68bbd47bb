"""CLIP image and text embeddings in the space that matches a diffusion model's text encoder.

Difference Inversion measures the change A → A′ in CLIP space (image delta, text delta, their
slerp) and compares learned prompt tokens with it. The space must be the one the diffusion
model's text encoder lives in, so that a token learned for the UNet can also be read by the
CLIP text tower:

- SD 1.x: OpenAI CLIP ViT-L/14 (its text tower *is* SD 1.x's text encoder);
- SD 2.x: OpenCLIP ViT-H-14 (laion2b_s32b_b79k; SD 2.x uses its text tower without the last
  layer and without the projection);
- SDXL: the pair, CLIP ViT-L/14 for the first text encoder and OpenCLIP ViT-bigG-14
  (laion2b_s39b_b160k) for the second;
- a model folder that carries its own CLIP (a transformers ``CLIPModel`` in a ``clip/`` or
  ``image_encoder/`` subfolder, preprocessing from ``feature_extractor/``; the toy world's
  ``toy-sd`` does) uses it;
- the embedded tiny models get a tiny CLIP built in code around their own text encoders
  (random image tower): it proves the machinery, not meaning.

A :class:`ClipSpace` wraps either a transformers ``CLIPModel`` or an open_clip model behind one
interface: image features, text features, and the text tower run from *input token
embeddings* (:meth:`ClipSpace.features_with_tokens`) so that learned tokens can be measured.
Weights are read from a local folder or file or the Hugging Face cache; the network is used
only when ``HF_HUB_OFFLINE`` is not set, and a missing model is a readable error.
"""
from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError, ModelError
from .text_embeddings import ids_with_slots, run_text_encoder

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# The CLIP that matches each family's text encoder(s), in text-encoder order.
# ("hf", repo id) is a transformers CLIPModel; ("open_clip", name, pretrained tag).
FAMILY_CLIP: dict[str, list[tuple[str, ...]]] = {
    "sd1": [("hf", "openai/clip-vit-large-patch14")],
    "sd2": [("open_clip", "ViT-H-14", "laion2b_s32b_b79k")],
    "sdxl": [("hf", "openai/clip-vit-large-patch14"),
             ("open_clip", "ViT-bigG-14", "laion2b_s39b_b160k")],
}
OWN_CLIP_SUBFOLDERS = ("clip", "image_encoder")


# -- maths --------------------------------------------------------------------------------

def unit(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def slerp(a: torch.Tensor, b: torch.Tensor, alpha: float, eps: float = 1e-6) -> torch.Tensor:
    """Spherical interpolation between the *directions* of ``a`` and ``b`` (unit result).

    Eq. 4 of Difference Inversion: sin((1−α)θ)/sin θ · a + sin(αθ)/sin θ · b with θ the angle
    between them. Both are normalised first (the paper's "joint hypersphere"), so α = 0 gives
    a's direction and α = 1 b's. Nearly parallel vectors fall back to a normalised lerp."""
    a32, b32 = unit(a.float()), unit(b.float())
    dot = (a32 * b32).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    theta = torch.arccos(dot)
    sin = torch.sin(theta)
    if float(sin.abs().min()) < eps:
        out = (1.0 - alpha) * a32 + alpha * b32
    else:
        out = (torch.sin((1.0 - alpha) * theta) / sin) * a32 + (torch.sin(alpha * theta) / sin) * b32
    return unit(out)


# -- the space ------------------------------------------------------------------------------

class ClipSpace:
    """A CLIP model's joint image-text space. Subclasses provide the model specifics."""

    name: str = "clip"
    dim: int
    text_width: int
    vocab_size: int
    context_length: int = 77
    bos_id: int
    eot_id: int
    pad_id: int
    device: torch.device
    dtype: torch.dtype

    # -- to implement ------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:  # (N, L) long on device
        raise NotImplementedError

    def token_embedding(self) -> torch.nn.Embedding:
        raise NotImplementedError

    def text_features_from_embeds(self, embeds: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        """Projected text features (N, dim) from input token embeddings (N, L, W); differentiable."""
        raise NotImplementedError

    def _pixels(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        raise NotImplementedError

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------
    def eot_index(self, ids: torch.Tensor) -> torch.Tensor:
        """Index of the first end-of-text token in each row."""
        return (ids == self.eot_id).int().argmax(dim=-1)

    @torch.no_grad()
    def image_features(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(N, dim) float32 projected image features of RGB/RGBA uint8 images (not normalised)."""
        return self._image_features(self._pixels(images)).float()

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, dim) float32 projected text features (not normalised)."""
        ids = self.tokenize(texts)
        emb = self.token_embedding()(ids)
        return self.text_features_from_embeds(emb, self.eot_index(ids)).float()

    def features_with_tokens(self, text: str, extra: torch.Tensor | None) -> torch.Tensor:
        """(1, dim) float32 text features of ``text`` with the rows of ``extra`` (n, W) inserted
        as input embeddings after its words, before the end-of-text token. Differentiable in
        ``extra``. With ``extra`` None or empty it equals :meth:`text_features`."""
        ids = self.tokenize([text])[0]
        n = 0 if extra is None else int(extra.shape[0])
        new_ids, start, eot = ids_with_slots(ids, int(self.eot_index(ids[None])[0]), n, self.pad_id)
        emb = self.token_embedding()(new_ids[None])
        if n:
            emb = torch.cat([emb[:, :start], extra.to(emb.dtype)[None], emb[:, start + n:]], dim=1)
        return self.text_features_from_embeds(emb, torch.tensor([eot], device=emb.device)).float()

    def accepts(self, text_encoder) -> bool:
        """Whether this CLIP's text tower reads the input embeddings of ``text_encoder``
        (same vocabulary size and width: it is the same tower, or a fine-tune of it)."""
        from .text_embeddings import token_embedding

        emb = token_embedding(text_encoder)
        return emb.num_embeddings == self.vocab_size and emb.embedding_dim == self.text_width

    def match(self, text_encoder) -> int:
        """2: this CLIP's text tower has exactly ``text_encoder``'s token embeddings; 1: it
        :meth:`accepts` them; 0: it cannot read them."""
        from .text_embeddings import token_embedding

        if not self.accepts(text_encoder):
            return 0
        a = token_embedding(text_encoder).weight
        b = self.token_embedding().weight
        same = a.shape == b.shape and torch.equal(a.detach().to(b.device, b.dtype), b.detach())
        return 2 if same else 1

    def _vocab(self) -> dict[str, int]:
        return {}

    def candidate_ids(self, whole_words: bool = True) -> torch.Tensor:
        """Token ids a hard prompt may use: not the special tokens and, with ``whole_words``
        and a BPE vocabulary that marks word ends (``</w>``), only whole-word tokens (prompts
        then read as words rather than fragments)."""
        special = {self.bos_id, self.eot_id, self.pad_id}
        keep = [i for i in range(self.vocab_size) if i not in special]
        if whole_words:
            words = {i for tok, i in self._vocab().items() if tok.endswith("</w>")}
            if words:
                keep = [i for i in keep if i in words]
        return torch.tensor(keep, device=self.device)

    def describe(self) -> str:
        return self.name


def _prep_pixels(images: Sequence[np.ndarray], size: int, mean, std, device, dtype) -> torch.Tensor:
    """CLIP preprocessing in torch: shortest side to ``size`` (bicubic, antialiased), centre crop,
    normalise."""
    out = []
    for img in images:
        a = np.asarray(img)
        if a.ndim == 2:
            a = np.stack([a] * 3, -1)
        x = torch.from_numpy(np.ascontiguousarray(a[..., :3])).permute(2, 0, 1)[None].float() / 255.0
        h, w = x.shape[-2:]
        s = size / min(h, w)
        nh, nw = max(size, round(h * s)), max(size, round(w * s))
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[..., top:top + size, left:left + size].clamp(0, 1)
        out.append(x)
    x = torch.cat(out)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return ((x - m) / s).to(device=device, dtype=dtype)


class HFClipSpace(ClipSpace):
    """A transformers ``CLIPModel`` (text and image towers with projections)."""

    def __init__(self, model, tokenizer, name: str, image_size: int | None = None,
                 mean=OPENAI_MEAN, std=OPENAI_STD):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.dim = int(model.text_projection.out_features)
        emb = model.text_model.embeddings.token_embedding
        self.text_width, self.vocab_size = emb.embedding_dim, emb.num_embeddings
        self.context_length = int(model.config.text_config.max_position_embeddings)
        self.bos_id = int(tokenizer.bos_token_id)
        self.eot_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eot_id)
        self.image_size = int(image_size or model.config.vision_config.image_size)
        self.mean, self.std = tuple(mean), tuple(std)

    def tokenize(self, texts):
        ids = self.tokenizer(list(texts), padding="max_length", max_length=self.context_length,
                             truncation=True, return_tensors="pt").input_ids
        return ids.to(self.device)

    def token_embedding(self):
        return self.model.text_model.embeddings.token_embedding

    def text_features_from_embeds(self, embeds, eot):
        _, pooled = run_text_encoder(self.model, embeds.to(self.dtype), eot)
        return pooled

    def _pixels(self, images):
        return _prep_pixels(images, self.image_size, self.mean, self.std, self.device, self.dtype)

    def _image_features(self, pixels):
        out = self.model.get_image_features(pixel_values=pixels)
        return out if torch.is_tensor(out) else out.pooler_output

    def decode(self, ids):
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    def _vocab(self):
        try:
            return dict(self.tokenizer.get_vocab())
        except Exception:
            return {}


class OpenClipSpace(ClipSpace):
    """An open_clip ``CLIP`` model (or one with a ``TextTransformer`` text tower)."""

    def __init__(self, model, tokenizer, preprocess_cfg: dict | None, name: str):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.tower = getattr(model, "text", model)
        if getattr(self.tower, "cls_emb", None) is not None:
            raise ModelError("clip_unsupported", f"The open_clip model {name} pools its text "
                             "differently (CoCa-style) and cannot be used here.", status=400)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        emb = self.tower.token_embedding
        self.text_width, self.vocab_size = emb.embedding_dim, emb.num_embeddings
        self.context_length = int(self.tower.positional_embedding.shape[0])
        proj = self.tower.text_projection
        self.dim = int(proj.out_features if isinstance(proj, torch.nn.Linear) else proj.shape[1])
        sot = getattr(tokenizer, "sot_token_id", None)
        eot = getattr(tokenizer, "eot_token_id", None)
        ids = tokenizer([""])[0].tolist()
        self.bos_id = int(sot if sot is not None else ids[0])
        self.eot_id = int(eot if eot is not None else ids[1])
        self.pad_id = int(ids[-1]) if ids[-1] not in (self.bos_id, self.eot_id) else 0
        cfg = dict(preprocess_cfg or {})
        size = cfg.get("size", getattr(getattr(model, "visual", None), "image_size", 224))
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean = tuple(cfg.get("mean", OPENAI_MEAN))
        self.std = tuple(cfg.get("std", OPENAI_STD))

    def tokenize(self, texts):
        return self.tokenizer(list(texts)).to(self.device)

    def token_embedding(self):
        return self.tower.token_embedding

    def text_features_from_embeds(self, embeds, eot):
        tw = self.tower
        x = embeds.to(self.dtype) + tw.positional_embedding.to(self.dtype)
        mask = tw.attn_mask
        if mask is not None:
            mask = mask.to(x.dtype)
        x = tw.transformer(x, attn_mask=mask)
        x = tw.ln_final(x)
        pool = getattr(tw, "text_pool_type", getattr(tw, "pool_type", "argmax"))
        if pool not in ("argmax", "eos"):
            raise ModelError("clip_unsupported", f"The open_clip model {self.name} pools text "
                             f"with {pool!r}; only end-of-text pooling is supported.", status=400)
        eot = torch.as_tensor(eot, device=x.device).reshape(-1).expand(x.shape[0])
        pooled = x[torch.arange(x.shape[0], device=x.device), eot]
        proj = tw.text_projection
        if proj is None:
            return pooled
        return proj(pooled) if isinstance(proj, torch.nn.Linear) else pooled @ proj

    def _vocab(self):
        return dict(getattr(self.tokenizer, "encoder", {}) or {})

    def eot_index(self, ids):
        if self.eot_id == self.vocab_size - 1:  # open_clip's own rule: the highest id
            return ids.argmax(dim=-1)
        return super().eot_index(ids)

    def _pixels(self, images):
        return _prep_pixels(images, self.image_size, self.mean, self.std, self.device, self.dtype)

    def _image_features(self, pixels):
        return self.model.encode_image(pixels)

    def decode(self, ids):
        dec = getattr(self.tokenizer, "decode", None)
        if dec is None:
            raise ModelError("clip_unsupported", f"The tokenizer of {self.name} cannot decode.", status=400)
        ids = [int(i) for i in ids]
        if self.eot_id in ids:
            ids = ids[:ids.index(self.eot_id)]
        text = dec([i for i in ids if i != self.bos_id])
        for tag in ("<start_of_text>", "<end_of_text>", "<|startoftext|>", "<|endoftext|>"):
            text = text.replace(tag, " ")
        return " ".join(text.split())


# -- loading --------------------------------------------------------------------------------

_LOCK = threading.Lock()
_LOADED: OrderedDict[tuple, ClipSpace] = OrderedDict()
KEEP_WARM = 2


def _network_allowed() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes")


def _missing(what: str, how: str) -> ModelError:
    return ModelError(
        "clip_not_available",
        f"Difference Inversion needs the CLIP model {what} to measure the change between A and "
        f"A′, and it is not on this computer. {how} Or set 'CLIP model' to a local folder "
        "(a transformers CLIPModel or an open_clip folder with open_clip_config.json).",
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except Exception:
        return {}


def _hf_preprocess(folder: Path) -> dict:
    """Image size, mean, std from a CLIPImageProcessor config in ``folder`` (if any)."""
    for name in ("preprocessor_config.json",):
        cfg = _read_json(folder / name)
        if cfg:
            crop = cfg.get("crop_size") or cfg.get("size") or {}
            size = crop.get("height") if isinstance(crop, dict) else crop
            size = size or (cfg.get("size") or {}).get("shortest_edge")
            return {"image_size": size, "mean": cfg.get("image_mean", OPENAI_MEAN),
                    "std": cfg.get("image_std", OPENAI_STD)}
    return {}


def load_hf_clip(path_or_id: str, device, dtype, *, tokenizer_folder: Path | None = None,
                 preprocess_folder: Path | None = None, name: str | None = None) -> HFClipSpace:
    """A transformers CLIPModel from a local folder or a hub id (cache first)."""
    from transformers import CLIPModel, CLIPTokenizer

    folder = Path(os.path.expanduser(path_or_id))
    if folder.is_dir():
        src = str(folder)
        local_only = True
    else:
        src = path_or_id
        local_only = not _network_allowed()
    try:
        try:
            model = CLIPModel.from_pretrained(src, local_files_only=True, dtype=dtype)
        except OSError:
            if local_only:
                raise
            model = CLIPModel.from_pretrained(src, dtype=dtype)
        tok_src = str(tokenizer_folder) if tokenizer_folder else src
        tokenizer = CLIPTokenizer.from_pretrained(tok_src, local_files_only=local_only)
    except OSError:
        raise _missing(path_or_id, f"Download it once with `huggingface-cli download {path_or_id}`."
                       if not folder.is_dir() else "The folder has no CLIPModel or tokenizer.") from None
    pre: dict = {}
    if preprocess_folder is not None:
        pre = _hf_preprocess(preprocess_folder)
    elif folder.is_dir():
        pre = _hf_preprocess(folder)
    else:
        try:
            from huggingface_hub import hf_hub_download

            pre = _hf_preprocess(Path(hf_hub_download(path_or_id, "preprocessor_config.json",
                                                      local_files_only=True)).parent)
        except Exception:
            pre = {}
    model = model.to(device=device, dtype=dtype)
    return HFClipSpace(model, tokenizer, name or path_or_id, image_size=pre.get("image_size"),
                       mean=pre.get("mean", OPENAI_MEAN), std=pre.get("std", OPENAI_STD))


def _open_clip_weights(name: str, tag: str) -> str:
    """A local weights file for an open_clip name + pretrained tag, from the hub cache (or the
    network when allowed)."""
    import open_clip
    from huggingface_hub import hf_hub_download

    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        raise InputError("clip_unknown", f"open_clip has no pretrained weights {tag!r} for {name}.",
                         {"model": name, "pretrained": tag})
    if cfg.get("file"):
        return cfg["file"]
    hub = cfg.get("hf_hub", "")
    if not hub:
        raise _missing(f"{name} ({tag})", "Its weights are only available by URL; download "
                       "them and give the file as 'CLIP weights'.")
    repo, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
    names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    for local_only in ((True, False) if _network_allowed() else (True,)):
        for fn in names:
            try:
                return hf_hub_download(repo, fn, local_files_only=local_only)
            except Exception:
                continue
    raise _missing(f"{name} ({tag})",
                   f"Download it once with `huggingface-cli download {repo} {names[0]}`.")


def load_open_clip(name: str, pretrained: str, device, dtype) -> OpenClipSpace:
    """An open_clip model: ``name`` a built-in/registered config with ``pretrained`` a tag or a
    weights file, or a folder (``local-dir:``) with open_clip_config.json and weights."""
    import open_clip

    folder = Path(os.path.expanduser(name.removeprefix("local-dir:")))
    if folder.is_dir():
        spec = "local-dir:" + str(folder)
        model, _, _ = open_clip.create_model_and_transforms(spec, device="cpu")
        tokenizer = open_clip.get_tokenizer(spec)
        pre = _read_json(folder / "open_clip_config.json").get("preprocess_cfg", {})
        label = str(folder)
    else:
        if name not in open_clip.list_models():
            raise InputError("clip_unknown", f"open_clip has no model called {name!r}.", {"model": name})
        if pretrained and Path(os.path.expanduser(pretrained)).is_file():
            weights = os.path.expanduser(pretrained)
        elif pretrained:
            weights = _open_clip_weights(name, pretrained)
        else:
            raise InputError("clip_no_weights", f"Give the weights for the CLIP model {name} "
                             "('CLIP weights': a pretrained tag or a file).", {"model": name})
        model, _, _ = open_clip.create_model_and_transforms(name, pretrained=weights, device="cpu")
        tokenizer = open_clip.get_tokenizer(name)
        pre = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
        label = f"{name} ({pretrained})"
    model = model.to(device=device, dtype=dtype)
    return OpenClipSpace(model, tokenizer, pre, label)


def load_clip_space(spec: str, pretrained: str = "", device="cpu", dtype=torch.float32) -> ClipSpace:
    """One CLIP space from a user spec (kept warm):

    - a folder: open_clip when it has ``open_clip_config.json``, else a transformers CLIPModel;
    - an open_clip model name (``ViT-H-14``) with ``pretrained`` a tag or a weights file;
    - a hub id ``org/name``: a transformers CLIPModel from the local cache."""
    key = (spec, pretrained, str(device), str(dtype))
    with _LOCK:
        if key in _LOADED:
            _LOADED.move_to_end(key)
            return _LOADED[key]
    path = Path(os.path.expanduser(spec.removeprefix("local-dir:")))
    if path.is_dir():
        if (path / "open_clip_config.json").exists():
            space: ClipSpace = load_open_clip(str(path), "", device, dtype)
        elif (path / "config.json").exists():
            space = load_hf_clip(str(path), device, dtype)
        else:
            raise InputError("clip_not_a_model", f"{path} is a folder but holds no CLIP model "
                             "(no open_clip_config.json or config.json).")
    elif spec.startswith(("/", ".", "~")):
        raise InputError("clip_not_found", f"No CLIP model folder at {path}.")
    else:
        try:
            import open_clip

            is_open_clip = spec in open_clip.list_models()
        except ImportError:  # pragma: no cover - open_clip is a dependency
            is_open_clip = False
        if is_open_clip:
            space = load_open_clip(spec, pretrained, device, dtype)
        elif spec.count("/") == 1:
            space = load_hf_clip(spec, device, dtype)
        else:
            raise InputError("clip_unknown", f"{spec!r} is neither a folder, an open_clip model "
                             "name nor a Hugging Face id.")
    with _LOCK:
        _LOADED[key] = space
        while len(_LOADED) > KEEP_WARM:
            _LOADED.popitem(last=False)
    return space


# -- the space that matches a bundle ------------------------------------------------------------

def model_folder(bundle) -> Path | None:
    """The diffusers folder a bundle was loaded from (local, hub snapshot or toy-sd), if any."""
    name = getattr(getattr(bundle.pipe, "config", None), "_name_or_path", None)
    if name and Path(str(name)).is_dir():
        return Path(str(name))
    if bundle.spec and Path(os.path.expanduser(bundle.spec)).is_dir():
        return Path(os.path.expanduser(bundle.spec))
    return None


def own_clip(bundle) -> ClipSpace | None:
    """The CLIP a model folder carries (``clip/`` or ``image_encoder/`` holding a full
    transformers CLIPModel; tokenizer from ``tokenizer/``, preprocessing from
    ``feature_extractor/`` when they are not in the subfolder itself)."""
    folder = model_folder(bundle)
    if folder is None:
        return None
    for sub in OWN_CLIP_SUBFOLDERS:
        d = folder / sub
        cfg = _read_json(d / "config.json")
        if cfg.get("model_type") != "clip":
            continue
        tok = d if (d / "vocab.json").exists() or (d / "tokenizer.json").exists() else folder / "tokenizer"
        pre = d if (d / "preprocessor_config.json").exists() else folder / "feature_extractor"
        key = ("own", str(d), str(bundle.device), str(bundle.dtype))
        with _LOCK:
            if key in _LOADED:
                return _LOADED[key]
        space = load_hf_clip(str(d), bundle.device, bundle.dtype, tokenizer_folder=tok,
                             preprocess_folder=pre if pre.exists() else None,
                             name=f"{bundle.spec} ({sub})")
        with _LOCK:
            _LOADED[key] = space
        return space
    return None


def clip_around_text_encoder(text_encoder, tokenizer, seed: int = 0, image_size: int = 32,
                             name: str = "tiny CLIP") -> HFClipSpace:
    """A CLIPModel whose text tower is a copy of ``text_encoder`` (and its projection, when it
    has one) and whose image tower is small and random: a stand-in for tests and the embedded
    tiny models, whose text encoders come without an image tower."""
    from transformers import CLIPConfig, CLIPModel

    from .text_embeddings import _core

    tcfg = text_encoder.config
    has_proj = getattr(text_encoder, "text_projection", None) is not None
    proj_dim = int(tcfg.projection_dim) if has_proj else int(tcfg.hidden_size)
    vision = dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, projection_dim=proj_dim,
                  hidden_act="quick_gelu")
    text = tcfg.to_dict()
    text["projection_dim"] = proj_dim
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=proj_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(cfg)
    model.text_model.load_state_dict(_core(text_encoder).state_dict())
    if has_proj:
        model.text_projection.load_state_dict(text_encoder.text_projection.state_dict())
    p = next(text_encoder.parameters())
    model = model.to(device=p.device, dtype=p.dtype)
    return HFClipSpace(model, tokenizer, name)


def _tiny_clips(bundle) -> list[ClipSpace]:
    from .text_embeddings import encoders

    spaces = bundle.info.get("_tiny_clip_spaces")
    if spaces is None:
        spaces = [clip_around_text_encoder(te, tok, seed=1000 + i, name=f"{bundle.spec} tiny CLIP {i + 1}")
                  for i, (tok, te) in enumerate(encoders(bundle))]
        bundle.info["_tiny_clip_spaces"] = spaces
    return spaces


def _family_clip(entry: tuple[str, ...], device, dtype) -> ClipSpace:
    if entry[0] == "hf":
        return load_clip_space(entry[1], "", device, dtype)
    return load_clip_space(entry[1], entry[2], device, dtype)


def clip_spaces_for(bundle, choice: str = "auto", pretrained: str = "") -> list[ClipSpace | None]:
    """One CLIP space per text encoder of ``bundle`` (None where no given space reads that
    encoder's token embeddings). ``choice`` "auto": ``bundle.info['clip_spaces']`` when set (an
    injection point), else the CLIP the model folder carries, else the tiny CLIP of an embedded
    tiny model, else the family's CLIP (:data:`FAMILY_CLIP`). Anything else is a user spec for
    :func:`load_clip_space`. Raises InputError when no text encoder is matched."""
    from .text_embeddings import encoders

    encs = encoders(bundle)
    if choice == "auto":
        injected = bundle.info.get("clip_spaces")
        if injected:
            candidates = list(injected)
        else:
            own = own_clip(bundle)
            if own is not None:
                candidates = [own]
            elif bundle.spec in ("tiny-sd", "tiny-sdxl"):
                candidates = _tiny_clips(bundle)
            else:
                entries = FAMILY_CLIP[bundle.family]
                out: list[ClipSpace | None] = []
                for (tok, te), entry in zip(encs, entries):
                    space = _family_clip(entry, bundle.device, bundle.dtype)
                    out.append(space if space.accepts(te) else None)
                if not any(out):
                    raise _mismatch(bundle, [s for s in out if s])
                return out
    else:
        candidates = [load_clip_space(choice, pretrained, bundle.device, bundle.dtype)]
    out = []
    for _, te in encs:
        scored = [(c.match(te), -i, c) for i, c in enumerate(candidates)]
        best = max(scored, key=lambda x: x[:2]) if scored else (0, 0, None)
        out.append(best[2] if best[0] > 0 else None)
    if not any(out):
        raise _mismatch(bundle, candidates)
    return out


def _mismatch(bundle, candidates) -> InputError:
    names = ", ".join(c.describe() for c in candidates) or "none"
    return InputError(
        "clip_mismatch",
        f"The CLIP model ({names}) does not read this model's text encoder (different vocabulary "
        "or width), so the learned tokens cannot be measured in its space. Use 'auto', or the "
        "CLIP whose text tower the model uses (ViT-L/14 for SD 1.x, OpenCLIP ViT-H-14 for SD 2.x, "
        "ViT-L/14 + ViT-bigG-14 for SDXL).",
        {"model": bundle.spec},
    )


def tiny_open_clip(embed_dim: int = 16, width: int = 32, image_size: int = 32, seed: int = 0,
                   name: str = "analogon-tiny-clip") -> OpenClipSpace:
    """A tiny open_clip model with random weights, built offline (a config registered with
    ``open_clip.add_model_config`` and ``pretrained=None``); for tests and benchmarks."""
    import tempfile

    import open_clip

    if name not in open_clip.list_models():
        d = Path(tempfile.mkdtemp(prefix="analogon-openclip-"))
        cfg = {"embed_dim": embed_dim,
               "vision_cfg": {"image_size": image_size, "layers": 1, "width": 32, "patch_size": 8,
                              "head_width": 16},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": width, "heads": 2,
                            "layers": 2}}
        (d / f"{name}.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(d)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(name, pretrained=None)
    return OpenClipSpace(model, open_clip.get_tokenizer(name), {"size": image_size}, name)
