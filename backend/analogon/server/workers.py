"""Several devices on one server: the devices named on the command line, and the models of
all workers seen as one (``app.state.models``).

Each worker has its own ``ModelManager`` (server.jobs.JobQueue), so a model is loaded once per
device and no module is ever shared between two devices. ``ModelPool`` answers what the API
asks of "the models" (which are loaded, what a model's family is) over all of them, and loads
through the first worker's manager when something outside a job needs a model.
"""
from __future__ import annotations

from typing import Any

from ..errors import AnalogonError


def parse_devices(text: str) -> list[str]:
    """``cuda:0,cuda:1`` (or ``cpu,cpu``) as a list; empty parts are refused."""
    parts = [p.strip() for p in str(text).split(",")]
    if not parts or any(not p for p in parts):
        raise AnalogonError("bad_device", f"--devices is a comma-separated list of devices such as "
                            f"cuda:0,cuda:1 (got {text!r}).", {"devices": text})
    return parts


def check_devices(devices: list[str | None]) -> list[str | None]:
    """The devices, checked before anything loads: each one a device torch knows, and a CUDA
    index this machine has. None (the automatic choice) passes."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for d in devices:
        if d is None:
            continue
        try:
            dev = torch.device(d)
        except (RuntimeError, TypeError, ValueError):
            raise AnalogonError("bad_device", f"{d!r} is not a device (examples: cpu, cuda, cuda:1, mps).",
                                {"device": d}) from None
        if dev.type == "cuda" and (count == 0 or (dev.index or 0) >= count):
            raise AnalogonError("bad_device", f"There is no {d} on this machine ({count} CUDA devices).",
                                {"device": d, "cuda_devices": count})
    return devices


class ModelPool:
    """The workers' model managers seen as one."""

    def __init__(self, managers: list):
        self.managers = list(managers)

    def __getattr__(self, name: str) -> Any:  # capacity, options, loads, ...: the first worker's
        if name == "managers":
            raise AttributeError(name)
        return getattr(self.managers[0], name)

    def get(self, spec: str):
        return self.managers[0].get(spec)

    def loaded(self) -> list[str]:
        out: list[str] = []
        for m in self.managers:
            out.extend(s for s in m.loaded() if s not in out)
        return out

    @property
    def _models(self) -> dict[str, Any]:  # what server.memory.family_of reads
        out: dict[str, Any] = {}
        for m in self.managers:
            for spec, bundle in list(m._models.items()):
                out.setdefault(spec, bundle)
        return out

    def available(self, discovered=None, method_ids=None) -> list[dict[str, Any]]:
        out = self.managers[0].available(discovered, method_ids)
        loaded = set(self.loaded())
        for entry in out:
            entry["loaded"] = entry.get("id") in loaded
        return out


# What the methods and model loaders import lazily. diffusers and transformers resolve these
# names on first use; two worker threads doing that for the first time at once can see a
# half-imported module ("cannot import name ..."), so a server with several workers imports
# them once, in one thread, before the workers start.
_NAMES = {
    "diffusers": ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusionImg2ImgPipeline",
                  "StableDiffusionXLImg2ImgPipeline", "StableDiffusionInpaintPipeline", "AutoencoderKL",
                  "UNet2DConditionModel", "DDIMScheduler", "DDIMInverseScheduler"),
    "diffusers.models.attention_processor": ("AttnProcessor", "AttnProcessor2_0"),
    "transformers": ("CLIPTokenizer", "CLIPTextConfig", "CLIPTextModel", "CLIPTextModelWithProjection",
                     "CLIPVisionModelWithProjection", "CLIPModel", "CLIPConfig", "CLIPImageProcessor"),
}


def preimport() -> None:
    import importlib

    for module, names in _NAMES.items():
        try:
            m = importlib.import_module(module)
            for n in names:
                getattr(m, n, None)
        except Exception:  # a missing optional part fails later, in the job that needs it
            pass


class SerialLoads:
    """A worker's ModelManager whose loads take turns with the other workers' (one model load at
    a time on the server: loading is host memory and disk, and the libraries' lazy imports are
    not safe from two threads at once). A model already loaded on the device is handed out at
    once."""

    def __init__(self, manager, lock):
        self.manager = manager
        self.lock = lock

    def __getattr__(self, name: str) -> Any:
        if name in ("manager", "lock"):
            raise AttributeError(name)
        return getattr(self.manager, name)

    def get(self, spec: str):
        if spec in self.manager.loaded():
            return self.manager.get(spec)
        with self.lock:
            return self.manager.get(spec)
