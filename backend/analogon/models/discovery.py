"""Finding the checkpoints a painter already has.

:func:`scan` looks in the folders it is given plus the usual places:

- this backend's own models folder (:func:`models_dir`; downloads go there),
- ComfyUI's ``models/checkpoints`` (and ``models/diffusers``),
- Automatic1111 / Forge's ``models/Stable-diffusion``,
- the Krita AI Diffusion plugin's managed server (``<Krita data>/ai_diffusion/server/ComfyUI``),
- the Hugging Face cache (diffusers pipelines and single files in its snapshots),

and lists every Stable Diffusion checkpoint with its family, read from the ``.safetensors``
header only (the JSON table of tensor names and shapes at the start of the file; the weights
are never read), its size, and the methods that can use it.

The variants told apart: SD 1.x, SD 2.x base (epsilon, 512) and v (v-prediction, 768),
SDXL base, SDXL refiner, and the inpainting models of each family (a UNet with 9 input
channels). SD 2.x base and v have the same tensors: the checkpoint's own metadata
(``modelspec.prediction_type`` or ``modelspec.architecture``) or a ``name.yaml`` beside it
decides, as the loader does (:func:`analogon.models.single_file.sd2_stated_prediction`);
without either the entry is ``sd2`` ("base or v: decided at load"): the loader probes the
UNet once (:mod:`analogon.models.prediction`). Which methods can use a variant is the methods'
own rule (:func:`analogon.methods.base.methods_for_variant`): the SDXL refiner is PIXELS' only.
"""
from __future__ import annotations

import json
import os
import struct
import sys
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

UNET = "model.diffusion_model."
CONV_IN = UNET + "input_blocks.0.0.weight"
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_DEPTH = 3

# the paper's own family comes first when a checkpoint is recommended for a method
PAPER_FAMILY = {"pixels": "sdxl", "appearance": "sd1", "dia": "sd1", "difference": "sd2"}

LABELS = {
    "sd1": "SD 1.x", "sd1-inpainting": "SD 1.x inpainting",
    "sd2-base": "SD 2.x base (512)", "sd2-v": "SD 2.x v (768)", "sd2-inpainting": "SD 2.x inpainting",
    "sd2": "SD 2.x (base or v: decided at load)",
    "sdxl": "SDXL", "sdxl-refiner": "SDXL refiner", "sdxl-inpainting": "SDXL inpainting",
    None: "unknown family",
}
WHY_NOT = {
    "inpainting": "an inpainting model (its UNet takes a mask and a masked image as well): "
                  "masked-latent conditioning is not built yet, so no method can use it; use "
                  "the base model of this family",
    "refiner": "the SDXL refiner: PIXELS only (one text encoder, trained for the last steps); "
               "the other methods need an SDXL base model",
}


@dataclass
class Checkpoint:
    id: str  # the model spec the backend loads: a file path, a folder, or a hub repo id
    name: str
    family: str | None  # sd1 | sd2 | sdxl (the loader's families) | None (not known)
    variant: str | None  # a key of LABELS
    label: str
    size_bytes: int
    source: str  # file | folder | hub
    location: str  # which of the usual places (or "configured")
    methods: list[str] = field(default_factory=list)
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# -- where to look ---------------------------------------------------------------------------

def data_dir() -> Path:
    """This application's per-user data folder (the installer's venv and the models live here)."""
    env = os.environ.get("ANALOGON_DATA_DIR")
    if env:
        return Path(env)
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local") / "analogon"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "analogon"
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "analogon"


def models_dir() -> Path:
    """Where downloaded models go (and are found): ``ANALOGON_MODELS_DIR`` or the data folder."""
    env = os.environ.get("ANALOGON_MODELS_DIR")
    return Path(env) if env else data_dir() / "models"


