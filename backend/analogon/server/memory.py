"""How much memory a job needs, estimated before it is queued, against what the machine has.

A job's memory has two parts:

- the full-resolution work: decoding, placing and compositing the images at their own size
  (a 4096² PIXELS job holds about 1 GB of such arrays). It grows with the pixel count and is
  on the host whatever the device. ``FULL_RES_BYTES_PER_PIXEL`` is what ``analogon``'s jobs
  measured on tiny-sd at 1024² and 2048² (peak RSS over the model's own, see
  docs/hardening.md); each image beyond the first adds ``IMAGE_BYTES_PER_PIXEL``.
- the model's work at its native size (the methods scale every region to it), from a table
  per family, for fp16; fp32 (the CPU's default) doubles it. It is on the device.
- the model's weights, when the model is not loaded yet (a loaded model's weights are already
  in use and no longer in what is free), from a table per family, for fp16; fp32 doubles them.

When the weights and the work alone do not fit — no region is small enough — the refusal
names the model and suggests a smaller one, instead of a smaller region.

A job that would not fit is refused at submission (``413 out_of_memory``, with the estimate
in ``detail``); an allocation that fails anyway while the job runs ends it with an
``out_of_memory`` error event, never ``internal_error``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import AnalogonError
from ..memory import device_available, host_available
from ..models.toy import TOY_FOLDERS

MiB = 1024**2
GiB = 1024**3

# host bytes per pixel of the largest image, by method (measured: see the module docstring)
FULL_RES_BYTES_PER_PIXEL = {"pixels": 64, "appearance": 60, "dia": 66, "difference": 68}
DEFAULT_BYTES_PER_PIXEL = 64
IMAGE_BYTES_PER_PIXEL = 8  # each further image: its RGBA8 copy and its placed canvas

# activations at the family's native size, fp16 (sd1 512², sd2 768², sdxl 1024²)
MODEL_WORK_BYTES = {"tiny": 64 * MiB, "sd1": int(1.5 * GiB), "sd2": int(2.5 * GiB), "sdxl": 5 * GiB}
# the weights (UNet, text encoders, VAE) in fp16: SD 1.5 2.0 GiB, SD 2.1 2.4 GiB, SDXL 6.5 GiB
WEIGHT_BYTES = {"tiny": 16 * MiB, "sd1": int(2.0 * GiB), "sd2": int(2.4 * GiB), "sdxl": int(6.5 * GiB)}
FAMILY_TITLES = {"tiny": "tiny", "sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
# methods that run several branches at once or train (Difference Inversion's DIFF tokens)
METHOD_WORK_FACTOR = {"pixels": 1.0, "appearance": 2.0, "dia": 1.0, "difference": 3.0}
EMBEDDED_TINY = ("tiny-sd", "tiny-sdxl", *TOY_FOLDERS)


@dataclass(frozen=True)
class Estimate:
    method: str
    family: str
    width: int
    height: int
    images: int
    full_res_bytes: int  # on the host
    model_bytes: int  # on the device (the host when the device is the CPU)
    weights_bytes: int = 0  # the model's weights when it is not loaded yet; on the device
    model: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "family": self.family, "width": self.width, "height": self.height,
                "images": self.images, "full_res_bytes": self.full_res_bytes, "model_bytes": self.model_bytes,
                "weights_bytes": self.weights_bytes, "model": self.model}


def memory_family(family: str | None) -> str:
    """The row of the tables above for a checkpoint family of models.discovery
    ('sd2-v', 'sdxl-inpainting', ...)."""
    f = family or "sd1"
    for k in ("sdxl", "sd2", "sd1", "tiny"):
        if f.startswith(k):
            return k
    return "sd1"


def model_need(family: str, method: str | None = None, fp32: bool = False, loaded: bool = False) -> int:
    """Bytes a model of ``family`` needs on its device for ``method`` (any method: the most
    demanding), weights included unless it is ``loaded``."""
    fam = memory_family(family)
    factor = METHOD_WORK_FACTOR.get(method, 1.0) if method else max(METHOD_WORK_FACTOR.values())
    need = MODEL_WORK_BYTES.get(fam, MODEL_WORK_BYTES["sd1"]) * factor
    if not loaded:
        need += WEIGHT_BYTES.get(fam, WEIGHT_BYTES["sd1"])
    return int(need * (2 if fp32 else 1))


def family_of(spec: str, models=None) -> str:
    """The family a model spec most likely is, without loading it."""
    if spec in EMBEDDED_TINY:
        return "tiny"
    if models is not None:
        bundle = getattr(models, "_models", {}).get(spec)
        if bundle is not None:
            return bundle.family
    low = spec.lower()
    if "xl" in low:
        return "sdxl"
    if "2-1" in low or "2.1" in low or "sd2" in low or "v2" in low:
        return "sd2"
    return "sd1"


def estimate(prepared, store, models=None) -> Estimate:
    """The memory ``prepared`` (an engine.PreparedJob) needs, from the stored images' sizes."""
    refs = [r for v in prepared.refs.values() for r in (v if isinstance(v, list) else [v])]
    sizes = []
    for r in refs:
        info = store.info(r.sha) if hasattr(store, "info") else None
        if info is not None:
            sizes.append((info.width, info.height))
        else:
            arr = store.load(r.sha)
            sizes.append((arr.shape[1], arr.shape[0]))
    w, h = max(sizes, key=lambda s: s[0] * s[1]) if sizes else (0, 0)
    pixels = w * h
    method = prepared.method.id
    full = pixels * (FULL_RES_BYTES_PER_PIXEL.get(method, DEFAULT_BYTES_PER_PIXEL)
                     + IMAGE_BYTES_PER_PIXEL * max(0, len(refs) - 1))
    family = family_of(prepared.model, models)
    work = MODEL_WORK_BYTES.get(family, MODEL_WORK_BYTES["sd1"]) * METHOD_WORK_FACTOR.get(method, 1.0)
    loaded = prepared.model in getattr(models, "_models", {}) if models is not None else False
    weights = 0 if loaded else WEIGHT_BYTES.get(family, WEIGHT_BYTES["sd1"])
    return Estimate(method, family, w, h, len(refs), int(full), int(work), int(weights), prepared.model)


