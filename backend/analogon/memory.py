"""The machine's device and memory, and the memory presets built on them.

A preset is the set of loading settings that fits a size of machine:

| preset | for | device | dtype | CPU offload | VAE tiling | max working pixels |
|---|---|---|---|---|---|---|
| ``cpu`` | no GPU | cpu | float32 | no | yes | 1024² |
| ``low`` | GPU ≤ 6 GB | GPU | float16 | yes | yes | 1024² |
| ``medium`` | GPU ≤ 12 GB | GPU | float16 | no | yes | 1536² |
| ``high`` | GPU > 12 GB | GPU | float16 | no | no | 2048² |

``auto`` picks one from what :func:`system_info` finds (an Apple GPU shares the system's
memory: its size decides). Explicit settings (``--device``, ``--dtype``, ``--cpu-offload``,
``--vae-tiling``, ``--max-pixels``) override the preset's. "Max working pixels" caps the area
of the high-resolution pass (``core.hires``), the part of a job whose memory grows with the
region's size.
"""
from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass
from typing import Any

GB = 1024**3
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
PRESET_NAMES = ("auto", *PRESETS)
LOW_MAX_BYTES = 6 * GB
MEDIUM_MAX_BYTES = 12 * GB


def system_memory() -> dict[str, int]:
    """Total and available system memory and this process's resident size, in bytes, on any
    platform (psutil)."""
    import psutil

    vm = psutil.virtual_memory()
    return {"system_total_bytes": int(vm.total), "system_available_bytes": int(vm.available),
            "process_rss_bytes": int(psutil.Process(os.getpid()).memory_info().rss)}


def host_available() -> int | None:
    """Memory the system can give without swapping, None where unknown (psutil: every platform)."""
    try:
        return system_memory()["system_available_bytes"]
    except Exception:  # pragma: no cover - psutil missing or failing
        return None


def device_available(device) -> int | None:
    """Free memory on a CUDA device, counting what torch caches but does not use; None elsewhere."""
    try:
        import torch

        if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
            free, _ = torch.cuda.mem_get_info(device)
            return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    except Exception:  # pragma: no cover
        pass
    return None


def system_info() -> dict[str, Any]:
    """The best device and how much memory it has: {device, device_name, vram_bytes (None on
    CPU), ram_bytes}."""
    import torch

    out: dict[str, Any] = {"device": "cpu", "device_name": "CPU", "vram_bytes": None}
    try:
        out["ram_bytes"] = system_memory()["system_total_bytes"]
    except Exception:  # pragma: no cover - psutil missing or failing
        out["ram_bytes"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(device="cuda", device_name=props.name, vram_bytes=int(props.total_memory))
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.update(device="mps", device_name="Apple GPU", vram_bytes=out["ram_bytes"])
    return out


def auto_preset(info: dict[str, Any]) -> str:
    """cpu / low (≤ 6 GB) / medium (≤ 12 GB) / high, from the device's memory."""
    vram = info.get("vram_bytes")
    if info.get("device", "cpu") == "cpu" or not vram:
        return "cpu"
    if info.get("device") == "mps":  # shared with the system: about two thirds is usable
        vram = vram * 2 // 3
    if vram <= LOW_MAX_BYTES:
        return "low"
    if vram <= MEDIUM_MAX_BYTES:
        return "medium"
    return "high"


@dataclass
class MemorySettings:
    preset: str
    device: str | None
    dtype: str | None
    cpu_offload: bool
    vae_tiling: bool
    max_pixels: int | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def resolve(preset: str | None = None, info: dict[str, Any] | None = None, *, device: str | None = None,
            dtype: str | None = None, cpu_offload: bool | None = None, vae_tiling: bool | None = None,
            max_pixels: int | None = None) -> MemorySettings:
    """The settings to load models with: the preset's (``auto``: chosen from ``info``, by
    default this machine's), each overridden by an explicit value. Without a preset, the
    explicit values alone (None: the loader's defaults)."""
    if preset in (None, "", "none"):
        return MemorySettings("none", device, dtype, bool(cpu_offload), bool(vae_tiling), max_pixels)
    if preset == "auto" or (preset in PRESETS and PRESETS[preset]["device"] is None and info is None):
        info = info if info is not None else system_info()
    if preset == "auto":
        preset = auto_preset(info)
    if preset not in PRESETS:
        raise ValueError(f"unknown memory preset {preset!r} (one of {', '.join(PRESET_NAMES)})")
    p = dict(PRESETS[preset])
    if p["device"] is None and (info if info is not None else system_info()).get("device") == "cpu":
        p.update(dtype="float32", cpu_offload=False)  # a GPU preset on a machine without one
    pick = lambda given, key: p[key] if given is None else given  # noqa: E731
    return MemorySettings(preset, pick(device, "device"), pick(dtype, "dtype"),
                          bool(pick(cpu_offload, "cpu_offload")), bool(pick(vae_tiling, "vae_tiling")),
                          pick(max_pixels, "max_pixels"))


def platform_name() -> str:
    return {"win32": "windows", "darwin": "macos"}.get(sys.platform, "linux")
