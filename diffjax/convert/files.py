"""Reading and writing weight files: safetensors (via the ``safetensors`` package), and guarded pickles.

The safetensors format (https://github.com/huggingface/safetensors) is an 8-byte
little-endian header length, a JSON header {name: {dtype, shape, data_offsets}} and
the raw little-endian data. Files are checked here first (cheaply: the header only,
against the file's size, never allocating what a header merely claims), so that a
malformed file raises one :class:`WeightFileError` naming it; then they are read with
``safetensors.safe_open(framework="numpy")`` (bfloat16 as ``ml_dtypes.bfloat16``) and
written with ``safetensors.numpy.save_file``. Pickled checkpoints (.ckpt, .bin, .pt,
.pth) run arbitrary code when loaded and are refused unless the caller passes
``allow_pickle=True``.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Mapping

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

PICKLE_SUFFIXES = ('.ckpt', '.bin', '.pt', '.pth', '.pkl')

_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16, 'I64': np.int64,
    'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_MAX_HEADER = 100_000_000  # the safetensors library's own limit on the JSON header


class PickleRefusedError(ValueError):
  """A pickled checkpoint was passed without ``allow_pickle=True``."""


class WeightFileError(ValueError):
  """A weight file (or its shard index, or a config.json) is malformed; the message names the file."""


def _is_count(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_safetensors(path: str) -> None:
  """Raises WeightFileError unless ``path`` has a well-formed safetensors header consistent with its size."""
  try:
    size = os.path.getsize(path)
  except OSError as e:
    raise WeightFileError(f'{path}: cannot read the safetensors file ({e})') from e
  if size == 0:
    raise WeightFileError(f'{path}: empty file, not a safetensors file')
  if size < 8:
    raise WeightFileError(f'{path}: truncated safetensors file ({size} bytes, shorter than the 8-byte header length)')
  with open(path, 'rb') as f:
    (n,) = struct.unpack('<Q', f.read(8))
    if n > size - 8:
      raise WeightFileError(f'{path}: truncated or corrupt safetensors file: the header claims {n} bytes but only '
                            f'{size - 8} follow the length field')
    if n > _MAX_HEADER:
      raise WeightFileError(f'{path}: safetensors header of {n} bytes exceeds the {_MAX_HEADER}-byte limit')
    raw = f.read(n)
  try:
    header = json.loads(raw.decode('utf-8'))
  except (UnicodeDecodeError, ValueError) as e:
    raise WeightFileError(f'{path}: the safetensors header is not valid UTF-8 JSON ({e})') from e
  if not isinstance(header, dict):
    raise WeightFileError(f'{path}: the safetensors header is a JSON {type(header).__name__}, not an object')
  meta = header.pop('__metadata__', None)
  if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
    raise WeightFileError(f'{path}: the safetensors __metadata__ is not an object of strings')
  data_len = size - 8 - n
  for name, info in header.items():
    if not isinstance(info, dict) or not {'dtype', 'shape', 'data_offsets'} <= info.keys():
      raise WeightFileError(f'{path}: tensor {name!r} header entry needs dtype, shape and data_offsets, got {info!r}')
    dtype, shape, offsets = info['dtype'], info['shape'], info['data_offsets']
    if not isinstance(dtype, str) or dtype not in _DTYPES:
      raise WeightFileError(f'{path}: tensor {name!r} has unsupported dtype {dtype!r} '
                            f'(supported: {", ".join(_DTYPES)})')
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
      raise WeightFileError(f'{path}: tensor {name!r} has invalid shape {shape!r}')
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
      raise WeightFileError(f'{path}: tensor {name!r} has invalid data_offsets {offsets!r}')
    start, end = offsets
    if end > data_len:
      raise WeightFileError(f'{path}: truncated or corrupt safetensors file: tensor {name!r} data_offsets '
                            f'[{start}, {end}] run past the end of the {data_len}-byte data section')
    nbytes = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize
    if end - start != nbytes:
      raise WeightFileError(f'{path}: tensor {name!r} shape {shape} of {dtype} needs {nbytes} bytes but its '
                            f'data_offsets [{start}, {end}] hold {end - start}')


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """{name: array} from a .safetensors file (native dtypes, bf16 as ``ml_dtypes.bfloat16``).

  Raises WeightFileError (naming the file) if it is malformed.
  """
  p = os.fspath(path)
  _check_safetensors(p)
  try:
    with safetensors.safe_open(p, framework='numpy') as f:
      return {name: f.get_tensor(name) for name in f.keys()}
  except safetensors.SafetensorError as e:  # anything the cheap check above lets through (e.g. overlapping data)
    raise WeightFileError(f'{p}: malformed safetensors file ({e})') from e


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None):
  """Writes {name: array} as a .safetensors file (``metadata`` defaults to {'format': 'pt'} for PyTorch loaders).

  The file is written to a temporary name and moved into place, so readers never see half a file.
  """
  arrays = {}
  for name in sorted(tensors):
    a = np.asarray(tensors[name])
    a = a if a.flags.c_contiguous else a.copy(order='C')  # (ascontiguousarray would make scalars 1-d)
    if a.dtype not in _NAMES:
      raise ValueError(f'tensor {name}: dtype {a.dtype} cannot be written to safetensors')
    arrays[name] = a
  metadata = dict(metadata or {'format': 'pt'})
  write_atomically(path, lambda tmp: safetensors.numpy.save_file(arrays, tmp, metadata=metadata))


def write_atomically(path: str | os.PathLike, write: Callable[[str], None], suffix: str = '') -> None:
  """``write(tmp)`` to a temporary name beside ``path`` (ending in ``suffix``, for writers such as ``np.savez``
  that append one), then moved into place: readers never see half a file, a failed write leaves none."""
  p = os.fspath(path)
  tmp = f'{p}.tmp{os.getpid()}{suffix}'
  try:
    write(tmp)
    os.replace(tmp, p)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json(path: str | os.PathLike, obj, **dump_options) -> None:
  """``obj`` as JSON in ``path`` (``json.dumps``' options, e.g. ``indent``), replacing it whole
  (``write_atomically``)."""
  text = json.dumps(obj, **dump_options) + '\n'

  def write(tmp):
    with open(tmp, 'w', encoding='utf-8') as f:
      f.write(text)

  write_atomically(path, write)


def read_json_config(path: str | os.PathLike, what: str = 'a JSON object') -> dict:
  """The JSON object in ``path`` (a config.json, model_index.json, shard index ...); the one place JSON files are
  parsed. WeightFileError naming the file if it is empty, not UTF-8 JSON, or not an object (``what`` says what
  was expected instead)."""
  p = os.fspath(path)
  with open(p, 'rb') as f:
    raw = f.read()
  if not raw.strip():
    raise WeightFileError(f'{p}: empty file, expected {what}')
  try:
    obj = json.loads(raw.decode('utf-8'))
  except (UnicodeDecodeError, ValueError) as e:
    raise WeightFileError(f'{p}: not valid JSON ({e})') from e
  if not isinstance(obj, dict):
    raise WeightFileError(f'{p}: expected {what}, got a JSON {_json_type(obj)}')
  return obj


def _json_type(x) -> str:
  """The JSON name of a parsed value's type (for error messages)."""
  if x is None:
    return 'null'
  return {bool: 'boolean', int: 'number', float: 'number', str: 'string', list: 'list', dict: 'object'}.get(
      type(x), type(x).__name__)


_WEIGHT_MAP = 'a "weight_map" object of {tensor: shard file}'


def _index_shards(index: str) -> list[str]:
  """The shard file names of a ``*.safetensors.index.json``, checked to exist next to it."""
  weight_map = read_json_config(index, f'a shard index: a JSON object with {_WEIGHT_MAP}').get('weight_map')
  if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
    raise WeightFileError(f'{index}: the shard index has no {_WEIGHT_MAP}')
  folder = os.path.dirname(index)
  shards = sorted(set(weight_map.values()))
  missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
  if missing:
    raise WeightFileError(f'{index}: names shard file(s) that do not exist: {", ".join(missing)}')
  return shards


def read_pickle(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, np.ndarray]:
  """{name: array} from a PyTorch pickle, only with ``allow_pickle=True`` (needs torch).

  Tries ``torch.load(weights_only=True)`` first; if the file holds other objects (old
  Lightning checkpoints do), loads it fully, which executes the code it contains.
  A top-level ``state_dict`` entry is unwrapped.
  """
  if not allow_pickle:
    raise PickleRefusedError(
        f'{path} is a pickled PyTorch checkpoint; loading it can execute arbitrary code. Convert it to '
        f'.safetensors, or pass allow_pickle=True if you trust its source.')
  try:
    import torch
  except ImportError as e:
    raise ImportError(f'reading the pickled checkpoint {path} needs PyTorch (pip install torch)') from e
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception:  # not plain tensors; the caller allowed full unpickling
    obj = torch.load(path, map_location='cpu', weights_only=False)
  if isinstance(obj, dict) and 'state_dict' in obj:
    obj = obj['state_dict']
  return {k: _torch_to_numpy(v) for k, v in obj.items() if hasattr(v, 'shape')}


def _torch_to_numpy(t) -> np.ndarray:
  import torch
  if t.dtype == torch.bfloat16:
    return t.float().numpy().astype(ml_dtypes.bfloat16)
  return t.numpy()


def read_weights(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, np.ndarray]:
  """{name: array} from a .safetensors file, or (with ``allow_pickle``) a pickled one."""
  p = os.fspath(path)
  if p.endswith('.safetensors'):
    return read_safetensors(p)
  if p.endswith(PICKLE_SUFFIXES):
    return read_pickle(p, allow_pickle)
  suffix = os.path.splitext(p)[1] or 'no suffix'
  raise ValueError(f'{p}: unknown weight file type ({suffix}); supported: .safetensors, and with allow_pickle=True '
                   f'{", ".join(PICKLE_SUFFIXES)}')


def find_weights(folder: str | os.PathLike, stems: tuple[str, ...], allow_pickle: bool = False
                 ) -> dict[str, np.ndarray]:
  """Reads the weights of a diffusers / transformers model folder.

  Looks for ``<stem>.safetensors``, then a sharded ``<stem>.safetensors.index.json``,
  then (pickles) ``<stem>.bin``, for each stem in order.
  """
  folder = os.fspath(folder)
  for stem in stems:
    single = os.path.join(folder, f'{stem}.safetensors')
    if os.path.exists(single):
      return read_safetensors(single)
    index = single + '.index.json'
    if os.path.exists(index):
      out = {}
      for s in _index_shards(index):
        out.update(read_safetensors(os.path.join(folder, s)))
      return out
  for stem in stems:
    for suffix in PICKLE_SUFFIXES:
      p = os.path.join(folder, stem + suffix)
      if os.path.exists(p):
        return read_pickle(p, allow_pickle)
  raise FileNotFoundError(f'{folder}: no weights found (looked for {[s + ".safetensors" for s in stems]})')
