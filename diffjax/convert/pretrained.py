"""``load_pretrained`` / ``save_pretrained``: Stable Diffusion, diffusers and transformers weights <-> diffjax."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.convert import configs, ldm, transformer_single_file
from diffjax.convert.files import find_weights, read_json_config, read_weights, write_safetensors
from diffjax.convert.keys import IGNORED_KEYS, flax_from_state_dict, state_dict_from_flax
from diffjax.models.dit import DiT, init_dit
from diffjax.models.flux import Flux, init_flux
from diffjax.models.mmdit import MMDiT, init_mmdit
from diffjax.models.pixart import PixArt, init_pixart
from diffjax.models.t5 import T5EncoderModel
from diffjax.models.text import BertEncoder, CLIPTextTransformer
from diffjax.models.unet import UNet, init_unet
from diffjax.models.vae import AutoencoderKL, init_vae

PIPELINE_PARTS = ('unet', 'transformer', 'vae', 'text_encoder', 'text_encoder_2', 'text_encoder_3')
Loaded = tuple[nn.Module, dict]


# -- building modules and their parameters ----------------------------------------------------------------------
# Each image network's own initialiser (dummy inputs of its kind); text encoders take (1, 4) token ids.
_INITIALISERS = {UNet: init_unet, AutoencoderKL: init_vae, DiT: init_dit, MMDiT: init_mmdit, PixArt: init_pixart,
                 Flux: init_flux}


def _target_shapes(module: nn.Module) -> dict:
  """The module's parameter tree as ShapeDtypeStructs (no computation)."""
  own = _INITIALISERS.get(type(module))
  if own is not None:
    init = lambda: own(module, jax.random.key(0))
  else:
    init = lambda: module.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params']
  return nn.meta.unbox(jax.eval_shape(init))


def _params_from_state(module: nn.Module, state: Mapping[str, np.ndarray], param_dtype, what: str,
                       key_fn: Callable[[str], str] = str, ignore=IGNORED_KEYS, consume: bool = False) -> dict:
  return flax_from_state_dict(state, _target_shapes(module), key_fn=key_fn, ignore=ignore,
                              dtype=np.dtype(param_dtype), what=what, convert=jnp.asarray, consume=consume)


def _clip_prefix_fn(state: Mapping) -> Callable[[str], str]:
  prefix = 'text_model.' if any(k.startswith('text_model.') for k in state) else ''
  return lambda k: k if k.startswith('text_projection.') else prefix + k


_CLIP_IGNORE = IGNORED_KEYS + (re.compile(r'^(vision_model\.|visual_projection\.|logit_scale$)'),)


def _bert_prefix(state: Mapping) -> str:
  return 'bert.' if any(k.startswith('bert.') for k in state) else ''


def _t5_state(state: Mapping[str, np.ndarray], in_place: bool) -> Mapping[str, np.ndarray]:
  """T5's token table under ``shared.weight``: transformers ties ``encoder.embed_tokens.weight`` to it and a
  file may hold either name or both (then the same tensor); a ``T5ForConditionalGeneration``'s decoder and
  head are not the encoder's and are dropped by the caller's ignore list. ``in_place``: rename in ``state``
  (a dict the caller gave away) rather than in a copy."""
  if 'encoder.embed_tokens.weight' not in state:
    return state
  state = state if in_place else dict(state)
  tokens = state.pop('encoder.embed_tokens.weight')
  state.setdefault('shared.weight', tokens)
  return state


_T5_IGNORE = IGNORED_KEYS + (re.compile(r'^(decoder\.|lm_head\.)'),)


