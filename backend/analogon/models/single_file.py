"""Single-file checkpoints: one ``.safetensors`` in the original (LDM) layout, as Krita and
ComfyUI users keep them. SD 1.x, SD 2.x and SDXL; loaded fully offline.

The family is read from the checkpoint's keys (which text encoder is inside). diffusers'
``from_single_file`` converts the weights; the model shapes come from small config-only
folders shipped in ``analogon/models/configs`` (SD 1.5, SD 2.1, SDXL base, SDXL refiner), and the CLIP
tokenizers are rebuilt from the BPE table bundled with open_clip, so nothing is downloaded.

A checkpoint may bring its own config folder beside it: ``<name>.config/`` (a diffusers
folder without weights: ``model_index.json``, ``unet/config.json``, ..., optionally
``tokenizer/``). :func:`save_single_file` writes one with the checkpoint, which is how the
tests round-trip the embedded tiny models through this loader.

SD 2.x comes in two parameterisations that the tensor names do not tell apart: 768-pixel
v-prediction (2.0-v, 2.1) and 512-pixel epsilon (2.0-base, 2.1-base). In order, what decides:
the user's per-model override (``LoadOptions.predictions``), the file's own metadata
(``modelspec.prediction_type`` / ``modelspec.architecture``), a ``<name>.yaml`` beside it (the
original LDM config: ``parameterization: "v"`` means v-prediction, without that line epsilon),
the scheduler of a ``<name>.config/`` folder beside it when it states a ``prediction_type``;
with none of these, a one-step probe of the UNet at load (:mod:`analogon.models.prediction`).

The SDXL refiner has one text encoder, OpenCLIP bigG, stored as ``conditioner.embedders.0``
(where the base keeps CLIP-L); it loads as diffusers' ``StableDiffusionXLImg2ImgPipeline``
with ``text_encoder``/``tokenizer`` None. Inpainting checkpoints (9-channel ``conv_in``) are
refused with the reason (:func:`analogon.models.inpainting_refusal`).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelError
from .checkpoint_header import read_safetensors_header, sd2_stated_prediction

CONFIG_ROOT = Path(__file__).parent / "configs"
FAMILY_CONFIG = {"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl_base", "sdxl-refiner": "sdxl_refiner"}

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = {"sd1": "cond_stage_model.transformer.", "sdxl": "conditioner.embedders.0.transformer."}
OPEN_CLIP_PREFIX = {"sd2": "cond_stage_model.model.", "sdxl": "conditioner.embedders.1.model.",
                    "sdxl-refiner": "conditioner.embedders.0.model."}
CONV_IN_KEY = UNET_PREFIX + "input_blocks.0.0.weight"


# -- reading -----------------------------------------------------------------------------

def checkpoint_keys(path: Path) -> list[str]:
    """The tensor names in a checkpoint, without loading the tensors (for .safetensors)."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                return list(f.keys())
        sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
        return list(sd.keys())
    except Exception as e:
        raise ModelError(
            "bad_checkpoint",
            f"{path.name} cannot be read as a model checkpoint ({type(e).__name__}). It may be "
            "incomplete (still downloading?) or not a Stable Diffusion file.",
            status=400,
        ) from None


def sidecar_config(path: Path) -> Path | None:
    folder = path.with_name(path.stem + ".config")
    return folder if (folder / "model_index.json").exists() else None


