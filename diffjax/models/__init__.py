"""Flax linen networks (NHWC images): the Stable Diffusion U-Net and its ControlNet, the KL autoencoder, diffusion
transformers (DiT, MMDiT, PixArt, Flux), text encoders (CLIP, BERT, T5) and the one attention function they call."""

from diffjax.models.controlnet import CONTROLNET_CONFIGS, ControlNet, ControlNetConfig, init_controlnet
from diffjax.models.text import (
  BERT_CONFIGS,
  CLIP_TEXT_CONFIGS,
  BertConfig,
  BertEncoder,
  CLIPTextConfig,
  CLIPTextTransformer,
  TextOutput,
  l2_normalize,
  mean_pool,
)
from diffjax.models.unet import UNET_CONFIGS, UNet, UNetConfig, init_unet
from diffjax.models.vae import VAE_CONFIGS, AutoencoderKL, DiagonalGaussian, VAEConfig, init_vae

__all__ = [
    'BERT_CONFIGS', 'CLIP_TEXT_CONFIGS', 'CONTROLNET_CONFIGS', 'UNET_CONFIGS', 'VAE_CONFIGS', 'AutoencoderKL',
    'BertConfig', 'BertEncoder', 'CLIPTextConfig', 'CLIPTextTransformer', 'ControlNet', 'ControlNetConfig',
    'DiagonalGaussian', 'TextOutput', 'UNet', 'UNetConfig', 'VAEConfig', 'init_controlnet', 'init_unet', 'init_vae',
    'l2_normalize', 'mean_pool',
]