def krita_data_dir() -> Path:
    """Krita's per-user data folder (where its plugins keep their files)."""
    if sys.platform == "win32":
        return Path(os.environ.get("APPDATA") or Path.home() / "AppData" / "Roaming") / "krita"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "krita"
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "krita"


def hf_hub_cache() -> Path:
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(env)
    home = os.environ.get("HF_HOME")
    base = Path(home) if home else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return base / "hub"


def usual_places() -> list[tuple[str, Path]]:
    """(location name, folder) for the places painters keep checkpoints, existing or not."""
    home = Path.home()
    docs = home / "Documents"
    comfy_roots = [home / "ComfyUI", home / "comfyui", docs / "ComfyUI",
                   home / "ComfyUI_windows_portable" / "ComfyUI"]
    a1111_roots = [home / "stable-diffusion-webui", home / "stable-diffusion-webui-forge",
                   home / "sd.webui" / "webui", home / "stable-diffusion-webui-reForge"]
    out: list[tuple[str, Path]] = [("Analogon models", models_dir())]
    for root in comfy_roots:
        out += [("ComfyUI", root / "models" / "checkpoints"), ("ComfyUI", root / "models" / "diffusers")]
    for root in a1111_roots:
        out.append(("Automatic1111 / Forge", root / "models" / "Stable-diffusion"))
    kad = krita_data_dir() / "ai_diffusion" / "server" / "ComfyUI" / "models"
    out += [("Krita AI Diffusion", kad / "checkpoints"), ("Krita AI Diffusion", kad / "diffusers")]
    return out


