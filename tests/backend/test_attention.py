"""The K/V-swap attention processor: identity, locality of the swap, contrast, resolution-based
layer selection, capture, restoring the stock processors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from analogon.core.attention import (
    decoder_self_attention_layers, is_decoder_self_attention,
    SwapController, SwapProcessor, _explicit_attention, contrast, decoder_attention_factors,
    factor_of, installed, spatial_size,
)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _inputs(bundle, b=3, hw=(8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((b, 4) + hw, generator=g)
    dim = bundle.unet.config.cross_attention_dim
    kw = {"encoder_hidden_states": torch.randn(b, 77, dim, generator=g)}
    if bundle.is_sdxl:
        pooled = bundle.text_encoder_2.config.projection_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(b, pooled, generator=g),
                                   "time_ids": torch.tensor([[hw[0] * 8, hw[1] * 8, 0, 0, hw[0] * 8, hw[1] * 8]] * b,
                                                            dtype=torch.float32)}
    return x, kw


def _unet(bundle, x, kw, t=500):
    with torch.no_grad():
        return bundle.unet(x, t, **kw).sample


@pytest.mark.parametrize("name", ["tiny_sd", "tiny_sdxl"])
def test_identity_mode_equals_stock_processor(name, request):
    bundle = request.getfixturevalue(name)
    from diffusers.models.attention_processor import AttnProcessor2_0

    assert all(isinstance(p, AttnProcessor2_0) for p in bundle.unet.attn_processors.values())
    x, kw = _inputs(bundle, hw=(8, 6))
    stock = _unet(bundle, x, kw)
    ctl = SwapController(beta=1.67)
    with installed(bundle.unet, ctl):
        assert all(isinstance(p, SwapProcessor) for p in bundle.unet.attn_processors.values())
        ctl.set_step((8, 6), {})
        ours = _unet(bundle, x, kw)
    assert torch.equal(ours, stock)
    # restored afterwards
    assert all(isinstance(p, AttnProcessor2_0) for p in bundle.unet.attn_processors.values())


@pytest.mark.parametrize("name", ["tiny_sd", "tiny_sdxl"])
def test_only_the_output_element_changes(name, request):
    bundle = request.getfixturevalue(name)
    x, kw = _inputs(bundle, b=3)
    fine, coarse = decoder_attention_factors(bundle.unet)[:2]
    ctl = SwapController(beta=1.67, log=[])
    with installed(bundle.unet, ctl):
        ctl.set_step((8, 8), {})
        plain = _unet(bundle, x, kw)
        ctl.set_step((8, 8), {fine: [(0, 2)], coarse: [(0, 2)]})
        swapped = _unet(bundle, x, kw)
    assert ctl.log, "no layer swapped"
    assert torch.equal(swapped[1:], plain[1:])
    assert (swapped[0] - plain[0]).abs().max() > 1e-4


def test_swapping_with_an_identical_element_is_identity(tiny_sd):
    """Q_out K_appᵀ with app == out is the output's own attention (β = 1)."""
    x, kw = _inputs(tiny_sd, b=2)
    x[1] = x[0]
    kw["encoder_hidden_states"][1] = kw["encoder_hidden_states"][0]
    ctl = SwapController(beta=1.0)
    with installed(tiny_sd.unet, ctl):
        ctl.set_step((8, 8), {})
        plain = _unet(tiny_sd, x, kw)
        ctl.set_step((8, 8), {1: [(0, 1)], 2: [(0, 1)], 4: [(0, 1)]})
        swapped = _unet(tiny_sd, x, kw)
    assert torch.equal(swapped, plain)


def _decoder_self_attention(dim=32, heads=2):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=dim, heads=heads, dim_head=dim // heads)
    return attn.eval()


