"""AdaIN on latents (Huang & Belongie, 2017), optionally restricted to masks.

Cross-Image Attention (eq. 5) matches the per-channel mean and standard deviation of the output
latent z_t^out to those of the appearance latent z_t^app after denoising steps; because those
statistics depend on how much of the frame the object fills, they are computed on foreground
masks only (one mask per image), and only the output's masked area is replaced.

Masks may be soft (values in [0, 1]): the statistics are then weighted, and the result is blended
by the mask: out = x·(1 − m) + AdaIN(x)·m. With binary masks this is the authors' masked AdaIN
(they use the unbiased variance; we use the weighted, biased one — the difference is one pixel's
worth of normalisation).
"""
from __future__ import annotations

import torch

EPS = 1e-5


def channel_stats(x: torch.Tensor, mask: torch.Tensor | None = None, eps: float = EPS
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of x (B, C, h, w), weighted by ``mask`` (B or 1, 1, h, w) if given.
    Returns (B, C, 1, 1) each. An all-zero mask falls back to the whole image."""
    xf = x.float()
    if mask is None:
        mean = xf.mean(dim=(2, 3), keepdim=True)
        var = xf.var(dim=(2, 3), keepdim=True, unbiased=False)
        return mean, (var + eps).sqrt()
    m = mask.to(device=x.device, dtype=torch.float32).expand(x.shape[0], 1, *x.shape[2:])
    w = m.sum(dim=(2, 3), keepdim=True)
    empty = w <= 0
    m = torch.where(empty, torch.ones_like(m), m)
    w = m.sum(dim=(2, 3), keepdim=True)
    mean = (xf * m).sum(dim=(2, 3), keepdim=True) / w
    var = ((xf - mean) ** 2 * m).sum(dim=(2, 3), keepdim=True) / w
    return mean, (var + eps).sqrt()


def adain(content: torch.Tensor, style: torch.Tensor, content_mask: torch.Tensor | None = None,
          style_mask: torch.Tensor | None = None, eps: float = EPS) -> torch.Tensor:
    """AdaIN(content, style): content's per-channel statistics (inside ``content_mask``) replaced
    by style's (inside ``style_mask``); outside ``content_mask`` the content is unchanged."""
    c_mean, c_std = channel_stats(content, content_mask, eps)
    s_mean, s_std = channel_stats(style, style_mask, eps)
    out = (content.float() - c_mean) / c_std * s_std + s_mean
    if content_mask is not None:
        m = content_mask.to(device=content.device, dtype=torch.float32)
        out = content.float() * (1 - m) + out * m
    return out.to(content.dtype)
