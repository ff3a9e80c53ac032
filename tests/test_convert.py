"""Weight conversion: file I/O, pickle refusal, mismatch errors, round trips, single-file SD checkpoints."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from diffjax.convert import (
  PickleRefusedError,
  WeightMismatchError,
  ldm,
  load_pretrained,
  read_safetensors,
  save_pretrained,
  write_safetensors,
)
from diffjax.convert.configs import unet_config_from_diffusers, vae_config_from_diffusers
from diffjax.models import (
  BERT_CONFIGS,
  CLIP_TEXT_CONFIGS,
  UNET_CONFIGS,
  VAE_CONFIGS,
  AutoencoderKL,
  BertEncoder,
  CLIPTextTransformer,
  UNet,
  init_unet,
  init_vae,
)


def _random_params(module, seed=0):
  if isinstance(module, UNet):
    init = lambda: init_unet(module, jax.random.key(0))
  elif isinstance(module, AutoencoderKL):
    init = lambda: init_vae(module, jax.random.key(0))
  else:
    init = lambda: module.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params']
  rng = np.random.default_rng(seed)
  shapes = nn.meta.unbox(jax.eval_shape(init))
  return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), jnp.float32), shapes)


# -- files ------------------------------------------------------------------------------------------------------------
def test_safetensors_roundtrip_all_dtypes(tmp_path):
  tensors = {'f32': np.arange(6, dtype=np.float32).reshape(2, 3), 'f16': np.ones(3, np.float16),
             'bf16': np.array([1.5, -2.0], ml_dtypes.bfloat16), 'i64': np.arange(4), 'scalar': np.float32(3.0)}
  write_safetensors(tmp_path / 'x.safetensors', tensors)
  back = read_safetensors(tmp_path / 'x.safetensors')
  assert back.keys() == tensors.keys()
  for k, v in tensors.items():
    assert back[k].dtype == np.asarray(v).dtype and back[k].shape == np.shape(v)
    np.testing.assert_array_equal(back[k], v)


@pytest.mark.parametrize('name', ['model.ckpt', 'model.bin', 'model.pt'])
def test_pickles_are_refused(tmp_path, name):
  (tmp_path / name).write_bytes(b'\x80\x04not really a pickle')
  with pytest.raises(PickleRefusedError, match='allow_pickle=True'):
    load_pretrained(tmp_path / name)


def test_pickled_model_folder_is_refused(tmp_path):
  save_pretrained(UNet(UNET_CONFIGS['tiny']), _random_params(UNet(UNET_CONFIGS['tiny'])), tmp_path)
  (tmp_path / 'diffusion_pytorch_model.safetensors').rename(tmp_path / 'diffusion_pytorch_model.bin')
  with pytest.raises(PickleRefusedError, match='arbitrary code'):
    load_pretrained(tmp_path)


# -- round trips and errors -------------------------------------------------------------------------------------------
@pytest.mark.parametrize('module', [UNet(UNET_CONFIGS['tiny']), AutoencoderKL(VAE_CONFIGS['tiny']),
                                    CLIPTextTransformer(CLIP_TEXT_CONFIGS['tiny']), BertEncoder(BERT_CONFIGS['tiny'])],
                         ids=['unet', 'vae', 'clip', 'bert'])
def test_save_then_load_is_identity(module, tmp_path):
  params = _random_params(module)
  save_pretrained(module, params, tmp_path)
  m, back = load_pretrained(tmp_path)
  assert m.config == module.config
  jax.tree.map(np.testing.assert_array_equal, params, back)


def test_pipeline_folder_and_dtypes(tmp_path):
  parts = {'unet': UNet(UNET_CONFIGS['tiny']), 'vae': AutoencoderKL(VAE_CONFIGS['tiny'])}
  save_pretrained({k: (m, _random_params(m)) for k, m in parts.items()}, None, tmp_path)
  out = load_pretrained(tmp_path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert set(out) == {'unet', 'vae'}
  m, p = out['unet']
  assert m.dtype == jnp.bfloat16 and {x.dtype for x in jax.tree.leaves(p)} == {jnp.dtype(jnp.bfloat16)}


def test_mismatched_keys_are_all_named_in_one_error(tmp_path):
  net = UNet(UNET_CONFIGS['tiny'])
  save_pretrained(net, _random_params(net), tmp_path)
  f = tmp_path / 'diffusion_pytorch_model.safetensors'
  state = dict(read_safetensors(f))
  del state['conv_in.bias'], state['mid_block.resnets.0.conv1.weight']
  state['extra.layer.weight'] = np.zeros(3, np.float32)
  state['conv_out.weight'] = np.zeros((4, 32, 1, 1), np.float32)
  write_safetensors(f, state)
  with pytest.raises(WeightMismatchError) as e:
    load_pretrained(tmp_path)
  msg = str(e.value)
  assert '2 missing, 1 unexpected, 1 mis-shaped' in msg
  missing, rest = msg.split('missing (in the model')[1].split('unexpected (in the checkpoint')
  unexpected, misshaped = rest.split('mis-shaped:')
  assert 'conv_in.bias' in missing and 'mid_block.resnets.0.conv1.weight' in missing
  assert 'extra.layer.weight' in unexpected
  assert 'conv_out.weight: checkpoint (4, 32, 1, 1), model (3, 3, 32, 4)' in misshaped


def test_unsupported_config_is_refused(tmp_path):
  net = UNet(UNET_CONFIGS['tiny'])
  save_pretrained(net, _random_params(net), tmp_path)
  cfg = json.loads((tmp_path / 'config.json').read_text())
  cfg['addition_embed_type'] = 'text_image'  # Kandinsky's; SDXL's 'text_time' is supported
  (tmp_path / 'config.json').write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match='addition_embed_type'):
    load_pretrained(tmp_path)


def test_only_cross_attention_config_roundtrip():
  """The x4 upscaler's per-level ``only_cross_attention`` is read, written back, and checked per level."""
  from diffjax.convert.configs import unet_config_to_diffusers
  from diffjax.convert.files import WeightFileError

  cfg = {'down_block_types': ['DownBlock2D'] + ['CrossAttnDownBlock2D'] * 3,
         'up_block_types': ['CrossAttnUpBlock2D'] * 3 + ['UpBlock2D'], 'in_channels': 7, 'num_class_embeds': 1000,
         'only_cross_attention': [True, True, True, False], 'use_linear_projection': True}
  c = unet_config_from_diffusers(cfg)
  assert c.only_cross() == (True, True, True, False) and c.in_channels == 7 and c.num_classes == 1000
  d = unet_config_to_diffusers(c)
  assert d['only_cross_attention'] == [True, True, True, False] and unet_config_from_diffusers(d) == c
  assert unet_config_from_diffusers(dict(cfg, only_cross_attention=True)).only_cross() == (True,) * 4
  with pytest.raises(ValueError, match='only_cross_attention has 2 entries for 4 down blocks'):
    unet_config_from_diffusers(dict(cfg, only_cross_attention=[True, False]), where='unet/config.json')
  with pytest.raises(WeightFileError, match="'only_cross_attention' must be true, false or a list of them"):
    unet_config_from_diffusers(dict(cfg, only_cross_attention='yes'), where='unet/config.json')


