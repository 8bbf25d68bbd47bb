"""Full-size Stable Diffusion folders with random weights, built offline (``analogon build-random``).

The shapes come from the config folders the project ships for single-file checkpoints
(``analogon/models/configs``: SD 1.5, SD 2.1, SDXL base), the tokenizers from the CLIP BPE table
in open_clip's wheel; every weight is drawn by the modules' own initialisers from a fixed seed.
The result is an ordinary diffusers folder that the resolver loads like any other, so that
``analogon bench --model DIR`` measures the real architectures (UNet 860 M / 865 M / 2.6 G
parameters) on a machine without weights. The pictures it makes are noise: it proves costs,
never quality.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

FAMILIES = {"sd15": ("sd15", "sd1"), "sd21": ("sd21", "sd2"), "sdxl": ("sdxl_base", "sdxl")}


def build_random(name: str, out: str | Path, dtype: str = "float32", seed: int = 0,
                 log=print, config_dir: str | Path | None = None, device: str | None = None) -> Path:
    """Write a diffusers folder of the family ``name`` (sd15 | sd21 | sdxl) with random weights
    to ``out``; returns the folder. ``config_dir``: another config-only folder of that family
    (default: the project's own), whose ``tokenizer*/`` folders are used when present. ``device``:
    where the weights are drawn (default the CPU; "cuda" draws SDXL's 3.5 G parameters in seconds
    instead of minutes — other numbers from the same seed)."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ..models import _pipeline_class
    from ..models.single_file import CONFIG_ROOT, default_tokenizer

    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; one of {', '.join(FAMILIES)}")
    folder, family = FAMILIES[name]
    cfg = Path(config_dir) if config_dir is not None else CONFIG_ROOT / folder
    out = Path(out).expanduser()
    if (out / "model_index.json").exists():
        raise FileExistsError(f"{out} already holds a model (model_index.json); remove it first")
    dt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    parts: dict = {}
    where = torch.device(device or "cpu")
    with where:  # the modules' initialisers draw on that device
        parts["unet"] = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(cfg / "unet")))
        parts["vae"] = AutoencoderKL.from_config(AutoencoderKL.load_config(str(cfg / "vae")))
        parts["text_encoder"] = CLIPTextModel(CLIPTextConfig.from_pretrained(str(cfg / "text_encoder")))
    from transformers import CLIPTokenizer

    def tokenizer(sub: str):
        if (cfg / sub).is_dir():
            return CLIPTokenizer.from_pretrained(str(cfg / sub), local_files_only=True)
        return default_tokenizer(family, sub)

    parts["tokenizer"] = tokenizer("tokenizer")
    sched_cfg = json.loads((cfg / "scheduler" / "scheduler_config.json").read_text())
    parts["scheduler"] = getattr(diffusers, sched_cfg["_class_name"]).from_config(sched_cfg)
    if family == "sdxl":
        with where:
            parts["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(str(cfg / "text_encoder_2")))
        parts["tokenizer_2"] = tokenizer("tokenizer_2")
    else:
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    for k in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if k in parts:
            if dt != torch.float32:
                parts[k].to(dtype=dt)
            parts[k].eval()
    pipe = _pipeline_class(family)(**parts)
    log(f"built {name} in {time.perf_counter() - t0:.1f} s; "
        + ", ".join(f"{k} {sum(p.numel() for p in parts[k].parameters()) / 1e6:.0f} M"
                    for k in ("unet", "vae", "text_encoder", "text_encoder_2") if k in parts))
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out), safe_serialization=True)
    (out / "RANDOM_WEIGHTS.txt").write_text(
        f"Random weights ({name}, seed {seed}, {dtype}, drawn on {where.type}) built by `analogon build-random` from "
        f"analogon/models/configs/{folder}: for measuring costs, never quality.\n")
    log(f"wrote {out} ({sum(p.stat().st_size for p in out.rglob('*') if p.is_file()) / 2**30:.2f} GiB) "
        f"in {time.perf_counter() - t0:.1f} s")
    return out
