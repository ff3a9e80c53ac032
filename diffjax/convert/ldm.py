"""Original (CompVis / Stability "LDM") single-file Stable Diffusion checkpoints.

A single file holds three models under prefixes: ``model.diffusion_model.`` (U-Net),
``first_stage_model.`` (autoencoder) and ``cond_stage_model.transformer.`` (SD 1.x,
a transformers CLIP text model) or ``cond_stage_model.model.`` (SD 2.x, OpenCLIP).
This module renames their keys to diffusers / transformers names and infers the
architecture from tensor shapes (a single file carries no config).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from diffjax.models.text import CLIPTextConfig
from diffjax.models.unet import UNetConfig
from diffjax.models.vae import VAEConfig

UNET_PREFIX = 'model.diffusion_model.'
VAE_PREFIX = 'first_stage_model.'
CLIP_PREFIX = 'cond_stage_model.transformer.'
OPENCLIP_PREFIX = 'cond_stage_model.model.'

_UNET_RESNET = {'in_layers.0': 'norm1', 'in_layers.2': 'conv1', 'emb_layers.1': 'time_emb_proj',
                'out_layers.0': 'norm2', 'out_layers.3': 'conv2', 'skip_connection': 'conv_shortcut'}
_VAE_RESNET = {'norm1': 'norm1', 'conv1': 'conv1', 'norm2': 'norm2', 'conv2': 'conv2', 'nin_shortcut': 'conv_shortcut'}
_VAE_ATTN = {'norm': 'group_norm', 'q': 'to_q', 'k': 'to_k', 'v': 'to_v', 'proj_out': 'to_out.0'}


def split_checkpoint(state: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
  """Splits a single-file state dict by model prefix (prefix removed); keys outside them are dropped."""
  parts: dict[str, dict] = {}
  for name, prefix in (('unet', UNET_PREFIX), ('vae', VAE_PREFIX), ('text_encoder', CLIP_PREFIX),
                       ('text_encoder_openclip', OPENCLIP_PREFIX)):
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if sub:
      parts[name] = sub
  return parts


def rename_modules(state: Mapping, table: Mapping[str, tuple[str, Mapping | None]], what: str) -> dict:
  """Renames keys by their longest module prefix in ``table`` ({ldm prefix: (new prefix, inner renames)})."""
  out, unknown = {}, []
  for key, w in state.items():
    parts = key.split('.')
    for n in range(len(parts) - 1, 0, -1):
      head = '.'.join(parts[:n])
      if head in table:
        new, inner = table[head]
        rest = '.'.join(parts[n:])
        if inner:
          for old, repl in inner.items():
            if rest.startswith(old + '.'):
              rest = repl + rest[len(old):]
              break
        out[f'{new}.{rest}'] = w
        break
    else:
      unknown.append(key)
  if unknown:
    raise ValueError(f'{what}: keys with no known conversion: {sorted(unknown)}')
  return out


def _count(state: Mapping, pattern: str) -> int:
  idx = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
  return max(idx) + 1 if idx else 0


# -- U-Net ---------------------------------------------------------------------------------------------------
def unet_config_from_ldm(state: Mapping[str, np.ndarray]) -> UNetConfig:
  """Infers the U-Net architecture from LDM tensor shapes (heads: SD 1.x 8 heads, SD 2.x 64-dim heads)."""
  n_in = _count(state, r'input_blocks\.(\d+)\.')
  levels, chans, attn = 0, [], []
  k = 1
  while k < n_in:  # walk levels: resnets then an optional downsampler ('.op')
    res = []
    while k < n_in and f'input_blocks.{k}.0.op.weight' not in state:
      res.append(k)
      k += 1
    chans.append(state[f'input_blocks.{res[0]}.0.out_layers.3.weight'].shape[0])
    attn.append(f'input_blocks.{res[0]}.1.norm.weight' in state)
    lpb = len(res)
    k += 1  # the downsampler
    levels += 1
  ctx_keys = [k for k in state if k.endswith('attn2.to_k.weight')]
  ctx = state[ctx_keys[0]].shape[1] if ctx_keys else None
  proj = [k for k in state if k.endswith('proj_in.weight')]
  linear = bool(proj) and state[proj[0]].ndim == 2
  depth = _count(state, r'middle_block\.1\.transformer_blocks\.(\d+)\.') or 1
  head_kw = {'head_dim': 64} if ctx == 1024 else {'num_heads': 8}
  return UNetConfig(
      in_channels=state['input_blocks.0.0.weight'].shape[1], out_channels=state['out.2.weight'].shape[0],
      block_out_channels=tuple(chans), layers_per_block=lpb, attention_levels=tuple(attn), transformer_depth=depth,
      cross_attention_dim=ctx, use_linear_projection=linear, **head_kw)


def unet_ldm_renames(c: UNetConfig) -> dict[str, tuple[str, Mapping | None]]:
  """{LDM module prefix: (diffusers prefix, inner renames)} for a U-Net of config ``c``."""
  L, n = c.layers_per_block, len(c.block_out_channels)
  t = {'time_embed.0': ('time_embedding.linear_1', None), 'time_embed.2': ('time_embedding.linear_2', None),
       'input_blocks.0.0': ('conv_in', None), 'out.0': ('conv_norm_out', None), 'out.2': ('conv_out', None),
       'middle_block.0': ('mid_block.resnets.0', _UNET_RESNET)}
  if c.mid_block_attention:
    t['middle_block.1'] = ('mid_block.attentions.0', None)
    t['middle_block.2'] = ('mid_block.resnets.1', _UNET_RESNET)
  else:
    t['middle_block.1'] = ('mid_block.resnets.1', _UNET_RESNET)
  if c.num_classes is not None:
    t['label_emb'] = ('class_embedding', None)
  if c.pooled_dim is not None:
    t.update({'label_emb.0.0': ('class_embedding.linear_1', None), 'label_emb.0.2': ('class_embedding.linear_2', None)})
  for i in range(n):
    for j in range(L):
      k = 1 + i * (L + 1) + j
      t[f'input_blocks.{k}.0'] = (f'down_blocks.{i}.resnets.{j}', _UNET_RESNET)
      t[f'input_blocks.{k}.1'] = (f'down_blocks.{i}.attentions.{j}', None)
    if i < n - 1:
      t[f'input_blocks.{1 + i * (L + 1) + L}.0.op'] = (f'down_blocks.{i}.downsamplers.0.conv', None)
  for i in range(n):
    has_attn = c.attention_levels[n - 1 - i]
    for j in range(L + 1):
      k = i * (L + 1) + j
      t[f'output_blocks.{k}.0'] = (f'up_blocks.{i}.resnets.{j}', _UNET_RESNET)
      t[f'output_blocks.{k}.1'] = (f'up_blocks.{i}.attentions.{j}', None)
      if j == L and i < n - 1:
        t[f'output_blocks.{k}.{2 if has_attn else 1}.conv'] = (f'up_blocks.{i}.upsamplers.0.conv', None)
  return t


def unet_from_ldm(state: Mapping[str, np.ndarray]) -> tuple[UNetConfig, dict]:
  """LDM U-Net state dict (prefix removed) -> (config, diffusers-named state dict)."""
  c = unet_config_from_ldm(state)
  return c, rename_modules(state, unet_ldm_renames(c), 'U-Net')


# -- autoencoder -----------------------------------------------------------------------------------------------
def vae_config_from_ldm(state: Mapping[str, np.ndarray], scaling_factor: float = 0.18215) -> VAEConfig:
  """Infers the autoencoder architecture from LDM tensor shapes."""
  n = _count(state, r'encoder\.down\.(\d+)\.')
  chans = tuple(state[f'encoder.down.{i}.block.0.conv2.weight'].shape[0] for i in range(n))
  return VAEConfig(
      in_channels=state['encoder.conv_in.weight'].shape[1], out_channels=state['decoder.conv_out.weight'].shape[0],
      latent_channels=state['decoder.conv_in.weight'].shape[1], block_out_channels=chans,
      layers_per_block=_count(state, r'encoder\.down\.0\.block\.(\d+)\.'),
      mid_block_attention='encoder.mid.attn_1.q.weight' in state,
      use_quant_conv='quant_conv.weight' in state, use_post_quant_conv='post_quant_conv.weight' in state,
      scaling_factor=scaling_factor)


def vae_ldm_renames(c: VAEConfig) -> dict[str, tuple[str, Mapping | None]]:
  """{LDM module prefix: (diffusers prefix, inner renames)} for an autoencoder of config ``c``."""
  n = len(c.block_out_channels)
  t = {'quant_conv': ('quant_conv', None), 'post_quant_conv': ('post_quant_conv', None)}
  for part in ('encoder', 'decoder'):
    t.update({f'{part}.conv_in': (f'{part}.conv_in', None), f'{part}.conv_out': (f'{part}.conv_out', None),
              f'{part}.norm_out': (f'{part}.conv_norm_out', None),
              f'{part}.mid.block_1': (f'{part}.mid_block.resnets.0', _VAE_RESNET),
              f'{part}.mid.block_2': (f'{part}.mid_block.resnets.1', _VAE_RESNET),
              f'{part}.mid.attn_1': (f'{part}.mid_block.attentions.0', _VAE_ATTN)})
  for i in range(n):
    for j in range(c.layers_per_block + 1):
      t[f'encoder.down.{i}.block.{j}'] = (f'encoder.down_blocks.{i}.resnets.{j}', _VAE_RESNET)
      t[f'decoder.up.{n - 1 - i}.block.{j}'] = (f'decoder.up_blocks.{i}.resnets.{j}', _VAE_RESNET)
    t[f'encoder.down.{i}.downsample.conv'] = (f'encoder.down_blocks.{i}.downsamplers.0.conv', None)
    t[f'decoder.up.{n - 1 - i}.upsample.conv'] = (f'decoder.up_blocks.{i}.upsamplers.0.conv', None)
  return t


def vae_from_ldm(state: Mapping[str, np.ndarray]) -> tuple[VAEConfig, dict]:
  """LDM autoencoder state dict (prefix removed) -> (config, diffusers-named state dict)."""
  c = vae_config_from_ldm(state)
  return c, rename_modules(state, vae_ldm_renames(c), 'autoencoder')


# -- text encoders -----------------------------------------------------------------------------------------------
def clip_config_from_state(state: Mapping[str, np.ndarray], hidden_act: str = 'quick_gelu') -> CLIPTextConfig:
  """Infers a CLIP text config from transformers-named tensors (``text_model.`` prefix optional)."""
  p = 'text_model.' if any(k.startswith('text_model.') for k in state) else ''
  vocab, d = state[f'{p}embeddings.token_embedding.weight'].shape
  return CLIPTextConfig(
      vocab_size=vocab, hidden_size=d, intermediate_size=state[f'{p}encoder.layers.0.mlp.fc1.weight'].shape[0],
      num_layers=_count(state, rf'{re.escape(p)}encoder\.layers\.(\d+)\.'), num_heads=d // 64,
      max_positions=state[f'{p}embeddings.position_embedding.weight'].shape[0], hidden_act=hidden_act)


def clip_from_openclip(state: Mapping[str, np.ndarray], drop_last_layers: int = 1) -> tuple[CLIPTextConfig, dict]:
  """OpenCLIP text tower (SD 2.x, prefix removed) -> (config, transformers-named state dict).

  Stable Diffusion 2 conditions on the penultimate layer followed by the final LayerNorm,
  so the last ``drop_last_layers`` layers are dropped (as diffusers' 23-layer encoder).
  The fused ``in_proj`` is split into q, k, v. Only the text tower is kept.
  """
  n = _count(state, r'transformer\.resblocks\.(\d+)\.') - drop_last_layers
  out = {'embeddings.token_embedding.weight': state['token_embedding.weight'],
         'embeddings.position_embedding.weight': state['positional_embedding'],
         'final_layer_norm.weight': state['ln_final.weight'], 'final_layer_norm.bias': state['ln_final.bias']}
  inner = {'ln_1': 'layer_norm1', 'ln_2': 'layer_norm2', 'mlp.c_fc': 'mlp.fc1', 'mlp.c_proj': 'mlp.fc2',
           'attn.out_proj': 'self_attn.out_proj'}
  for i in range(n):
    src, dst = f'transformer.resblocks.{i}.', f'encoder.layers.{i}.'
    for old, new in inner.items():
      for leaf in ('weight', 'bias'):
        out[f'{dst}{new}.{leaf}'] = state[f'{src}{old}.{leaf}']
    for leaf in ('weight', 'bias'):
      q, k, v = np.split(np.asarray(state[f'{src}attn.in_proj_{leaf}']), 3, axis=0)
      out.update({f'{dst}self_attn.q_proj.{leaf}': q, f'{dst}self_attn.k_proj.{leaf}': k,
                  f'{dst}self_attn.v_proj.{leaf}': v})
  return clip_config_from_state(out, hidden_act='gelu'), out
