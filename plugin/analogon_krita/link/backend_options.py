"""What the docker tells the backend it starts: the memory preset (or the explicit settings
behind it) and the folders to look for checkpoints in, as separate command-line arguments
(never one string to split). Kept in the plugin's settings (``settings.py``).
"""
from __future__ import annotations

import json
from typing import Any

# the backend's presets (analogon.memory.PRESETS), for showing what each one means
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"device": "cpu", "dtype": "float32", "cpu_offload": False, "vae_tiling": True,
            "max_pixels": 1024 * 1024},
    "low": {"device": None, "dtype": "float16", "cpu_offload": True, "vae_tiling": True,
            "max_pixels": 1024 * 1024},
    "medium": {"device": None, "dtype": "float16", "cpu_offload": False, "vae_tiling": True,
               "max_pixels": 1536 * 1536},
    "high": {"device": None, "dtype": "float16", "cpu_offload": False, "vae_tiling": False,
             "max_pixels": 2048 * 2048},
}
PRESET_CHOICES = (
    ("auto", "Automatic (from the GPU's memory)"),
    ("cpu", "CPU only"),
    ("low", "GPU with up to 6 GB"),
    ("medium", "GPU with up to 12 GB"),
    ("high", "GPU with more than 12 GB"),
    ("custom", "Custom (the settings below)"),
)
DEVICE_CHOICES = (("", "Best available"), ("cuda", "NVIDIA / AMD GPU (cuda)"), ("mps", "Apple GPU (mps)"),
                  ("cpu", "CPU"))
DTYPE_CHOICES = (("", "Automatic"), ("float16", "float16"), ("bfloat16", "bfloat16"), ("float32", "float32"))

DEFAULTS = {
    "memory_preset": "auto",
    "device": "",
    "dtype": "",
    "cpu_offload": "false",
    "vae_tiling": "false",
    "max_pixels": "0",  # 0: the preset's
    "model_folders": "[]",
    "show_developer_models": "false",
}


def _get(settings, key: str) -> str:
    value = settings.get(key, DEFAULTS[key])
    return DEFAULTS[key] if value in (None, "") and key != "device" and key != "dtype" else str(value)


def model_folders(settings) -> list[str]:
    try:
        folders = json.loads(_get(settings, "model_folders") or "[]")
    except ValueError:
        return []
    return [str(f) for f in folders if isinstance(f, str) and f.strip()] if isinstance(folders, list) else []


def memory_args(settings) -> list[str]:
    """``--memory-preset P``, or for *Custom* the explicit ``--device``, ``--dtype``,
    ``--[no-]cpu-offload``, ``--[no-]vae-tiling`` and ``--max-pixels``."""
    preset = _get(settings, "memory_preset")
    if preset in PRESETS or preset == "auto":
        return ["--memory-preset", preset]
    args: list[str] = []
    if _get(settings, "device"):
        args += ["--device", _get(settings, "device")]
    if _get(settings, "dtype"):
        args += ["--dtype", _get(settings, "dtype")]
    truthy = lambda key: _get(settings, key).strip().lower() in ("1", "true", "yes", "on")  # noqa: E731
    args.append("--cpu-offload" if truthy("cpu_offload") else "--no-cpu-offload")
    args.append("--vae-tiling" if truthy("vae_tiling") else "--no-vae-tiling")
    try:
        pixels = int(float(_get(settings, "max_pixels") or 0))
    except ValueError:
        pixels = 0
    if pixels > 0:
        args += ["--max-pixels", str(pixels)]
    return args


def backend_args(settings) -> list[str]:
    """Every argument the docker adds to ``analogon serve``."""
    args = memory_args(settings)
    for folder in model_folders(settings):
        args += ["--models-dir", folder]
    return args


GB = 1024**3
LOW_MAX_BYTES, MEDIUM_MAX_BYTES = 6 * GB, 12 * GB  # the backend's (analogon.memory.auto_preset)


def effective(preset: str, health: dict[str, Any] | None) -> tuple[str, dict[str, Any] | None]:
    """The preset and settings the backend described by ``health`` (``GET /v1/health``) uses
    for ``preset``, as ``analogon.memory.resolve`` does: *auto* from its GPU's memory, a GPU
    preset on a machine without one in float32 without CPU offload."""
    health = health or {}
    device = str(health.get("device", "")).split(":")[0]
    if preset == "auto":
        if not device:
            return preset, None
        vram = (health.get("memory") or {}).get("gpu_total_bytes") or 0
        if device == "mps":
            vram = vram * 2 // 3
        preset = "cpu" if device == "cpu" or not vram else (
            "low" if vram <= LOW_MAX_BYTES else "medium" if vram <= MEDIUM_MAX_BYTES else "high")
    if preset not in PRESETS:
        return preset, None
    p = dict(PRESETS[preset])
    if p["device"] is None and device == "cpu":
        p.update(device="cpu", dtype="float32", cpu_offload=False)
    return preset, p


def _describe(p: dict[str, Any]) -> str:
    side = int(round(p["max_pixels"] ** 0.5))
    return (f"{'CPU' if p['device'] == 'cpu' else 'GPU'}, {p['dtype']}, CPU offload "
            f"{'on' if p['cpu_offload'] else 'off'}, VAE tiling {'on' if p['vae_tiling'] else 'off'}, "
            f"at most {side}\u00d7{side} pixels per working image.")


def preset_summary(preset: str, health: dict[str, Any] | None = None) -> str:
    """What a preset means, in words; with the connected backend's ``health``, what it means
    there (a GPU preset on a machine without a GPU says so)."""
    name, p = effective(preset, health)
    if preset == "auto":
        if p is None:
            return ("The backend picks a preset when it starts, from the memory of its GPU: CPU only, "
                    "\u2264 6 GB, \u2264 12 GB, or more.")
        return f"Automatic: this backend uses {dict(PRESET_CHOICES)[name]}: {_describe(p)}"
    if p is None:
        return "The settings below, as they are."
    if PRESETS[preset]["device"] is None and p["device"] == "cpu":
        return (f"This backend has no GPU: it runs this preset on the CPU ({_describe(p)[5:-1]}). "
                "\u201cCPU only\u201d or Automatic say so.")
    return _describe(p)
