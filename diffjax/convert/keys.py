"""PyTorch state dicts <-> Flax parameter trees, by name.

diffjax modules are named like their diffusers / transformers counterparts, with a
list index folded into the name (``down_blocks.0.resnets.1`` <-> ``down_blocks_0 /
resnets_1``). Leaves: ``weight`` <-> ``kernel`` (Dense, Conv), ``scale`` (norms) or
``embedding`` (Embed); ``bias`` <-> ``bias``. Tensors: linear (out, in) <-> (in, out);
conv OIHW <-> HWIO; a 1x1 convolution (O, I, 1, 1) loads into a Dense kernel.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import flax.linen as nn
import numpy as np
from flax import traverse_util

# Module names that are lists in PyTorch (``name.3``) and ``name_3`` in diffjax.
LIST_NAMES = frozenset({
    'down_blocks', 'up_blocks', 'resnets', 'attentions', 'downsamplers', 'upsamplers', 'transformer_blocks',
    'to_out', 'net', 'layers', 'layer', 'block',  # block: T5's encoder.block.N
    'single_transformer_blocks',  # Flux
})
_LEAF_TO_TORCH = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight', 'bias': 'bias',
                  'mean': 'running_mean', 'var': 'running_var',  # inference BatchNorm statistics
                  'class_embedding': 'class_embedding', 'logit_scale': 'logit_scale',  # CLIP's raw parameters
                  'pos_embed': 'pos_embed',  # SD3's stored position table
                  'scale_shift_table': 'scale_shift_table'}  # PixArt's adaLN-single offsets
# Buffers that PyTorch modules save but that are not parameters.
IGNORED_KEYS = (re.compile(r'(^|\.)position_ids$'), re.compile(r'(^|\.)num_batches_tracked$'))


class WeightMismatchError(ValueError):
  """The checkpoint's tensors do not match the model: lists missing, unexpected and mis-shaped keys."""


def torch_key(path: tuple[str, ...]) -> str:
  """Flax parameter path -> PyTorch state-dict key, e.g. ('up_blocks_0', 'resnets_1', 'conv1', 'kernel')
  -> 'up_blocks.0.resnets.1.conv1.weight'."""
  parts = []
  for seg in path[:-1]:
    m = re.fullmatch(r'(.+)_(\d+)', seg)
    parts += [m.group(1), m.group(2)] if m and m.group(1) in LIST_NAMES else [seg]
  return '.'.join(parts + [_LEAF_TO_TORCH[path[-1]]])


def to_flax_array(w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
  """A PyTorch linear/conv weight converted to the Flax kernel layout of ``shape``; None when it cannot fit."""
  w = np.asarray(w)
  if w.ndim == 4 and len(shape) == 2 and w.shape[2:] == (1, 1):  # 1x1 conv -> Dense
    w = w[:, :, 0, 0]
  if w.ndim == 2 and len(shape) == 4 and shape[:2] == (1, 1):  # Dense -> 1x1 conv
    w = w[:, :, None, None]
  if w.ndim == 4 and len(shape) == 4:
    w = w.transpose(2, 3, 1, 0)
  elif w.ndim == 2 and len(shape) == 2:
    w = w.T
  return w if w.shape == tuple(shape) else None


def to_torch_array(path: tuple[str, ...], w: np.ndarray) -> np.ndarray:
  """A Flax parameter converted to the PyTorch layout."""
  w = np.asarray(w)
  if path[-1] == 'kernel' and w.ndim == 4:
    return np.ascontiguousarray(w.transpose(3, 2, 0, 1))
  if path[-1] == 'kernel' and w.ndim == 2:
    return np.ascontiguousarray(w.T)
  return w


def flax_from_state_dict(state: Mapping[str, np.ndarray], target: Mapping, *, key_fn: Callable[[str], str] = str,
                         ignore: Iterable[re.Pattern] = IGNORED_KEYS, dtype=np.float32, what: str = 'checkpoint',
                         convert: Callable = np.array, consume: bool = False) -> dict:
  """Builds the Flax parameter tree ``target`` (nested dict of arrays or ShapeDtypeStructs) from ``state``.

  ``key_fn`` maps the default PyTorch key of a parameter (``torch_key``) to the key in
  ``state`` (e.g. adds a prefix). Keys of ``state`` that no parameter uses (other than
  buffers matching ``ignore``), parameters without a key, and tensors whose shape does
  not fit are all collected and raised together as a ``WeightMismatchError``.
  Each leaf is ``convert`` of the rearranged tensor in ``dtype`` (e.g. ``jnp.asarray``: one
  device copy per tensor, no second host copy of the whole tree). ``consume`` removes each
  tensor from ``state`` (a dict) once converted, so a large checkpoint is not held twice.
  """
  flat = traverse_util.flatten_dict(dict(target))
  out, missing, bad, used = {}, [], [], set()
  for path, leaf in flat.items():
    key = key_fn(torch_key(path))
    if key not in state:
      missing.append(f'{key} (model {tuple(leaf.shape)})')
      continue
    used.add(key)
    w = np.asarray(state.pop(key) if consume else state[key])
    arr = to_flax_array(w, tuple(leaf.shape)) if path[-1] == 'kernel' else w  # only kernels change layout
    if arr is None or arr.shape != tuple(leaf.shape):
      bad.append(f'{key}: checkpoint {tuple(w.shape)}, model {tuple(leaf.shape)} ({"/".join(path)})')
      continue
    out[path] = convert(arr.astype(dtype, copy=False))
    del w, arr
  unexpected = [k for k in state if k not in used and not any(p.search(k) for p in ignore)]
  if missing or unexpected or bad:
    raise WeightMismatchError(mismatch_message(what, missing, unexpected, bad))
  return traverse_util.unflatten_dict(out)


def mismatch_message(what: str, missing: list[str], unexpected: list[str], bad: list[str]) -> str:
  lines = [f'{what} does not match the model ({len(missing)} missing, {len(unexpected)} unexpected, '
           f'{len(bad)} mis-shaped keys). Check that the config matches the weights.']
  for title, keys in (('missing (in the model, not in the checkpoint)', missing),
                      ('unexpected (in the checkpoint, not in the model)', sorted(unexpected)),
                      ('mis-shaped', bad)):
    if keys:
      lines.append(f'{title}:')
      lines += [f'  {k}' for k in keys]
  return '\n'.join(lines)


def state_dict_from_flax(params: Mapping, *, key_fn: Callable[[str], str] = str) -> dict[str, np.ndarray]:
  """Flax parameter tree -> PyTorch-layout float arrays keyed like the reference module."""
  flat = traverse_util.flatten_dict(dict(nn.meta.unbox(params)))
  return {key_fn(torch_key(p)): to_torch_array(p, np.asarray(w)) for p, w in flat.items()}
