"""Gradients through a model held in half precision.

DIA's conditioning and noise inversions and Difference Inversion's DIFF training
back-propagate a loss through the UNet (and the text encoders) into a few fp32 leaves: token
rows, a noise map, DIFF tokens. With the model in fp16 the backward pass runs in fp16 too, and
fp16 has five exponent bits: a gradient below 2⁻²⁴ ≈ 6·10⁻⁸ becomes zero. The loss is a mean
over every latent element (4·64·64·views at 512²), so the gradient each element sends back
starts near 10⁻⁶ and much of it flushes to zero on the way. Measured on toy-sd at a 64×64
latent (the token inversion's gradient, against the same model in fp32): fp16 gives 18 % less
norm (0.825×); with the loss scaled by 2¹⁶ before the backward pass, 0.9993× and cosine
0.999999. bf16 has fp32's exponent range and needs no scaling (cosine 0.99994).

:class:`LossScaler` is dynamic loss scaling, as mixed-precision training does it: the loss is
multiplied by ``scale`` before the backward pass and the leaves' gradients are divided by it
after; when a gradient overflows (inf/nan) the step's gradients are not used and the scale
halves; after ``growth_interval`` clean steps it doubles again. For fp32 and bf16 models the
scale is 1 and this is a plain ``torch.autograd.grad``.
"""
from __future__ import annotations

import torch


class LossScaler:
    def __init__(self, dtype: torch.dtype, init_scale: float = 2.0 ** 16,
                 growth_interval: int = 200, min_scale: float = 1.0):
        self.active = dtype == torch.float16
        self.scale = float(init_scale) if self.active else 1.0
        self.growth_interval = int(growth_interval)
        self.min_scale = float(min_scale)
        self.overflows = 0  # steps whose gradients overflowed (and were not used)
        self._clean = 0

    @classmethod
    def for_bundle(cls, bundle, **kw) -> "LossScaler":
        """Scaled when the UNet (where the backward pass spends its time) is fp16."""
        return cls(bundle.unet.dtype, **kw)

    def grads(self, loss: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """d loss / d inputs, unscaled, in the inputs' dtypes; ``None`` when they overflowed
        (the scale has been halved: skip this step, or compute the loss again and retry)."""
        if not self.active:
            return list(torch.autograd.grad(loss, inputs, allow_unused=True))
        scaled = torch.autograd.grad(loss.float() * self.scale, inputs, allow_unused=True)
        finite = all(g is None or bool(torch.isfinite(g).all()) for g in scaled)
        if not finite and torch.isfinite(loss.detach()).all() and self.scale > self.min_scale:
            self.overflows += 1
            self._clean = 0
            self.scale = max(self.min_scale, self.scale / 2)
            return None
        self._clean += 1
        if self._clean >= self.growth_interval:
            self._clean = 0
            self.scale *= 2
        return [None if g is None else (g.float() / self.scale).to(x.dtype) for g, x in zip(scaled, inputs)]

    def backward(self, loss: torch.Tensor, params: list[torch.Tensor]) -> bool:
        """Set ``p.grad`` for an optimiser step; False when the step must be skipped."""
        grads = self.grads(loss, params)
        if grads is None:
            return False
        for p, g in zip(params, grads):
            p.grad = torch.zeros_like(p) if g is None else g
        return True

    def info(self) -> dict:
        return {"loss_scale": self.scale, "overflows": self.overflows} if self.active else {}
