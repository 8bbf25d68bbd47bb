"""SD 2.x: epsilon (2.x-base, 512) or v-prediction (2.x-v, 768), decided from the weights.

The two have the same tensors, so when neither the user, the file's metadata, a yaml nor a
config folder says which it is, one UNet call at load tells:

At the last training timestep T the signal is almost gone: x_T = √ᾱ_T·x₀ + √(1−ᾱ_T)·ε with
√ᾱ_T ≈ 0.068 for SD's schedule, so x_T ≈ ε. An epsilon model therefore returns (close to) its
input there, whatever the input: its output moves one-for-one with x_T. A v model predicts
v = √ᾱ·ε − √(1−ᾱ)·x₀ ≈ −x̂₀, minus its guess of the clean image, which at T is nearly the
same whatever x_T is (it barely depends on a 7 % signal): its output hardly moves with x_T.

The probe runs the UNet once on a batch of two constant latents, +a and −a, at the last
timestep with the empty prompt's conditioning, and measures the slope of output against input
(mean over all latent entries of (out₊ − out₋) / 2a). About 1: epsilon; about 0 (the ideal v
model's slope is √ᾱ − √(1−ᾱ)·∂x̂₀/∂x_T ≈ 0.07 − 0.07): v. The decision threshold is 0.5, half
way. Constant latents keep the probe independent of any random draw, and the difference of
the pair cancels whatever the model adds independently of its input (the −x̂₀ of a v model,
a bias of either kind). ``decisive`` says whether the slope is clearly on one side (below 0.3
or above 0.7); the loader uses the decision either way and reports the slope.
"""
from __future__ import annotations

from typing import Any

import torch

AMPLITUDE = 1.0
THRESHOLD = 0.5
PROBE_LATENT = 32  # side of the probe's latent (256 pixels: cheap, and enough to average over)


def probe_slope(unet, hidden: torch.Tensor, timestep: int, latent: int = PROBE_LATENT,
                amplitude: float = AMPLITUDE) -> float:
    """The slope of the UNet's output against a constant input at ``timestep``."""
    dev, dt = hidden.device, hidden.dtype
    c = int(getattr(unet.config, "in_channels", 4))
    x = torch.ones(2, c, latent, latent, device=dev, dtype=dt) * amplitude
    x[1] = -x[1]
    t = torch.tensor([timestep, timestep], device=dev)
    with torch.no_grad():
        out = unet(x, t, encoder_hidden_states=hidden.expand(2, *hidden.shape[1:])).sample.float()
    return float(((out[0] - out[1]) / (2 * amplitude)).mean())


def decide_from_slope(slope: float) -> str:
    return "epsilon" if slope > THRESHOLD else "v_prediction"


def probe(bundle) -> dict[str, Any]:
    """Run the probe on a loaded SD 2.x bundle: {"type", "slope", "timestep", "decisive"}."""
    pipe = bundle.pipe
    t_last = int(pipe.scheduler.config.num_train_timesteps) - 1
    with torch.no_grad():
        hidden = pipe.encode_prompt("", bundle.device, 1, False)[0].to(bundle.unet.dtype)
    sample = getattr(bundle.unet.config, "sample_size", PROBE_LATENT)
    side = min(PROBE_LATENT, max(sample) if isinstance(sample, (list, tuple)) else int(sample or PROBE_LATENT))
    slope = probe_slope(bundle.unet, hidden, t_last, latent=side)
    return {"type": decide_from_slope(slope), "slope": round(slope, 4), "timestep": t_last,
            "decisive": abs(slope - THRESHOLD) > 0.2}


def apply(bundle, kind: str, decided_by: str, detail: dict[str, Any] | None = None) -> None:
    """Set the bundle's scheduler to ``kind`` and its native size (512 base, 768 v) when the
    shapes came from the shipped SD 2.1 config."""
    from .single_file import set_native_latent

    sched = bundle.pipe.scheduler
    if sched.config.get("prediction_type") != kind:
        bundle.pipe.scheduler = type(sched).from_config(sched.config, prediction_type=kind)
    default_config = bundle.prediction.get("default_config", False)
    if default_config:
        set_native_latent(bundle.pipe, 64 if kind == "epsilon" else 96)
        bundle.native_size = (64 if kind == "epsilon" else 96) * bundle.vae_scale_factor
    bundle.prediction = {"type": kind, "decided_by": decided_by, "default_config": default_config,
                         **({"probe": detail} if detail else {})}
    bundle.variant = "sd2-v" if kind == "v_prediction" else "sd2-base"


def decide(bundle) -> None:
    """Probe an SD 2.x bundle that nothing described and apply the decision."""
    result = probe(bundle)
    apply(bundle, result["type"], "probe", {k: v for k, v in result.items() if k != "type"})
