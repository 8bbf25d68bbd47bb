"""The embedded tiny models: SD-1.x- and SDXL-shaped pipelines with random weights.

They are built in code, offline, in a fraction of a second, and prove the machinery (shapes,
schedules, attention layers at several resolutions, both text-encoder layouts), not quality.
Seeds are fixed so that the same name always gives the same weights.
"""
from __future__ import annotations

import torch

from .tokenizer import byte_level_clip_tokenizer

TINY_SEED = 20240229


def _unet_sd(cross_dim: int, in_channels: int = 4):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=cross_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def _unet_sdxl(cross_dim: int, pooled_dim: int, time_ids: int = 6):
    """SDXL's UNet at toy size; ``time_ids=5`` is the refiner's micro-conditioning (original
    size, crop, aesthetic score) instead of the base's six (original size, crop, target size)."""
    from diffusers import UNet2DConditionModel

    time_dim = 8
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_dim,
        attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=time_ids * time_dim + pooled_dim,
        # SDXL stacks 2 and 10 transformer blocks per attention in its two attention levels; 2
        # and 3 here, so that code which counts or selects layers meets depth > 1
        transformer_layers_per_block=(1, 2, 3),
        norm_num_groups=8,
    )


def _vae(scaling_factor: float = 0.18215, force_upcast: bool = False):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    )


def _text_encoder(hidden: int, with_projection: bool = False, projection_dim: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok_size = 2 + 512
    cfg = CLIPTextConfig(
        vocab_size=tok_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_act="quick_gelu",
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(cfg)


def _scheduler():
    from diffusers import DDIMScheduler

    # Stable Diffusion's training schedule.
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_tiny_sd(dtype: torch.dtype = torch.float32):
    """A StableDiffusionPipeline with SD-1.5's layout at toy size."""
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(TINY_SEED)
    pipe = StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=_text_encoder(32),
        tokenizer=byte_level_clip_tokenizer(),
        unet=_unet_sd(32),
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def build_tiny_sdxl(dtype: torch.dtype = torch.float32):
    """A StableDiffusionXLPipeline with SDXL's layout (two text encoders, text_time) at toy size."""
    from diffusers import StableDiffusionXLPipeline

    torch.manual_seed(TINY_SEED + 1)
    te1 = _text_encoder(32)
    te2 = _text_encoder(32, with_projection=True, projection_dim=32)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(scaling_factor=0.13025, force_upcast=True),
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=byte_level_clip_tokenizer(),
        tokenizer_2=byte_level_clip_tokenizer(),
        unet=_unet_sdxl(64, 32),
        scheduler=_scheduler(),
        force_zeros_for_empty_prompt=True,
    )
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def build_tiny_sdxl_refiner(dtype: torch.dtype = torch.float32):
    """A StableDiffusionXLImg2ImgPipeline shaped like the SDXL refiner at toy size: the OpenCLIP
    encoder only (no CLIP-L: ``text_encoder``/``tokenizer`` are None), cross-attention as wide
    as that encoder, five time ids with the aesthetic score (``requires_aesthetics_score``),
    and negative prompts encoded as text (``force_zeros_for_empty_prompt=False``), as the real
    refiner's configs have them."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    torch.manual_seed(TINY_SEED + 2)
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=_vae(scaling_factor=0.13025, force_upcast=True),
        text_encoder=None,
        text_encoder_2=_text_encoder(32, with_projection=True, projection_dim=32),
        tokenizer=None,
        tokenizer_2=byte_level_clip_tokenizer(),
        unet=_unet_sdxl(32, 32, time_ids=5),
        scheduler=_scheduler(),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def build_tiny_sd_inpainting(dtype: torch.dtype = torch.float32):
    """tiny-sd with an inpainting UNet: 9 input channels (latent, mask, masked-image latent)."""
    from diffusers import StableDiffusionInpaintPipeline

    torch.manual_seed(TINY_SEED + 3)
    pipe = StableDiffusionInpaintPipeline(
        vae=_vae(),
        text_encoder=_text_encoder(32),
        tokenizer=byte_level_clip_tokenizer(),
        unet=_unet_sd(32, in_channels=9),
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


TINY_BUILDERS = {"tiny-sd": (build_tiny_sd, "sd1"), "tiny-sdxl": (build_tiny_sdxl, "sdxl")}