def conv_in_channels(path: Path) -> int | None:
    """The UNet's input channels (4; 9 for inpainting models) from the checkpoint's header
    (``.safetensors``) or its lazily loaded tensors (``.ckpt``)."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".safetensors":
            shape = read_safetensors_header(path)[0].get(CONV_IN_KEY, {}).get("shape")
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            sd = sd.get("state_dict", sd)
            shape = list(sd[CONV_IN_KEY].shape) if CONV_IN_KEY in sd else None
    except Exception:
        return None
    return int(shape[1]) if shape and len(shape) == 4 else None


def sd2_prediction_type(path: Path) -> str:
    """From the yaml beside the file: v_prediction, epsilon; v_prediction without a yaml (the
    old rule; the loader and discovery use :func:`sd2_stated_prediction`)."""
    return sd2_stated_prediction(path)[0] or "v_prediction"


PREDICTION_NAMES = {"epsilon": "epsilon", "eps": "epsilon", "base": "epsilon",
                    "v": "v_prediction", "v_prediction": "v_prediction", "v-prediction": "v_prediction"}


def normalise_prediction(value: str) -> str:
    try:
        return PREDICTION_NAMES[value.strip().lower()]
    except KeyError:
        raise ModelError("bad_prediction", f"Unknown prediction type {value!r}: use eps or v.",
                         status=400) from None


def default_tokenizer(family: str, name: str):
    """CLIP's tokenizer for a component; OpenCLIP encoders (SD 2.x, SDXL's second) pad with "!"."""
    from .tokenizer import openai_clip_tokenizer

    open_clip = family == "sd2" or (family == "sdxl" and name == "tokenizer_2")
    return openai_clip_tokenizer(pad_token="!") if open_clip else openai_clip_tokenizer()


def _open_clip_text_encoder(path: Path, config_dir: Path, prefix: str, dtype: torch.dtype):
    """SDXL's second text encoder, converted with an explicit prefix (diffusers guesses the
    prefix from the hidden size, which is ambiguous when both encoders have the same width)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = CLIPTextConfig.from_pretrained(str(config_dir / "text_encoder_2"), local_files_only=True)
    model = CLIPTextModelWithProjection(cfg)
    if path.suffix.lower() == ".safetensors":
        with safe_open(str(path), framework="pt", device="cpu") as f:
            sd = {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    else:
        full = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        full = full.get("state_dict", full)
        sd = {k: v for k, v in full.items() if k.startswith(prefix)}
    converted = convert_open_clip_checkpoint(model, sd, prefix=prefix)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing:
        raise ModelError("bad_checkpoint", f"{path.name}: the second text encoder is incomplete "
                         f"({len(missing)} tensors missing, e.g. {missing[0]}).", status=400)
    return model.to(dtype=dtype).eval()


def load_single_file(path: Path, dtype: torch.dtype, config_dir: Path | None = None,
                     prediction: str | None = None):
    """Load a single-file checkpoint offline. Returns (pipeline, family, variant, prediction):
    ``prediction`` is ``{}`` except for SD 2.x, where it says the type and what decided it
    (``"undecided"``: nothing stated it, the loader probes; see the module's docstring).
    ``prediction`` (argument): the user's override for SD 2.x, eps or v."""
    from . import _pipeline_class, inpainting_refusal, variant_from_state_dict_keys

    from diffusers.utils import logging as dlogging

    dlogging.disable_progress_bar()
    path = Path(path)
    keys = checkpoint_keys(path)
    variant = variant_from_state_dict_keys(keys)
    family = "sdxl" if variant == "sdxl-refiner" else variant
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise ModelError(
            "unsupported_checkpoint",
            f"{path.name} is not in the original Stable Diffusion layout (no model.diffusion_model.* "
            "weights). Use a complete checkpoint or a diffusers folder.", status=400)
    if conv_in_channels(path) == 9:
        raise inpainting_refusal(path.name, family)
    sidecar = sidecar_config(path)
    config_dir = Path(config_dir) if config_dir else (sidecar or CONFIG_ROOT / FAMILY_CONFIG[variant])
    cls = _pipeline_class(family, variant)
    kwargs: dict[str, Any] = {"config": str(config_dir), "local_files_only": True, "torch_dtype": dtype}
    refiner = variant == "sdxl-refiner"
    for name in ("tokenizer", "tokenizer_2") if family == "sdxl" else ("tokenizer",):
        if refiner and name == "tokenizer":
            continue
        if not (config_dir / name).is_dir():
            kwargs[name] = default_tokenizer(family, name)
    info: dict[str, Any] = {}
    if family == "sd2":
        from diffusers import DDIMScheduler

        sched_cfg = DDIMScheduler.load_config(str(config_dir), subfolder="scheduler", local_files_only=True)
        stated, how = sd2_stated_prediction(path)
        if prediction:
            info = {"type": normalise_prediction(prediction), "decided_by": "override"}
        elif stated:
            info = {"type": stated, "decided_by": how}
        elif config_dir.parent != CONFIG_ROOT and "prediction_type" in sched_cfg:
            info = {"type": sched_cfg["prediction_type"], "decided_by": "config"}
        else:  # probed once the model is placed (models.prediction); v until then
            info = {"type": "v_prediction", "decided_by": "undecided"}
        info["default_config"] = config_dir.parent == CONFIG_ROOT
        sched_cfg["prediction_type"] = info["type"]
        kwargs["scheduler"] = DDIMScheduler.from_config(sched_cfg)
    if refiner:
        kwargs.update(text_encoder=None, tokenizer=None)
        kwargs["text_encoder_2"] = _open_clip_text_encoder(path, config_dir, OPEN_CLIP_PREFIX[variant], dtype)
    elif family == "sdxl":
        kwargs["text_encoder_2"] = _open_clip_text_encoder(path, config_dir, OPEN_CLIP_PREFIX["sdxl"], dtype)
    else:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = cls.from_single_file(str(path), **kwargs)
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(
            "bad_checkpoint",
            f"{path.name} looks like a {family.upper()} checkpoint but could not be loaded "
            f"({type(e).__name__}: {str(e)[:200]}).", status=400,
        ) from None
    if refiner and not pipe.config.get("requires_aesthetics_score"):
        pipe.register_to_config(requires_aesthetics_score=True)
    if family == "sd2" and info.get("default_config") and info["type"] == "epsilon":
        set_native_latent(pipe, 64)  # 2.x base: 512 pixels (the shipped config is 2.1's 768)
    return pipe, family, variant, info


def set_native_latent(pipe, size: int) -> None:
    """The UNet's ``sample_size`` (the native size is this times the VAE factor)."""
    pipe.unet.register_to_config(sample_size=size)


# -- writing (the inverse of diffusers' LDM -> diffusers conversion) ---------------------------

_UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
}


