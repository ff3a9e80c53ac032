"""Original single-file transformer checkpoints (SD3 / SD3.5, FLUX.1, DiT) -> diffusers names and config.

A single file carries no config: the family is recognised by its keys and the architecture inferred from
tensor shapes, as diffusers' single-file loader and conversion scripts do; the tensors are renamed (fused
q, k, v split, adaLN halves swapped where diffusers orders them otherwise) to the names of the diffusers
model, so that ``pretrained.build`` makes the same module and parameters as from a diffusers folder.

* SD3 / SD3.5 (Stability's ``sd3_medium.safetensors``, ``sd3.5_large.safetensors``, ...): keys under
  ``model.diffusion_model.`` (other models in the file, e.g. the autoencoder under ``first_stage_model.``,
  are left out): ``x_embedder.proj``, ``pos_embed`` (the stored max x max sin-cos table), ``t_embedder.mlp.{0,2}``,
  ``y_embedder.mlp.{0,2}`` (pooled text), ``context_embedder``, ``joint_blocks.N.{x_block, context_block}.{
  adaLN_modulation.1, attn.qkv, attn.proj, attn.ln_q, attn.ln_k, mlp.fc1, mlp.fc2}`` (SD3.5: per-head RMS
  ``ln_q`` / ``ln_k``; MMDiT-X blocks of SD3.5 Medium: an image-only ``x_block.attn2``), ``final_layer.{linear,
  adaLN_modulation.1}``. The last block's text stream (``context_pre_only``) has no ``attn.proj`` and no MLP
  and its modulation is (shift, scale), as is ``final_layer``'s: diffusers' ``AdaLayerNormContinuous`` reads
  (scale, shift), so both are swapped. Heads have 64 channels (``ln_q``'s length where the file has QK
  norms); ``sample_size`` is not stored: Stability's 128 (the table's full size if smaller); it only seeds a
  table the file stores.
* FLUX.1 (Black Forest Labs' ``flux1-dev.safetensors`` / ``flux1-schnell.safetensors``; bare keys or under
  ``model.diffusion_model.``): ``img_in``, ``txt_in``, ``time_in`` / ``vector_in`` / ``guidance_in`` (dev only;
  schnell is not guidance-distilled) ``.{in_layer, out_layer}``, ``double_blocks.N.{img, txt}_{mod.lin, attn.qkv,
  attn.norm.query_norm, attn.norm.key_norm, attn.proj, mlp.0, mlp.2}``, ``single_blocks.N.{modulation.lin,
  linear1 (q, k, v, MLP-in rows fused), linear2, norm.query_norm, norm.key_norm}``, ``final_layer.{linear,
  adaLN_modulation.1 (shift, scale: swapped)}``. The head size is the norms' length; the rotary axes, which
  no tensor shows, are FLUX.1's (16, 56, 56) scaled to it: (d / 8, 7 d / 16, 7 d / 16).
* DiT (facebookresearch's ``DiT-XL-2-256x256.pt``; diffusers' ``scripts/convert_dit_to_diffusers.py``):
  ``x_embedder.proj``, ``t_embedder.mlp.{0,2}`` and ``y_embedder.embedding_table`` (num_classes + 1 rows,
  the last the null label), which diffusers copies into every block's ``norm1.emb``, ``blocks.N.{
  adaLN_modulation.1, attn.qkv, attn.proj, mlp.fc1, mlp.fc2}``, ``final_layer.{adaLN_modulation.1, linear}``
  (-> ``proj_out_1``, ``proj_out_2``; (shift, scale) in both) and ``pos_embed`` (a fixed sin-cos table,
  recomputed by diffjax; its length gives ``sample_size``). Heads: 16 for DiT-XL's width 1152, else
  64-channel heads (DiT-S, B, L). The config is the script's (diffusers' defaults, e.g. ``norm_eps`` 1e-5).

A file whose tensors do not fit the inferred architecture (a truncated block list, a missing tensor, a
variant other than the one asked for) raises one ``WeightMismatchError`` naming the file.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Mapping
from typing import Any

import numpy as np
from absl import logging

from diffjax.convert import configs
from diffjax.convert.keys import WeightMismatchError

PREFIX = 'model.diffusion_model.'
# variant: (name, what in the file shows it)
VARIANTS = {
    'sd3': ('Stable Diffusion 3 (MMDiT)', 'joint_blocks.N without QK norms'),
    'sd3.5': ('Stable Diffusion 3.5 (MMDiT with QK norms)', 'joint_blocks.N with attn.ln_q / attn.ln_k'),
    'flux-dev': ('FLUX.1 [dev]', 'double_blocks.N / single_blocks.N and a guidance embedder (guidance_in)'),
    'flux-schnell': ('FLUX.1 [schnell]', 'double_blocks.N / single_blocks.N and no guidance embedder'),
    'dit': ('DiT', 'blocks.N.attn.qkv and a class table (y_embedder.embedding_table)'),
}
_LEAVES = ('.weight', '.bias', '.scale')  # BFL's RMS norms call their weight 'scale'

# {original module: diffusers module} or, for a fused tensor split into equal row blocks, a tuple of them.
_SD3_IMAGE = {
    'adaLN_modulation.1': 'norm1.linear', 'attn.qkv': ('attn.to_q', 'attn.to_k', 'attn.to_v'),
    'attn.proj': 'attn.to_out.0', 'attn.ln_q': 'attn.norm_q', 'attn.ln_k': 'attn.norm_k',
    'attn2.qkv': ('attn2.to_q', 'attn2.to_k', 'attn2.to_v'), 'attn2.proj': 'attn2.to_out.0',
    'attn2.ln_q': 'attn2.norm_q', 'attn2.ln_k': 'attn2.norm_k', 'mlp.fc1': 'ff.net.0.proj', 'mlp.fc2': 'ff.net.2',
}
_SD3_TEXT = {
    'adaLN_modulation.1': 'norm1_context.linear', 'attn.qkv': ('attn.add_q_proj', 'attn.add_k_proj', 'attn.add_v_proj'),
    'attn.proj': 'attn.to_add_out', 'attn.ln_q': 'attn.norm_added_q', 'attn.ln_k': 'attn.norm_added_k',
    'mlp.fc1': 'ff_context.net.0.proj', 'mlp.fc2': 'ff_context.net.2',
}
_SD3_TOP = {
    'pos_embed': 'pos_embed.pos_embed', 'x_embedder.proj': 'pos_embed.proj',
    't_embedder.mlp.0': 'time_text_embed.timestep_embedder.linear_1',
    't_embedder.mlp.2': 'time_text_embed.timestep_embedder.linear_2',
    'y_embedder.mlp.0': 'time_text_embed.text_embedder.linear_1',
    'y_embedder.mlp.2': 'time_text_embed.text_embedder.linear_2',
    'context_embedder': 'context_embedder', 'final_layer.linear': 'proj_out',
}
_FLUX_DOUBLE = {
    'img_mod.lin': 'norm1.linear', 'txt_mod.lin': 'norm1_context.linear',
    'img_attn.qkv': ('attn.to_q', 'attn.to_k', 'attn.to_v'),
    'txt_attn.qkv': ('attn.add_q_proj', 'attn.add_k_proj', 'attn.add_v_proj'),
    'img_attn.norm.query_norm': 'attn.norm_q', 'img_attn.norm.key_norm': 'attn.norm_k',
    'txt_attn.norm.query_norm': 'attn.norm_added_q', 'txt_attn.norm.key_norm': 'attn.norm_added_k',
    'img_attn.proj': 'attn.to_out.0', 'txt_attn.proj': 'attn.to_add_out',
    'img_mlp.0': 'ff.net.0.proj', 'img_mlp.2': 'ff.net.2', 'txt_mlp.0': 'ff_context.net.0.proj',
    'txt_mlp.2': 'ff_context.net.2',
}
_FLUX_SINGLE = {'modulation.lin': 'norm.linear', 'norm.query_norm': 'attn.norm_q', 'norm.key_norm': 'attn.norm_k',
                'linear2': 'proj_out'}  # linear1: split at the width (below)
_FLUX_TOP = {
    'img_in': 'x_embedder', 'txt_in': 'context_embedder',
    'time_in.in_layer': 'time_text_embed.timestep_embedder.linear_1',
    'time_in.out_layer': 'time_text_embed.timestep_embedder.linear_2',
    'vector_in.in_layer': 'time_text_embed.text_embedder.linear_1',
    'vector_in.out_layer': 'time_text_embed.text_embedder.linear_2',
    'guidance_in.in_layer': 'time_text_embed.guidance_embedder.linear_1',
    'guidance_in.out_layer': 'time_text_embed.guidance_embedder.linear_2', 'final_layer.linear': 'proj_out',
}
_DIT_BLOCK = {
    'adaLN_modulation.1': 'norm1.linear', 'attn.qkv': ('attn1.to_q', 'attn1.to_k', 'attn1.to_v'),
    'attn.proj': 'attn1.to_out.0', 'mlp.fc1': 'ff.net.0.proj', 'mlp.fc2': 'ff.net.2',
}
_DIT_TOP = {'x_embedder.proj': 'pos_embed.proj', 'final_layer.adaLN_modulation.1': 'proj_out_1',
            'final_layer.linear': 'proj_out_2'}
_DIT_HEADS = {1152: 16}  # DiT-XL's 72-channel heads; DiT-S, B and L have 64-channel heads
_SD3_SAMPLE_SIZE = 128  # Stability's SD3 / SD3.5 configs (1024 px); not stored in the file


# -- tensor rules: a diffusers name, a tuple of them (equal row blocks), or a function of the tensor --------------
Rule = str | tuple[str, ...] | Callable[[np.ndarray], list[tuple[str, np.ndarray]]]


def _swapped(name: str) -> Rule:
  """An adaLN projection stored (shift, scale), which diffusers' ``AdaLayerNormContinuous`` reads (scale, shift)."""
  return lambda w: [(name, np.concatenate(np.split(w, 2)[::-1]))]


