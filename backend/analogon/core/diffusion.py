"""The diffusion building blocks every method shares, on a ModelBundle's stock components.

- ``Conditioning``: the UNet's text conditioning for SD 1.x/2.x (hidden states) and SDXL
  (hidden states + pooled embedding + size ids), batched and concatenated as one value.
- ``time_ids``: SDXL's micro-conditioning, the one place it is made: six ids on the base
  (original size, crop, target size), five on the refiner (original size, crop, aesthetic
  score: 6.0 for the prompt, 2.5 for the negative, diffusers' defaults).
- ``encode_prompt``: the pipeline's own prompt encoder, wrapped into Conditioning. The
  unconditional side follows the model's ``force_zeros_for_empty_prompt`` as diffusers'
  pipelines do: with an empty negative prompt it is all zeros (hidden and pooled) when the
  model's config says so (SDXL base), the encoded empty prompt otherwise (SDXL refiner).
- ``vae_encode`` / ``vae_decode``: scaled latents, in the VAE's dtype (SDXL's VAE stays fp32).
- ``make_scheduler``, ``img2img_timesteps``, ``noised``: schedulers by name, the img2img
  truncation diffusers uses, and noising at one timestep that is immune to ``set_begin_index``.
- ``predict_noise``: one (optionally classifier-free guided) UNet call.
- ``sample``: a guided denoising loop with a per-step hook (edit maps use it), progress and cancel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

SCHEDULERS: dict[str, str] = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "pndm": "PNDMScheduler",
    "ddpm": "DDPMScheduler",
}
SCHEDULER_NAMES = tuple(SCHEDULERS)


@dataclass
class Conditioning:
    """Text conditioning for the UNet. ``pooled``/``time_ids`` are set for SDXL only."""

    hidden: torch.Tensor  # (B, 77, D)
    pooled: torch.Tensor | None = None  # (B, P)
    time_ids: torch.Tensor | None = None  # (B, 6); (B, 5) on the SDXL refiner

    @property
    def batch(self) -> int:
        return self.hidden.shape[0]

    def unet_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"encoder_hidden_states": self.hidden}
        if self.pooled is not None:
            kw["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kw

    def fields(self) -> tuple:
        """(hidden, pooled, time_ids) as they are: ``dataclasses.astuple`` would deep-copy them
        (and refuses tensors that carry gradients)."""
        return (self.hidden, self.pooled, self.time_ids)

    def repeat(self, n: int) -> "Conditioning":
        return self.map(lambda t: t.repeat(n, *([1] * (t.ndim - 1))))

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Conditioning":
        return Conditioning(*(None if v is None else fn(v) for v in self.fields()))

    @staticmethod
    def cat(items: list["Conditioning"]) -> "Conditioning":
        fields = list(zip(*(c.fields() for c in items)))
        return Conditioning(*(None if f[0] is None else torch.cat(f) for f in fields))

    def lerp_delta(self, plus: "Conditioning", minus: "Conditioning", scale: float) -> "Conditioning":
        """self + scale·(plus − minus), field by field (used by analogies in embedding space)."""
        def f(a, b, c):
            return None if a is None else a + scale * (b - c)
        s, p, m = self.fields(), plus.fields(), minus.fields()
        return Conditioning(*(f(a, b, c) if i < 2 else a for i, (a, b, c) in enumerate(zip(s, p, m))))


# the SDXL refiner's aesthetic scores (diffusers' StableDiffusionXLImg2ImgPipeline defaults)
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5


def sdxl_time_ids(size_hw: tuple[int, int], device, dtype, aesthetic: float | None = None) -> torch.Tensor:
    """SDXL's micro-conditioning, one row: (original size, crop top-left, target size) on the
    base; (original size, crop top-left, aesthetic score) when ``aesthetic`` is given (refiner)."""
    h, w = size_hw
    row = [h, w, 0, 0, aesthetic] if aesthetic is not None else [h, w, 0, 0, h, w]
    return torch.tensor([row], device=device, dtype=dtype)


def time_ids(bundle, image_hw: tuple[int, int] | None, device=None, dtype=None,
             aesthetic: float = AESTHETIC_SCORE) -> torch.Tensor | None:
    """The model's micro-conditioning ids (one row) at ``image_hw`` (None: native size);
    None for SD 1.x / 2.x. ``aesthetic`` is used by the SDXL refiner only."""
    if not bundle.is_sdxl:
        return None
    hw = image_hw or (bundle.native_size, bundle.native_size)
    return sdxl_time_ids(hw, device or bundle.device, dtype or bundle.unet.dtype,
                         aesthetic if getattr(bundle, "is_refiner", False) else None)


@torch.no_grad()
def encode_prompt(bundle, prompt: str, negative: str = "", image_hw: tuple[int, int] | None = None,
                  aesthetic: float | None = None, negative_aesthetic: float | None = None
                  ) -> tuple[Conditioning, Conditioning]:
    """(conditional, unconditional) Conditioning for a prompt, using the pipeline's encoder.
    An empty ``negative`` is "no negative prompt": zeros where the model's config has
    ``force_zeros_for_empty_prompt`` (SDXL), the encoded empty prompt otherwise.
    ``aesthetic``/``negative_aesthetic``: the refiner's scores for each side (defaults 6.0/2.5)."""
    pipe = bundle.pipe
    dev = bundle.device
    if bundle.is_sdxl:
        pe, ne, pp, npool = pipe.encode_prompt(
            prompt=prompt, device=dev, num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=negative or None,
        )
        a = AESTHETIC_SCORE if aesthetic is None else aesthetic
        na = NEGATIVE_AESTHETIC_SCORE if negative_aesthetic is None else negative_aesthetic
        ids = time_ids(bundle, image_hw, dev, pe.dtype, aesthetic=a)
        nids = time_ids(bundle, image_hw, dev, pe.dtype, aesthetic=na)
        return Conditioning(pe, pp, ids), Conditioning(ne, npool, nids)
    pe, ne = pipe.encode_prompt(prompt, dev, 1, True, negative_prompt=negative or None)
    return Conditioning(pe), Conditioning(ne)


