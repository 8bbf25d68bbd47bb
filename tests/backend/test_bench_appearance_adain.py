"""`bench appearance-adain`: the objects' masks on the latent grid and the transfers it compares."""
from __future__ import annotations

import numpy as np
import torch

from analogon.bench.appearance_adain import latent_mask, transfer
from analogon.core.adain import channel_stats


def test_latent_mask_takes_cells_half_inside_or_wholly_inside():
    sil = np.zeros((16, 16), np.uint8)
    sil[0:8, 0:8] = 255  # cell (0, 0) of a 4 × 4 grid wholly inside
    sil[0:8, 8:10] = 255  # cell (0, 2) half inside
    sil[0:8, 12:13] = 255  # cell (0, 3) a quarter inside
    half = latent_mask(sil, (4, 4))[0, 0]
    inner = latent_mask(sil, (4, 4), interior=True)[0, 0]
    assert half[0].tolist() == [1, 1, 1, 0] and half[1].tolist() == [1, 1, 1, 0] and half[2:].sum() == 0
    assert inner[0].tolist() == [1, 1, 0, 0] and inner.sum() == 4


def test_transfers_change_only_the_structures_object():
    g = torch.Generator().manual_seed(0)
    z_s, z_a = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g) * 3 + 2
    m_s = torch.zeros(1, 1, 8, 8)
    m_s[..., 2:6, 2:6] = 1
    m_a = torch.zeros(1, 1, 8, 8)
    m_a[..., :4, :4] = 1
    assert torch.equal(transfer(z_s, z_a, m_s, m_a, "decoded"), z_s)
    for path in ("adain", "mean"):
        out = transfer(z_s, z_a, m_s, m_a, path)
        outside = m_s.expand_as(z_s) == 0
        assert torch.equal(out[outside], z_s[outside])
        mean, std = channel_stats(out, m_s)
        a_mean, a_std = channel_stats(z_a, m_a)
        assert torch.allclose(mean, a_mean, atol=1e-4)
        s_std = channel_stats(z_s, m_s)[1]
        assert torch.allclose(std, a_std if path == "adain" else s_std, atol=1e-4)