# -- reference: PyTorch pickles and original single-file checkpoints ---------------------------------------------------
def _torch_models():
  torch = pytest.importorskip('torch')
  diffusers = pytest.importorskip('diffusers')
  transformers = pytest.importorskip('transformers')
  torch.manual_seed(0)
  unet = diffusers.UNet2DConditionModel(
      sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, cross_attention_dim=24,
      down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'), up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'),
      attention_head_dim=8)  # SD 1.x checkpoints imply 8 heads
  vae = diffusers.AutoencoderKL(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=32,
                                down_block_types=('DownEncoderBlock2D',) * 2, up_block_types=('UpDecoderBlock2D',) * 2)
  clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
      max_position_embeddings=12, eos_token_id=2))
  for m in (unet, vae, clip):
    with torch.no_grad():
      for p in m.parameters():
        p.add_(0.05 * torch.randn_like(p))
    m.eval()
  return unet, vae, clip


def _to_ldm(state, renames, conv_attention=False):
  """diffusers-named tensors -> LDM names (inverse of diffjax's table); VAE attention as 1x1 convs like SD files."""
  inv = {new: (old, inner) for old, (new, inner) in renames.items()}
  out = {}
  for key, w in state.items():
    parts = key.split('.')
    for n in range(len(parts) - 1, 0, -1):
      head = '.'.join(parts[:n])
      if head in inv:
        old, inner = inv[head]
        rest = '.'.join(parts[n:])
        for a, b in (inner or {}).items():
          if rest.startswith(b + '.'):
            rest = a + rest[len(b):]
            break
        w = w.numpy()
        if conv_attention and inner is ldm._VAE_ATTN and w.ndim == 2:
          w = w[:, :, None, None]
        out[f'{old}.{rest}'] = w
        break
    else:
      raise KeyError(key)
  return out


