"""FreeU (Si, Huang, Jiang & Liu, 2023) on a diffusers UNet, in the two forms in use.

FreeU re-weights the decoder: it amplifies half of the backbone's channels by b and damps the low
frequencies of some features by s (a box around the zero frequency of the 2-D spectrum). Which
features, and where, differs:

- ``diffusers`` (``UNet2DConditionModel.enable_freeu``): in the first two up blocks, before each
  resnet, the backbone's first half of channels × b and the *skip* features Fourier-filtered by s.
- ``authors`` (Cross-Image Attention's code, a UNet subclass): at the input of *every* up block
  whose backbone has the UNet's deepest channel count (SD 1.5 / SDXL: 1280) or the next one (640),
  the backbone's first half of channels × b1 / b2 and then the whole *backbone* Fourier-filtered by
  s1 / s2; the skip features are left alone. In SD 1.5 that is three up blocks at 1280 and one at
  640 (the inputs of up blocks 0–3); in SDXL two at 1280 and one at 640.

Here the authors' operator is a forward pre-hook on the up blocks (their ``hidden_states``),
not a copy of the UNet's forward. The filter runs in float32 (half-precision FFTs are limited to
power-of-two sizes) and is cast back.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Literal

import torch

FreeUOperator = Literal["authors", "diffusers"]
FREEU_OPERATORS = ("authors", "diffusers")
_DIFFUSERS_KEYS = ("s1", "s2", "b1", "b2")


def fourier_filter(x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    """Scale the spectrum of x (B, C, H, W) by ``scale`` in the (2·threshold)² box around the zero
    frequency (after centring), leave the rest; the real part of the inverse."""
    xf = x.float()
    freq = torch.fft.fftshift(torch.fft.fftn(xf, dim=(-2, -1)), dim=(-2, -1))
    h, w = x.shape[-2:]
    cy, cx = h // 2, w // 2
    mask = torch.ones((h, w), dtype=torch.float32, device=x.device)
    mask[max(0, cy - threshold):cy + threshold, max(0, cx - threshold):cx + threshold] = scale
    freq = freq * mask
    out = torch.fft.ifftn(torch.fft.ifftshift(freq, dim=(-2, -1)), dim=(-2, -1)).real
    return out.to(x.dtype)


def stage_channels(unet) -> tuple[int, int | None]:
    """The backbone channel counts the authors' operator acts on: the UNet's deepest and the next
    distinct one (SD 1.5 and SDXL: 1280 and 640)."""
    chans = sorted(set(int(c) for c in unet.config.block_out_channels), reverse=True)
    return chans[0], (chans[1] if len(chans) > 1 else None)


def authors_backbone(h: torch.Tensor, b: float, s: float) -> torch.Tensor:
    """The authors' step on one up block's input: first half of the channels × b, then the whole
    backbone's low frequencies × s."""
    h = h.clone()
    half = h.shape[1] // 2
    h[:, :half] = h[:, :half] * b
    return fourier_filter(h, threshold=1, scale=s)


@contextmanager
def freeu(unet, operator: FreeUOperator | None, s1: float = 0.9, s2: float = 0.2, b1: float = 1.2,
          b2: float = 1.4) -> Iterator[None]:
    """FreeU on ``unet`` for the block: ``operator`` "authors" or "diffusers", or None for off.
    The UNet's own FreeU settings are off inside (so that two operators never stack) and restored
    afterwards, as are its hooks."""
    if operator is not None and operator not in FREEU_OPERATORS:
        raise ValueError(f"unknown FreeU operator {operator!r}; one of {FREEU_OPERATORS}")
    saved = [{k: getattr(b, k, None) for k in _DIFFUSERS_KEYS} for b in unet.up_blocks]
    handles = []
    if operator == "diffusers":
        unet.enable_freeu(s1=s1, s2=s2, b1=b1, b2=b2)
    else:
        unet.disable_freeu()
    if operator == "authors":
        c1, c2 = stage_channels(unet)
        factors = {c1: (b1, s1)}
        if c2 is not None:
            factors[c2] = (b2, s2)

        def pre_hook(module, args, kwargs):
            if "hidden_states" in kwargs:
                h = kwargs["hidden_states"]
                bs = factors.get(int(h.shape[1]))
                if bs is not None:
                    kwargs = {**kwargs, "hidden_states": authors_backbone(h, *bs)}
                return args, kwargs
            if args:
                bs = factors.get(int(args[0].shape[1]))
                if bs is not None:
                    args = (authors_backbone(args[0], *bs), *args[1:])
            return args, kwargs

        handles = [b.register_forward_pre_hook(pre_hook, with_kwargs=True) for b in unet.up_blocks]
    try:
        yield
    finally:
        for hd in handles:
            hd.remove()
        for block, values in zip(unet.up_blocks, saved):
            for k, v in values.items():
                if v is None and not hasattr(block, k):
                    continue
                setattr(block, k, v)
