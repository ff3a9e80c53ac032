"""diffusers / transformers ``config.json`` dicts <-> diffjax architecture dataclasses.

Every ``*_from_*`` function refuses (``ValueError``) options diffjax does not
implement, rather than silently building a different network.
"""

from __future__ import annotations

from typing import Any

from diffjax.models.text import BertConfig, CLIPTextConfig
from diffjax.models.unet import UNetConfig
from diffjax.models.vae import VAEConfig

DIFFUSERS_VERSION = '0.42.1'
TRANSFORMERS_VERSION = '5.23.0'

# diffusers UNet2DConditionModel options and the only values diffjax implements.
_UNET_FIXED = {
    'act_fn': 'silu', 'center_input_sample': False, 'conv_in_kernel': 3, 'conv_out_kernel': 3,
    'downsample_padding': 1, 'dual_cross_attention': False, 'only_cross_attention': False,
    'time_embedding_type': 'positional', 'addition_embed_type': None, 'encoder_hid_dim': None,
    'encoder_hid_dim_type': None, 'time_cond_proj_dim': None, 'timestep_post_act': None,
    'time_embedding_dim': None, 'time_embedding_act_fn': None, 'class_embeddings_concat': False,
    'mid_block_only_cross_attention': None, 'resnet_skip_time_act': False, 'resnet_out_scale_factor': 1.0,
    'attention_type': 'default', 'cross_attention_norm': None, 'reverse_transformer_layers_per_block': None,
    'mid_block_scale_factor': 1, 'num_attention_heads': None,
}
_VAE_FIXED = {'act_fn': 'silu', 'latents_mean': None, 'latents_std': None}


def _check_fixed(cfg: dict, fixed: dict, what: str):
  bad = {k: cfg[k] for k, v in fixed.items() if k in cfg and cfg[k] != v and not (v is False and cfg[k] is None)}
  if bad:
    raise ValueError(f'{what} config options not supported by diffjax: {bad} (supported: '
                     f'{ {k: fixed[k] for k in bad} })')


def _per_level(v: Any, n: int) -> tuple:
  return tuple(v) if isinstance(v, list | tuple) else (v,) * n


