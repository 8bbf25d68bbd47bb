"""Model specs to ready pipelines, kept warm.

A spec is one of
- an embedded name: ``tiny-sd``, ``tiny-sdxl`` (random weights, built in code), ``toy-sd``
  (the trained toy-world model shipped in the package);
- a local diffusers folder (has ``model_index.json``);
- a single ``.safetensors``/``.ckpt`` checkpoint as Krita/ComfyUI users keep them;
- a Hugging Face repo id (``org/name``), loaded from the local hub cache, or downloaded when
  the network allows.

The family (``sd1``, ``sd2``, ``sdxl``) and the variant (``sd1``, ``sd2-base``, ``sd2-v``,
``sdxl``, ``sdxl-refiner``) are detected from the files, never from the name. Inpainting models
(a UNet with 9 input channels) are refused at load with the reason (:func:`inpainting_refusal`).
SD 2.x single files whose parameterisation nothing states are probed once at load
(:mod:`analogon.models.prediction`); ``LoadOptions.predictions`` overrides per model.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from ..errors import ModelError
from .toy import TOY_FOLDERS

Family = Literal["sd1", "sd2", "sdxl"]

NATIVE_SIZE: dict[str, int] = {"sd1": 512, "sd2": 768, "sdxl": 1024}
EMBEDDED = ("tiny-sd", "tiny-sdxl", *TOY_FOLDERS)
DEFAULT_MODEL = "tiny-sd"


@dataclass
class LoadOptions:
    device: str | None = None  # None: cuda > mps > cpu
    dtype: str | None = None  # None: float16 on cuda/mps, float32 on cpu
    cpu_offload: bool = False
    vae_tiling: bool = False
    max_working_pixels: int | None = None  # caps the high-resolution pass's area (core.hires)
    # SD 2.x prediction type per model spec ("*": every model), "epsilon" or "v_prediction";
    # wins over the checkpoint's metadata, its yaml and the probe (see models.prediction)
    predictions: dict[str, str] = field(default_factory=dict)

    def key(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)


@dataclass
class ModelBundle:
    """A loaded pipeline and what the methods need to know about it."""

    spec: str
    family: Family
    pipe: Any  # StableDiffusionPipeline | StableDiffusionXLPipeline
    device: torch.device
    dtype: torch.dtype
    source: str  # embedded | local | single_file | hub
    # A stable identity for cache keys: changes when the weights change.
    key: str
    native_size: int = 512
    info: dict[str, Any] = field(default_factory=dict)
    # sd1 | sd2-base | sd2-v | sdxl | sdxl-refiner (models.discovery.LABELS)
    variant: str = ""
    # SD 2.x: {"type": epsilon | v_prediction, "decided_by": override | metadata | yaml | config
    # | probe, "probe": {...}}; empty for other families
    prediction: dict[str, Any] = field(default_factory=dict)

    # components, for readability in the methods
    @property
    def unet(self):
        return self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def text_encoder(self):
        return self.pipe.text_encoder

    @property
    def tokenizer(self):
        return self.pipe.tokenizer

    @property
    def text_encoder_2(self):
        return getattr(self.pipe, "text_encoder_2", None)

    @property
    def tokenizer_2(self):
        return getattr(self.pipe, "tokenizer_2", None)

    @property
    def scheduler(self):
        return self.pipe.scheduler

    @property
    def is_sdxl(self) -> bool:
        return self.family == "sdxl"

    @property
    def is_refiner(self) -> bool:
        """The SDXL refiner: one text encoder (OpenCLIP bigG), five time ids with an aesthetic
        score (the pipeline's ``requires_aesthetics_score``)."""
        return self.variant == "sdxl-refiner"

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def describe(self) -> dict[str, Any]:
        out = {"id": self.spec, "family": self.family, "variant": self.variant, "source": self.source,
               "device": str(self.device), "dtype": str(self.dtype).replace("torch.", "")}
        if self.prediction:
            out["prediction"] = dict(self.prediction)
        return out


# -- device and dtype ----------------------------------------------------------------------

def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, requested: str | None = None) -> torch.dtype:
    if requested:
        try:
            return {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16,
                    "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}[requested]
        except KeyError:
            raise ModelError("bad_dtype", f"Unknown dtype {requested!r}.", status=400) from None
    return torch.float16 if device.type in ("cuda", "mps") else torch.float32


# -- family detection --------------------------------------------------------------------

# the configs of a diffusers folder that tell its family and variant (missing ones read as {})
FOLDER_CONFIGS = ("model_index.json", "unet/config.json", "scheduler/scheduler_config.json",
                  "text_encoder_2/config.json")


def _json(path: Path) -> dict[str, Any]:
    from .checkpoint_header import read_json_object

    return read_json_object(path) if path.exists() else {}


def sdxl_time_id_count(unet_cfg: dict[str, Any], pooled_dim: int | None) -> int | None:
    """How many micro-conditioning ids an SDXL UNet's addition embedding expects: 6 (base:
    original size, crop, target size) or 5 (refiner: original size, crop, aesthetic score).
    Its input is ``n · addition_time_embed_dim + pooled_dim``."""
    td, total = unet_cfg.get("addition_time_embed_dim"), unet_cfg.get("projection_class_embeddings_input_dim")
    if not td or not total:
        return None
    if pooled_dim:
        n, rest = divmod(total - pooled_dim, td)
        return n if rest == 0 else None
    return None


def variant_from_diffusers_folder(path: Path) -> tuple[Family, str]:
    """(family, variant) of a diffusers folder from its JSON configs (:func:`variant_from_configs`)."""
    return variant_from_configs({name: _json(path / name) for name in FOLDER_CONFIGS})


def variant_from_configs(configs: dict[str, dict[str, Any]]) -> tuple[Family, str]:
    """(family, variant) from a diffusers folder's configs (:data:`FOLDER_CONFIGS` -> the parsed
    JSON object, {} when missing). The refiner: the index's ``requires_aesthetics_score``, or a
    UNet whose addition embedding expects 5 time ids. ``-inpainting`` variants: a UNet with 9
    input channels. Raises ValueError or TypeError for configs with values of the wrong type."""
    index, unet, sched = (configs.get(name) or {} for name in FOLDER_CONFIGS[:3])
    cls = str(index.get("_class_name", ""))
    te2 = index.get("text_encoder_2")
    if "XL" in cls or (te2 and te2[0] is not None) or unet.get("addition_embed_type") == "text_time":
        family: Family = "sdxl"
        pooled = (configs.get(FOLDER_CONFIGS[3]) or {}).get("projection_dim")
        refiner = bool(index.get("requires_aesthetics_score")) or sdxl_time_id_count(unet, pooled) == 5
        variant = "sdxl-refiner" if refiner else "sdxl"
    elif unet.get("cross_attention_dim") == 1024 or sched.get("prediction_type") == "v_prediction":
        family = "sd2"
        variant = "sd2-v" if sched.get("prediction_type") == "v_prediction" else "sd2-base"
    else:
        family, variant = "sd1", "sd1"
    if int(unet.get("in_channels", 4)) == 9:
        variant = family + "-inpainting"
    return family, variant


def family_from_diffusers_folder(path: Path) -> Family:
    return variant_from_diffusers_folder(path)[0]


# which methods could use an inpainting model, and why none does yet
INPAINTING_HELP = (
    "its UNet takes 9 input channels (the noisy latent, a mask and the masked image's latent). "
    "PIXELS and the mask of any method could condition it on the kept area, but that masked-"
    "latent conditioning is not built yet, and the other methods (appearance transfer, DIA, "
    "Difference Inversion) invert and steer a text-to-image UNet. Load the base model of the "
    "same family instead (SD 1.5, SD 2.x or SDXL)."
)


def inpainting_refusal(name: str, family: str) -> ModelError:
    return ModelError(
        "inpainting_model",
        f"{name} is a {family.upper()} inpainting model: {INPAINTING_HELP}",
        {"family": family, "variant": family + "-inpainting"}, status=400)


def family_from_state_dict_keys(keys: list[str] | set[str]) -> Family:
    """Original (LDM) single-file layout: which text encoder is inside tells the family."""
    keys = set(keys)
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):  # the refiner
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    # diffusers layout saved as one file
    if any(k.startswith("text_encoder_2.") for k in keys) or any("add_embedding" in k for k in keys):
        return "sdxl"
    raise ModelError(
        "unknown_checkpoint",
        "This checkpoint is not a Stable Diffusion 1.x, 2.x or SDXL model (no known text "
        "encoder inside).",
        status=400,
    )


