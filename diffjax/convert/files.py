"""Reading and writing weight files: safetensors (no dependency), and guarded pickles.

The safetensors format (https://github.com/huggingface/safetensors) is an 8-byte
little-endian header length, a JSON header {name: {dtype, shape, data_offsets}} and
the raw little-endian data; it is read here with ``np.memmap`` (lazy, zero-copy) and
bfloat16 via ``ml_dtypes``. Pickled checkpoints (.ckpt, .bin, .pt, .pth) run arbitrary
code when loaded and are refused unless the caller passes ``allow_pickle=True``.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np

PICKLE_SUFFIXES = ('.ckpt', '.bin', '.pt', '.pth', '.pkl')

_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16, 'I64': np.int64,
    'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class PickleRefusedError(ValueError):
  """A pickled checkpoint was passed without ``allow_pickle=True``."""


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """{name: array} from a .safetensors file; arrays are read-only memory maps (native dtypes, bf16 included)."""
  with open(path, 'rb') as f:
    (n,) = struct.unpack('<Q', f.read(8))
    header = json.loads(f.read(n))
  header.pop('__metadata__', None)
  data = np.memmap(path, dtype=np.uint8, mode='r', offset=8 + n)
  out = {}
  for name, info in header.items():
    if info['dtype'] not in _DTYPES:
      raise ValueError(f'{path}: tensor {name} has unsupported dtype {info["dtype"]}')
    start, end = info['data_offsets']
    out[name] = data[start:end].view(_DTYPES[info['dtype']]).reshape(info['shape'])
  return out


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None):
  """Writes {name: array} as a .safetensors file (``metadata`` defaults to {'format': 'pt'} for PyTorch loaders)."""
  header, offset, arrays = {}, 0, []
  for name in sorted(tensors):
    a = np.asarray(tensors[name])
    a = a if a.flags.c_contiguous else a.copy(order='C')  # (ascontiguousarray would make scalars 1-d)
    if a.dtype not in _NAMES:
      raise ValueError(f'tensor {name}: dtype {a.dtype} cannot be written to safetensors')
    header[name] = {'dtype': _NAMES[a.dtype], 'shape': list(a.shape), 'data_offsets': [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  header['__metadata__'] = dict(metadata or {'format': 'pt'})
  blob = json.dumps(header, separators=(',', ':')).encode()
  blob += b' ' * (-len(blob) % 8)  # align the data to 8 bytes
  tmp = f'{os.fspath(path)}.tmp{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(struct.pack('<Q', len(blob)))
    f.write(blob)
    for a in arrays:
      f.write(a.tobytes())
  os.replace(tmp, path)  # a new file: memory maps of the old one (``read_safetensors``) stay valid


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
  raise ValueError(f'{p}: unknown weight file type (expected .safetensors, or {", ".join(PICKLE_SUFFIXES)})')


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
      with open(index) as f:
        shards = sorted(set(json.load(f)['weight_map'].values()))
      out = {}
      for s in shards:
        out.update(read_safetensors(os.path.join(folder, s)))
      return out
  for stem in stems:
    for suffix in PICKLE_SUFFIXES:
      p = os.path.join(folder, stem + suffix)
      if os.path.exists(p):
        return read_pickle(p, allow_pickle)
  raise FileNotFoundError(f'{folder}: no weights found (looked for {[s + ".safetensors" for s in stems]})')
