"""Weight files (diffjax.convert.files): safetensors round trips, and one clear error per malformed file."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest

from diffjax.convert import configs, load_pretrained
from diffjax.convert.files import (
  WeightFileError,
  find_weights,
  read_json_config,
  read_safetensors,
  read_weights,
  write_safetensors,
)
from diffjax.models import BERT_CONFIGS, CLIP_TEXT_CONFIGS, UNET_CONFIGS, VAE_CONFIGS


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


_BAD_JSON = [(b'{"a": 1,', 'not valid JSON'), (b'\xff\xfe', 'not valid JSON'), (b'[1, 2]', 'JSON object'),
             (b'', 'empty file'), (b' \n', 'empty file'), (b'"config"', 'got a JSON string')]
_BAD_JSON_IDS = ['invalid', 'non-utf8', 'list', 'empty', 'blank', 'string']


@pytest.mark.parametrize('content, match', _BAD_JSON, ids=_BAD_JSON_IDS)
def test_bad_json_config(tmp_path, content, match):
  (tmp_path / 'config.json').write_bytes(content)
  with pytest.raises(WeightFileError, match=match) as e:
    read_json_config(tmp_path / 'config.json')
  assert str(tmp_path / 'config.json') in str(e.value)


def test_unknown_weight_suffix(tmp_path):
  (tmp_path / 'model.npz').write_bytes(b'PK')
  with pytest.raises(ValueError, match=r'unknown weight file type \(\.npz\); supported: \.safetensors') as e:
    read_weights(tmp_path / 'model.npz')
  assert str(tmp_path / 'model.npz') in str(e.value) and '.ckpt' in str(e.value)


# -- config.json of model folders --------------------------------------------------------------------------------------
_CONFIGS = {  # the tiny architectures of tests/test_convert.py, as their config.json dicts
    'unet': lambda: configs.unet_config_to_diffusers(UNET_CONFIGS['tiny']),
    'vae': lambda: configs.vae_config_to_diffusers(VAE_CONFIGS['tiny']),
    'clip': lambda: configs.clip_text_config_to_transformers(CLIP_TEXT_CONFIGS['tiny']),
    'bert': lambda: configs.bert_config_to_transformers(BERT_CONFIGS['tiny']),
}


def _load_error(folder, cfg):
  """load_pretrained(folder) with only a config.json there (the config is checked before the weights)."""
  folder.mkdir(exist_ok=True)
  path = folder / 'config.json'
  path.write_text(json.dumps(cfg) if isinstance(cfg, dict) else cfg)
  with pytest.raises(WeightFileError) as e:
    load_pretrained(folder)
  assert str(e.value).startswith(str(path)), str(e.value)
  return str(e.value)


@pytest.mark.parametrize('content, match', _BAD_JSON, ids=_BAD_JSON_IDS)
def test_bad_config_json_of_a_model_folder(tmp_path, content, match):
  (tmp_path / 'config.json').write_bytes(content)
  with pytest.raises(WeightFileError, match=match) as e:
    load_pretrained(tmp_path)
  assert str(e.value).startswith(str(tmp_path / 'config.json'))


def test_bad_config_json_in_a_pipeline_folder_names_the_part(tmp_path):
  assert 'not valid JSON' in _load_error(tmp_path / 'vae', '{"_class_name": "AutoencoderKL",')


@pytest.mark.parametrize('kind, field, value, expected', [
    ('unet', 'block_out_channels', 'abc', 'a list of integers'),
    ('unet', 'block_out_channels', [32, '64'], 'a list of integers'),
    ('unet', 'layers_per_block', '2', 'an integer'),
    ('unet', 'layers_per_block', [1, 2], 'an integer'),
    ('unet', 'cross_attention_dim', [1, 2], 'an integer or null'),
    ('unet', 'in_channels', None, 'an integer'),
    ('unet', 'in_channels', True, 'an integer'),
    ('unet', 'attention_head_dim', 'eight', 'an integer or a list of integers'),
    ('unet', 'down_block_types', 'DownBlock2D', 'a list of strings'),
    ('unet', 'use_linear_projection', 1, 'true or false'),
    ('unet', 'norm_eps', '1e-5', 'a number'),
    ('unet', 'resnet_time_scale_shift', 0, 'a string'),
    ('vae', 'block_out_channels', 'abc', 'a list of integers'),
    ('vae', 'latent_channels', 4.0, 'an integer'),
    ('vae', 'in_channels', None, 'an integer'),
    ('vae', 'scaling_factor', '0.18215', 'a number'),
    ('vae', 'up_block_types', [['UpDecoderBlock2D']], 'a list of strings'),
    ('clip', 'hidden_size', '32', 'an integer'),
    ('clip', 'num_hidden_layers', None, 'an integer'),
    ('clip', 'layer_norm_eps', [1e-5], 'a number'),
    ('clip', 'hidden_act', 1, 'a string'),
    ('clip', 'architectures', 'CLIPTextModel', 'a list of strings or null'),
    ('bert', 'num_attention_heads', '4', 'an integer'),
])
def test_config_field_of_the_wrong_type(tmp_path, kind, field, value, expected):
  cfg = _CONFIGS[kind]()
  cfg[field] = value
  msg = _load_error(tmp_path, cfg)
  assert f"field '{field}' must be {expected}, got {value!r}" in msg


@pytest.mark.parametrize('kind, patch, field', [
    ('unet', {'class_embed_type': 'projection'}, 'projection_class_embeddings_input_dim'),
    ('clip', {'model_type': 'clip'}, 'text_config'),
], ids=['unet-projection-dim', 'clip-text-config'])
def test_missing_required_config_field(tmp_path, kind, patch, field):
  msg = _load_error(tmp_path, {**_CONFIGS[kind](), **patch})
  assert f"required field '{field}'" in msg and 'is missing' in msg


def test_nested_clip_text_config_is_checked(tmp_path):
  text = _CONFIGS['clip']()
  assert 'must be a JSON object' in _load_error(tmp_path, {'model_type': 'clip', 'text_config': [text]})
  text['vocab_size'] = 1e3
  msg = _load_error(tmp_path, {'model_type': 'clip', 'text_config': text})
  assert "field 'text_config.vocab_size' must be an integer, got 1000.0" in msg


@pytest.mark.parametrize('kind', sorted(_CONFIGS))
def test_valid_configs_still_convert(kind):
  convert = {'unet': configs.unet_config_from_diffusers, 'vae': configs.vae_config_from_diffusers,
             'clip': configs.clip_text_config_from_transformers, 'bert': configs.bert_config_from_transformers}[kind]
  want = {'unet': UNET_CONFIGS, 'vae': VAE_CONFIGS, 'clip': CLIP_TEXT_CONFIGS, 'bert': BERT_CONFIGS}[kind]['tiny']
  assert convert(_CONFIGS[kind]()) == want
  assert convert(json.loads(json.dumps(_CONFIGS[kind]()))) == want  # lists from JSON, not tuples


def test_config_dict_errors_name_where():
  with pytest.raises(WeightFileError, match=r"^unet/config\.json: field 'layers_per_block' must be an integer"):
    configs.unet_config_from_diffusers({'layers_per_block': '2'}, where='unet/config.json')
  with pytest.raises(WeightFileError, match=r'^config: the config must be a JSON object'):
    configs.vae_config_from_diffusers([1, 2])