def _save_safe(model, folder):
  model.save_pretrained(folder)
  return folder


@pytest.mark.reference
def test_pickled_checkpoint_loads_when_allowed(tmp_path):
  unet, _, _ = _torch_models()
  unet.save_pretrained(tmp_path, safe_serialization=False)
  assert (tmp_path / 'diffusion_pytorch_model.bin').exists()
  with pytest.raises(PickleRefusedError):
    load_pretrained(tmp_path)
  m, params = load_pretrained(tmp_path, allow_pickle=True)
  np.testing.assert_array_equal(params['conv_in']['kernel'], unet.conv_in.weight.detach().numpy().transpose(2, 3, 1, 0))
  _, safe = load_pretrained(_save_safe(unet, tmp_path / 'safe'))
  jax.tree.map(np.testing.assert_array_equal, params, safe)


@pytest.mark.reference
def test_single_file_stable_diffusion_checkpoint(tmp_path):
  import torch
  from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
  unet, vae, clip = _torch_models()  # GroupNorm: 32 groups, as in all SD checkpoints (not inferable from shapes)
  ucfg, vcfg = unet_config_from_diffusers(dict(unet.config)), vae_config_from_diffusers(dict(vae.config))
  u_ldm = _to_ldm(unet.state_dict(), ldm.unet_ldm_renames(ucfg))
  v_ldm = _to_ldm(vae.state_dict(), ldm.vae_ldm_renames(vcfg), conv_attention=True)
  assert ldm.unet_config_from_ldm(u_ldm) == ucfg and ldm.vae_config_from_ldm(v_ldm) == vcfg  # inferred from shapes
  # diffusers' own converter agrees with diffjax's naming tables
  for ours, theirs in ((u_ldm, convert_ldm_unet_checkpoint({ldm.UNET_PREFIX + k: torch.from_numpy(v)
                                                             for k, v in u_ldm.items()}, dict(unet.config))),
                       (v_ldm, convert_ldm_vae_checkpoint({ldm.VAE_PREFIX + k: torch.from_numpy(v)
                                                          for k, v in v_ldm.items()}, dict(vae.config)))):
    ref = unet.state_dict() if ours is u_ldm else vae.state_dict()
    assert theirs.keys() == ref.keys()
    assert all(torch.equal(theirs[k].reshape(ref[k].shape), ref[k]) for k in ref)
  single = {ldm.UNET_PREFIX + k: v for k, v in u_ldm.items()}
  single.update({ldm.VAE_PREFIX + k: v for k, v in v_ldm.items()})
  single.update({ldm.CLIP_PREFIX + k: v.numpy() for k, v in clip.state_dict().items()})
  single['model_ema.decay'] = np.float32(0.999)  # other top-level entries are ignored
  write_safetensors(tmp_path / 'sd.safetensors', single)

  out = load_pretrained(tmp_path / 'sd.safetensors')
  assert set(out) == {'unet', 'vae', 'text_encoder'}
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 100, (2, 12))
  (te, tp), (un, up), (va, vp) = out['text_encoder'], out['unet'], out['vae']
  ctx = te.apply({'params': tp}, ids).last_hidden_state
  x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  c = rng.standard_normal((2, 5, 24)).astype(np.float32)
  eps = jax.jit(un.apply)({'params': up}, x, jnp.array([10.0, 500.0]), c)
  img = jax.jit(lambda p, z: va.apply({'params': p}, z, method=va.decode))(vp, x)
  with torch.no_grad():
    ref_ctx = clip(torch.from_numpy(ids)).last_hidden_state.numpy()
    ref_eps = unet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.tensor([10.0, 500.0]), torch.from_numpy(c)).sample
    ref_img = vae.decode(torch.from_numpy(x).permute(0, 3, 1, 2)).sample
  diffs = {'text_encoder': np.abs(np.asarray(ctx) - ref_ctx).max(),
           'unet': np.abs(np.asarray(eps) - ref_eps.permute(0, 2, 3, 1).numpy()).max(),
           'vae': np.abs(np.asarray(img) - ref_img.permute(0, 2, 3, 1).numpy()).max()}
  print('single-file max abs diff', {k: f'{v:.2e}' for k, v in diffs.items()})
  assert max(diffs.values()) <= 1e-4