def variant_from_state_dict_keys(keys: list[str] | set[str]) -> str:
    """The SDXL refiner (its only text encoder, OpenCLIP bigG, is ``conditioner.embedders.0``)
    apart from the rest; SD 2.x base and v have the same keys (``"sd2"``: decided later)."""
    family = family_from_state_dict_keys(keys)
    if family == "sdxl" and not any(k.startswith("conditioner.embedders.1.") for k in keys) \
            and any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        return "sdxl-refiner"
    return family


def _pipeline_class(family: Family, variant: str = ""):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    if variant == "sdxl-refiner":
        return StableDiffusionXLImg2ImgPipeline
    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def _file_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def _folder_key(path: Path) -> str:
    h = hashlib.sha256(str(path.resolve()).encode())
    for p in sorted(path.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(path)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


MISSING_MODEL_HELP = (
    "Model weights cannot be downloaded here. Point the model field at a local diffusers "
    "folder (one with model_index.json) or at a single .safetensors checkpoint file, or use "
    "an embedded model: " + ", ".join(EMBEDDED) + "."
)


CHECKPOINT_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


def _local_model_kind(path: Path) -> Literal["folder", "file"] | None:
    """``folder``: a diffusers folder (with a model_index.json file); ``file``: a regular file
    named like a checkpoint; None for anything else, missing or not (a folder without
    model_index.json, a FIFO, another file): a model spec never tells what is on the disk."""
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            return "folder" if stat.S_ISREG(os.stat(path / "model_index.json").st_mode) else None
    except (OSError, ValueError):  # missing, a link to nothing, a loop, not allowed, a NUL in the name
        return None
    return "file" if stat.S_ISREG(mode) and path.suffix.lower() in CHECKPOINT_FILE_SUFFIXES else None


def load_bundle(spec: str, options: LoadOptions | None = None) -> ModelBundle:
    """Resolve and load one model spec. Raises ModelError with a readable message."""
    options = options or LoadOptions()
    device = pick_device(options.device)
    dtype = pick_dtype(device, options.dtype)
    spec = spec.strip()
    if not spec:
        raise ModelError("no_model", "No model given. " + MISSING_MODEL_HELP, status=400)

    if spec in ("tiny-sd", "tiny-sdxl"):
        from .tiny import TINY_BUILDERS

        builder, family = TINY_BUILDERS[spec]
        pipe = builder(torch.float32)
        source, key, variant, prediction = "embedded", spec, family, {}
    elif spec in TOY_FOLDERS:
        from .toy import toy_path

        path = toy_path(spec)
        pipe, family, variant, prediction = _load_folder(path, dtype)
        # keyed by the folder's content: both names of one folder are one loaded model
        source, key = "embedded", "toy-sd:" + _folder_key(path)
    else:
        path = Path(os.path.expanduser(spec))
        local = _local_model_kind(path)
        if local == "folder":
            pipe, family, variant, prediction = _load_folder(path, dtype)
            source, key = "local", "dir:" + _folder_key(path)
        elif local == "file":
            from .single_file import load_single_file

            override = options.predictions.get(spec) or options.predictions.get("*")
            pipe, family, variant, prediction = load_single_file(path, dtype, prediction=override)
            source, key = "single_file", "file:" + _file_key(path)
        elif "/" in spec and not spec.startswith((".", "/", "~")) and spec.count("/") == 1:
            pipe, family, variant, prediction = _load_hub(spec, dtype)
            source, key = "hub", "hub:" + spec
        else:  # the same answer whether or not something else is at that path
            raise ModelError("model_not_found", f"No model called {spec!r}. " + MISSING_MODEL_HELP)

    pipe = _place(pipe, family, device, dtype, options)
    bundle = ModelBundle(
        spec=spec, family=family, pipe=pipe, device=device, dtype=dtype, source=source,
        key=key, native_size=_native_size(pipe, family),
        info={"max_working_pixels": options.max_working_pixels} if options.max_working_pixels else {},
        variant=variant, prediction=prediction,
    )
    if family == "sd2":
        from .prediction import apply, decide
        from .single_file import normalise_prediction

        override = options.predictions.get(spec) or options.predictions.get("*")
        if override and bundle.prediction.get("decided_by") != "override":
            apply(bundle, normalise_prediction(override), "override")
        elif bundle.prediction.get("decided_by") == "undecided":
            decide(bundle)
        elif not bundle.prediction:  # a diffusers folder: its scheduler says
            apply(bundle, bundle.scheduler.config.get("prediction_type", "epsilon"), "config")
        bundle.variant = "sd2-v" if bundle.prediction["type"] == "v_prediction" else "sd2-base"
    return bundle


def _native_size(pipe, family: Family) -> int:
    """The image size the model was trained at: the UNet's sample size times the VAE factor
    (64·8 = 512 for SD 1.5, 96·8 = 768 for SD 2.1, 128·8 = 1024 for SDXL, 8·8 = 64 for the tiny
    models), whatever the model is called; the family's default when the config has none."""
    sample = getattr(pipe.unet.config, "sample_size", None)
    if isinstance(sample, (list, tuple)):
        sample = max(sample)
    if isinstance(sample, int) and sample > 0:
        return sample * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return NATIVE_SIZE[family]


def _load_folder(path: Path, dtype: torch.dtype):
    """(pipeline, family, variant, prediction) of a diffusers folder."""
    family, variant = variant_from_diffusers_folder(path)
    if variant.endswith("-inpainting"):
        raise inpainting_refusal(path.name, family)
    cls = _pipeline_class(family, variant)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if family != "sdxl":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = cls.from_pretrained(str(path), dtype=dtype, **kwargs)
    except TypeError:  # older diffusers: torch_dtype
        pipe = cls.from_pretrained(str(path), torch_dtype=dtype, **kwargs)
    if variant == "sdxl-refiner" and not pipe.config.get("requires_aesthetics_score"):
        # a refiner UNet (5 time ids) in a folder whose index does not say so
        pipe.register_to_config(requires_aesthetics_score=True)
    return pipe, family, variant, {}


def _load_hub(repo_id: str, dtype: torch.dtype):
    """A hub id: the local cache first; the network only when allowed and reachable."""
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        folder = snapshot_download(
            repo_id, local_files_only=True,
            allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model"],
        )
    except Exception:
        if offline:
            raise ModelError(
                "model_not_available",
                f"{repo_id} is not in the local Hugging Face cache and the hub is offline. "
                + MISSING_MODEL_HELP,
            ) from None
        try:
            folder = snapshot_download(
                repo_id, allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model"],
                etag_timeout=10,
            )
        except Exception as e:
            raise ModelError(
                "model_not_available",
                f"Could not download {repo_id} ({type(e).__name__}). " + MISSING_MODEL_HELP,
            ) from None
    return _load_folder(Path(folder), dtype)


def _place(pipe, family: Family, device: torch.device, dtype: torch.dtype, options: LoadOptions):
    if pipe.unet.dtype != dtype:
        pipe.to(dtype=dtype)
    # SDXL's VAE overflows in fp16: keep it in fp32 (the pipelines' force_upcast).
    if dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False):
        pipe.vae.to(dtype=torch.float32)
    if options.cpu_offload and device.type != "cpu":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    if options.vae_tiling:
        pipe.vae.enable_tiling()
    try:
        from diffusers.models.attention_processor import AttnProcessor2_0

        pipe.unet.set_attn_processor(AttnProcessor2_0())
    except Exception:  # pragma: no cover - very old diffusers
        pass
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if m is not None:
            m.requires_grad_(False)
            m.eval()
    return pipe


