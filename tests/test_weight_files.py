"""Weight files (diffjax.convert.files): safetensors round trips, and one clear error per malformed file."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest

from diffjax.convert.files import WeightFileError, find_weights, read_json_config, read_safetensors, write_safetensors


def _raw(path, header, data=b'', length=None):
  """Writes a safetensors file by hand: ``header`` (a dict, or raw bytes), optionally a false ``length``."""
  blob = header if isinstance(header, bytes) else json.dumps(header).encode()
  path.write_bytes(struct.pack('<Q', len(blob) if length is None else length) + blob + data)
  return path


def _raises(path, match):
  with pytest.raises(WeightFileError, match=match) as e:
    read_safetensors(path)
  assert str(path) in str(e.value)


def _entry(dtype='F32', shape=(2,), offsets=(0, 8)):
  return {'dtype': dtype, 'shape': list(shape), 'data_offsets': list(offsets)}


# -- round trips ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('value', [
    np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1.0, -0.5, 65504], np.float16),
    np.array([1.5, -2.0, 3.0], ml_dtypes.bfloat16), np.array([-(2**40), 0, 7], np.int64),
    np.array([True, False, True]), np.float32(3.0), np.zeros((0, 3), np.float32),
], ids=['f32', 'f16', 'bf16', 'i64', 'bool', 'scalar', 'empty'])
def test_roundtrip(tmp_path, value):
  write_safetensors(tmp_path / 'x.safetensors', {'t': value})
  back = read_safetensors(tmp_path / 'x.safetensors')['t']
  assert back.dtype == np.asarray(value).dtype and back.shape == np.shape(value)
  np.testing.assert_array_equal(back, value)


def test_roundtrip_many_and_non_contiguous(tmp_path):
  tensors = {'b': np.arange(12, dtype=np.float32).reshape(3, 4).T, 'a': np.ones(3, ml_dtypes.bfloat16)}
  write_safetensors(tmp_path / 'x.safetensors', tensors)
  back = read_safetensors(tmp_path / 'x.safetensors')
  assert back.keys() == tensors.keys()
  for k, v in tensors.items():
    np.testing.assert_array_equal(back[k], v)


@pytest.mark.parametrize('metadata, expected', [(None, {'format': 'pt'}), ({'format': 'np', 'k': 'v'}, None)])
def test_metadata(tmp_path, metadata, expected):
  from safetensors import safe_open
  write_safetensors(tmp_path / 'x.safetensors', {'t': np.ones(2, np.float32)}, metadata)
  with safe_open(tmp_path / 'x.safetensors', framework='numpy') as f:
    assert f.metadata() == (expected or metadata)


def test_write_is_atomic_and_leaves_no_tmp(tmp_path):
  write_safetensors(tmp_path / 'x.safetensors', {'t': np.ones(2, np.float32)})
  with pytest.raises(ValueError, match='cannot be written'):
    write_safetensors(tmp_path / 'x.safetensors', {'t': np.ones(2, np.complex64)})
  assert [p.name for p in tmp_path.iterdir()] == ['x.safetensors']
  np.testing.assert_array_equal(read_safetensors(tmp_path / 'x.safetensors')['t'], np.ones(2, np.float32))


def test_torch_loads_diffjax_files(tmp_path):
  torch = pytest.importorskip('torch')
  from safetensors.torch import load_file
  write_safetensors(tmp_path / 'x.safetensors', {'w': np.arange(4, dtype=np.float32), 'h': np.ones(2, np.float16),
                                                 'b': np.array([1.5, -2.0], ml_dtypes.bfloat16),
                                                 's': np.int64(5)})
  back = load_file(tmp_path / 'x.safetensors')
  assert back['w'].tolist() == [0, 1, 2, 3] and back['h'].dtype == torch.float16
  assert back['b'].dtype == torch.bfloat16 and back['b'].float().tolist() == [1.5, -2.0]
  assert back['s'].shape == () and back['s'].item() == 5


# -- malformed files --------------------------------------------------------------------------------------------------
def test_empty_file(tmp_path):
  (tmp_path / 'x.safetensors').write_bytes(b'')
  _raises(tmp_path / 'x.safetensors', 'empty')


def test_shorter_than_length_field(tmp_path):
  (tmp_path / 'x.safetensors').write_bytes(b'\x10\x00\x00')
  _raises(tmp_path / 'x.safetensors', 'truncated')


def test_header_shorter_than_stated(tmp_path):
  path = tmp_path / 'x.safetensors'
  path.write_bytes(struct.pack('<Q', 100) + b'{"t": {')
  _raises(path, 'truncated')


def test_huge_header_length(tmp_path):
  _raises(_raw(tmp_path / 'x.safetensors', {}, length=2**60), 'truncated or corrupt')


def test_data_shorter_than_offsets(tmp_path):
  _raises(_raw(tmp_path / 'x.safetensors', {'t': _entry()}, b'\0' * 4), 'truncated')


def test_offsets_past_end_of_file(tmp_path):
  _raises(_raw(tmp_path / 'x.safetensors', {'t': _entry(shape=(2**40,), offsets=(0, 2**42))}, b'\0' * 8),
          'past the end')


def test_shape_does_not_match_bytes(tmp_path):
  _raises(_raw(tmp_path / 'x.safetensors', {'t': _entry(shape=(3,))}, b'\0' * 8), 'needs 12 bytes')


@pytest.mark.parametrize('header', [b'\xff\xfe\x00garbage', b'{not json', b'\x80\x81\x82\x83'],
                         ids=['binary', 'non-json', 'non-utf8'])
def test_garbage_header(tmp_path, header):
  _raises(_raw(tmp_path / 'x.safetensors', header), 'not valid UTF-8 JSON')


def test_header_not_an_object(tmp_path):
  _raises(_raw(tmp_path / 'x.safetensors', [1, 2, 3]), 'not an object')


@pytest.mark.parametrize('missing', ['dtype', 'shape', 'data_offsets'])
def test_entry_missing_field(tmp_path, missing):
  entry = _entry()
  del entry[missing]
  _raises(_raw(tmp_path / 'x.safetensors', {'t': entry}, b'\0' * 8), 'needs dtype, shape and data_offsets')


def test_entry_not_an_object(tmp_path):
  _raises(_raw(tmp_path / 'x.safetensors', {'t': 'F32'}), 'needs dtype, shape and data_offsets')


def test_unsupported_dtype(tmp_path):
  _raises(_raw(tmp_path / 'x.safetensors', {'t': _entry(dtype='Q7')}, b'\0' * 8), 'unsupported dtype')


def test_overlapping_tensors_are_refused_by_the_library(tmp_path):
  header = {'a': _entry(), 'b': _entry()}
  _raises(_raw(tmp_path / 'x.safetensors', header, b'\0' * 8), 'malformed')


# -- shard indexes and configs ----------------------------------------------------------------------------------------
def test_sharded_folder(tmp_path):
  write_safetensors(tmp_path / 'm-1.safetensors', {'a': np.ones(2, np.float32)})
  write_safetensors(tmp_path / 'm-2.safetensors', {'b': np.zeros(3, np.float16)})
  (tmp_path / 'model.safetensors.index.json').write_text(
      json.dumps({'weight_map': {'a': 'm-1.safetensors', 'b': 'm-2.safetensors'}}))
  assert set(find_weights(tmp_path, ('model',))) == {'a', 'b'}


@pytest.mark.parametrize('content, match', [
    ('{"weight_map": ', 'not valid JSON'), ('{"metadata": {}}', 'weight_map'), ('[1]', 'weight_map'),
    ('{"weight_map": {"a": "missing-shard.safetensors"}}', 'missing-shard.safetensors'),
], ids=['invalid-json', 'no-weight-map', 'not-object', 'missing-shard'])
def test_bad_shard_index(tmp_path, content, match):
  index = tmp_path / 'model.safetensors.index.json'
  index.write_text(content)
  with pytest.raises(WeightFileError, match=match) as e:
    find_weights(tmp_path, ('model',))
  assert str(index) in str(e.value)


def test_read_json_config(tmp_path):
  (tmp_path / 'config.json').write_text('{"a": 1}')
  assert read_json_config(tmp_path / 'config.json') == {'a': 1}


@pytest.mark.parametrize('content, match', [(b'{"a": 1,', 'not valid JSON'), (b'\xff\xfe', 'not valid JSON'),
                                            (b'[1, 2]', 'JSON object')], ids=['invalid', 'non-utf8', 'list'])
def test_bad_json_config(tmp_path, content, match):
  (tmp_path / 'config.json').write_bytes(content)
  with pytest.raises(WeightFileError, match=match) as e:
    read_json_config(tmp_path / 'config.json')
  assert str(tmp_path / 'config.json') in str(e.value)