def _resnet_tail(tail: str) -> str:
    for new, old in _UNET_RESNET:
        if tail.startswith(new + "."):
            return old + tail[len(new):]
    raise KeyError(tail)


def unet_to_ldm(sd: dict[str, torch.Tensor], layers_per_block: int, up_has_attention: list[bool]) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel state dict -> LDM ``model.diffusion_model.*``."""
    per = layers_per_block + 1
    out: dict[str, torch.Tensor] = {}
    for key, v in sd.items():
        parts = key.split(".")
        top = ".".join(parts[:-1])
        if top in _UNET_TOP:
            out[_UNET_TOP[top] + "." + parts[-1]] = v
            continue
        if parts[0] == "down_blocks":
            b, kind = int(parts[1]), parts[2]
            if kind == "downsamplers":  # down_blocks.b.downsamplers.0.conv.weight
                new = f"input_blocks.{1 + b * per + layers_per_block}.0.op.{parts[-1]}"
            else:
                layer = int(parts[3])
                idx = 1 + b * per + layer
                tail = ".".join(parts[4:])
                new = (f"input_blocks.{idx}.0.{_resnet_tail(tail)}" if kind == "resnets"
                       else f"input_blocks.{idx}.1.{tail}")
        elif parts[0] == "mid_block":
            kind, i, tail = parts[1], int(parts[2]), ".".join(parts[3:])
            new = (f"middle_block.{2 * i}.{_resnet_tail(tail)}" if kind == "resnets"
                   else f"middle_block.1.{tail}")
        elif parts[0] == "up_blocks":
            b, kind = int(parts[1]), parts[2]
            if kind == "upsamplers":
                slot = 2 if up_has_attention[b] else 1
                new = f"output_blocks.{b * per + layers_per_block}.{slot}.conv.{parts[-1]}"
            else:
                idx = b * per + int(parts[3])
                tail = ".".join(parts[4:])
                new = (f"output_blocks.{idx}.0.{_resnet_tail(tail)}" if kind == "resnets"
                       else f"output_blocks.{idx}.1.{tail}")
        else:
            raise KeyError(f"unexpected UNet key {key}")
        out[new] = v
    return {UNET_PREFIX + k: v for k, v in out.items()}


_VAE_ATTN = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))
_VAE_TOP = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}


def vae_to_ldm(sd: dict[str, torch.Tensor], num_up_blocks: int) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state dict -> LDM ``first_stage_model.*``."""
    out: dict[str, torch.Tensor] = {}
    for key, v in sd.items():
        parts = key.split(".")
        top = ".".join(parts[:-1])
        side = parts[0]
        if top in _VAE_TOP:
            new = _VAE_TOP[top] + "." + parts[-1]
        elif len(parts) > 1 and parts[1] == "down_blocks":  # encoder.down_blocks.i.(resnets.j|downsamplers.0.conv)
            i = int(parts[2])
            if parts[3] == "downsamplers":
                new = f"encoder.down.{i}.downsample.conv.{parts[-1]}"
            else:
                tail = ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
                new = f"encoder.down.{i}.block.{parts[4]}.{tail}"
        elif len(parts) > 1 and parts[1] == "up_blocks":
            b = num_up_blocks - 1 - int(parts[2])
            if parts[3] == "upsamplers":
                new = f"decoder.up.{b}.upsample.conv.{parts[-1]}"
            else:
                tail = ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
                new = f"decoder.up.{b}.block.{parts[4]}.{tail}"
        elif len(parts) > 1 and parts[1] == "mid_block":
            if parts[2] == "resnets":
                tail = ".".join(parts[4:]).replace("conv_shortcut", "nin_shortcut")
                new = f"{side}.mid.block_{int(parts[3]) + 1}.{tail}"
            else:  # attentions.0.<name>.(weight|bias)
                name = ".".join(parts[4:-1])
                name = dict(_VAE_ATTN)[name]
                new = f"{side}.mid.attn_1.{name}.{parts[-1]}"
                if parts[-1] == "weight" and v.ndim == 2:  # linear -> 1x1 conv, as LDM stores it
                    v = v[:, :, None, None]
        else:  # conv_in, conv_out, quant_conv, post_quant_conv keep their names
            new = key
        out[new] = v
    return {VAE_PREFIX + k: v for k, v in out.items()}