@pytest.mark.reference
def test_openclip_text_tower_of_sd2_checkpoints(tmp_path):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  torch.manual_seed(0)
  cfg = transformers.CLIPTextConfig(vocab_size=100, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                    num_attention_heads=2, max_position_embeddings=12, hidden_act='gelu',
                                    eos_token_id=2)
  ref = transformers.CLIPTextModel(cfg).eval()
  sd = {k.removeprefix('text_model.'): v.numpy() for k, v in ref.state_dict().items()}
  oc = {'token_embedding.weight': sd['embeddings.token_embedding.weight'],
        'positional_embedding': sd['embeddings.position_embedding.weight'],
        'ln_final.weight': sd['final_layer_norm.weight'], 'ln_final.bias': sd['final_layer_norm.bias'],
        'text_projection': np.zeros((128, 128), np.float32), 'logit_scale': np.float32(1.0)}
  for i in range(3):  # OpenCLIP has one layer more; SD 2 uses the penultimate one
    j = min(i, 1)
    p = f'encoder.layers.{j}.'
    for a, b in (('ln_1', 'layer_norm1'), ('ln_2', 'layer_norm2'), ('mlp.c_fc', 'mlp.fc1'), ('mlp.c_proj', 'mlp.fc2'),
                 ('attn.out_proj', 'self_attn.out_proj')):
      for leaf in ('weight', 'bias'):
        oc[f'transformer.resblocks.{i}.{a}.{leaf}'] = sd[f'{p}{b}.{leaf}'] * (1.0 if i < 2 else 7.0)
    for leaf in ('weight', 'bias'):
      oc[f'transformer.resblocks.{i}.attn.in_proj_{leaf}'] = np.concatenate(
          [sd[f'{p}self_attn.{n}_proj.{leaf}'] for n in 'qkv'])
  write_safetensors(tmp_path / 'sd2.safetensors', {ldm.OPENCLIP_PREFIX + k: v for k, v in oc.items()})
  m, params = load_pretrained(tmp_path / 'sd2.safetensors')['text_encoder']
  assert m.config.num_layers == 2 and m.config.hidden_act == 'gelu' and m.config.num_heads == 2
  ids = np.random.default_rng(0).integers(0, 100, (2, 12))
  with torch.no_grad():
    want = ref(torch.from_numpy(ids)).last_hidden_state.numpy()
  diff = np.abs(np.asarray(m.apply({'params': params}, ids).last_hidden_state) - want).max()
  print(f'openclip max abs diff {diff:.2e}')
  assert diff <= 1e-4
