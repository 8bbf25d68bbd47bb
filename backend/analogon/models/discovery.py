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
decides, as the loader does (:func:`analogon.models.checkpoint_header.sd2_stated_prediction`);
without either the entry is ``sd2`` ("base or v: decided at load"): the loader probes the
UNet once (:mod:`analogon.models.prediction`). Which methods can use a variant is the methods'
own rule (:func:`analogon.methods.base.methods_for_variant`): the SDXL refiner is PIXELS' only.

The folders are treated as hostile: any file system can hold links to a drive that is not
mounted, link loops, FIFOs and devices named ``*.safetensors``, headers of any size and JSON of
any shape. Only regular files are opened (:mod:`analogon.models.checkpoint_header`); whatever
reading a file raises makes that entry "cannot be read (reason)"; links that lead nowhere, link
loops and things that are not files are skipped, each with its reason (:class:`Skipped`). A
scan has a :class:`Budget` (time, files and folders looked at, entries listed) and, when it
runs out, answers with what it found and a note. The server scans off the request path
(:class:`Scanner`): at start, when a searched folder changes and when asked; a request reads the
last result. Results per file are cached by size and modification time, at most
:data:`CACHE_ENTRIES` of them (least recently used first out).
"""
from __future__ import annotations

import logging
import os
import stat
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable

from .checkpoint_header import (
    UnreadableFile, kind_of, read_json_object, read_safetensors_header, reason, regular_file_stat,
    sd2_stated_prediction,
)

log = logging.getLogger(__name__)

UNET = "model.diffusion_model."
CONV_IN = UNET + "input_blocks.0.0.weight"
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
MAX_DEPTH = 3  # folders below a searched folder
UNREADABLE = "cannot be read"  # how the note of an entry that cannot be read begins
CACHE_ENTRIES = 4096  # per-file results kept (each a few hundred bytes)
MAX_SKIPPED_SHOWN = 200  # skipped paths listed in a result (all are counted)
MAX_WATCHED_FOLDERS = 4096  # folders whose modification time tells the scanner to scan again

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

def _sd2_variant(path: Path | None, meta: dict[str, str]) -> str:
    """sd2-v / sd2-base when the metadata or a yaml says; ``sd2`` (decided at load) otherwise."""
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


Classified = tuple[str | None, str | None, str]  # (family, variant, note)


def _unreadable(exc: BaseException) -> Classified:
    return None, None, f"{UNREADABLE} ({reason(exc)})"


class ResultCache:
    """The last ``size`` results, least recently used first out; thread-safe."""

    def __init__(self, size: int = CACHE_ENTRIES):
        self.size = size
        self._items: OrderedDict[Hashable, Classified] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Classified | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Hashable, value: Classified) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


_CACHE = ResultCache()


def _mtime_ns(path: Path) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except (OSError, ValueError):
        return 0


def classify_file(path: Path) -> Classified:
    """(family, variant, note) of one checkpoint file, from its header (cached by size and
    modification time). ``.ckpt`` files (pickles) have no header: family unknown. Never raises:
    a file that cannot be read is (None, None, "cannot be read (reason)")."""
    try:
        return _classify(Path(path), regular_file_stat(path))
    except Exception as e:  # not a file, a link to nothing, a loop, ...
        return _unreadable(e)


def _classify(path: Path, st: os.stat_result) -> Classified:
    """:func:`classify_file` of a path already known to be a regular file (``st``)."""
    key = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, _mtime_ns(path.with_suffix(".yaml")))
    cached = _CACHE.get(key)
    if cached is not None:
        return cached
    if path.suffix.lower() == ".ckpt":
        out: Classified = (None, "unknown", "a pickle checkpoint: its family is known once it is loaded "
                                            "(a .safetensors copy is listed faster and loads more safely)")
    else:
        try:
            tensors, meta = read_safetensors_header(path)
            out = classify_tensors(tensors, meta, path)
        except Exception as e:  # whatever the file holds, it is this entry's note, never the scan's end
            out = _unreadable(e)
    _CACHE.put(key, out)
    return out


# -- a scan --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Budget:
    """What one scan may spend before it answers with what it has."""

    seconds: float = 20.0
    entries: int = 200_000  # files and folders looked at
    listed: int = 2_000  # checkpoints listed
    unreadable: int = 200  # files that cannot be read, listed (the rest are counted)


@dataclass
class Skipped:
    path: str
    reason: str


@dataclass
class ScanResult:
    checkpoints: list[Checkpoint]
    searched: list[str]  # the folders searched
    skipped: list[Skipped]  # the first MAX_SKIPPED_SHOWN
    skipped_total: int
    notes: list[str]
    complete: bool  # False: the budget ran out first
    seconds: float
    finished_at: float  # time.time()
    watched: dict[str, int | None] = field(default_factory=dict, repr=False)  # folder -> mtime (None: absent)

    def to_json(self) -> dict[str, Any]:
        return {"complete": self.complete, "seconds": round(self.seconds, 3), "finished_at": self.finished_at,
                "notes": list(self.notes), "skipped": [asdict(s) for s in self.skipped],
                "skipped_total": self.skipped_total}


FileKey = tuple[int, int]  # (st_dev, st_ino): the same file or folder however it is reached


class _Scan:
    """One scan's walk: what it found, what it skipped and why, and its budget."""

    def __init__(self, method_ids: list[str], budget: Budget, stop: threading.Event | None = None):
        self.method_ids = method_ids
        self.budget = budget
        self.stop = stop
        self.t0 = time.monotonic()
        self.looked = 0
        self.stopped: str | None = None  # why the scan ended before it was complete
        self.checkpoints: list[Checkpoint] = []
        self.listed = {"readable": 0, "unreadable": 0}
        self.unlisted = {"readable": 0, "unreadable": 0}
        self.skipped: list[Skipped] = []
        self.skipped_total = 0
        self.listed_keys: set[FileKey] = set()
        self.walked: set[FileKey] = set()
        self.searched: list[str] = []
        self.watched: dict[str, int | None] = {}

    # -- budget and bookkeeping
    def out_of_budget(self) -> bool:
        if self.stopped is None:
            if self.stop is not None and self.stop.is_set():
                self.stopped = "it was stopped"
            elif time.monotonic() - self.t0 > self.budget.seconds:
                self.stopped = f"its time budget of {self.budget.seconds:g} s ran out"
            elif self.looked >= self.budget.entries:
                self.stopped = f"it looked at {self.looked:,} files and folders, its budget"
        return self.stopped is not None

    def skip(self, path: str | Path, why: str) -> None:
        self.skipped_total += 1
        if len(self.skipped) < MAX_SKIPPED_SHOWN:
            self.skipped.append(Skipped(str(path), why))

    def watch(self, folder: Path, st: os.stat_result | None) -> None:
        if len(self.watched) < MAX_WATCHED_FOLDERS:
            self.watched[str(folder)] = st.st_mtime_ns if st is not None else None

    def add(self, entry: Checkpoint, key: FileKey) -> None:
        kind = "unreadable" if entry.note.startswith(UNREADABLE) else "readable"
        if self.listed[kind] >= (self.budget.unreadable if kind == "unreadable" else self.budget.listed):
            self.unlisted[kind] += 1
            return
        self.listed[kind] += 1
        self.listed_keys.add(key)
        self.checkpoints.append(entry)

    def listdir(self, folder: Path) -> list[os.DirEntry] | None:
        """The folder's entries by name, each counted against the budget; None (skipped, with
        the reason) when it cannot be listed."""
        entries = []
        try:
            with os.scandir(folder) as it:
                for e in it:
                    self.looked += 1
                    if self.out_of_budget():
                        break
                    entries.append(e)
        except OSError as e:
            self.skip(folder, reason(e))
            return None
        return sorted(entries, key=lambda e: e.name)

    # -- places
    def place(self, location: str, folder: Path, configured: bool = False) -> None:
        """One of the places to search; a configured one is reported when it is not there."""
        try:
            st = os.stat(folder)
        except (OSError, ValueError) as e:
            self.watch(folder, None)  # so that creating it starts a scan
            if configured or os.path.islink(folder):
                self.skip(folder, reason(e) if os.path.islink(folder) else "no such folder")
            return
        if not stat.S_ISDIR(st.st_mode):
            if configured:
                self.skip(folder, f"{kind_of(st.st_mode)}, not a folder")
            return
        if not configured:
            self.searched.append(str(folder))
        self.walk(folder, st, location, 0, frozenset())

    def walk(self, folder: Path, st: os.stat_result, location: str, depth: int,
             ancestors: frozenset[FileKey]) -> None:
        key = (st.st_dev, st.st_ino)
        if key in ancestors:
            self.skip(folder, "a link loop (it leads back to a folder above it)")
            return
        if key in self.walked:  # the same folder reached again (linked from two places)
            return
        self.walked.add(key)
        self.watch(folder, st)
        entries = self.listdir(folder)
        if entries is None:
            return
        names = {e.name for e in entries}
        ancestors = ancestors | {key}
        for e in entries:
            if self.out_of_budget():
                return
            if e.name.startswith("."):
                continue
            checkpoint_name = os.path.splitext(e.name)[1].lower() in CHECKPOINT_SUFFIXES
            if not (checkpoint_name or e.is_symlink() or e.is_dir(follow_symlinks=False)):
                continue  # a plain file of another kind (an image, a text): not a model, not odd
            path = Path(e.path)
            try:
                est = os.stat(path)
            except (OSError, ValueError) as err:
                self.skip(path, reason(err))
                continue
            if stat.S_ISDIR(est.st_mode):
                self.folder(path, est, names, location, depth, ancestors)
            elif not checkpoint_name:
                continue  # a link to a file of another kind
            elif stat.S_ISREG(est.st_mode):
                self.file(path, est, location)
            else:
                self.skip(path, f"{kind_of(est.st_mode)}, not a file")

    def folder(self, path: Path, st: os.stat_result, sibling_names: set[str], location: str, depth: int,
               ancestors: frozenset[FileKey]) -> None:
        name = path.name
        if name.endswith(".config") and any(name[:-len(".config")] + s in sibling_names
                                            for s in CHECKPOINT_SUFFIXES):
            return  # a checkpoint's own config folder (no weights), not a model
        if os.path.lexists(path / "model_index.json"):
            self.diffusers_folder(path, st, str(path), name, location, "folder", size_of=path)
        elif depth < MAX_DEPTH and not name.endswith(".config"):
            self.walk(path, st, location, depth + 1, ancestors)

    # -- what is listed
    def file(self, path: Path, st: os.stat_result, location: str) -> None:
        key = (st.st_dev, st.st_ino)
        if key in self.listed_keys:
            return
        family, variant, note = _classify(path, st)
        if family is None and variant is None and ("LoRA" in note or note.startswith("not a whole")):
            return  # LoRAs, VAEs and embeddings kept beside checkpoints are not models
        usable = methods_for(variant, self.method_ids) if variant != "unknown" else list(self.method_ids)
        self.add(Checkpoint(str(path), path.stem, family, variant, LABELS.get(variant, "unknown family"),
                            st.st_size, "file", location, usable, _entry_note(variant, note, usable)), key)

    def diffusers_folder(self, folder: Path, st: os.stat_result, spec: str, name: str, location: str,
                         source: str, size_of: Path) -> None:
        """A diffusers folder (model_index.json), classified from its JSON configs."""
        from . import FOLDER_CONFIGS, variant_from_configs

        key = (st.st_dev, st.st_ino)
        if key in self.listed_keys:
            return
        try:
            index = read_json_object(folder / "model_index.json")
            cls = index.get("_class_name")
            if not isinstance(cls, str):
                raise UnreadableFile("model_index.json names no pipeline class")
            if "StableDiffusion" not in cls:
                return  # another kind of model
            configs = {FOLDER_CONFIGS[0]: index}
            for config in FOLDER_CONFIGS[1:]:
                if os.path.lexists(folder / config):
                    configs[config] = read_json_object(folder / config, config)
            if FOLDER_CONFIGS[1] not in configs:
                raise UnreadableFile(f"it has no {FOLDER_CONFIGS[1]}")
            try:
                family, variant = variant_from_configs(configs)
            except Exception as e:
                raise UnreadableFile(f"a config holds a value of the wrong kind: {reason(e)}") from None
        except Exception as e:  # any config of any shape: this entry's note
            family, variant, note = _unreadable(e)
            self.add(Checkpoint(spec, name, None, None, LABELS[None], 0, source, location, [], note), key)
            return
        usable = methods_for(variant, self.method_ids)
        self.add(Checkpoint(spec, name, family, variant, LABELS.get(variant, variant), self.tree_size(size_of),
                            source, location, usable, _entry_note(variant, "", usable)), key)

    def tree_size(self, root: Path, max_depth: int = 4) -> int:
        """The bytes of the regular files under ``root`` (links followed, each folder once)."""
        total = 0
        stack, seen = ([(root, 0)] if os.path.isdir(root) else []), set()
        while stack:
            folder, depth = stack.pop()
            for e in self.listdir(folder) or ():
                try:
                    st = e.stat()
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    total += st.st_size
                elif stat.S_ISDIR(st.st_mode) and depth < max_depth and (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    stack.append((Path(e.path), depth + 1))
        return total

    # -- the Hugging Face cache
    def hf_cache(self, cache: Path) -> None:
        """Diffusers pipelines (listed by repo id) and top-level single files in the snapshots."""
        self.searched.append(str(cache))
        try:
            st = os.stat(cache)
        except (OSError, ValueError):
            self.watch(cache, None)
            return
        if not stat.S_ISDIR(st.st_mode):
            return
        self.watch(cache, st)
        for e in self.listdir(cache) or ():
            if self.out_of_budget():
                return
            if e.name.startswith("models--"):
                self.hf_repo(Path(e.path), e.name[len("models--"):].replace("--", "/"))

    def hf_repo(self, repo: Path, repo_id: str) -> None:
        if not os.path.isdir(repo / "snapshots"):
            return  # a repo whose download never began
        snapshots = []
        for e in self.listdir(repo / "snapshots") or ():
            try:
                st = os.stat(e.path)
            except (OSError, ValueError) as err:
                self.skip(e.path, reason(err))
                continue
            if stat.S_ISDIR(st.st_mode):
                snapshots.append((st.st_mtime_ns, e.name, st))
        if not snapshots:
            return
        _, name, st = max(snapshots)
        snap = repo / "snapshots" / name
        if os.path.lexists(snap / "model_index.json"):
            self.diffusers_folder(snap, st, repo_id, repo_id, "Hugging Face cache", "hub", size_of=repo / "blobs")
            return
        for e in self.listdir(snap) or ():
            if not e.name.endswith(".safetensors"):
                continue
            path = Path(e.path)
            try:
                fst = regular_file_stat(path)
            except Exception as err:  # a link to a blob that is not there (an unfinished download)
                self.skip(path, reason(err))
                continue
            family, variant, note = _classify(path, fst)
            if family is None and variant is None:
                if note.startswith(UNREADABLE):
                    self.skip(path, note)
                continue
            usable = methods_for(variant, self.method_ids)
            self.add(Checkpoint(str(path), f"{repo_id}/{e.name}", family, variant,
                                LABELS.get(variant, "unknown family"), fst.st_size, "file",
                                "Hugging Face cache", usable, _entry_note(variant, note, usable)),
                     (fst.st_dev, fst.st_ino))

    def result(self) -> ScanResult:
        notes = []
        if self.stopped:
            notes.append(f"The scan stopped before it was complete: {self.stopped}. What it found "
                         "until then is listed.")
        if self.unlisted["readable"]:
            notes.append(f"{self.unlisted['readable']:,} more checkpoints were found and are not listed "
                         f"(at most {self.budget.listed:,} are).")
        if self.unlisted["unreadable"]:
            notes.append(f"{self.unlisted['unreadable']:,} more files that cannot be read are not listed.")
        self.checkpoints.sort(key=lambda c: (not c.methods, c.name.lower()))
        return ScanResult(self.checkpoints, self.searched, self.skipped, self.skipped_total, notes,
                          self.stopped is None, time.monotonic() - self.t0, time.time(), self.watched)


def run_scan(extra_dirs: Iterable[str | os.PathLike] = (), method_ids: Iterable[str] | None = None,
             include_usual: bool = True, hf_cache: Path | None = None, budget: Budget | None = None,
             stop: threading.Event | None = None) -> ScanResult:
    """Every checkpoint in the configured folders and the usual places, each listed once
    (the first place that has it wins), usable ones first; what was skipped and why. A set
    ``stop`` ends the scan as its budget would."""
    if method_ids is None:
        from ..methods import all_methods

        method_ids = [m.id for m in all_methods()]
    scan = _Scan(list(method_ids), budget or Budget(), stop)
    for folder in configured_dirs(extra_dirs):
        scan.searched.append(str(folder))
        scan.place("configured", folder, configured=True)
    if include_usual:
        for location, folder in usual_places():
            scan.place(location, folder)
    if include_usual or hf_cache is not None:
        scan.hf_cache(hf_cache or hf_hub_cache())
    return scan.result()


def scan(extra_dirs: Iterable[str | os.PathLike] = (), method_ids: Iterable[str] | None = None,
         include_usual: bool = True, hf_cache: Path | None = None, budget: Budget | None = None) -> list[Checkpoint]:
    """The checkpoints of :func:`run_scan`."""
    return run_scan(extra_dirs, method_ids, include_usual, hf_cache, budget).checkpoints


def folders_changed(watched: dict[str, int | None]) -> bool:
    """Whether any folder a scan watched was changed, created or removed since."""
    for folder, mtime in watched.items():
        try:
            now: int | None = os.stat(folder).st_mtime_ns
        except (OSError, ValueError):
            now = None
        if now != mtime:
            return True
    return False


# -- scanning off the request path ---------------------------------------------------------------

class Scanner:
    """Runs ``scan(stop)`` in a background thread: at start, when a folder the last scan watched
    changes (checked every ``poll_s``) and when asked (:meth:`refresh`). Readers get the last
    result at once (:meth:`latest`); nothing a reader does waits for a scan. :meth:`stop` sets
    ``stop``, which ends a running scan at its next file."""

    def __init__(self, scan: Callable[[threading.Event], ScanResult], poll_s: float = 2.0):
        self._scan = scan
        self.poll_s = poll_s
        self._cond = threading.Condition()
        self._result: ScanResult | None = None
        self._requested = 0  # scans asked for
        self._done = 0  # the requests the last finished scan answered
        self._running_since: float | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread and its first scan (again: nothing)."""
        with self._cond:
            if self._thread is not None or self._stopping.is_set():
                return
            self._requested += 1
            self._thread = threading.Thread(target=self._run, name="analogon-model-scan", daemon=True)
            self._thread.start()

    def refresh(self) -> int:
        """Ask for a scan; returns its ticket for :meth:`answered`."""
        with self._cond:
            self._requested += 1
            self._cond.notify_all()
            return self._requested

    def ticket(self) -> int:
        """The ticket of the last scan asked for."""
        return self._requested

    def answered(self, ticket: int) -> bool:
        return self._done >= ticket

    def latest(self) -> tuple[ScanResult | None, float | None]:
        """(the last finished scan's result or None, when the running scan began or None)."""
        with self._cond:
            return self._result, self._running_since

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping.set()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._requested == self._done and not self._stopping.is_set():
                    self._cond.wait(self.poll_s)
                if self._stopping.is_set():
                    return
                ticket, last = self._requested, self._result
            if ticket == self._done and not folders_changed(last.watched if last else {}):
                continue
            with self._cond:
                self._running_since = time.time()
            try:
                result = self._scan(self._stopping)
            except Exception as e:  # a fault of the scan itself: the last listing stays, with a note
                log.exception("the scan of the model folders failed")
                result = ScanResult(last.checkpoints if last else [], last.searched if last else [], [], 0,
                                    [f"The last scan failed ({type(e).__name__}: {str(e)[:200]})."],
                                    False, 0.0, time.time())
            with self._cond:
                self._result, self._done, self._running_since = result, ticket, None
                self._cond.notify_all()


def recommended_for(method_id: str, checkpoints: list[Checkpoint],
                    fits: Callable[[str | None], bool] | None = None) -> Checkpoint | None:
    """The checkpoint to pre-select for a method: one of the paper's family if there is one,
    else the first usable one. ``fits(family)`` tells whether a family can run here at all
    (memory): checkpoints that fit come first, so a CPU machine is not offered SDXL when it
    has an SD 1.5 checkpoint."""
    usable = [c for c in checkpoints if method_id in c.methods]
    if fits is not None:
        usable = [c for c in usable if fits(c.family)] + [c for c in usable if not fits(c.family)]
        fitting = [c for c in usable if fits(c.family)]
    else:
        fitting = usable
    paper = PAPER_FAMILY.get(method_id)
    for c in fitting:
        if c.family == paper:
            return c
    return usable[0] if usable else None