def _split_at(names: tuple[str, ...], rows: tuple[int, ...]) -> Rule:
  """A fused tensor cut before the given rows (the last part takes the rest)."""
  return lambda w: list(zip(names, np.split(w, rows), strict=True))


def _copies(names: list[str]) -> Rule:
  """One tensor that diffusers holds once per block."""
  return lambda w: [(n, w) for n in names]


def _in_block(src: str, dst: str, table: Mapping[str, str | tuple[str, ...]]) -> dict[str, Rule]:
  """``table`` ({original module: diffusers module(s)} inside one block) with the blocks' prefixes."""
  return {src + k: dst + v if isinstance(v, str) else tuple(dst + n for n in v) for k, v in table.items()}


def _rename(tensors: dict[str, np.ndarray], rules: Mapping[str, Rule]) -> dict[str, np.ndarray]:
  """Applies ``rules`` by module (a key without its leaf), emptying ``tensors``; a tensor without a rule keeps its
  name, for ``build`` to report as unexpected together with whatever else does not fit."""
  out = {}
  for key in list(tensors):
    w = tensors.pop(key)
    module, leaf = (key.rsplit('.', 1) if key.endswith(_LEAVES) else (key, None))
    rule = rules.get(module)
    if rule is None:
      out[key] = w
      continue
    suffix = '' if leaf is None else '.' + ('weight' if leaf == 'scale' else leaf)
    parts = [(rule, w)] if isinstance(rule, str) else (
        list(zip(rule, np.split(w, len(rule)), strict=True)) if isinstance(rule, tuple) else rule(w))
    out.update((name + suffix, part) for name, part in parts)
  return out