def build(kind: str, config: Any, state: Mapping[str, np.ndarray], *, dtype=jnp.float32, param_dtype=jnp.float32,
          what: str = 'checkpoint', consume: bool = False) -> Loaded:
  """(module, params) for ``kind`` in {'unet', 'vae', 'dit', 'mmdit', 'pixart', 'flux',
  'clip', 'bert', 't5'} from a state dict with reference key
  names.

  ``consume``: empty ``state`` (a dict) tensor by tensor while converting, so the checkpoint
  and the parameters are not both held in host memory.
  """
  kw = dict(dtype=dtype, param_dtype=param_dtype)
  if kind == 'unet':
    m = UNet(config, **kw)
    return m, _params_from_state(m, state, param_dtype, what, consume=consume)
  if kind == 'vae':
    m = AutoencoderKL(config, **kw)
    return m, _params_from_state(m, state, param_dtype, what, consume=consume)
  if kind in ('dit', 'mmdit', 'pixart', 'flux'):
    m = {'dit': DiT, 'mmdit': MMDiT, 'pixart': PixArt, 'flux': Flux}[kind](config, **kw)
    return m, _params_from_state(m, state, param_dtype, what, consume=consume)
  if kind == 'clip':
    m = CLIPTextTransformer(config, **kw)
    return m, _params_from_state(m, state, param_dtype, what, _clip_prefix_fn(state), _CLIP_IGNORE, consume)
  if kind == 'bert':
    prefix = _bert_prefix(state)
    ignore = IGNORED_KEYS + ((re.compile(r'^(?!bert\.)'),) if prefix else ())  # task heads (cls., ...) dropped
    m = BertEncoder(config, **kw)
    return m, _params_from_state(m, state, param_dtype, what, lambda k: prefix + k, ignore, consume)
  if kind == 't5':
    m = T5EncoderModel(config, **kw)
    return m, _params_from_state(m, _t5_state(state, consume), param_dtype, what, str, _T5_IGNORE, consume)
  raise ValueError(f'unknown model kind {kind!r}')


# -- loading ---------------------------------------------------------------------------------------------------------
def _load_folder(folder: str, allow_pickle: bool, **kw) -> Loaded:
  where = os.path.join(folder, 'config.json')
  cfg = read_json_config(where)
  cls = cfg.get('_class_name')
  model_type = cfg.get('model_type')
  # the config is checked before any weights are read
  if cls == 'UNet2DConditionModel':
    kind, config, stem = 'unet', configs.unet_config_from_diffusers(cfg, where), 'diffusion_pytorch_model'
  elif cls == 'AutoencoderKL':
    kind, config, stem = 'vae', configs.vae_config_from_diffusers(cfg, where), 'diffusion_pytorch_model'
  elif cls == 'DiTTransformer2DModel':
    kind, config, stem = 'dit', configs.dit_config_from_diffusers(cfg, where), 'diffusion_pytorch_model'
  elif cls == 'SD3Transformer2DModel':
    kind, config, stem = 'mmdit', configs.mmdit_config_from_diffusers(cfg, where), 'diffusion_pytorch_model'
  elif cls == 'PixArtTransformer2DModel':
    kind, config, stem = 'pixart', configs.pixart_config_from_diffusers(cfg, where), 'diffusion_pytorch_model'
  elif cls == 'FluxTransformer2DModel':
    kind, config, stem = 'flux', configs.flux_config_from_diffusers(cfg, where), 'diffusion_pytorch_model'
  elif model_type in ('clip_text_model', 'clip'):
    kind, config, stem = 'clip', configs.clip_text_config_from_transformers(cfg, where), 'model'
  elif model_type == 'bert':
    kind, config, stem = 'bert', configs.bert_config_from_transformers(cfg, where=where), 'model'
  elif model_type == 't5':
    kind, config, stem = 't5', configs.t5_config_from_transformers(cfg, where), 'model'
  else:
    raise ValueError(f'{where}: unsupported model (_class_name={cls!r}, model_type={model_type!r}); '
                     f'diffjax loads UNet2DConditionModel, AutoencoderKL, DiTTransformer2DModel, '
                     f'SD3Transformer2DModel, PixArtTransformer2DModel, FluxTransformer2DModel, CLIPTextModel, '
                     f'BertModel and T5EncoderModel')
  state = find_weights(folder, (stem,), allow_pickle)
  if kind == 'bert':
    config = dataclasses.replace(config, add_pooler=any(k.endswith('pooler.dense.weight') for k in state))
  return build(kind, config, state, what=folder, consume=True, **kw)  # the state is ours alone


def _load_single_file(path: str, allow_pickle: bool, **kw) -> dict[str, Loaded]:
  state = read_weights(path, allow_pickle)
  if transformer_single_file.variant_of(state) is not None:
    return {'transformer': transformer_from_original(state, path, consume=True, **kw)}  # the state is ours alone
  return models_from_ldm(state, path, **kw)