def unet_config_from_diffusers(cfg: dict) -> UNetConfig:
  """A diffusers ``UNet2DConditionModel`` config dict -> ``UNetConfig``."""
  _check_fixed(cfg, _UNET_FIXED, 'UNet2DConditionModel')
  down = cfg.get('down_block_types', ('CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',))
  up = cfg.get('up_block_types', ('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 3)
  allowed = {'CrossAttnDownBlock2D', 'DownBlock2D'}
  if set(down) - allowed or set(up) - {'CrossAttnUpBlock2D', 'UpBlock2D'}:
    raise ValueError(f'unsupported block types {down} / {up}; diffjax has {sorted(allowed)} and their Up versions')
  levels = tuple(t == 'CrossAttnDownBlock2D' for t in down)
  if tuple(t == 'CrossAttnUpBlock2D' for t in up) != levels[::-1]:
    raise ValueError(f'up_block_types {up} must mirror down_block_types {down}')
  mid = cfg.get('mid_block_type', 'UNetMidBlock2DCrossAttn')
  if mid != 'UNetMidBlock2DCrossAttn':
    raise ValueError(f'mid_block_type {mid!r} is not supported (only UNetMidBlock2DCrossAttn)')
  n = len(down)
  heads = _per_level(cfg.get('attention_head_dim', 8), n)
  depth = set(_per_level(cfg.get('transformer_layers_per_block', 1), n))
  if len(depth) != 1:
    raise ValueError(f'transformer_layers_per_block must be the same on every level, got {depth}')
  lpb = cfg.get('layers_per_block', 2)
  if not isinstance(lpb, int):
    raise ValueError(f'layers_per_block must be an int, got {lpb}')
  if cfg.get('resnet_time_scale_shift', 'default') not in ('default', 'scale_shift'):
    raise ValueError(f"resnet_time_scale_shift {cfg['resnet_time_scale_shift']!r} is not supported")
  num_classes = pooled = None
  cet = cfg.get('class_embed_type')
  if cet is None:
    num_classes = cfg.get('num_class_embeds')
  elif cet == 'projection':
    pooled = cfg['projection_class_embeddings_input_dim']
  else:
    raise ValueError(f'class_embed_type {cet!r} is not supported (None or "projection")')
  return UNetConfig(
      in_channels=cfg.get('in_channels', 4), out_channels=cfg.get('out_channels', 4),
      block_out_channels=tuple(cfg.get('block_out_channels', (320, 640, 1280, 1280))), layers_per_block=lpb,
      attention_levels=levels, num_heads=heads[0] if len(set(heads)) == 1 else heads,
      transformer_depth=depth.pop(), cross_attention_dim=cfg.get('cross_attention_dim', 1280),
      use_linear_projection=cfg.get('use_linear_projection', False), norm_num_groups=cfg.get('norm_num_groups', 32),
      norm_eps=cfg.get('norm_eps', 1e-5), flip_sin_to_cos=cfg.get('flip_sin_to_cos', True),
      freq_shift=cfg.get('freq_shift', 0), resnet_scale_shift=cfg.get('resnet_time_scale_shift') == 'scale_shift',
      dropout=cfg.get('dropout', 0.0), num_classes=num_classes, pooled_dim=pooled)


def unet_config_to_diffusers(c: UNetConfig, sample_size: int = 64) -> dict:
  """``UNetConfig`` -> a diffusers ``UNet2DConditionModel`` config dict."""
  if c.cross_attention_dim is None and any(c.attention_levels):
    raise ValueError('diffusers UNet2DConditionModel has no self-attention-only blocks (cross_attention_dim=None)')
  if not c.mid_block_attention:
    raise ValueError('diffusers UNet2DConditionModel always has mid-block attention')
  heads = c.heads()
  d = {
      '_class_name': 'UNet2DConditionModel', '_diffusers_version': DIFFUSERS_VERSION, 'act_fn': 'silu',
      'attention_head_dim': heads[0] if len(set(heads)) == 1 else list(heads),
      'block_out_channels': list(c.block_out_channels), 'center_input_sample': False,
      'cross_attention_dim': c.cross_attention_dim,
      'down_block_types': ['CrossAttnDownBlock2D' if a else 'DownBlock2D' for a in c.attention_levels],
      'up_block_types': ['CrossAttnUpBlock2D' if a else 'UpBlock2D' for a in c.attention_levels[::-1]],
      'mid_block_type': 'UNetMidBlock2DCrossAttn', 'downsample_padding': 1, 'dropout': c.dropout,
      'flip_sin_to_cos': c.flip_sin_to_cos, 'freq_shift': c.freq_shift, 'in_channels': c.in_channels,
      'out_channels': c.out_channels, 'layers_per_block': c.layers_per_block, 'norm_eps': c.norm_eps,
      'norm_num_groups': c.norm_num_groups, 'sample_size': sample_size,
      'transformer_layers_per_block': c.transformer_depth, 'use_linear_projection': c.use_linear_projection,
      'resnet_time_scale_shift': 'scale_shift' if c.resnet_scale_shift else 'default',
  }
  if c.num_classes is not None:
    d['num_class_embeds'] = c.num_classes
  if c.pooled_dim is not None:
    d.update(class_embed_type='projection', projection_class_embeddings_input_dim=c.pooled_dim)
  return d


def vae_config_from_diffusers(cfg: dict) -> VAEConfig:
  """A diffusers ``AutoencoderKL`` config dict -> ``VAEConfig``."""
  _check_fixed(cfg, _VAE_FIXED, 'AutoencoderKL')
  boc = tuple(cfg.get('block_out_channels', (64,)))
  for key, typ in (('down_block_types', 'DownEncoderBlock2D'), ('up_block_types', 'UpDecoderBlock2D')):
    if set(cfg.get(key, (typ,))) != {typ}:
      raise ValueError(f'{key} {cfg[key]} is not supported (only {typ})')
  return VAEConfig(
      in_channels=cfg.get('in_channels', 3), out_channels=cfg.get('out_channels', 3),
      latent_channels=cfg.get('latent_channels', 4), block_out_channels=boc,
      layers_per_block=cfg.get('layers_per_block', 1), norm_num_groups=cfg.get('norm_num_groups', 32),
      mid_block_attention=cfg.get('mid_block_add_attention', True),
      use_quant_conv=cfg.get('use_quant_conv', True), use_post_quant_conv=cfg.get('use_post_quant_conv', True),
      scaling_factor=cfg.get('scaling_factor', 0.18215), shift_factor=cfg.get('shift_factor') or 0.0)


def vae_config_to_diffusers(c: VAEConfig, sample_size: int = 512) -> dict:
  """``VAEConfig`` -> a diffusers ``AutoencoderKL`` config dict."""
  n = len(c.block_out_channels)
  return {
      '_class_name': 'AutoencoderKL', '_diffusers_version': DIFFUSERS_VERSION, 'act_fn': 'silu',
      'block_out_channels': list(c.block_out_channels), 'down_block_types': ['DownEncoderBlock2D'] * n,
      'up_block_types': ['UpDecoderBlock2D'] * n, 'in_channels': c.in_channels, 'out_channels': c.out_channels,
      'latent_channels': c.latent_channels, 'layers_per_block': c.layers_per_block,
      'norm_num_groups': c.norm_num_groups, 'sample_size': sample_size, 'scaling_factor': c.scaling_factor,
      'shift_factor': c.shift_factor or None, 'mid_block_add_attention': c.mid_block_attention,
      'use_quant_conv': c.use_quant_conv, 'use_post_quant_conv': c.use_post_quant_conv, 'force_upcast': True,
  }


def clip_text_config_from_transformers(cfg: dict) -> CLIPTextConfig:
  """A transformers ``CLIPTextConfig`` dict (or a ``CLIPConfig`` with ``text_config``) -> ``CLIPTextConfig``."""
  if cfg.get('model_type') == 'clip':
    cfg = cfg['text_config']
  with_proj = 'CLIPTextModelWithProjection' in (cfg.get('architectures') or ())
  return CLIPTextConfig(
      vocab_size=cfg.get('vocab_size', 49408), hidden_size=cfg.get('hidden_size', 512),
      intermediate_size=cfg.get('intermediate_size', 2048), num_layers=cfg.get('num_hidden_layers', 12),
      num_heads=cfg.get('num_attention_heads', 8), max_positions=cfg.get('max_position_embeddings', 77),
      hidden_act=cfg.get('hidden_act', 'quick_gelu'), layer_norm_eps=cfg.get('layer_norm_eps', 1e-5),
      eos_token_id=cfg.get('eos_token_id', 2), projection_dim=cfg.get('projection_dim', 512) if with_proj else None)


def clip_text_config_to_transformers(c: CLIPTextConfig) -> dict:
  """``CLIPTextConfig`` -> a transformers ``CLIPTextConfig`` dict."""
  d = {
      'architectures': ['CLIPTextModelWithProjection' if c.projection_dim else 'CLIPTextModel'],
      'model_type': 'clip_text_model', 'transformers_version': TRANSFORMERS_VERSION, 'vocab_size': c.vocab_size,
      'hidden_size': c.hidden_size, 'intermediate_size': c.intermediate_size, 'num_hidden_layers': c.num_layers,
      'num_attention_heads': c.num_heads, 'max_position_embeddings': c.max_positions, 'hidden_act': c.hidden_act,
      'layer_norm_eps': c.layer_norm_eps, 'eos_token_id': c.eos_token_id, 'bos_token_id': 0, 'pad_token_id': 1,
      'attention_dropout': 0.0, 'dropout': 0.0, 'torch_dtype': 'float32',
  }
  if c.projection_dim:
    d['projection_dim'] = c.projection_dim
  return d


def bert_config_from_transformers(cfg: dict, add_pooler: bool = True) -> BertConfig:
  """A transformers ``BertConfig`` dict -> ``BertConfig``."""
  if cfg.get('position_embedding_type', 'absolute') != 'absolute':
    raise ValueError(f"position_embedding_type {cfg['position_embedding_type']!r} is not supported (absolute)")
  return BertConfig(
      vocab_size=cfg.get('vocab_size', 30522), hidden_size=cfg.get('hidden_size', 768),
      intermediate_size=cfg.get('intermediate_size', 3072), num_layers=cfg.get('num_hidden_layers', 12),
      num_heads=cfg.get('num_attention_heads', 12), max_positions=cfg.get('max_position_embeddings', 512),
      type_vocab_size=cfg.get('type_vocab_size', 2), hidden_act=cfg.get('hidden_act', 'gelu'),
      layer_norm_eps=cfg.get('layer_norm_eps', 1e-12), add_pooler=add_pooler)


def bert_config_to_transformers(c: BertConfig) -> dict:
  """``BertConfig`` -> a transformers ``BertConfig`` dict."""
  return {
      'architectures': ['BertModel'], 'model_type': 'bert', 'transformers_version': TRANSFORMERS_VERSION,
      'vocab_size': c.vocab_size, 'hidden_size': c.hidden_size, 'intermediate_size': c.intermediate_size,
      'num_hidden_layers': c.num_layers, 'num_attention_heads': c.num_heads,
      'max_position_embeddings': c.max_positions, 'type_vocab_size': c.type_vocab_size, 'hidden_act': c.hidden_act,
      'layer_norm_eps': c.layer_norm_eps, 'position_embedding_type': 'absolute', 'pad_token_id': 0,
      'torch_dtype': 'float32',
  }
