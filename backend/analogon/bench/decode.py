"""Section `decode`: one VAE decode at several working sizes, whole against tiled.

The VAE decode is the peak memory of a job at every size on SD shapes, so this section measures
it alone, per size:

- ``shipped``: ``core.diffusion.vae_decode`` as the methods call it (one image; tiled only where
  :func:`~analogon.core.diffusion.decode_plan` finds that one image's decode would not fit in the
  free memory: the row's ``plan`` says which it chose);
- ``tiled``: the same call with the VAE's tiling forced on (what the ``vae_tiling`` load option /
  the memory settings' VAE tiling do: diffusers' ``tiled_decode``, overlapping tiles blended).

Reported per row (``bench._measure``): wall and CPU seconds (median of ``--repeat``), the true
peak memory above the start, the estimate the plan decides by (``est_mb``:
:func:`~analogon.core.diffusion.decode_bytes`), and for ``tiled`` the largest difference from
the whole decode (``max_diff``, in [-1, 1] units: tiling blends, it is not exact).
"""
from __future__ import annotations

import statistics
from typing import Any

from . import register


def _add_arguments(p) -> None:
    p.add_argument("--decode-model", default="tiny-sd",
                   help="model spec for the decode section (default tiny-sd)")
    p.add_argument("--decode-sizes", default=None,
                   help="comma-separated square working sizes (default: the native size and twice it)")
    p.add_argument("--decode-modes", default="shipped,tiled",
                   help="comma-separated: shipped (the methods' decode), tiled (tiling forced on)")


MODES = {"shipped": "shipped", "tiled": "tiled"}


def run(opts) -> list[dict[str, Any]]:
    import torch

    from ..core.diffusion import decode_bytes, decode_plan, vae_decode
    from ..models import LoadOptions, load_bundle
    from .pixels import _sync, cases_from
    from ._measure import measure

    spec = getattr(opts, "decode_model", None) or "tiny-sd"
    modes = cases_from(getattr(opts, "decode_modes", None), MODES)
    bundle = load_bundle(spec, LoadOptions(device=opts.device))
    vf = bundle.vae_scale_factor
    text = getattr(opts, "decode_sizes", None)
    sizes = [int(x) for x in text.split(",") if x.strip()] if text else [bundle.native_size, 2 * bundle.native_size]
    if bundle.device.type == "cpu":
        torch.set_num_threads(1)  # a shared CPU: one thread gives steadier medians
    vae = bundle.vae
    with torch.no_grad():  # the VAE's weights resident before measuring (folders load memory-mapped)
        for t in list(vae.parameters()) + list(vae.buffers()):
            t.sum()
    c = vae.config.latent_channels
    rows: list[dict[str, Any]] = []
    for size in sizes:
        lat = (size // vf, size // vf)
        z = torch.randn(1, c, *lat, generator=torch.Generator().manual_seed(0)).to(bundle.device, bundle.unet.dtype)
        outs: dict[str, torch.Tensor] = {}
        for mode in modes:
            tiled = mode == "tiled"
            was = bool(getattr(vae, "use_tiling", False))
            if tiled:
                vae.enable_tiling()
            try:
                plan = "tiled" if tiled else decode_plan(bundle, tuple(z.shape))

                def go():
                    out = vae_decode(bundle, z)
                    _sync(bundle)
                    return out

                if not getattr(opts, "no_warmup", False):
                    go()
                runs = [measure(bundle, go) for _ in range(max(1, opts.repeat))]
            finally:
                if tiled and not was:
                    vae.disable_tiling()
            outs[mode] = runs[-1][1]
            last = runs[-1][0]
            row: dict[str, Any] = {
                "model": spec, "device": str(bundle.device), "threads": torch.get_num_threads(),
                "size": f"{size}x{size}", "latent": f"{lat[1]}x{lat[0]}", "case": mode, "plan": plan,
                "seconds": round(statistics.median(r[0]["wall_s"] for r in runs), 3),
                "cpu_s": round(statistics.median(r[0]["cpu_s"] for r in runs), 3),
                "est_mb": round(decode_bytes(bundle, lat) / 2**20, 1),
            }
            row.update({k: v for k, v in last.items()
                        if k in ("peak_mem_mb", "peak_rss_mb", "peak_alloc_mb", "vae_dec", "vae_dec_s")})
            if tiled and "shipped" in outs:
                row["max_diff"] = round(float((outs["tiled"] - outs["shipped"]).abs().max()), 4)
            rows.append(row)
    return rows


register("decode", run, "one VAE decode per working size: the shipped plan against forced tiling "
         "(time, peak memory)", _add_arguments)
