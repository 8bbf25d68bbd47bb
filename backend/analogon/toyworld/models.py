"""The components of ``toy-sd``, built from code with the sizes recorded here.

Stable Diffusion 1.x's layout at toy size: an ``AutoencoderKL`` with four levels (factor 8,
4 latent channels), a CLIP (``CLIPModel``: text tower + image tower with projections) trained
contrastively on the world, whose text tower is the diffusion model's ``CLIPTextModel``, and
a ``UNet2DConditionModel`` with cross-attention and self-attention in every block at two
resolutions (8x8 and 4x4 latents for 64x64 images).
"""
from __future__ import annotations

import torch

from .vocab import vocab

IMAGE_SIZE = 64
LATENT_SIZE = IMAGE_SIZE // 8
TEXT_HIDDEN = 128
PROJECTION_DIM = 64
# CLIP image normalisation for the toy world (per-channel mean/std of training renders,
# rounded). The feature extractor saved with the model uses the same numbers.
IMAGE_MEAN = (0.55, 0.50, 0.42)
IMAGE_STD = (0.30, 0.28, 0.30)


def vae_config() -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        # One group: each GroupNorm normalises all channels of an image together, so the
        # ratios between channels (hue) survive. With a few channels per group, a small flat
        # object on a flat background normalises to the same value whatever its colour,
        # and the autoencoder cannot tell red from orange (measured).
        norm_num_groups=1,
        sample_size=IMAGE_SIZE,
        scaling_factor=1.0,  # set from the latents' spread after training
    )


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**vae_config())


def clip_config():
    from transformers import CLIPConfig

    v = vocab()
    text = dict(
        vocab_size=len(v), hidden_size=TEXT_HIDDEN, intermediate_size=TEXT_HIDDEN * 2,
        num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
        projection_dim=PROJECTION_DIM, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        hidden_act="quick_gelu",
    )
    vision = dict(
        image_size=IMAGE_SIZE, patch_size=8, num_channels=3, hidden_size=96,
        intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
        projection_dim=PROJECTION_DIM, hidden_act="quick_gelu",
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=PROJECTION_DIM,
                      logit_scale_init_value=2.6592)


def build_clip():
    from transformers import CLIPModel

    return CLIPModel(clip_config())


def unet_config() -> dict:
    return dict(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(48, 96),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=4,  # diffusers' legacy name: the number of heads
        norm_num_groups=16,
    )


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**unet_config())


def build_scheduler():
    from diffusers import DDIMScheduler

    # Stable Diffusion's training schedule.
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )


def build_feature_extractor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": IMAGE_SIZE}, do_center_crop=True,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD), do_convert_rgb=True,
    )


def images_to_clip_pixels(images: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) in [0,1] -> CLIP pixel_values (same as the feature extractor)."""
    mean = torch.tensor(IMAGE_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    if images.shape[-1] != IMAGE_SIZE:
        images = torch.nn.functional.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE),
                                                 mode="bilinear", antialias=True,
                                                 align_corners=False)
    return (images - mean) / std
