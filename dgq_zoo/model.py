"""Architecture of the bundled model: Stable Diffusion's components at a size that trains on two CPU cores.

32x32 RGB images, an AutoencoderKL with a downsampling factor of 4 (8x8x4 latents), a CLIPTextModel over the shapes
dataset's own word vocabulary, and a UNet2DConditionModel with ResNet blocks, a time embedding and Transformer2D
blocks whose attn2 cross-attends to the text encoder's hidden states -- the structure DGQ quantizes in SD 1.x.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from dgq_zoo import shapes
from dgq_zoo.tokenizer import save_word_tokenizer

# Stable Diffusion 1.x's training noise schedule.
BETA_START = 0.00085
BETA_END = 0.012
NUM_TRAIN_TIMESTEPS = 1000


@dataclass
class ZooModelConfig:
    """Sizes of the bundled model's components.

    Args:
        image_size: side of the square images in pixels.
        vae_channels: AutoencoderKL block widths; len - 1 downsamplings by 2.
        latent_channels: channels of the VAE latent.
        unet_channels: UNet block widths, one resolution level each; every down/up block is a cross-attention
            block. Three levels put the middle block at 2x2 latents, where a pixel knows which quadrant it is in:
            with two (middle block at 4x4) the model never learned which object of a pair goes where
            (MODEL_CARD.md).
        unet_layers_per_block: ResNet (+ transformer) layers per UNet block.
        unet_attention_heads: heads of every UNet attention layer.
        text_hidden_size: CLIP text encoder width = the UNet's cross_attention_dim.
        text_layers: CLIP text encoder depth.
        text_heads: CLIP text encoder attention heads.
        max_prompt_tokens: tokenizer/text-encoder sequence length (the longest prompt is 16 tokens with BOS/EOS).
    """

    image_size: int = shapes.IMAGE_SIZE
    vae_channels: tuple[int, ...] = (32, 64, 64)
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (64, 128, 128)
    unet_layers_per_block: int = 1
    unet_attention_heads: int = 4
    text_hidden_size: int = 128
    text_layers: int = 3
    text_heads: int = 4
    max_prompt_tokens: int = 20
    extra: dict = field(default_factory=dict)

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)


def build_tokenizer(directory: str | Path, config: ZooModelConfig) -> CLIPTokenizer:
    """Write the dataset-vocabulary tokenizer into `directory` and load it back."""
    return save_word_tokenizer(shapes.vocabulary(), directory, config.max_prompt_tokens)


def build_text_encoder(tokenizer: CLIPTokenizer, config: ZooModelConfig) -> CLIPTextModel:
    """A randomly initialised CLIPTextModel over the tokenizer's vocabulary."""
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.text_hidden_size,
        intermediate_size=4 * config.text_hidden_size,
        projection_dim=config.text_hidden_size,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=config.max_prompt_tokens,
        # The pooled output is read at the EOS position; ids must match the tokenizer's.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(text_config)


def build_vae(config: ZooModelConfig) -> AutoencoderKL:
    """A randomly initialised AutoencoderKL with downsampling factor 2 ** (len(vae_channels) - 1)."""
    depth = len(config.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * depth,
        up_block_types=("UpDecoderBlock2D",) * depth,
        block_out_channels=config.vae_channels,
        layers_per_block=1,
        latent_channels=config.latent_channels,
        norm_num_groups=16,
        sample_size=config.image_size,
    )


def build_unet(config: ZooModelConfig) -> UNet2DConditionModel:
    """A randomly initialised UNet2DConditionModel with cross-attention in every block."""
    depth = len(config.unet_channels)
    return UNet2DConditionModel(
        sample_size=config.latent_size,
        in_channels=config.latent_channels,
        out_channels=config.latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * depth,
        up_block_types=("CrossAttnUpBlock2D",) * depth,
        block_out_channels=config.unet_channels,
        layers_per_block=config.unet_layers_per_block,
        cross_attention_dim=config.text_hidden_size,
        attention_head_dim=config.unet_attention_heads,
        norm_num_groups=32,
    )


def build_scheduler() -> DDIMScheduler:
    """Stable Diffusion 1.x's DDIM configuration; the pipeline's default sampler."""
    return DDIMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_start=BETA_START,
        beta_end=BETA_END,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def assemble_pipeline(
    vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, unet: UNet2DConditionModel
) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline from the components (no safety checker: the images are coloured shapes)."""
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