# -- recognising a file --------------------------------------------------------------------------------------------
def _transformer_part(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The tensors under ``model.diffusion_model.`` (prefix removed) if the file has any, else all of them."""
  inner = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
  return inner or dict(state)


def _variant(keys: Collection[str]) -> str | None:
  if any(k.startswith('joint_blocks.') for k in keys):
    return 'sd3.5' if any(re.match(r'joint_blocks\.\d+\.\w+\.attn2?\.ln_[qk]\.', k) for k in keys) else 'sd3'
  if any(k.startswith(('double_blocks.', 'single_blocks.')) for k in keys):
    return 'flux-dev' if any(k.startswith('guidance_in.') for k in keys) else 'flux-schnell'
  if 'y_embedder.embedding_table.weight' in keys and any(k.startswith('blocks.') for k in keys):
    return 'dit'
  return None


def variant_of(state: Mapping[str, np.ndarray]) -> str | None:
  """The variant (a key of ``VARIANTS``) of an original single-file transformer state dict, None if it is none
  (e.g. a Stable Diffusion 1.x / 2.x checkpoint, whose ``model.diffusion_model.`` is a U-Net)."""
  return _variant(_transformer_part(state).keys())


def _need(tensors: Mapping[str, np.ndarray], key: str, path: str, variant: str) -> np.ndarray:
  if key not in tensors:
    raise WeightMismatchError(f'{path}: this {VARIANTS[variant][0]} checkpoint lacks {key!r}, which gives the '
                              f'architecture; the file is truncated or of another model')
  return tensors[key]


def _count_blocks(tensors: Mapping, name: str, path: str) -> int:
  """How many ``name.N.`` blocks the file has; WeightMismatchError if an index below the largest is absent."""
  found = {int(m.group(1)) for k in tensors if (m := re.match(rf'{re.escape(name)}\.(\d+)\.', k))}
  n = max(found) + 1 if found else 0
  gaps = sorted(set(range(n)) - found)
  if gaps:
    raise WeightMismatchError(f'{path}: missing block(s) {", ".join(f"{name}.{i}" for i in gaps)} below '
                              f'{name}.{n - 1}: a truncated or damaged checkpoint')
  return n


# -- families ---------------------------------------------------------------------------------------------------------
def _sd3(s: Mapping[str, np.ndarray], path: str, variant: str) -> tuple[dict, dict[str, Rule]]:
  n = _count_blocks(s, 'joint_blocks', path)
  last = f'joint_blocks.{n - 1}.context_block.'
  if f'{last}mlp.fc1.weight' in s or f'{last}attn.proj.weight' in s:
    raise WeightMismatchError(f'{path}: the last joint block ({last[:-1]}) updates the text stream (it has an MLP '
                              f'or an output projection), which only earlier blocks do: the block list is truncated')
  width, in_channels, patch, _ = _need(s, 'x_embedder.proj.weight', path, variant).shape
  context = _need(s, 'context_embedder.weight', path, variant)
  head_dim = _need(s, 'joint_blocks.0.x_block.attn.ln_q.weight', path, variant).shape[0] if variant == 'sd3.5' else 64
  table = _need(s, 'pos_embed', path, variant).shape[1]
  side = math.isqrt(table)
  if side * side != table:
    raise WeightMismatchError(f'{path}: pos_embed has {table} rows, not a square grid')
  config = {
      '_class_name': 'SD3Transformer2DModel', 'sample_size': min(_SD3_SAMPLE_SIZE, side * patch), 'patch_size': patch,
      'in_channels': in_channels, 'out_channels': _need(s, 'final_layer.linear.weight', path, variant).shape[0]
      // patch**2, 'num_layers': n, 'attention_head_dim': head_dim, 'num_attention_heads': width // head_dim,
      'joint_attention_dim': context.shape[1], 'caption_projection_dim': context.shape[0],
      'pooled_projection_dim': _need(s, 'y_embedder.mlp.0.weight', path, variant).shape[1],
      'pos_embed_max_size': side, 'qk_norm': 'rms_norm' if variant == 'sd3.5' else None,
      'dual_attention_layers': sorted({int(m.group(1)) for k in s
                                       if (m := re.match(r'joint_blocks\.(\d+)\.x_block\.attn2\.', k))}),
  }
  rules: dict[str, Rule] = dict(_SD3_TOP, **{'final_layer.adaLN_modulation.1': _swapped('norm_out.linear')})
  for i in range(n):
    rules.update(_in_block(f'joint_blocks.{i}.x_block.', f'transformer_blocks.{i}.', _SD3_IMAGE))
    rules.update(_in_block(f'joint_blocks.{i}.context_block.', f'transformer_blocks.{i}.', _SD3_TEXT))
  rules[f'{last}adaLN_modulation.1'] = _swapped(f'transformer_blocks.{n - 1}.norm1_context.linear')
  return config, rules


def _flux(s: Mapping[str, np.ndarray], path: str, variant: str) -> tuple[dict, dict[str, Rule]]:
  n, n_single = _count_blocks(s, 'double_blocks', path), _count_blocks(s, 'single_blocks', path)
  width, in_channels = _need(s, 'img_in.weight', path, variant).shape
  norm = 'double_blocks.0.img_attn.norm.query_norm.scale' if n else 'single_blocks.0.norm.query_norm.scale'
  head_dim = _need(s, norm, path, variant).shape[0]
  if head_dim % 32:
    raise ValueError(f'{path}: {head_dim}-channel heads have no FLUX.1 rotary split (16, 56, 56 scaled to the head '
                     f'size needs a multiple of 32)')
  out = _need(s, 'final_layer.linear.weight', path, variant).shape[0]
  config = {
      '_class_name': 'FluxTransformer2DModel', 'patch_size': 1, 'in_channels': in_channels,
      'out_channels': None if out == in_channels else out, 'num_layers': n, 'num_single_layers': n_single,
      'attention_head_dim': head_dim, 'num_attention_heads': width // head_dim,
      'joint_attention_dim': _need(s, 'txt_in.weight', path, variant).shape[1],
      'pooled_projection_dim': _need(s, 'vector_in.in_layer.weight', path, variant).shape[1],
      'guidance_embeds': variant == 'flux-dev',
      'axes_dims_rope': [head_dim // 8, 7 * head_dim // 16, 7 * head_dim // 16],
  }
  rules: dict[str, Rule] = dict(_FLUX_TOP, **{'final_layer.adaLN_modulation.1': _swapped('norm_out.linear')})
  for i in range(n):
    rules.update(_in_block(f'double_blocks.{i}.', f'transformer_blocks.{i}.', _FLUX_DOUBLE))
  for i in range(n_single):
    src, dst = f'single_blocks.{i}.', f'single_transformer_blocks.{i}.'
    rules.update(_in_block(src, dst, _FLUX_SINGLE))
    rules[f'{src}linear1'] = _split_at(tuple(dst + m for m in ('attn.to_q', 'attn.to_k', 'attn.to_v', 'proj_mlp')),
                                       (width, 2 * width, 3 * width))
  return config, rules


def _dit(s: Mapping[str, np.ndarray], path: str, variant: str) -> tuple[dict, dict[str, Rule]]:
  n = _count_blocks(s, 'blocks', path)
  width, in_channels, patch, _ = _need(s, 'x_embedder.proj.weight', path, variant).shape
  if width not in _DIT_HEADS and (width % 64 or not width):
    raise ValueError(f'{path}: a DiT of width {width} is none of DiT-S/B/L/XL (64-channel heads, or 16 for 1152)')
  heads = _DIT_HEADS.get(width, width // 64)
  patches = _need(s, 'pos_embed', path, variant).shape[1]
  side = math.isqrt(patches)
  if side * side != patches:
    raise WeightMismatchError(f'{path}: pos_embed has {patches} rows, not a square grid')
  config = {
      '_class_name': 'DiTTransformer2DModel', 'num_attention_heads': heads, 'attention_head_dim': width // heads,
      'in_channels': in_channels, 'out_channels': _need(s, 'final_layer.linear.weight', path, variant).shape[0]
      // patch**2, 'num_layers': n, 'sample_size': side * patch, 'patch_size': patch,
      'num_embeds_ada_norm': _need(s, 'y_embedder.embedding_table.weight', path, variant).shape[0] - 1,
      'attention_bias': True, 'activation_fn': 'gelu-approximate', 'norm_type': 'ada_norm_zero',
      'norm_elementwise_affine': False,
  }
  emb = [f'transformer_blocks.{i}.norm1.emb.' for i in range(n)]
  rules: dict[str, Rule] = dict(_DIT_TOP, **{
      't_embedder.mlp.0': _copies([e + 'timestep_embedder.linear_1' for e in emb]),
      't_embedder.mlp.2': _copies([e + 'timestep_embedder.linear_2' for e in emb]),
      'y_embedder.embedding_table': _copies([e + 'class_embedder.embedding_table' for e in emb]),
      'pos_embed': lambda w: [],  # recomputed (diffjax.models.dit.sincos_position_table)
  })
  for i in range(n):
    rules.update(_in_block(f'blocks.{i}.', f'transformer_blocks.{i}.', _DIT_BLOCK))
  return config, rules


_FAMILIES = {  # variant: (diffjax kind, architecture and rules, the config reader)
    'sd3': ('mmdit', _sd3, configs.mmdit_config_from_diffusers),
    'sd3.5': ('mmdit', _sd3, configs.mmdit_config_from_diffusers),
    'flux-dev': ('flux', _flux, configs.flux_config_from_diffusers),
    'flux-schnell': ('flux', _flux, configs.flux_config_from_diffusers),
    'dit': ('dit', _dit, configs.dit_config_from_diffusers),
}


def to_diffusers(state: dict[str, np.ndarray], path: str, variant: str | None = None, *,
                 consume: bool = False) -> tuple[str, Any, dict[str, np.ndarray]]:
  """An original single-file transformer state dict -> (kind, config, diffusers-named state dict).

  Args:
    state: the file's tensors ({name: array}, as ``files.read_weights`` returns them).
    path: the file, for messages.
    variant: the variant the file must be (a key of ``VARIANTS``: 'sd3', 'sd3.5', 'flux-dev',
      'flux-schnell', 'dit'); None accepts any.
    consume: empty ``state`` while converting (the caller gives it away), so that a large checkpoint is not
      held twice; tensors of other models in the file (outside ``model.diffusion_model.``) are dropped.

  Returns:
    ``kind`` for ``pretrained.build`` ('mmdit', 'flux' or 'dit'), the architecture (``MMDiTConfig``,
    ``FluxConfig`` or ``DiTConfig``, read from the inferred diffusers config dict as a folder's config.json
    is) and the tensors under the diffusers model's names (any the rules do not know keep their names).

  Raises:
    ValueError: the file is no such checkpoint, or ``variant`` is not a known one.
    WeightMismatchError: the file is another variant than ``variant``, or a tensor the architecture is inferred
      from or a block below the last is missing.
  """
  if variant is not None and variant not in VARIANTS:
    raise ValueError(f'unknown transformer variant {variant!r}; known: {", ".join(VARIANTS)}')
  tensors = _transformer_part(state)
  left_out = len(state) - len(tensors)
  found = _variant(tensors.keys())
  if found is None:
    raise ValueError(f'{path}: not an original single-file transformer checkpoint (SD3 / SD3.5: joint_blocks.N, '
                     f'FLUX.1: double_blocks.N / single_blocks.N, DiT: blocks.N with y_embedder.embedding_table)')
  if variant is not None and variant != found:
    raise WeightMismatchError(f'{path}: expected a {VARIANTS[variant][0]} checkpoint, but the file holds a '
                              f'{VARIANTS[found][0]} one: it has {VARIANTS[found][1]}')
  if consume:
    state.clear()
  if left_out:
    logging.info('%s: reading the %s transformer; %d tensors of other models in the file are left out', path,
                 VARIANTS[found][0], left_out)
  kind, family, reader = _FAMILIES[found]
  config, rules = family(tensors, path, found)
  logging.info('%s: %s, inferred config %s', path, VARIANTS[found][0], config)
  return kind, reader(config, f'{path} (the config inferred from its tensors)'), _rename(tensors, rules)
