"""diffusers / transformers ``config.json`` dicts <-> diffjax architecture dataclasses.

Every ``*_from_*`` function refuses (``ValueError``) options diffjax does not
implement, rather than silently building a different network, and checks the type of
every field it reads: a wrong-typed or missing required field raises one
``WeightFileError`` that starts with the config file's path (``where``) and names the
field and what was expected.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

from diffjax.convert.files import WeightFileError
from diffjax.models.clip import CLIPConfig, CLIPVisionConfig
from diffjax.models.dit import DiTConfig
from diffjax.models.flux import FluxConfig
from diffjax.models.mmdit import MMDiTConfig
from diffjax.models.pixart import PixArtConfig
from diffjax.models.t5 import T5Config
from diffjax.models.text import BertConfig, CLIPTextConfig
from diffjax.models.unet import UNetConfig
from diffjax.models.vae import VAEConfig

DIFFUSERS_VERSION = '0.42.1'
TRANSFORMERS_VERSION = '5.23.0'

# diffusers UNet2DConditionModel options and the only values diffjax implements.
_UNET_FIXED = {
    'act_fn': 'silu', 'center_input_sample': False, 'conv_in_kernel': 3, 'conv_out_kernel': 3,
    'downsample_padding': 1, 'dual_cross_attention': False,
    'time_embedding_type': 'positional', 'encoder_hid_dim': None,
    'encoder_hid_dim_type': None, 'time_cond_proj_dim': None, 'timestep_post_act': None,
    'time_embedding_dim': None, 'time_embedding_act_fn': None, 'class_embeddings_concat': False,
    'mid_block_only_cross_attention': None, 'resnet_skip_time_act': False, 'resnet_out_scale_factor': 1.0,
    'attention_type': 'default', 'cross_attention_norm': None, 'reverse_transformer_layers_per_block': None,
    'mid_block_scale_factor': 1, 'num_attention_heads': None,
}
_VAE_FIXED = {'act_fn': 'silu', 'latents_mean': None, 'latents_std': None}


_REQUIRED = object()


def _is_int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_num(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _seq_of(check):
  return lambda x: isinstance(x, list | tuple) and all(check(e) for e in x)


_KINDS = {  # kind: (check, what is expected)
    'int': (_is_int, 'an integer'), 'float': (_is_num, 'a number'),
    'bool': (lambda x: isinstance(x, bool), 'true or false'), 'str': (lambda x: isinstance(x, str), 'a string'),
    'ints': (_seq_of(_is_int), 'a list of integers'),
    'strs': (_seq_of(lambda x: isinstance(x, str)), 'a list of strings'),
    'int|ints': (lambda x: _is_int(x) or _seq_of(_is_int)(x), 'an integer or a list of integers'),
    'bool|bools': (lambda x: isinstance(x, bool) or _seq_of(lambda e: isinstance(e, bool))(x),
                   'true, false or a list of them'),
}


class Fields:
  """Typed reads of a config dict at the config -> dataclass boundary.

  A field of the wrong type, or a missing required one, raises one WeightFileError whose message starts with
  ``where`` (the config file) and names the field and what was expected. Lists come back as tuples.
  """

  def __init__(self, cfg: Any, where: str, prefix: str = ''):
    if not isinstance(cfg, Mapping):
      name = prefix.rstrip('.') or 'the config'
      raise WeightFileError(f'{where}: {name} must be a JSON object, got {cfg!r}')
    self.cfg, self.where, self.prefix = cfg, where, prefix

  def __call__(self, key: str, kind: str, default: Any = _REQUIRED, nullable: bool = False) -> Any:
    check, expected = _KINDS[kind]
    expected += ' or null' if nullable else ''
    if key not in self.cfg:
      if default is _REQUIRED:
        raise WeightFileError(f'{self.where}: required field {self.prefix + key!r} ({expected}) is missing')
      return default
    v = self.cfg[key]
    if v is None and nullable:
      return None
    if not check(v):
      raise WeightFileError(f'{self.where}: field {self.prefix + key!r} must be {expected}, got {v!r}')
    return tuple(v) if isinstance(v, list | tuple) else v

  def sub(self, key: str) -> Fields:
    """The nested object ``key`` (e.g. a CLIPConfig's ``text_config``)."""
    if key not in self.cfg:
      raise WeightFileError(f'{self.where}: required field {self.prefix + key!r} (a JSON object) is missing')
    return Fields(self.cfg[key], self.where, f'{self.prefix}{key}.')

  def check_fixed(self, fixed: dict, what: str):
    """ValueError (naming the file) for options whose values diffjax does not implement."""
    cfg = self.cfg
    bad = {k: cfg[k] for k, v in fixed.items() if k in cfg and cfg[k] != v and not (v is False and cfg[k] is None)}
    if bad:
      raise ValueError(f'{self.where}: {what} config options not supported by diffjax: {bad} (supported: '
                       f'{ {k: fixed[k] for k in bad} })')


def _per_level(v: Any, n: int) -> tuple:
  return tuple(v) if isinstance(v, list | tuple) else (v,) * n


def unet_config_from_diffusers(cfg: Mapping, where: str = 'config') -> UNetConfig:
  """A diffusers ``UNet2DConditionModel`` config dict -> ``UNetConfig`` (``where``: the config file, for errors)."""
  f = Fields(cfg, where)
  f.check_fixed(_UNET_FIXED, 'UNet2DConditionModel')
  down = f('down_block_types', 'strs', ('CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',))
  up = f('up_block_types', 'strs', ('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 3)
  allowed = {'CrossAttnDownBlock2D', 'DownBlock2D'}
  if set(down) - allowed or set(up) - {'CrossAttnUpBlock2D', 'UpBlock2D'}:
    raise ValueError(f'{where}: unsupported block types {down} / {up}; diffjax has {sorted(allowed)} and their Up '
                     f'versions')
  levels = tuple(t == 'CrossAttnDownBlock2D' for t in down)
  if tuple(t == 'CrossAttnUpBlock2D' for t in up) != levels[::-1]:
    raise ValueError(f'{where}: up_block_types {up} must mirror down_block_types {down}')
  mid = f('mid_block_type', 'str', 'UNetMidBlock2DCrossAttn', nullable=True)
  if mid != 'UNetMidBlock2DCrossAttn':
    raise ValueError(f'{where}: mid_block_type {mid!r} is not supported (only UNetMidBlock2DCrossAttn)')
  n = len(down)
  heads = _per_level(f('attention_head_dim', 'int|ints', 8), n)
  depth = _per_level(f('transformer_layers_per_block', 'int|ints', 1), n)  # nested (per-layer) lists are refused
  if len(depth) != n:
    raise ValueError(f'{where}: transformer_layers_per_block {depth} needs one entry per level ({n})')
  shift = f('resnet_time_scale_shift', 'str', 'default')
  if shift not in ('default', 'scale_shift'):
    raise ValueError(f'{where}: resnet_time_scale_shift {shift!r} is not supported')
  num_classes = pooled = None
  cet = f('class_embed_type', 'str', None, nullable=True)
  if cet is None:
    num_classes = f('num_class_embeds', 'int', None, nullable=True)
  elif cet == 'projection':
    pooled = f('projection_class_embeddings_input_dim', 'int')
  else:
    raise ValueError(f'{where}: class_embed_type {cet!r} is not supported (None or "projection")')
  time_dim = added = None
  aet = f('addition_embed_type', 'str', None, nullable=True)
  if aet == 'text_time':  # SDXL: pooled text + time ids, the MLP's input width in projection_class_...
    time_dim, added = f('addition_time_embed_dim', 'int'), f('projection_class_embeddings_input_dim', 'int')
  elif aet is not None:
    raise ValueError(f'{where}: addition_embed_type {aet!r} is not supported (None or "text_time")')
  only_cross = f('only_cross_attention', 'bool|bools', False, nullable=True) or False
  if not isinstance(only_cross, bool) and len(only_cross) != n:
    raise ValueError(f'{where}: only_cross_attention has {len(only_cross)} entries for {n} down blocks')
  return UNetConfig(
      in_channels=f('in_channels', 'int', 4), out_channels=f('out_channels', 'int', 4),
      block_out_channels=f('block_out_channels', 'ints', (320, 640, 1280, 1280)),
      layers_per_block=f('layers_per_block', 'int', 2), attention_levels=levels,
      num_heads=heads[0] if len(set(heads)) == 1 else heads,
      transformer_depth=depth[0] if len(set(depth)) == 1 else depth,
      cross_attention_dim=f('cross_attention_dim', 'int', 1280, nullable=True),
      use_linear_projection=f('use_linear_projection', 'bool', False),
      norm_num_groups=f('norm_num_groups', 'int', 32), norm_eps=f('norm_eps', 'float', 1e-5),
      flip_sin_to_cos=f('flip_sin_to_cos', 'bool', True), freq_shift=f('freq_shift', 'float', 0),
      resnet_scale_shift=shift == 'scale_shift', dropout=f('dropout', 'float', 0.0), num_classes=num_classes,
      pooled_dim=pooled, only_cross_attention=only_cross, addition_time_embed_dim=time_dim, addition_embed_dim=added)


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
      'transformer_layers_per_block': c.transformer_depth if isinstance(c.transformer_depth, int)
                                      else list(c.transformer_depth),
      'use_linear_projection': c.use_linear_projection,
      'resnet_time_scale_shift': 'scale_shift' if c.resnet_scale_shift else 'default',
      'only_cross_attention': c.only_cross_attention if isinstance(c.only_cross_attention, bool)
                              else list(c.only_cross_attention),
  }
  if c.num_classes is not None:
    d['num_class_embeds'] = c.num_classes
  if c.pooled_dim is not None:
    d.update(class_embed_type='projection', projection_class_embeddings_input_dim=c.pooled_dim)
  if c.addition_time_embed_dim is not None:
    if c.pooled_dim not in (None, c.addition_embed_dim):  # diffusers sizes both MLPs' inputs with one field
      raise ValueError(f'diffusers cannot express pooled_dim {c.pooled_dim} != addition_embed_dim '
                       f'{c.addition_embed_dim}')
    d.update(addition_embed_type='text_time', addition_time_embed_dim=c.addition_time_embed_dim,
             projection_class_embeddings_input_dim=c.addition_embed_dim)
  return d


def vae_config_from_diffusers(cfg: Mapping, where: str = 'config') -> VAEConfig:
  """A diffusers ``AutoencoderKL`` config dict -> ``VAEConfig`` (``where``: the config file, for errors)."""
  f = Fields(cfg, where)
  f.check_fixed(_VAE_FIXED, 'AutoencoderKL')
  for key, typ in (('down_block_types', 'DownEncoderBlock2D'), ('up_block_types', 'UpDecoderBlock2D')):
    types = f(key, 'strs', (typ,))
    if set(types) != {typ}:
      raise ValueError(f'{where}: {key} {types} is not supported (only {typ})')
  return VAEConfig(
      in_channels=f('in_channels', 'int', 3), out_channels=f('out_channels', 'int', 3),
      latent_channels=f('latent_channels', 'int', 4), block_out_channels=f('block_out_channels', 'ints', (64,)),
      layers_per_block=f('layers_per_block', 'int', 1), norm_num_groups=f('norm_num_groups', 'int', 32),
      mid_block_attention=f('mid_block_add_attention', 'bool', True),
      use_quant_conv=f('use_quant_conv', 'bool', True), use_post_quant_conv=f('use_post_quant_conv', 'bool', True),
      scaling_factor=f('scaling_factor', 'float', 0.18215),
      shift_factor=f('shift_factor', 'float', None, nullable=True) or 0.0)


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


def clip_text_config_from_transformers(cfg: Mapping, where: str = 'config') -> CLIPTextConfig:
  """A transformers ``CLIPTextConfig`` dict (or a ``CLIPConfig`` with ``text_config``) -> ``CLIPTextConfig``."""
  f = Fields(cfg, where)
  if f('model_type', 'str', None, nullable=True) == 'clip':
    f = f.sub('text_config')
  with_proj = 'CLIPTextModelWithProjection' in (f('architectures', 'strs', None, nullable=True) or ())
  return CLIPTextConfig(
      vocab_size=f('vocab_size', 'int', 49408), hidden_size=f('hidden_size', 'int', 512),
      intermediate_size=f('intermediate_size', 'int', 2048), num_layers=f('num_hidden_layers', 'int', 12),
      num_heads=f('num_attention_heads', 'int', 8), max_positions=f('max_position_embeddings', 'int', 77),
      hidden_act=f('hidden_act', 'str', 'quick_gelu'), layer_norm_eps=f('layer_norm_eps', 'float', 1e-5),
      eos_token_id=f('eos_token_id', 'int', 2),
      projection_dim=f('projection_dim', 'int', 512) if with_proj else None)


def clip_config_from_transformers(cfg: Mapping, where: str = 'config') -> CLIPConfig:
  """A transformers ``CLIPConfig`` dict (a ``CLIPModel``'s: text and vision towers) -> ``CLIPConfig``."""
  f = Fields(cfg, where)
  if f('model_type', 'str', None, nullable=True) != 'clip':
    raise WeightFileError(f"{where}: not a transformers CLIPModel config (model_type 'clip')")
  v = f.sub('vision_config')
  vision = CLIPVisionConfig(
      hidden_size=v('hidden_size', 'int', 768), intermediate_size=v('intermediate_size', 'int', 3072),
      num_layers=v('num_hidden_layers', 'int', 12), num_heads=v('num_attention_heads', 'int', 12),
      image_size=v('image_size', 'int', 224), patch_size=v('patch_size', 'int', 32),
      hidden_act=v('hidden_act', 'str', 'quick_gelu'), layer_norm_eps=float(v('layer_norm_eps', 'float', 1e-5)))
  return CLIPConfig(text=clip_text_config_from_transformers(cfg, where), vision=vision,
                    projection_dim=f('projection_dim', 'int', 512))


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


def bert_config_from_transformers(cfg: Mapping, add_pooler: bool = True, where: str = 'config') -> BertConfig:
  """A transformers ``BertConfig`` dict -> ``BertConfig`` (``where``: the config file, for errors)."""
  f = Fields(cfg, where)
  pos = f('position_embedding_type', 'str', 'absolute')
  if pos != 'absolute':
    raise ValueError(f'{where}: position_embedding_type {pos!r} is not supported (absolute)')
  return BertConfig(
      vocab_size=f('vocab_size', 'int', 30522), hidden_size=f('hidden_size', 'int', 768),
      intermediate_size=f('intermediate_size', 'int', 3072), num_layers=f('num_hidden_layers', 'int', 12),
      num_heads=f('num_attention_heads', 'int', 12), max_positions=f('max_position_embeddings', 'int', 512),
      type_vocab_size=f('type_vocab_size', 'int', 2), hidden_act=f('hidden_act', 'str', 'gelu'),
      layer_norm_eps=f('layer_norm_eps', 'float', 1e-12), add_pooler=add_pooler)


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


def t5_config_from_transformers(cfg: Mapping, where: str = 'config') -> T5Config:
  """A transformers ``T5Config`` dict (``T5EncoderModel``, ``T5ForConditionalGeneration``, UMT5 excluded) ->
  ``T5Config``. ``feed_forward_proj`` is ``[gated-]ACT``; ``gated-gelu`` means tanh GELU, as in transformers."""
  f = Fields(cfg, where)
  proj = f('feed_forward_proj', 'str', 'relu')
  gated, act = proj.startswith('gated-'), proj.removeprefix('gated-')
  act = 'gelu_new' if proj == 'gated-gelu' else act
  if '-' in act or act not in ('relu', 'gelu', 'gelu_new'):
    raise ValueError(f'{where}: feed_forward_proj {proj!r} is not supported (relu, gelu, gated-gelu, gated-relu, '
                     f'gated-gelu_new)')
  return T5Config(
      vocab_size=f('vocab_size', 'int', 32128), d_model=f('d_model', 'int', 512), d_kv=f('d_kv', 'int', 64),
      d_ff=f('d_ff', 'int', 2048), num_layers=f('num_layers', 'int', 6), num_heads=f('num_heads', 'int', 8),
      relative_attention_num_buckets=f('relative_attention_num_buckets', 'int', 32),
      relative_attention_max_distance=f('relative_attention_max_distance', 'int', 128),
      layer_norm_epsilon=float(f('layer_norm_epsilon', 'float', 1e-6)), act=act, gated=gated)


def t5_config_to_transformers(c: T5Config) -> dict:
  """``T5Config`` -> a transformers ``T5Config`` dict of a ``T5EncoderModel``."""
  proj = ('gated-gelu' if c.act == 'gelu_new' else f'gated-{c.act}') if c.gated else c.act
  return {
      'architectures': ['T5EncoderModel'], 'model_type': 't5', 'transformers_version': TRANSFORMERS_VERSION,
      'vocab_size': c.vocab_size, 'd_model': c.d_model, 'd_kv': c.d_kv, 'd_ff': c.d_ff, 'num_layers': c.num_layers,
      'num_heads': c.num_heads, 'relative_attention_num_buckets': c.relative_attention_num_buckets,
      'relative_attention_max_distance': c.relative_attention_max_distance,
      'layer_norm_epsilon': c.layer_norm_epsilon, 'feed_forward_proj': proj, 'dropout_rate': 0.0,
      'is_encoder_decoder': False, 'use_cache': False, 'tie_word_embeddings': False, 'pad_token_id': 0,
      'eos_token_id': 1, 'torch_dtype': 'float32',
  }


def dit_config_from_diffusers(cfg: Mapping, where: str = 'config') -> DiTConfig:
  """A diffusers ``DiTTransformer2DModel`` config dict -> ``DiTConfig``."""
  f = Fields(cfg, where)
  f.check_fixed({'norm_type': 'ada_norm_zero', 'norm_elementwise_affine': False}, 'DiTTransformer2DModel')
  classes = f('num_embeds_ada_norm', 'int', 1000, nullable=True)
  if classes is None:
    raise ValueError(f'{where}: a DiT needs num_embeds_ada_norm (its number of classes)')
  return DiTConfig(
      num_heads=f('num_attention_heads', 'int', 16), head_dim=f('attention_head_dim', 'int', 72),
      in_channels=f('in_channels', 'int', 4), out_channels=f('out_channels', 'int', None, nullable=True),
      num_layers=f('num_layers', 'int', 28), sample_size=f('sample_size', 'int', 32),
      patch_size=f('patch_size', 'int', 2), num_classes=classes, norm_eps=float(f('norm_eps', 'float', 1e-5)),
      attention_bias=f('attention_bias', 'bool', True), activation=f('activation_fn', 'str', 'gelu-approximate'))


def dit_config_to_diffusers(c: DiTConfig) -> dict:
  """``DiTConfig`` -> a diffusers ``DiTTransformer2DModel`` config dict."""
  return {
      '_class_name': 'DiTTransformer2DModel', '_diffusers_version': DIFFUSERS_VERSION,
      'num_attention_heads': c.num_heads, 'attention_head_dim': c.head_dim, 'in_channels': c.in_channels,
      'out_channels': c.out_channels, 'num_layers': c.num_layers, 'dropout': 0.0, 'norm_num_groups': 32,
      'attention_bias': c.attention_bias, 'sample_size': c.sample_size, 'patch_size': c.patch_size,
      'activation_fn': c.activation, 'num_embeds_ada_norm': c.num_classes, 'upcast_attention': False,
      'norm_type': 'ada_norm_zero', 'norm_elementwise_affine': False, 'norm_eps': c.norm_eps,
  }


def mmdit_config_from_diffusers(cfg: Mapping, where: str = 'config') -> MMDiTConfig:
  """A diffusers ``SD3Transformer2DModel`` config dict (SD3, SD3.5) -> ``MMDiTConfig``."""
  f = Fields(cfg, where)
  qk_norm = f('qk_norm', 'str', None, nullable=True)
  if qk_norm not in (None, 'rms_norm'):
    raise ValueError(f"{where}: qk_norm {qk_norm!r} is not supported (None or 'rms_norm')")
  return MMDiTConfig(
      sample_size=f('sample_size', 'int', 128), patch_size=f('patch_size', 'int', 2),
      in_channels=f('in_channels', 'int', 16), out_channels=f('out_channels', 'int', 16, nullable=True),
      num_layers=f('num_layers', 'int', 18), head_dim=f('attention_head_dim', 'int', 64),
      num_heads=f('num_attention_heads', 'int', 18), joint_attention_dim=f('joint_attention_dim', 'int', 4096),
      caption_projection_dim=f('caption_projection_dim', 'int', 1152),
      pooled_projection_dim=f('pooled_projection_dim', 'int', 2048),
      pos_embed_max_size=f('pos_embed_max_size', 'int', 96),
      dual_attention_layers=tuple(f('dual_attention_layers', 'ints', ())), qk_norm=qk_norm)


def mmdit_config_to_diffusers(c: MMDiTConfig) -> dict:
  """``MMDiTConfig`` -> a diffusers ``SD3Transformer2DModel`` config dict."""
  return {
      '_class_name': 'SD3Transformer2DModel', '_diffusers_version': DIFFUSERS_VERSION,
      'sample_size': c.sample_size, 'patch_size': c.patch_size, 'in_channels': c.in_channels,
      'out_channels': c.out_channels, 'num_layers': c.num_layers, 'attention_head_dim': c.head_dim,
      'num_attention_heads': c.num_heads, 'joint_attention_dim': c.joint_attention_dim,
      'caption_projection_dim': c.caption_projection_dim, 'pooled_projection_dim': c.pooled_projection_dim,
      'pos_embed_max_size': c.pos_embed_max_size, 'dual_attention_layers': list(c.dual_attention_layers),
      'qk_norm': c.qk_norm,
  }


def pixart_config_from_diffusers(cfg: Mapping, where: str = 'config') -> PixArtConfig:
  """A diffusers ``PixArtTransformer2DModel`` config dict (PixArt-alpha, PixArt-Sigma) -> ``PixArtConfig``."""
  f = Fields(cfg, where)
  f.check_fixed({'norm_type': 'ada_norm_single', 'norm_elementwise_affine': False, 'attention_type': 'default'},
                'PixArtTransformer2DModel')
  caption = f('caption_channels', 'int', None, nullable=True)
  cross = f('cross_attention_dim', 'int', 1152, nullable=True)
  if caption is None or cross is None:
    raise ValueError(f'{where}: diffjax loads PixArt with a caption projection and cross-attention '
                     f'(caption_channels and cross_attention_dim set)')
  scale = f('interpolation_scale', 'float', None, nullable=True)
  return PixArtConfig(
      num_heads=f('num_attention_heads', 'int', 16), head_dim=f('attention_head_dim', 'int', 72),
      in_channels=f('in_channels', 'int', 4), out_channels=f('out_channels', 'int', 8, nullable=True),
      num_layers=f('num_layers', 'int', 28), cross_attention_dim=cross, sample_size=f('sample_size', 'int', 128),
      patch_size=f('patch_size', 'int', 2), caption_channels=caption,
      interpolation_scale=None if scale is None else float(scale),
      use_additional_conditions=f('use_additional_conditions', 'bool', None, nullable=True),
      norm_eps=float(f('norm_eps', 'float', 1e-6)), attention_bias=f('attention_bias', 'bool', True))


def pixart_config_to_diffusers(c: PixArtConfig) -> dict:
  """``PixArtConfig`` -> a diffusers ``PixArtTransformer2DModel`` config dict."""
  return {
      '_class_name': 'PixArtTransformer2DModel', '_diffusers_version': DIFFUSERS_VERSION,
      'num_attention_heads': c.num_heads, 'attention_head_dim': c.head_dim, 'in_channels': c.in_channels,
      'out_channels': c.out_channels, 'num_layers': c.num_layers, 'dropout': 0.0, 'norm_num_groups': 32,
      'cross_attention_dim': c.cross_attention_dim, 'attention_bias': c.attention_bias,
      'sample_size': c.sample_size, 'patch_size': c.patch_size, 'activation_fn': 'gelu-approximate',
      'num_embeds_ada_norm': 1000, 'upcast_attention': False, 'norm_type': 'ada_norm_single',
      'norm_elementwise_affine': False, 'norm_eps': c.norm_eps, 'interpolation_scale': c.interpolation_scale,
      'use_additional_conditions': c.use_additional_conditions, 'caption_channels': c.caption_channels,
      'attention_type': 'default',
  }


def flux_config_from_diffusers(cfg: Mapping, where: str = 'config') -> FluxConfig:
  """A diffusers ``FluxTransformer2DModel`` config dict (FLUX.1 dev / schnell) -> ``FluxConfig``."""
  f = Fields(cfg, where)
  return FluxConfig(
      patch_size=f('patch_size', 'int', 1), in_channels=f('in_channels', 'int', 64),
      out_channels=f('out_channels', 'int', None, nullable=True), num_layers=f('num_layers', 'int', 19),
      num_single_layers=f('num_single_layers', 'int', 38), head_dim=f('attention_head_dim', 'int', 128),
      num_heads=f('num_attention_heads', 'int', 24), joint_attention_dim=f('joint_attention_dim', 'int', 4096),
      pooled_projection_dim=f('pooled_projection_dim', 'int', 768),
      guidance_embeds=f('guidance_embeds', 'bool', False), axes_dims_rope=tuple(f('axes_dims_rope', 'ints',
                                                                                    (16, 56, 56))))


def flux_config_to_diffusers(c: FluxConfig) -> dict:
  """``FluxConfig`` -> a diffusers ``FluxTransformer2DModel`` config dict."""
  return {
      '_class_name': 'FluxTransformer2DModel', '_diffusers_version': DIFFUSERS_VERSION,
      'patch_size': c.patch_size, 'in_channels': c.in_channels, 'out_channels': c.out_channels,
      'num_layers': c.num_layers, 'num_single_layers': c.num_single_layers, 'attention_head_dim': c.head_dim,
      'num_attention_heads': c.num_heads, 'joint_attention_dim': c.joint_attention_dim,
      'pooled_projection_dim': c.pooled_projection_dim, 'guidance_embeds': c.guidance_embeds,
      'axes_dims_rope': list(c.axes_dims_rope),
  }