class Budget:
    """What a job may use: ``host_bytes`` (a setting) or what is free at submission."""

    def __init__(self, device, dtype=None, host_bytes: int | None = None):
        self.device = device
        self.on_cpu = getattr(device, "type", str(device)) == "cpu"
        self.fp32 = str(dtype).endswith("float32") if dtype is not None else self.on_cpu
        self.host_bytes = host_bytes

    def available(self) -> int | None:
        """What the model may use: the device's free memory, or the host's on the CPU."""
        if self.on_cpu:
            return self.host_bytes if self.host_bytes is not None else host_available()
        return device_available(self.device)

    def fits(self, family: str, method: str | None = None, loaded: bool = False) -> bool:
        """Whether a model of ``family`` can run ``method`` here at all (at the smallest
        region); True where the free memory is unknown."""
        have = self.available()
        return have is None or model_need(family, method, self.fp32, loaded) <= have

    def check(self, est: Estimate) -> None:
        model_total = (est.model_bytes + est.weights_bytes) * (2 if self.fp32 else 1)
        host_need = est.full_res_bytes + (model_total if self.on_cpu else 0)
        host_have = self.host_bytes if self.host_bytes is not None else host_available()
        if host_have is not None and host_need > host_have:
            raise self._refuse(est, host_need, host_have, "memory", model_total)
        if not self.on_cpu:
            dev_have = device_available(self.device)
            if dev_have is not None and model_total > dev_have:
                raise self._refuse(est, model_total, dev_have, "GPU memory", model_total)

    def _refuse(self, est: Estimate, need: int, have: int, what: str, model_total: int) -> AnalogonError:
        detail = {**est.to_json(), "needed_bytes": need, "available_bytes": have}
        if model_total > have:
            # No region is small enough: the model is the cause.
            title = FAMILY_TITLES.get(est.family, est.family)
            precision = "in fp32 on the CPU" if self.on_cpu and self.fp32 else (
                "in fp32" if self.fp32 else "in fp16")
            loaded = "" if est.weights_bytes else " (it is loaded)"
            return AnalogonError(
                "out_of_memory",
                f"The {title} model “{est.model}”{loaded} needs about {model_total / GiB:.1f} GiB of "
                f"{what} for {est.method} {precision}, weights included; {max(0, have) / GiB:.1f} GiB "
                "are free, so no region is small enough. Choose a smaller model (an SD 1.5 "
                f"checkpoint needs about {model_need_text('sd1', est.method, self.fp32)}), run the "
                "backend on a GPU, or close other programs.",
                {**detail, "cause": "model"}, status=413)
        return AnalogonError(
            "out_of_memory",
            f"This {est.method} job at {est.width}×{est.height} pixels needs about {need / GiB:.1f} GiB of "
            f"{what}; {max(0, have) / GiB:.1f} GiB are free. Use a smaller region (a selection), "
            "scale the layers down, or close other programs.",
            {**detail, "cause": "region"}, status=413)


def model_need_text(family: str, method: str | None, fp32: bool) -> str:
    return f"{model_need(family, method, fp32) / GiB:.1f} GiB"
