"""ControlNet weights: diffusers ``ControlNetModel`` folders and original single files <-> diffjax.

* A diffusers folder holds ``config.json`` (``_class_name: ControlNetModel``) and
  ``diffusion_pytorch_model.safetensors``; its parameter names are the U-Net encoder's
  (``conv_in``, ``time_embedding``, ``down_blocks.*``, ``mid_block``) plus
  ``controlnet_cond_embedding.{conv_in, blocks.i, conv_out}``, ``controlnet_down_blocks.i`` and
  ``controlnet_mid_block``, which is what ``diffjax.models.controlnet.ControlNet`` is named after
  (a list index ``blocks.3`` <-> ``blocks_3``).
* An original (lllyasviel / webui) single file holds the same tensors under ``control_model.``
  (or no prefix) with the LDM U-Net's names (``input_blocks``, ``middle_block``, ``time_embed``;
  ``diffjax.convert.ldm``) and ``zero_convs.i.0`` (-> ``controlnet_down_blocks.i``),
  ``middle_block_out.0`` (-> ``controlnet_mid_block``) and ``input_hint_block.{0, 2, ..., 4n - 2}``
  (-> ``controlnet_cond_embedding.conv_in``, ``blocks.0 .. 2n - 3``, ``conv_out``). The architecture
  is inferred from tensor shapes (SD 1.x and 2.x).

Usage::

  net, params = load_controlnet('path/to/controlnet')          # folder or .safetensors file
  save_controlnet(net, params, 'out')                         # diffusers ControlNetModel.from_pretrained('out')
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.convert import configs, ldm
from diffjax.convert.files import find_weights, read_json_config, read_weights, write_safetensors
from diffjax.convert.keys import flax_from_state_dict, state_dict_from_flax
from diffjax.models.controlnet import ControlNet, ControlNetConfig, init_controlnet

CONTROL_PREFIX = 'control_model.'
WEIGHTS = 'diffusion_pytorch_model'
_CONTROL_DEFAULTS = ControlNetConfig()
# diffusers ControlNetModel's default down blocks (its config may omit them)
_DOWN_DEFAULT = ('CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',)
# UNet2DConditionModel config keys that ControlNetModel does not take (it has no decoder and no dropout)
_NOT_CONTROLNET = ('up_block_types', 'out_channels', 'sample_size', 'center_input_sample', 'dropout')
_LIST_MODULE = re.compile(r'(^|\.)(controlnet_down_blocks|blocks)_(\d+)(?=\.)')


# -- names and configs ---------------------------------------------------------------------------------------------
def torch_names(key: str) -> str:
  """``keys.torch_key``'s name of a ControlNet parameter -> the diffusers key: the ControlNet's own lists
  (``controlnet_down_blocks_3`` -> ``controlnet_down_blocks.3``, ``blocks_2`` -> ``blocks.2``)."""
  return _LIST_MODULE.sub(r'\1\2.\3', key)


def controlnet_config_from_diffusers(cfg: Mapping, where: str = 'config') -> ControlNetConfig:
  """A diffusers ``ControlNetModel`` config dict -> ``ControlNetConfig`` (``where``: the config file, for errors).

  The encoder's options are read by ``configs.unet_config_from_diffusers`` (same checks, same errors), the
  decoder it needs being the mirror of the down blocks.
  """
  f = configs.Fields(cfg, where)
  cls = f('_class_name', 'str', None, nullable=True)
  if cls != 'ControlNetModel':
    raise ValueError(f'{where}: not a diffusers ControlNetModel (_class_name={cls!r}); a U-Net or other model '
                     f'folder loads with diffjax.convert.load_pretrained')
  down = cfg.get('down_block_types', _DOWN_DEFAULT)
  as_unet = dict(cfg)
  if isinstance(down, list | tuple) and all(isinstance(t, str) for t in down):  # else the U-Net reader says why
    as_unet['up_block_types'] = [t.replace('Down', 'Up') for t in reversed(down)]
  unet = configs.unet_config_from_diffusers(as_unet, where)
  order = f('controlnet_conditioning_channel_order', 'str', 'rgb')
  if order not in ('rgb', 'bgr'):
    raise ValueError(f"{where}: controlnet_conditioning_channel_order {order!r} is not 'rgb' or 'bgr'")
  d = _CONTROL_DEFAULTS
  return ControlNetConfig.from_unet(
      unet, conditioning_channels=f('conditioning_channels', 'int', d.conditioning_channels),
      conditioning_embedding_out_channels=f('conditioning_embedding_out_channels', 'ints',
                                            d.conditioning_embedding_out_channels),
      global_pool_conditions=f('global_pool_conditions', 'bool', d.global_pool_conditions),
      controlnet_conditioning_channel_order=order)


def controlnet_config_to_diffusers(c: ControlNetConfig) -> dict:
  """``ControlNetConfig`` -> a diffusers ``ControlNetModel`` config dict (``dropout`` is dropped: diffusers'
  ControlNet has none, and it does not change inference)."""
  d = {k: v for k, v in configs.unet_config_to_diffusers(c).items() if k not in _NOT_CONTROLNET}
  d.update(_class_name='ControlNetModel', conditioning_channels=c.conditioning_channels,
           conditioning_embedding_out_channels=list(c.conditioning_embedding_out_channels),
           global_pool_conditions=c.global_pool_conditions,
           controlnet_conditioning_channel_order=c.controlnet_conditioning_channel_order)
  return d


# -- building ----------------------------------------------------------------------------------------------------
def build_controlnet(config: ControlNetConfig, state: Mapping[str, np.ndarray], *, dtype=jnp.float32,
                     param_dtype=jnp.float32, what: str = 'checkpoint', consume: bool = False
                     ) -> tuple[ControlNet, dict]:
  """(module, params) from a state dict with diffusers ``ControlNetModel`` names (``keys.flax_from_state_dict``:
  one ``WeightMismatchError`` lists every missing, unexpected and mis-shaped key; ``consume`` empties ``state``)."""
  net = ControlNet(config, dtype=dtype, param_dtype=param_dtype)
  target = nn.meta.unbox(jax.eval_shape(lambda: init_controlnet(net, jax.random.key(0))))
  params = flax_from_state_dict(state, target, key_fn=torch_names, dtype=np.dtype(param_dtype), what=what,
                                convert=jnp.asarray, consume=consume)
  return net, params


def state_dict(params: Mapping) -> dict[str, np.ndarray]:
  """ControlNet parameters -> a diffusers ``ControlNetModel`` state dict (PyTorch layouts, float arrays)."""
  return state_dict_from_flax(params, key_fn=torch_names)


# -- original single files -------------------------------------------------------------------------------------
def controlnet_ldm_renames(c: ControlNetConfig) -> dict[str, tuple[str, Mapping | None]]:
  """{original module prefix: (diffusers prefix, inner renames)} of a ControlNet (``ldm.rename_modules``'s table):
  the LDM U-Net's encoder entries plus the zero convolutions and the hint (conditioning) embedding."""
  t = dict(ldm.unet_ldm_renames(c))  # decoder entries included; they match nothing in a ControlNet
  t.update({f'zero_convs.{i}.0': (f'controlnet_down_blocks.{i}', None) for i in range(c.num_down_residuals())})
  t['middle_block_out.0'] = ('controlnet_mid_block', None)
  n_blocks = 2 * (len(c.conditioning_embedding_out_channels) - 1)
  t['input_hint_block.0'] = ('controlnet_cond_embedding.conv_in', None)
  t.update({f'input_hint_block.{2 * (j + 1)}': (f'controlnet_cond_embedding.blocks.{j}', None)
            for j in range(n_blocks)})
  t[f'input_hint_block.{2 * (n_blocks + 1)}'] = ('controlnet_cond_embedding.conv_out', None)
  return t


def _hint_config(state: Mapping[str, np.ndarray], where: str) -> dict:
  """conditioning_channels and conditioning_embedding_out_channels from the ``input_hint_block`` convolutions
  (indices 0, 2, ..., 4n - 2: conv_in, n - 1 pairs whose second is strided, conv_out)."""
  idx = sorted(int(m.group(1)) for k in state if (m := re.fullmatch(r'input_hint_block\.(\d+)\.weight', k)))
  if len(idx) < 2 or idx != list(range(0, 2 * len(idx), 2)) or len(idx) % 2:
    raise ValueError(f'{where}: input_hint_block convolutions at {idx}; expected 0, 2, ..., 4n - 2 (conv_in, '
                     f'pairs of blocks, conv_out)')
  w = [state[f'input_hint_block.{i}.weight'] for i in idx]
  out = (w[0].shape[0],) + tuple(v.shape[0] for v in w[2:-1:2])  # conv_in, then the strided block of each pair
  return dict(conditioning_channels=w[0].shape[1], conditioning_embedding_out_channels=out)


def controlnet_from_ldm(state: Mapping[str, np.ndarray], where: str = 'checkpoint', **overrides
                        ) -> tuple[ControlNetConfig, dict]:
  """Original ControlNet state dict (``control_model.`` prefix or none; other prefixes, e.g. the Stable Diffusion
  model of a training checkpoint, are dropped) -> (config, diffusers-named state dict).

  ``overrides``: ControlNetConfig fields that the weights cannot tell: the U-Net's (``ldm.unet_config_from_ldm``
  assumes Stable Diffusion's 8 heads (1.x) or 64-dim heads (2.x) and 32 norm groups; pass e.g.
  ``num_heads=, head_dim=None, norm_num_groups=``), ``global_pool_conditions``,
  ``controlnet_conditioning_channel_order``. A ValueError naming ``where`` lists the keys with no conversion.
  """
  sub = {k[len(CONTROL_PREFIX):]: v for k, v in state.items() if k.startswith(CONTROL_PREFIX)}
  if not sub and 'input_hint_block.0.weight' in state:
    sub = dict(state)
  if 'input_hint_block.0.weight' not in sub or 'input_blocks.0.0.weight' not in sub:
    raise ValueError(f'{where}: not an original ControlNet checkpoint (no {CONTROL_PREFIX}input_hint_block.0 / '
                     f'input_blocks.0.0 weights)')
  # a ControlNet has no output layer; the LDM U-Net reader takes out_channels from it: stand in the input's
  out = {'out.2.weight': np.empty((sub['input_blocks.0.0.weight'].shape[1], 0, 0, 0), np.float32)}
  unet = ldm.unet_config_from_ldm({**sub, **out})
  c = ControlNetConfig.from_unet(unet, **{**_hint_config(sub, where), **overrides})
  return c, ldm.rename_modules(sub, controlnet_ldm_renames(c), f'{where} (ControlNet)')


# -- files ---------------------------------------------------------------------------------------------------------
def load_controlnet(path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=jnp.float32,
                    allow_pickle: bool = False, **overrides) -> tuple[ControlNet, dict]:
  """Loads a ControlNet.

  Args:
    path: a diffusers ``ControlNetModel`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``, or
      a pipeline folder with a ``controlnet/`` one), or an original single file (``.safetensors``; pickles with
      ``allow_pickle``) of an SD 1.x / 2.x ControlNet.
    dtype, param_dtype, allow_pickle: as ``load_pretrained``'s.
    overrides: for single files, ControlNetConfig fields the weights cannot tell (``controlnet_from_ldm``; e.g.
      ``global_pool_conditions=True`` for the shuffle ControlNet); refused for folders.

  Returns:
    ``(ControlNet module, params)``.

  Raises:
    ValueError: not a ControlNet (names the file), or keys of a single file with no conversion (lists them).
    WeightMismatchError: the weights do not fit the architecture (lists every missing, unexpected, mis-shaped key).
    WeightFileError: a malformed weight file or config.json.
  """
  p = os.fspath(path)
  kw = dict(dtype=dtype, param_dtype=param_dtype)
  if os.path.isfile(p):
    config, state = controlnet_from_ldm(read_weights(p, allow_pickle), p, **overrides)
    return build_controlnet(config, state, what=f'{p} (ControlNet)', consume=True, **kw)
  if not os.path.isdir(p):
    raise FileNotFoundError(f'{p} does not exist')
  if not os.path.exists(os.path.join(p, 'config.json')) and os.path.exists(os.path.join(p, 'controlnet',
                                                                                          'config.json')):
    p = os.path.join(p, 'controlnet')
  if overrides:
    raise ValueError(f'{p}: a folder has a config.json; {sorted(overrides)} are options for single files')
  where = os.path.join(p, 'config.json')
  if not os.path.exists(where):
    raise ValueError(f'{p}: not a diffusers ControlNetModel folder (no config.json, nor controlnet/config.json)')
  config = controlnet_config_from_diffusers(read_json_config(where), where)  # checked before reading weights
  return build_controlnet(config, find_weights(p, (WEIGHTS,), allow_pickle), what=p, consume=True, **kw)


def save_controlnet(module: ControlNet, params: Mapping, folder: str | os.PathLike, *, dtype=np.float32):
  """Writes a diffusers ``ControlNetModel.from_pretrained`` folder: ``config.json`` and
  ``diffusion_pytorch_model.safetensors`` (tensors in PyTorch layout cast to ``dtype``)."""
  folder = os.fspath(folder)
  cfg = controlnet_config_to_diffusers(module.config)
  os.makedirs(folder, exist_ok=True)
  write_safetensors(os.path.join(folder, f'{WEIGHTS}.safetensors'),
                    {k: v.astype(dtype) for k, v in state_dict(params).items()})
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(cfg, f, indent=2, sort_keys=True)