class ModelManager:
    """Keeps the last ``capacity`` models warm. Thread-safe; loads outside the lock's way.

    ``on_load(bundle)`` runs after each load, before the bundle is handed out; it must return at
    once (the server's starts the latent-preview fit in a background thread:
    ``core.previews.prepare``). An exception there is logged, never the load's failure."""

    def __init__(self, capacity: int = 1, options: LoadOptions | None = None,
                 on_load: Callable[[ModelBundle], Any] | None = None):
        self.capacity = max(1, capacity)
        self.options = options or LoadOptions()
        self.on_load = on_load
        self._models: OrderedDict[str, ModelBundle] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0

    def get(self, spec: str) -> ModelBundle:
        with self._lock:
            if spec in self._models:
                self._models.move_to_end(spec)
                return self._models[spec]
        bundle = load_bundle(spec, self.options)
        if self.on_load is not None:
            try:
                self.on_load(bundle)
            except Exception:
                logging.getLogger(__name__).exception("model load hook failed for %s", spec)
        with self._lock:
            self.loads += 1
            self._models[spec] = bundle
            while len(self._models) > self.capacity:
                _, old = self._models.popitem(last=False)
                del old
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        return bundle

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._models)

    def available(self, discovered: list[dict[str, Any]] | None = None,
                  method_ids: list[str] | None = None) -> list[dict[str, Any]]:
        """The embedded models, then ``discovered`` checkpoints (see models.discovery), then
        any other loaded model. ``developer`` marks the random-weight models that prove the
        machinery and are never offered to a painter; ``toy-sd`` is the toy-world demo."""
        loaded = set(self.loaded())
        methods = list(method_ids or [])
        out = []
        for name in EMBEDDED:
            fam = "sdxl" if name == "tiny-sdxl" else "sd1"
            if name in TOY_FOLDERS:
                from .toy import toy_available

                if not toy_available(name):
                    continue
            developer = name != "toy-sd"
            label, note = {
                "toy-sd": ("demo (toy world)", "a small model trained on the toy world: shapes "
                           "and colours, not photographs"),
                "toy-sd-64": (f"{name} (developer: the first, 64-px toy world)",
                              "the small, fast toy model the test suite uses"),
            }.get(name, (f"{name} (developer: random weights, output is noise)",
                         "random weights: proves the machinery, not quality"))
            out.append({"id": name, "family": fam, "source": "embedded", "loaded": name in loaded,
                        "name": name, "developer": developer, "methods": methods,
                        "label": label, "note": note})
        listed = set(EMBEDDED)
        for entry in discovered or []:
            entry = {**entry, "loaded": entry["id"] in loaded, "developer": False}
            b = self._models.get(entry["id"]) if entry["loaded"] else None
            if b is not None:  # what the load decided (SD 2.x: base or v, and how)
                entry["variant"] = b.variant or entry.get("variant")
                if b.prediction:
                    entry["prediction"] = dict(b.prediction)
            out.append(entry)
            listed.add(entry["id"])
        for name in loaded:
            if name not in listed:
                b = self._models.get(name)
                entry = {"id": name, "family": b.family if b else None, "name": name,
                         "source": b.source if b else "local", "loaded": True, "developer": False,
                         "methods": methods, "label": name}
                if b is not None:
                    from ..methods.base import methods_for_variant

                    entry["variant"] = b.variant
                    entry["methods"] = methods_for_variant(b.variant, methods)
                    if b.prediction:
                        entry["prediction"] = dict(b.prediction)
                out.append(entry)
        return out