@pytest.mark.parametrize("beta", [1.0, 1.67])
def test_query_preservation_mixes_the_queries(beta):
    """γ = 1 asks with the source's queries: with the source's keys and values too (and no
    contrast), the destination's output is the source's own; γ = 0 is the plain swap."""
    attn = _decoder_self_attention()
    name = "up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor"
    g = torch.Generator().manual_seed(1)
    h = torch.randn(3, 16, 32, generator=g)  # latent 4×4 at factor 1
    ctl = SwapController(beta=beta)
    proc = SwapProcessor(ctl, name)

    def run(swaps, queries=None, gamma=None):
        ctl.set_step((4, 4), swaps, queries=queries, gamma=gamma)
        with torch.no_grad():
            return proc(attn, h.clone())

    plain = run({})
    swap = run({1: [(0, 1)]})
    same = run({1: [(0, 1)]}, {1: [(0, 1)]}, 1.0)[0]
    assert torch.allclose(same, plain[1], atol=1e-5) == (beta == 1.0)
    assert torch.equal(run({1: [(0, 1)]}, {1: [(0, 1)]}, 0.0), swap)
    half = run({1: [(0, 1)]}, {1: [(0, 2)]}, 0.5)
    assert torch.equal(half[1:], plain[1:])  # only the destination changes
    assert (half[0] - swap[0]).abs().max() > 1e-4
    # queries only at the factor named: this layer is factor 1, the pair is at factor 2
    assert torch.equal(run({1: [(0, 1)]}, {2: [(0, 2)]}, 0.5), swap)


def test_query_preservation_in_a_unet_changes_only_the_destination(tiny_sd):
    x, kw = _inputs(tiny_sd, b=3)
    ctl = SwapController(beta=1.67)
    with installed(tiny_sd.unet, ctl):
        ctl.set_step((8, 8), {1: [(0, 1)]})
        swapped = _unet(tiny_sd, x, kw)
        ctl.set_step((8, 8), {1: [(0, 1)]}, queries={1: [(0, 2)]}, gamma=0.75)
        preserved = _unet(tiny_sd, x, kw)
    assert torch.equal(preserved[1:], swapped[1:])
    assert (preserved[0] - swapped[0]).abs().max() > 1e-4


def test_explicit_path_matches_sdpa_at_beta_one():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 50, 8, generator=g) for _ in range(3))
    ref = F.scaled_dot_product_attention(q[None], k[None], v[None])[0]
    assert torch.allclose(_explicit_attention(q, k, v, 1.0, "clip"), ref, atol=1e-6)
    assert not torch.allclose(_explicit_attention(q, k, v, 1.67, "clip"), ref, atol=1e-3)


def test_contrast_modes():
    a = torch.softmax(torch.randn(3, 7, 20, generator=torch.Generator().manual_seed(0)) * 3, -1)
    assert torch.equal(contrast(a, 1.0, "clip"), a)
    p = contrast(a, 1.67, "paper")
    assert torch.allclose(p.sum(-1), torch.ones(3, 7), atol=1e-6)
    assert (p < 0).any() and p.var(-1).mean() > a.var(-1).mean()
    c = contrast(a, 1.67, "clip")
    assert c.min() >= 0 and c.max() <= 1 and (c.sum(-1) > 1 + 1e-4).any()  # not renormalised
    r = contrast(a, 1.67, "renormalize")
    assert r.min() >= 0 and torch.allclose(r.sum(-1), torch.ones(3, 7), atol=1e-6)
    with pytest.raises(ValueError):
        contrast(a, 2.0, "nope")


@pytest.mark.parametrize("latent,expected", [
    ((64, 64), {4096: 1, 1024: 2, 256: 4, 64: 8}),
    ((96, 64), {6144: 1, 1536: 2, 384: 4, 96: 8}),
    ((128, 128), {16384: 1, 4096: 2, 1024: 4, 256: 8}),
    ((9, 7), {63: 1, 20: 2, 6: 4, 2: 8}),  # odd sizes: the UNet's stride-2 convs round up
])
def test_factor_of_latent_sizes(latent, expected):
    for seq, f in expected.items():
        assert factor_of(seq, latent) == f
    assert factor_of(4095, latent) is None
    assert spatial_size(latent, 1) == latent