def transformer_from_original(state: dict[str, np.ndarray], path: str, *, variant: str | None = None,
                              consume: bool = False, **kw) -> Loaded:
  """(module, params) of an original single-file SD3 / SD3.5, FLUX.1 or DiT checkpoint's state dict read from
  ``path`` (``diffjax.convert.transformer_single_file``): the same as from the diffusers folder of its model.

  ``variant`` ('sd3', 'sd3.5', 'flux-dev', 'flux-schnell' or 'dit'): the file must be that one, else a
  ``WeightMismatchError`` says what it is. ``consume``: empty ``state`` while converting. ``kw``: ``build``'s.
  """
  kind, config, state = transformer_single_file.to_diffusers(state, path, variant, consume=consume)
  return build(kind, config, state, what=f'{path} (its tensors under diffusers names)', consume=True, **kw)


def models_from_ldm(state: Mapping[str, np.ndarray], path: str, **kw) -> dict[str, Loaded]:
  """{'unet' | 'vae' | 'text_encoder': (module, params)} of a single-file state dict read from ``path``."""
  found = transformer_single_file.variant_of(state)
  if found is not None:
    raise ValueError(f'{path}: an original {transformer_single_file.VARIANTS[found][0]} transformer checkpoint, not '
                     f'a Stable Diffusion 1.x / 2.x one; load_pretrained reads it')
  parts = ldm.split_checkpoint(state)
  if not parts:
    raise ValueError(f'{path}: not a single-file checkpoint diffjax reads: neither an original Stable Diffusion '
                     f'1.x / 2.x checkpoint (keys starting with {ldm.UNET_PREFIX!r}, {ldm.VAE_PREFIX!r} or '
                     f'{ldm.CLIP_PREFIX!r}) nor an original SD3 / SD3.5 (joint_blocks.N), FLUX.1 (double_blocks.N, '
                     f'single_blocks.N) or DiT (blocks.N, y_embedder) transformer')
  out = {}
  if 'unet' in parts:
    cfg, state = ldm.unet_from_ldm(parts['unet'])
    out['unet'] = build('unet', cfg, state, what=f'{path} (U-Net)', **kw)
  if 'vae' in parts:
    cfg, state = ldm.vae_from_ldm(parts['vae'])
    out['vae'] = build('vae', cfg, state, what=f'{path} (autoencoder)', **kw)
  if 'text_encoder' in parts:
    state = parts['text_encoder']
    out['text_encoder'] = build('clip', ldm.clip_config_from_state(state), state, what=f'{path} (CLIP)', **kw)
  elif 'text_encoder_openclip' in parts:
    cfg, state = ldm.clip_from_openclip(parts['text_encoder_openclip'])
    out['text_encoder'] = build('clip', cfg, state, what=f'{path} (OpenCLIP)', **kw)
  return out


def load_pretrained(path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=jnp.float32,
                    allow_pickle: bool = False) -> Loaded | dict[str, Loaded]:
  """Loads pretrained weights into diffjax modules.

  Args:
    path: one of
      * a diffusers model folder (``config.json`` + ``diffusion_pytorch_model.safetensors``)
        of a ``UNet2DConditionModel``, ``AutoencoderKL``, ``DiTTransformer2DModel``,
        ``SD3Transformer2DModel`` (SD3, SD3.5), ``PixArtTransformer2DModel`` or
        ``FluxTransformer2DModel``;
      * a transformers model folder (``config.json`` + ``model.safetensors``) of a
        ``CLIPTextModel`` / ``CLIPTextModelWithProjection``, ``BertModel`` (keys with
        or without the ``text_model.`` / ``bert.`` prefixes; task heads are ignored) or
        ``T5EncoderModel`` (a ``T5ForConditionalGeneration``'s encoder);
      * a diffusers pipeline folder with ``unet/`` (or ``transformer/``), ``vae/``, ``text_encoder/``
        (and ``text_encoder_2/``, ``text_encoder_3/``) subfolders;
      * an original single-file Stable Diffusion 1.x/2.x checkpoint (``.safetensors``
        with ``model.diffusion_model.*``, ``first_stage_model.*`` and
        ``cond_stage_model.*`` keys); the architecture is inferred from tensor shapes;
      * an original single-file transformer checkpoint: Stability's SD3 / SD3.5
        (``model.diffusion_model.joint_blocks.*``; other models in the file are left out),
        Black Forest Labs' FLUX.1 [dev] or [schnell] (``double_blocks.*``, ``single_blocks.*``)
        or facebookresearch's DiT (``blocks.*``, ``y_embedder.*``; a ``.pt`` needs ``allow_pickle``);
        recognised by its keys, the architecture inferred from tensor shapes
        (``diffjax.convert.transformer_single_file``; ``transformer_from_original`` asks for a variant).
    dtype: computation dtype of the returned modules (e.g. ``jnp.bfloat16``).
    param_dtype: dtype of the returned parameters (float32 by default, whatever the file holds).
    allow_pickle: also read pickled checkpoints (.ckpt, .bin, .pt), which can execute
      arbitrary code; refused with ``PickleRefusedError`` otherwise.

  Returns:
    ``(module, params)`` for a model folder: ``module.apply({'params': params}, ...)``
    runs it (U-Net and VAE inputs are NHWC). For a pipeline folder or a single-file
    checkpoint, a dict {'unet' | 'vae' | 'text_encoder' ...: (module, params)}; for a
    single-file transformer checkpoint {'transformer': (module, params)}, the module an
    ``MMDiT``, ``Flux`` or ``DiT`` with the parameters its diffusers folder would give.

  Raises:
    WeightMismatchError: the weights do not fit the architecture; the message lists
      every missing, unexpected and mis-shaped key.
    WeightFileError: a malformed weight file, shard index or config.json (invalid JSON, a
      field of the wrong type, a missing required field); the message starts with the file.
    ValueError: an architecture option diffjax does not implement, or a single file of none of the
      families above.
  """
  p = os.fspath(path)
  kw = dict(dtype=dtype, param_dtype=param_dtype)
  if os.path.isfile(p):
    return _load_single_file(p, allow_pickle, **kw)
  if not os.path.isdir(p):
    raise FileNotFoundError(f'{p} does not exist')
  if os.path.exists(os.path.join(p, 'config.json')):
    return _load_folder(p, allow_pickle, **kw)
  subs = [s for s in PIPELINE_PARTS if os.path.exists(os.path.join(p, s, 'config.json'))]
  if not subs:
    raise ValueError(f'{p}: neither a model folder (config.json) nor a pipeline folder ({", ".join(PIPELINE_PARTS)})')
  return {s: _load_folder(os.path.join(p, s), allow_pickle, **kw) for s in subs}