def with_size(cond: Conditioning, image_hw: tuple[int, int]) -> Conditioning:
    """SDXL: the same conditioning with size ids for another working size (the refiner's
    aesthetic score is kept)."""
    if cond.time_ids is None:
        return cond
    h, w = image_hw
    ids = cond.time_ids.clone()
    ids[:, 0], ids[:, 1], ids[:, 2], ids[:, 3] = h, w, 0, 0
    if ids.shape[1] == 6:
        ids[:, 4], ids[:, 5] = h, w
    return Conditioning(cond.hidden, cond.pooled, ids)


# -- VAE ------------------------------------------------------------------------------------

def vae_encode(bundle, image: torch.Tensor, generator: torch.Generator | None = None,
               sample: bool = False) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] to scaled latents in the UNet's dtype. The distribution's mean
    unless ``sample`` (deterministic by default)."""
    vae = bundle.vae
    x = image.to(device=bundle.device, dtype=vae.dtype)
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        z = dist.sample(generator) if sample else dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    z = (z - shift) * vae.config.scaling_factor
    return z.to(bundle.unet.dtype)


def vae_decode(bundle, latents: torch.Tensor, grad: bool = False) -> torch.Tensor:
    """Scaled latents to (B, 3, H, W) in [-1, 1] (float32).

    The decoder's activations are the peak memory of a job at every size (SD 1.5 shapes, fp32:
    1.08 GB at 512², 2.22 GB at 768², 3.94 GB at 1024², for one image). So, without gradients,
    the decode is chosen per call: one image at a time (a batch costs no more than one image;
    exact), and tiled (diffusers' ``tiled_decode``, blended overlaps: not bit-exact) only when one
    image's estimated peak exceeds the memory there is (:func:`decode_plan`). The memory
    settings' VAE tiling (``vae.enable_tiling``) still tiles every decode larger than a tile."""
    vae = bundle.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    z = latents.to(vae.dtype) / vae.config.scaling_factor + shift
    if grad:
        return vae.decode(z).sample.float()
    tiled = decode_plan(bundle, tuple(z.shape)) == "tiled"
    with torch.no_grad():
        out = [(vae.tiled_decode(zi[None]) if tiled else vae.decode(zi[None])).sample.float() for zi in z]
    return torch.cat(out)


# fp32 bytes per output pixel of one decode with SD's VAE decoder (512 channels at its widest):
# measured 1.08 / 2.22 / 3.94 GB at 512² / 768² / 1024² (docs/benchmarks-fullsize.md)
DECODE_BYTES_PER_PIXEL = 4200


def decode_bytes(bundle, latent_hw: tuple[int, int]) -> int:
    """Estimated peak bytes of decoding one latent of ``latent_hw`` without tiling."""
    vae = bundle.vae
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    width = max(vae.config.block_out_channels) / 512
    itemsize = torch.empty((), dtype=vae.dtype).element_size()
    return int(latent_hw[0] * f * latent_hw[1] * f * DECODE_BYTES_PER_PIXEL * width * itemsize / 4)


def decode_plan(bundle, latent_shape: tuple[int, ...], available: int | None = None) -> str:
    """"whole" or "tiled": tiled when the latent is larger than a tile and one image's decode
    would not fit in what is free on the VAE's device (``available``, measured when None)."""
    vae = bundle.vae
    tile = int(getattr(vae, "tile_latent_min_size", 0) or 0)
    if getattr(vae, "use_tiling", False) or tile <= 0 or max(latent_shape[-2:]) <= tile:
        return "whole"  # diffusers tiles by itself, or nothing to tile
    if available is None:
        from ..memory import device_available, host_available

        dev = next(vae.parameters()).device
        available = device_available(dev) if dev.type != "cpu" else host_available()
        if available is None:
            return "whole"
    return "tiled" if decode_bytes(bundle, tuple(latent_shape[-2:])) > available else "whole"


# -- schedulers -------------------------------------------------------------------------------

def make_scheduler(bundle, name: str = "ddim", steps: int = 50, **overrides):
    """A fresh scheduler of the given kind, configured from the model's own scheduler config,
    with ``set_timesteps(steps)`` done."""
    import diffusers

    try:
        cls = getattr(diffusers, SCHEDULERS[name])
    except KeyError:
        raise ValueError(f"unknown scheduler {name!r}; one of {SCHEDULER_NAMES}") from None
    sched = cls.from_config(bundle.scheduler.config, **overrides)
    sched.set_timesteps(steps, device=bundle.device)
    return sched


def img2img_timesteps(scheduler, steps: int, strength: float) -> torch.Tensor:
    """The timesteps diffusers' img2img runs for ``strength`` (the last ⌈steps·strength⌉)."""
    init = min(int(steps * strength), steps)
    start = max(steps - init, 0)
    return scheduler.timesteps[start * scheduler.order:]


def noised(scheduler, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
    """x0 noised to timestep t with the scheduler's own ``add_noise``, one timestep at a time.

    Some schedulers read their begin/step index instead of ``t`` once a pipeline called
    ``set_begin_index``; we clear it for the call so that ``t`` decides."""
    tt = torch.as_tensor(t, device=x0.device).reshape(1)
    saved = getattr(scheduler, "_begin_index", None)
    if saved is not None:
        scheduler._begin_index = None
    try:
        return scheduler.add_noise(x0, noise, tt)
    finally:
        if saved is not None:
            scheduler._begin_index = saved


def init_noise(bundle, latent_shape, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(latent_shape, generator=generator, device="cpu", dtype=torch.float32).to(
        bundle.device, bundle.unet.dtype)


# -- the UNet -----------------------------------------------------------------------------------

def predict_noise(bundle, latents: torch.Tensor, t, cond: Conditioning,
                  uncond: Conditioning | None = None, guidance: float = 1.0,
                  scheduler=None, cross_attention_kwargs: dict | None = None) -> torch.Tensor:
    """The UNet's noise prediction for ``latents`` at ``t``; classifier-free guided in one batched
    call when ``uncond`` is given and ``guidance != 1``. ``scheduler.scale_model_input`` is applied
    when a scheduler is given."""
    unet = bundle.unet
    x = scheduler.scale_model_input(latents, t) if scheduler is not None else latents
    b = latents.shape[0]
    if cond.batch != b:
        cond = cond.repeat(b // cond.batch)
    if uncond is not None and guidance != 1.0:
        if uncond.batch != b:
            uncond = uncond.repeat(b // uncond.batch)
        both = Conditioning.cat([uncond, cond])
        out = unet(torch.cat([x, x]), t, cross_attention_kwargs=cross_attention_kwargs,
                   **both.unet_kwargs()).sample
        e_u, e_c = out.chunk(2)
        return e_u + guidance * (e_c - e_u)
    return unet(x, t, cross_attention_kwargs=cross_attention_kwargs, **cond.unet_kwargs()).sample


StepHook = Callable[[int, Any, torch.Tensor], torch.Tensor]


def sample(bundle, scheduler, latents: torch.Tensor, timesteps, cond: Conditioning,
           uncond: Conditioning | None = None, guidance: float = 1.0,
           before_step: StepHook | None = None, on_step: Callable[[int], None] | None = None,
           generator: torch.Generator | None = None, eta: float | None = None,
           on_prediction: Callable[[int, torch.Tensor], None] | None = None,
           noise_maps: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
    """Run the scheduler over ``timesteps`` from ``latents``.

    ``before_step(i, t, latents) -> latents`` runs before each UNet call (edit-map resets,
    latent surgery); ``on_step(i)`` after each step (progress, cancel: it may raise);
    ``on_prediction(i, x0)`` after step i with the scheduler's prediction of the clean latent
    (its ``pred_original_sample``; the new latents for schedulers that give none): previews.
    ``noise_maps(i)`` gives step i's noise instead of a random draw (a DDIM scheduler with
    ``eta`` > 0: the noise maps of an edit-friendly inversion, ``core.ddpm_inversion``)."""
    extra: dict[str, Any] = {}
    import inspect

    params = inspect.signature(scheduler.step).parameters
    if noise_maps is not None and "variance_noise" not in params:
        raise ValueError(f"{type(scheduler).__name__} takes no noise maps")
    if generator is not None and "generator" in params and noise_maps is None:
        extra["generator"] = generator
    if eta is not None and "eta" in params:
        extra["eta"] = eta
    for i, t in enumerate(timesteps):
        if before_step is not None:
            latents = before_step(i, t, latents)
        with torch.no_grad():
            eps = predict_noise(bundle, latents, t, cond, uncond, guidance, scheduler=scheduler)
            if noise_maps is not None:
                extra["variance_noise"] = noise_maps(i).to(latents.device, latents.dtype)
            out = scheduler.step(eps, t, latents, **extra)
            latents = out.prev_sample
        if on_prediction is not None:
            x0 = getattr(out, "pred_original_sample", None)
            on_prediction(i, latents if x0 is None else x0)
        if on_step is not None:
            on_step(i + 1)
    return latents