def test_decoder_attention_factors(tiny_sd, tiny_sdxl):
    # SD 1.x: attention at the latent's own resolution and below; SDXL: from factor 2 on
    assert decoder_attention_factors(tiny_sd.unet) == [1, 2, 4]
    assert decoder_attention_factors(tiny_sdxl.unet) == [2, 4]
    # layers per level: attentions per up block × transformer depth. tiny-sd: 2 per level;
    # tiny-sdxl: 2 attentions, 2 and 3 deep (SDXL: 3 attentions, 2 and 10 deep: 6 and 30)
    assert decoder_self_attention_layers(tiny_sd.unet) == {1: 2, 2: 2, 4: 2}
    assert decoder_self_attention_layers(tiny_sdxl.unet) == {2: 4, 4: 6}
    names = [n for n in tiny_sdxl.unet.attn_processors if is_decoder_self_attention(n)]
    assert len(names) == 10


def _micro_unet(sdxl_layout: bool):
    """A UNet with 8 channels, one head and attention in the decoder only, so that 64²–128²
    latents run in seconds on a CPU. Layouts: SD 1.x (decoder attention at the latent's own
    resolution and half of it) and SDXL (at half and a quarter)."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    torch.manual_seed(0)
    if sdxl_layout:
        up = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    else:
        up = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=0,
        block_out_channels=(8, 8, 8), down_block_types=("DownBlock2D",) * 3, up_block_types=up,
        cross_attention_dim=8, attention_head_dim=8, norm_num_groups=4,
    ).eval()
    unet.set_attn_processor(AttnProcessor2_0())
    return unet


@pytest.mark.parametrize("sdxl_layout,latent,expected", [
    (False, (64, 64), {1: (64, 64), 2: (32, 32)}),    # SD 1.x at 512²: 64×64 and 32×32 layers
    (False, (96, 64), {1: (96, 64), 2: (48, 32)}),    # SD 1.x at 768×512
    (True, (128, 128), {2: (64, 64), 4: (32, 32)}),   # SDXL at 1024²: 64×64 and 32×32 layers
])
def test_layer_selection_by_resolution_on_a_real_unet(sdxl_layout, latent, expected):
    unet = _micro_unet(sdxl_layout)
    fine, coarse = decoder_attention_factors(unet)[:2]
    assert {fine: spatial_size(latent, fine), coarse: spatial_size(latent, coarse)} == expected
    # up block j works at factor 2^(n-1-j)
    block_of = {f: f"up_blocks.{len(unet.up_blocks) - f.bit_length()}." for f in (fine, coarse)}
    x = torch.randn((2, 4) + latent, generator=torch.Generator().manual_seed(0))
    ehs = torch.randn(2, 77, 8)
    ctl = SwapController(log=[])
    with installed(unet, ctl), torch.no_grad():
        ctl.set_step(latent, {fine: [(0, 1)], coarse: [(0, 1)]})
        unet(x, 500, encoder_hidden_states=ehs)
    seen = {name: f for name, f, _ in ctl.log}
    decoder_self = {n for n in unet.attn_processors if n.startswith("up_blocks.") and ".attn1." in n}
    assert set(seen) == decoder_self  # every decoder self-attention layer, nothing else
    for name, f in seen.items():
        assert name.startswith(block_of[f])
    assert set(seen.values()) == {fine, coarse}


def test_capture_does_not_change_the_output(tiny_sd):
    x, kw = _inputs(tiny_sd, b=2)
    ctl = SwapController()
    with installed(tiny_sd.unet, ctl):
        ctl.set_step((8, 8), {})
        plain = _unet(tiny_sd, x, kw)
        ctl.capture = (0, 1)
        captured = _unet(tiny_sd, x, kw)
    assert torch.equal(plain, captured)
    m = ctl.mean_self_map(1)
    assert m.shape == (2, 64, 64) and torch.allclose(m.sum(-1), torch.ones(2, 64), atol=1e-5)
    c = ctl.mean_cross_map(1)
    assert c.shape == (2, 64, 77)


def test_processors_restored_on_error(tiny_sd):
    before = dict(tiny_sd.unet.attn_processors)
    with pytest.raises(RuntimeError):
        with installed(tiny_sd.unet, SwapController()):
            raise RuntimeError("boom")
    after = tiny_sd.unet.attn_processors
    assert all(after[k] is before[k] for k in before)