def configured_dirs(extra: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """``extra`` (the server's --models-dir) and ``ANALOGON_MODEL_DIRS`` (os.pathsep-separated)."""
    env = [p for p in os.environ.get("ANALOGON_MODEL_DIRS", "").split(os.pathsep) if p.strip()]
    return [Path(os.path.expanduser(str(p))) for p in [*extra, *env]]


# -- reading one checkpoint -------------------------------------------------------------------

def read_safetensors_header(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensor name -> {dtype, shape, data_offsets}, metadata) from the file's header; reads
    the first 8 + N bytes only. Raises ValueError for a file that is not safetensors."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("too short for a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n <= 1 or n > MAX_HEADER_BYTES:
            raise ValueError(f"header length {n} is not plausible")
        raw = f.read(n)
    if len(raw) != n:
        raise ValueError("the header is cut short (still downloading?)")
    header = json.loads(raw.decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    return header, {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def _sd2_variant(path: Path | None, meta: dict[str, str]) -> str:
    """sd2-v / sd2-base when the metadata or a yaml says; ``sd2`` (decided at load) otherwise."""
    from .single_file import sd2_stated_prediction

    kind, _ = sd2_stated_prediction(path, meta)
    if kind is None:
        return "sd2"
    return "sd2-v" if kind == "v_prediction" else "sd2-base"


def classify_tensors(tensors: dict[str, Any], meta: dict[str, str] | None = None,
                     path: Path | None = None) -> tuple[str | None, str | None, str]:
    """(family, variant, note) from the tensor names and the UNet's input shape.
    (None, None, why) for files that are not a whole Stable Diffusion checkpoint."""
    meta = meta or {}
    keys = tensors.keys()
    if CONV_IN not in tensors:
        if any(k.startswith(("lora_", "lora_unet_", "lora_te")) or ".lora_" in k for k in keys):
            return None, None, "a LoRA, not a checkpoint"
        return None, None, "not a whole Stable Diffusion checkpoint (no UNet in the original layout)"
    shape = tensors[CONV_IN].get("shape") if isinstance(tensors[CONV_IN], dict) else None
    in_ch = int(shape[1]) if shape and len(shape) == 4 else 4
    inpainting = in_ch == 9
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    note = ""
    if has("conditioner.embedders.1.model."):
        family, variant = "sdxl", "sdxl"
    elif has("conditioner.embedders.0.model."):
        family, variant = "sdxl", "sdxl-refiner"
    elif has("cond_stage_model.model."):
        family = "sd2"
        variant = "sd2" if inpainting else _sd2_variant(path, meta)
        if variant == "sd2" and not inpainting:
            note = ("base (512, epsilon) or v (768): decided at load by a one-step probe of "
                    "the UNet; a name.yaml beside the file, or the prediction load option, "
                    "decides instead")
    elif has("cond_stage_model.transformer."):
        family, variant = "sd1", "sd1"
    else:
        return None, None, "no known text encoder inside (not SD 1.x, 2.x or SDXL)"
    if inpainting:
        variant = family + "-inpainting"
    elif in_ch != 4:
        return family, None, f"a UNet with {in_ch} input channels (an edit or depth model)"
    return family, variant, note


def methods_for(variant: str | None, method_ids: Iterable[str]) -> list[str]:
    if variant is None or variant.endswith("-inpainting") or variant == "unknown":
        return []
    from ..methods.base import methods_for_variant

    return methods_for_variant(variant, list(method_ids))


def _entry_note(variant: str | None, note: str, usable: list[str]) -> str:
    if variant == "sdxl-refiner":
        return WHY_NOT["refiner"]
    return note if usable else _why_unusable(variant, note)


def _why_unusable(variant: str | None, note: str) -> str:
    if variant and variant.endswith("-inpainting"):
        return WHY_NOT["inpainting"]
    if variant == "sdxl-refiner":
        return WHY_NOT["refiner"]
    return note


_CACHE: dict[tuple[str, int, int], tuple[str | None, str | None, str]] = {}
_CACHE_LOCK = threading.Lock()


def classify_file(path: Path) -> tuple[str | None, str | None, str]:
    """(family, variant, note) of one checkpoint file, from its header (cached by size and
    modification time). ``.ckpt`` files (pickles) have no header: family unknown."""
    st = path.stat()
    yaml = path.with_suffix(".yaml")
    key = (str(path), st.st_size, st.st_mtime_ns + (yaml.stat().st_mtime_ns if yaml.exists() else 0))
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
    if path.suffix.lower() == ".ckpt":
        out: tuple[str | None, str | None, str] = (
            None, "unknown", "a pickle checkpoint: its family is known once it is loaded "
            "(a .safetensors copy is listed faster and loads more safely)")
    else:
        try:
            tensors, meta = read_safetensors_header(path)
            out = classify_tensors(tensors, meta, path)
        except (OSError, ValueError, UnicodeDecodeError) as e:
            out = (None, None, f"cannot be read ({e})")
    with _CACHE_LOCK:
        _CACHE[key] = out
    return out


def _folder_entry(folder: Path, spec: str, name: str, location: str, source: str,
                  method_ids: list[str]) -> Checkpoint | None:
    """A diffusers folder (model_index.json), classified from its JSON configs."""
    from . import variant_from_diffusers_folder

    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        cls = str(index.get("_class_name", ""))
        json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
        if "StableDiffusion" not in cls:
            return None
        family, variant = variant_from_diffusers_folder(folder)
    except (OSError, ValueError):
        return None
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    usable = methods_for(variant, method_ids)
    return Checkpoint(spec, name, family, variant, LABELS.get(variant, variant), size, source, location,
                      usable, _entry_note(variant, "", usable))


def _walk(folder: Path, depth: int = 0) -> Iterable[Path]:
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return
    for p in entries:
        if p.name.startswith("."):
            continue
        if p.is_dir():
            if p.name.endswith(".config") and any(
                    p.with_name(p.name[:-len(".config")] + s).exists() for s in CHECKPOINT_SUFFIXES):
                continue  # a checkpoint's own config folder (no weights), not a model
            if (p / "model_index.json").exists():
                yield p
            elif depth < MAX_DEPTH and not p.name.endswith(".config"):
                yield from _walk(p, depth + 1)
        elif p.suffix.lower() in CHECKPOINT_SUFFIXES:
            yield p


def scan_folder(folder: Path, location: str, method_ids: list[str]) -> list[Checkpoint]:
    out = []
    for p in _walk(folder):
        if p.is_dir():
            entry = _folder_entry(p, str(p), p.name, location, "folder", method_ids)
            if entry is not None:
                out.append(entry)
            continue
        family, variant, note = classify_file(p)
        if variant is None and family is None and "LoRA" in note:
            continue  # LoRAs, VAEs and embeddings kept beside checkpoints are not models
        if variant is None and family is None and note.startswith("not a whole"):
            continue
        usable = methods_for(variant, method_ids) if variant != "unknown" else list(method_ids)
        out.append(Checkpoint(str(p), p.stem, family, variant, LABELS.get(variant, "unknown family"),
                              p.stat().st_size, "file", location, usable,
                              _entry_note(variant, note, usable)))
    return out


def scan_hf_cache(cache: Path, method_ids: list[str]) -> list[Checkpoint]:
    """Diffusers pipelines (listed by repo id) and top-level single files in the snapshots."""
    out = []
    try:
        repos = sorted(p for p in cache.iterdir() if p.name.startswith("models--"))
    except OSError:
        return out
    for repo in repos:
        repo_id = repo.name[len("models--"):].replace("--", "/")
        snaps = sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime, reverse=True)
        if not snaps:
            continue
        snap = snaps[0]
        if (snap / "model_index.json").exists():
            entry = _folder_entry(snap, repo_id, repo_id, "Hugging Face cache", "hub", method_ids)
            if entry is not None:
                entry.size_bytes = sum(p.stat().st_size for p in (repo / "blobs").glob("*") if p.is_file())
                out.append(entry)
            continue
        for f in sorted(snap.glob("*.safetensors")):
            try:
                family, variant, note = classify_file(f)
            except OSError:  # a dangling link: the blob is not there
                continue
            if family is None and variant is None:
                continue
            usable = methods_for(variant, method_ids)
            out.append(Checkpoint(str(f), f"{repo_id}/{f.name}", family, variant,
                                  LABELS.get(variant, "unknown family"), f.stat().st_size, "file",
                                  "Hugging Face cache", usable, _entry_note(variant, note, usable)))
    return out


def scan(extra_dirs: Iterable[str | os.PathLike] = (), method_ids: Iterable[str] | None = None,
         include_usual: bool = True, hf_cache: Path | None = None) -> list[Checkpoint]:
    """Every checkpoint in the configured folders and the usual places, each listed once
    (the first place that has it wins), usable ones first."""
    if method_ids is None:
        from ..methods import all_methods

        method_ids = [m.id for m in all_methods()]
    method_ids = list(method_ids)
    places = [("configured", d) for d in configured_dirs(extra_dirs)]
    if include_usual:
        places += usual_places()
    out: list[Checkpoint] = []
    seen: set[str] = set()
    for location, folder in places:
        if not folder.is_dir():
            continue
        for entry in scan_folder(folder, location, method_ids):
            real = os.path.realpath(entry.id)
            if real not in seen:
                seen.add(real)
                out.append(entry)
    if include_usual or hf_cache is not None:
        for entry in scan_hf_cache(hf_cache or hf_hub_cache(), method_ids):
            real = os.path.realpath(entry.id) if entry.source == "file" else entry.id
            if real not in seen:
                seen.add(real)
                out.append(entry)
    out.sort(key=lambda c: (not c.methods, c.name.lower()))
    return out


def recommended_for(method_id: str, checkpoints: list[Checkpoint]) -> Checkpoint | None:
    """The checkpoint to pre-select for a method: one of the paper's family if there is one,
    else the first usable one."""
    usable = [c for c in checkpoints if method_id in c.methods]
    paper = PAPER_FAMILY.get(method_id)
    for c in usable:
        if c.family == paper:
            return c
    return usable[0] if usable else None