def _text_model_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 flattens CLIPTextModel (no ``text_model.`` level): put it back."""
    out = {}
    for k, v in sd.items():
        if k.endswith("position_ids"):
            continue
        if not k.startswith("text_model.") and not k.startswith("text_projection"):
            k = "text_model." + k
        out[k] = v
    return out


def clip_to_ldm(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """CLIPTextModel (OpenAI CLIP-L, HF layout) -> ``<prefix>text_model.*``."""
    return {prefix + k: v for k, v in _text_model_keys(sd).items()}


_OPEN_CLIP_LAYER = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                    ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj"))


def open_clip_to_ldm(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """CLIPTextModel(WithProjection) in HF layout -> OpenCLIP layout under ``prefix``
    (q/k/v joined into ``in_proj``, the projection transposed)."""
    sd = _text_model_keys(sd)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    fixed = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    for k, v in sd.items():
        if k in fixed:
            out[fixed[k]] = v
        elif k == "text_projection.weight":
            out["text_projection"] = v.T.contiguous()
        elif k.startswith("text_model.encoder.layers."):
            rest = k[len("text_model.encoder.layers."):]
            i, tail = rest.split(".", 1)
            m = re.match(r"self_attn\.([qkv])_proj\.(weight|bias)$", tail)
            if m:
                qkv.setdefault((int(i), m.group(2)), {})[m.group(1)] = v
                continue
            for new, old in _OPEN_CLIP_LAYER:
                if tail.startswith(new + "."):
                    tail = old + tail[len(new):]
                    break
            out[f"transformer.resblocks.{i}.{tail}"] = v
        else:
            raise KeyError(f"unexpected text encoder key {k}")
    for (i, kind), d in qkv.items():
        out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat([d["q"], d["k"], d["v"]], 0)
    return {prefix + k: v for k, v in out.items()}


def pipeline_to_ldm(pipe, family: str) -> dict[str, torch.Tensor]:
    """A whole StableDiffusion(XL)Pipeline as one LDM-layout state dict."""
    ucfg = pipe.unet.config
    up_attn = [t.startswith("CrossAttn") for t in ucfg.up_block_types]
    sd = unet_to_ldm(pipe.unet.state_dict(), ucfg.layers_per_block, up_attn)
    sd.update(vae_to_ldm(pipe.vae.state_dict(), len(pipe.vae.config.up_block_types)))
    if family == "sd1":
        sd.update(clip_to_ldm(pipe.text_encoder.state_dict(), CLIP_PREFIX["sd1"]))
    elif family == "sd2":
        sd.update(open_clip_to_ldm(pipe.text_encoder.state_dict(), OPEN_CLIP_PREFIX["sd2"]))
    elif pipe.text_encoder is None:  # the SDXL refiner: OpenCLIP bigG as the only embedder
        sd.update(open_clip_to_ldm(pipe.text_encoder_2.state_dict(), OPEN_CLIP_PREFIX["sdxl-refiner"]))
    else:
        sd.update(clip_to_ldm(pipe.text_encoder.state_dict(), CLIP_PREFIX["sdxl"]))
        sd.update(open_clip_to_ldm(pipe.text_encoder_2.state_dict(), OPEN_CLIP_PREFIX["sdxl"]))
    return sd


def save_config_folder(pipe, folder: Path) -> Path:
    """A diffusers folder without weights: every component's config, and the tokenizers."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_config(str(folder))
    for name in ("unet", "vae", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        comp = getattr(pipe, name, None)
        if comp is None:
            continue
        sub = folder / name
        sub.mkdir(exist_ok=True)
        if name.startswith("tokenizer"):
            comp.save_pretrained(str(sub))
        elif name.startswith("text_encoder"):
            comp.config.save_pretrained(str(sub))
        else:
            comp.save_config(str(sub))
    # no safety checker / feature extractor / image encoder in a converted checkpoint
    index = json.loads((folder / "model_index.json").read_text())
    for name in ("safety_checker", "feature_extractor", "image_encoder"):
        if name in index:
            index[name] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def save_single_file(bundle, path: str | Path, with_config: bool = True, family: str | None = None) -> Path:
    """Write a loaded model as one LDM-layout ``.safetensors`` (and, with ``with_config``, its
    ``<name>.config/`` folder so that the loader rebuilds exactly this architecture).
    ``family`` overrides the text-encoder layout (``"sd2"`` writes an SD-1-shaped model with
    an OpenCLIP-layout text encoder, to exercise the SD 2.x path)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = pipeline_to_ldm(bundle.pipe, family or bundle.family)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in sd.items()}, str(path))
    if with_config:
        save_config_folder(bundle.pipe, path.with_name(path.stem + ".config"))
    return path
