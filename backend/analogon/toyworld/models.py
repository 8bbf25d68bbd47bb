"""The components of the toy-world models, built from code with the sizes recorded here.

Stable Diffusion 1.x's layout at toy size: an ``AutoencoderKL`` with four levels (factor 8,
4 latent channels), a CLIP (``CLIPModel``: text tower + image tower with projections) trained
contrastively on the world, whose text tower is the diffusion model's ``CLIPTextModel``, and
a ``UNet2DConditionModel`` with cross-attention and self-attention in every block at two
resolutions: 16x16 and 8x8 latents for toy128's 128x128 images (``toy-sd``), 8x8 and 4x4 for
toy64's 64x64 (``toy-sd-64``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .vocab import vocab
from .world import World, world_of


@dataclass(frozen=True)
class Sizes:
    """The widths and depths of one world's model."""

    image: int
    vae_channels: tuple[int, ...]
    vae_layers: int
    unet_channels: tuple[int, ...]
    unet_layers: int
    unet_heads: int
    unet_groups: int
    text_hidden: int
    text_layers: int
    vision_patch: int
    vision_hidden: int
    projection: int

    @property
    def latent(self) -> int:
        return self.image // 8


SIZES = {
    "toy64": Sizes(image=64, vae_channels=(16, 32, 64, 64), vae_layers=1,
                   unet_channels=(48, 96), unet_layers=1, unet_heads=4, unet_groups=16,
                   text_hidden=128, text_layers=3, vision_patch=8, vision_hidden=96,
                   projection=64),
    "toy128": Sizes(image=128, vae_channels=(32, 64, 96, 96), vae_layers=1,
                    unet_channels=(96, 192), unet_layers=1, unet_heads=4, unet_groups=16,
                    text_hidden=128, text_layers=3, vision_patch=16, vision_hidden=128,
                    projection=64),
}


def sizes(world: World | str | None = None) -> Sizes:
    return SIZES[world_of(world).name]


IMAGE_SIZE = SIZES["toy64"].image
LATENT_SIZE = IMAGE_SIZE // 8
TEXT_HIDDEN = 128
PROJECTION_DIM = 64
# CLIP image normalisation for the toy world (per-channel mean/std of training renders,
# rounded). The feature extractor saved with the model uses the same numbers.
IMAGE_MEAN = (0.55, 0.50, 0.42)
IMAGE_STD = (0.30, 0.28, 0.30)


def vae_config(world: World | str | None = None) -> dict:
    z = sizes(world)
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=z.vae_channels,
        layers_per_block=z.vae_layers,
        latent_channels=4,
        # One group: each GroupNorm normalises all channels of an image together, so the
        # ratios between channels (hue) survive. With a few channels per group, a small flat
        # object on a flat background normalises to the same value whatever its colour,
        # and the autoencoder cannot tell red from orange (measured).
        norm_num_groups=1,
        sample_size=z.image,
        scaling_factor=1.0,  # set from the latents' spread after training
    )


def build_vae(world: World | str | None = None):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**vae_config(world))


def clip_config(world: World | str | None = None):
    from transformers import CLIPConfig

    z = sizes(world)
    v = vocab()
    text = dict(
        vocab_size=len(v), hidden_size=z.text_hidden, intermediate_size=z.text_hidden * 2,
        num_hidden_layers=z.text_layers, num_attention_heads=4, max_position_embeddings=77,
        projection_dim=z.projection, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        hidden_act="quick_gelu",
    )
    vision = dict(
        image_size=z.image, patch_size=z.vision_patch, num_channels=3,
        hidden_size=z.vision_hidden, intermediate_size=z.vision_hidden * 2,
        num_hidden_layers=3, num_attention_heads=4, projection_dim=z.projection,
        hidden_act="quick_gelu",
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=z.projection,
                      logit_scale_init_value=2.6592)


def build_clip(world: World | str | None = None):
    from transformers import CLIPModel

    return CLIPModel(clip_config(world))


def unet_config(world: World | str | None = None) -> dict:
    z = sizes(world)
    return dict(
        sample_size=z.latent,
        in_channels=4,
        out_channels=4,
        layers_per_block=z.unet_layers,
        block_out_channels=z.unet_channels,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=z.text_hidden,
        attention_head_dim=z.unet_heads,  # diffusers' legacy name: the number of heads
        norm_num_groups=z.unet_groups,
    )


def build_unet(world: World | str | None = None):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**unet_config(world))


def build_scheduler():
    from diffusers import DDIMScheduler

    # Stable Diffusion's training schedule.
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )


def build_feature_extractor(world: World | str | None = None):
    from transformers import CLIPImageProcessor

    side = sizes(world).image
    return CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": side}, do_center_crop=True,
        crop_size={"height": side, "width": side}, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD), do_convert_rgb=True,
    )


def images_to_clip_pixels(images: torch.Tensor, world: World | str | None = None) -> torch.Tensor:
    """(B,3,H,W) in [0,1] -> CLIP pixel_values (same as the feature extractor)."""
    side = sizes(world).image
    mean = torch.tensor(IMAGE_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    if images.shape[-1] != side:
        images = torch.nn.functional.interpolate(images, size=(side, side),
                                                 mode="bilinear", antialias=True,
                                                 align_corners=False)
    return (images - mean) / std
