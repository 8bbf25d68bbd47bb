"""The VAE decode that sets every job's peak memory (core.diffusion.vae_decode): a batch is
decoded one image at a time (exactly as alone), and tiled only where one image's decode would
not fit in the memory there is."""
from __future__ import annotations

import pytest
import torch

from analogon import memory
from analogon.core import diffusion
from analogon.core.diffusion import decode_bytes, decode_plan, vae_decode
from analogon.models import load_bundle


@pytest.fixture(scope="module")
def bundle():
    return load_bundle("tiny-sd")


def _latents(n=2, hw=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, hw, hw, generator=g)


def test_a_batch_decodes_as_each_image_alone(bundle):
    z = _latents(3)
    both = vae_decode(bundle, z)
    alone = torch.cat([vae_decode(bundle, z[i:i + 1]) for i in range(3)])
    assert torch.equal(both, alone)


def test_the_plan_tiles_only_what_does_not_fit(bundle):
    need = decode_bytes(bundle, (32, 32))
    assert decode_plan(bundle, (1, 4, 32, 32), available=need * 2) == "whole"
    assert decode_plan(bundle, (1, 4, 32, 32), available=need // 2) == "tiled"
    tile = bundle.vae.tile_latent_min_size
    assert decode_plan(bundle, (1, 4, tile, tile), available=1) == "whole"  # one tile: nothing to tile
    # the estimate grows with the pixels and with the dtype's width
    assert decode_bytes(bundle, (64, 64)) == 4 * decode_bytes(bundle, (32, 32))


def test_sd15_shapes_estimate_what_was_measured():
    class Vae:
        config = type("C", (), {"block_out_channels": (128, 256, 512, 512)})
        dtype = torch.float32

    class B:
        vae = Vae()

    assert decode_bytes(B(), (64, 64)) == pytest.approx(1.08e9, rel=0.05)  # 512², measured 1.08 GB
    assert decode_bytes(B(), (128, 128)) == pytest.approx(3.94e9, rel=0.15)  # 1024², measured 3.94 GB


def test_short_of_memory_the_decode_is_tiled(bundle, monkeypatch):
    z = _latents(1)
    whole = vae_decode(bundle, z)
    calls = []
    real = bundle.vae.tiled_decode
    monkeypatch.setattr(bundle.vae, "tiled_decode", lambda x: calls.append(x.shape) or real(x))
    monkeypatch.setattr(memory, "host_available", lambda: decode_bytes(bundle, (32, 32)) // 4)
    tiled = vae_decode(bundle, z)
    assert calls == [torch.Size([1, 4, 32, 32])]
    assert tiled.shape == whole.shape and not torch.equal(tiled, whole)
    # blended tiles (8-latent tiles on the tiny model): the same picture, not bit-exact
    assert float(torch.corrcoef(torch.stack([tiled.flatten(), whole.flatten()]))[0, 1]) > 0.8
    monkeypatch.setattr(memory, "host_available", lambda: 10 ** 12)
    assert torch.equal(vae_decode(bundle, z), whole)
    assert diffusion.decode_plan(bundle, tuple(z.shape)) == "whole"