# -- saving ------------------------------------------------------------------------------------------------------------
def save_pretrained(module: nn.Module | Mapping[str, Loaded], params: Mapping | None = None,
                    folder: str | os.PathLike = '.', *, dtype=np.float32):
  """Writes diffusers / transformers ``from_pretrained``-compatible folders.

  ``save_pretrained(unet, params, folder)`` writes ``config.json`` and
  ``diffusion_pytorch_model.safetensors`` (U-Net, VAE) or ``model.safetensors`` (CLIP,
  BERT), tensors in PyTorch layout cast to ``dtype``. ``save_pretrained({'unet': (m, p),
  ...}, None, folder)`` writes one subfolder per entry (as in a pipeline folder).
  """
  folder = os.fspath(folder)
  if isinstance(module, Mapping):
    for name, (m, p) in module.items():
      save_pretrained(m, p, os.path.join(folder, name), dtype=dtype)
    return
  key_fn, weights = str, 'diffusion_pytorch_model.safetensors'
  if isinstance(module, UNet):
    cfg = configs.unet_config_to_diffusers(module.config)
  elif isinstance(module, AutoencoderKL):
    cfg = configs.vae_config_to_diffusers(module.config)
  elif isinstance(module, DiT):
    cfg = configs.dit_config_to_diffusers(module.config)
  elif isinstance(module, MMDiT):
    cfg = configs.mmdit_config_to_diffusers(module.config)
  elif isinstance(module, PixArt):
    cfg = configs.pixart_config_to_diffusers(module.config)
  elif isinstance(module, Flux):
    cfg = configs.flux_config_to_diffusers(module.config)
  elif isinstance(module, CLIPTextTransformer):
    cfg, weights = configs.clip_text_config_to_transformers(module.config), 'model.safetensors'
    key_fn = lambda k: k if k.startswith('text_projection.') else 'text_model.' + k
  elif isinstance(module, BertEncoder):
    cfg, weights = configs.bert_config_to_transformers(module.config), 'model.safetensors'
  elif isinstance(module, T5EncoderModel):
    cfg, weights = configs.t5_config_to_transformers(module.config), 'model.safetensors'
  else:
    raise TypeError(f'cannot export {type(module).__name__}')
  os.makedirs(folder, exist_ok=True)
  state = {k: v.astype(dtype) for k, v in state_dict_from_flax(params, key_fn=key_fn).items()}
  write_safetensors(os.path.join(folder, weights), state)
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(cfg, f, indent=2, sort_keys=True)

