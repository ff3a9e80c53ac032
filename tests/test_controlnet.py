"""ControlNet parity with diffusers' ControlNetModel (tiny random models): residuals, the U-Net with them added,
export, ``from_unet``, original single files and the errors at the boundary."""

import json
import math
import re

import jax
import numpy as np
import pytest
from reference_models import jiggle

from diffjax.convert import WeightMismatchError, load_controlnet, load_pretrained, save_controlnet, write_safetensors
from diffjax.convert import controlnet as convert_controlnet
from diffjax.models import CONTROLNET_CONFIGS, UNET_CONFIGS
from diffjax.models.controlnet import ControlNetConfig, from_unet

pytestmark = pytest.mark.reference

# SD 1.x-like: attention (1x1-conv projections) on the first of two levels, 2 heads; control images at 2x the latents
TINY = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, norm_num_groups=8,
            down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'), attention_head_dim=2)
HINT = dict(conditioning_embedding_out_channels=(8, 16))
SCALE = 0.7


def tolerance(layers: int) -> float:
  """Relative bound on |diffjax - diffusers| / max|diffusers| after ``layers`` layers, float32 on both sides.

  Per convolution / attention matmul the rounding is ~lambda sqrt(k) u relative to the activation scale (k <=
  9 x 64 terms, u = 2^-24, lambda = 3 for a probabilistic bound): 4.3e-6. The errors of successive layers and of
  both implementations add as a random walk: x sqrt(2 layers). Times 3 for margin. The activations are
  GroupNorm-restored O(1); the outputs are them through one more (zero-)convolution, so the bound is taken
  relative to the output's magnitude. ~35 layers (mid residual): 1.1e-4; ~65 (U-Net after it): 1.5e-4.
  """
  return 3 * 3 * math.sqrt(9 * 64) * 2.0**-24 * math.sqrt(2 * layers)


CONTROLNET_LAYERS = 35  # hint embedding 4, conv_in, 2 levels of resnet / transformer / downsampler, mid, zero conv
UNET_LAYERS = CONTROLNET_LAYERS + 30  # the U-Net's decoder after the residuals


def _reference_controlnet(seed, **options):
  """A tiny diffusers ControlNetModel, jiggled (zero convolutions included) and with a control-image embedding whose
  ``conv_out`` has O(1 / sqrt(fan_in)) weights (as after training) so that the control image matters."""
  import torch
  from diffusers import ControlNetModel
  torch.manual_seed(seed)  # the default initialisation too, for reproducible numbers
  cn = jiggle(ControlNetModel(**{**TINY, **HINT, **options}), seed=seed)
  conv_out = cn.controlnet_cond_embedding.conv_out
  with torch.no_grad():
    conv_out.weight.normal_(0.0, conv_out.weight[0].numel() ** -0.5)
  return cn


def _torch(a):
  import torch
  return torch.from_numpy(np.ascontiguousarray(a))


def _nchw(a):
  return _torch(np.asarray(a)).permute(0, 3, 1, 2)


def _nhwc(t):
  return t.permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """Jiggled tiny diffusers ControlNetModel and UNet2DConditionModel (zero convolutions included), saved."""
  torch = pytest.importorskip('torch')
  diffusers = pytest.importorskip('diffusers')
  folder = tmp_path_factory.mktemp('controlnet')
  cn = _reference_controlnet(0)
  torch.manual_seed(1)
  unet = jiggle(diffusers.UNet2DConditionModel(sample_size=8, up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'),
                                               **TINY), seed=1)
  cn.save_pretrained(folder / 'controlnet')
  unet.save_pretrained(folder / 'unet')
  return dict(controlnet=cn, unet=unet, folder=folder)


@pytest.fixture(scope='module')
def inputs():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  t = np.array([3.0, 700.0], np.float32)
  ctx = rng.standard_normal((2, 5, 32)).astype(np.float32)
  hint = rng.uniform(size=(2, 16, 16, 3)).astype(np.float32)  # in [0, 1], at 2x the latent size
  return x, t, ctx, hint


@pytest.fixture(scope='module')
def loaded(reference):
  return load_controlnet(reference['folder'] / 'controlnet')


@pytest.fixture(scope='module')
def controlnet_apply(loaded):
  """The loaded ControlNet's jitted apply, compiled once for the module's tests."""
  return jax.jit(loaded[0].apply)  # guess_mode traced: one program for both


@pytest.fixture(scope='module')
def unet(reference):
  net, params = load_pretrained(reference['folder'] / 'unet')
  return net, params, jax.jit(net.apply)


def _reference_residuals(cn, x, t, ctx, hint, guess_mode):
  import torch
  with torch.no_grad():
    out = cn(_nchw(x), _torch(t), _torch(ctx), _nchw(hint), conditioning_scale=SCALE, guess_mode=guess_mode)
  return [_nhwc(r) for r in out.down_block_res_samples], _nhwc(out.mid_block_res_sample)


def _assert_close(got, want, layers, what):
  diff, size = float(np.abs(np.asarray(got) - want).max()), float(np.abs(want).max())
  print(f'{what}: max abs diff {diff:.2e}, max |output| {size:.2e}')
  assert size > 0.01, f'{what}: the reference output is ~0, the comparison would be empty'
  assert diff <= tolerance(layers) * size, f'{what}: {diff:.3g} > {tolerance(layers):.3g} x {size:.3g}'


@pytest.mark.parametrize('guess_mode', [False, True])
def test_residuals_match_diffusers(reference, loaded, controlnet_apply, inputs, guess_mode):
  net, params = loaded
  x, t, ctx, hint = inputs
  apply = controlnet_apply
  down, mid = apply({'params': params}, x, t, ctx, hint, SCALE, guess_mode=guess_mode)
  want_down, want_mid = _reference_residuals(reference['controlnet'], x, t, ctx, hint, guess_mode)
  assert len(down) == len(want_down) == net.config.num_down_residuals() == 4
  for i, (a, b) in enumerate(zip(down, want_down, strict=True)):
    _assert_close(a, b, CONTROLNET_LAYERS, f'down residual {i} (guess_mode={guess_mode})')
  _assert_close(mid, want_mid, CONTROLNET_LAYERS, f'mid residual (guess_mode={guess_mode})')
  if not guess_mode:  # the check has teeth: another control image moves the residuals by far more
    _, other = apply({'params': params}, x, t, ctx, 1.0 - hint, SCALE)
    assert float(np.abs(np.asarray(other) - want_mid).max()) > 100 * tolerance(CONTROLNET_LAYERS) * np.abs(
        want_mid).max()


def test_unet_with_residuals_matches_diffusers(reference, loaded, controlnet_apply, unet, inputs):
  """The U-Net adds the residuals where diffusers does (skips before the decoder, the middle block's output)."""
  import torch
  params = loaded[1]
  unet, unet_params, apply = unet
  x, t, ctx, hint = inputs
  down, mid = controlnet_apply({'params': params}, x, t, ctx, hint, SCALE)
  want_down, want_mid = _reference_residuals(reference['controlnet'], x, t, ctx, hint, False)
  with torch.no_grad():
    want = _nhwc(reference['unet'](_nchw(x), _torch(t), _torch(ctx), down_block_additional_residuals=[
        _nchw(r) for r in want_down], mid_block_additional_residual=_nchw(want_mid)).sample)
    plain = _nhwc(reference['unet'](_nchw(x), _torch(t), _torch(ctx)).sample)
  y = apply({'params': unet_params}, x, t, ctx, down_residuals=down, mid_residual=mid)
  _assert_close(y, want, UNET_LAYERS, 'U-Net with residuals')
  assert np.abs(want - plain).max() > 100 * tolerance(UNET_LAYERS) * np.abs(want).max()  # residuals matter
  trace = lambda **residuals: jax.eval_shape(lambda: unet.apply({'params': unet_params}, x, t, ctx, **residuals))
  with pytest.raises(ValueError, match='down_residuals has 3 entries; this U-Net has 4 skip'):
    trace(down_residuals=down[:3], mid_residual=mid)
  with pytest.raises(ValueError, match=r'mid_residual has shape \(2, 8, 8, 32\)'):
    trace(down_residuals=down, mid_residual=down[0])


def test_export_roundtrip_to_diffusers(reference, loaded, inputs, tmp_path):
  import torch
  from diffusers import ControlNetModel

  net, params = loaded
  save_controlnet(net, params, tmp_path / 'out')
  back = ControlNetModel.from_pretrained(tmp_path / 'out').eval()
  ref = reference['controlnet']
  public = lambda cfg: {k: json.loads(json.dumps(v)) for k, v in cfg.items() if not k.startswith('_')}
  assert public(back.config) == public(ref.config)
  sa, sb = ref.state_dict(), back.state_dict()
  assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
  x, t, ctx, hint = inputs
  (a_down, a_mid), (b_down, b_mid) = (_reference_residuals(m, x, t, ctx, hint, True) for m in (ref, back))
  for a, b in zip((*a_down, a_mid), (*b_down, b_mid), strict=True):
    np.testing.assert_array_equal(a, b)
  net2, params2 = load_controlnet(tmp_path / 'out')
  assert net2.config == net.config
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_from_unet_matches_diffusers(reference, unet):
  """Shared weights copied, zero convolutions zero, the same config as ``ControlNetModel.from_unet``."""
  from diffusers import ControlNetModel

  for name in ('tiny', 'sd15', 'sd21'):  # the named configs are the named U-Nets' encoders
    hint = HINT if name == 'tiny' else {}
    assert CONTROLNET_CONFIGS[name] == ControlNetConfig.from_unet(UNET_CONFIGS[name], **hint)
  unet, unet_params, _ = unet
  want = ControlNetModel.from_unet(reference['unet'], **HINT)
  config = ControlNetConfig.from_unet(unet.config, **HINT)
  assert convert_controlnet.controlnet_config_from_diffusers(dict(want.config, _class_name='ControlNetModel')) == config
  got = convert_controlnet.state_dict(from_unet(unet_params, config, key=jax.random.key(0)))
  want = {k: v.numpy() for k, v in want.state_dict().items()}
  assert got.keys() == want.keys()
  zero = re.compile(r'^(controlnet_down_blocks\.\d+|controlnet_mid_block|controlnet_cond_embedding\.conv_out)\.')
  hint_embedding = re.compile(r'^controlnet_cond_embedding\.(conv_in|blocks\.\d+)\.')
  for k, w in want.items():
    if zero.match(k):
      assert not np.any(got[k]) and not np.any(w), k
    elif hint_embedding.match(k):  # random in both (diffjax draws its own from the key); biases zero in diffjax
      assert got[k].shape == w.shape and (k.endswith('.bias') or np.any(got[k])), k
    else:
      np.testing.assert_array_equal(got[k], w, err_msg=k)
  with pytest.raises(ValueError, match='down_blocks_0/resnets_0/conv1/kernel'):
    from_unet(unet_params, ControlNetConfig.from_unet(unet.config, block_out_channels=(16, 64), **HINT),
              key=jax.random.key(0))


_RESNET = {'norm1': 'in_layers.0', 'conv1': 'in_layers.2', 'time_emb_proj': 'emb_layers.1', 'norm2': 'out_layers.0',
           'conv2': 'out_layers.3', 'conv_shortcut': 'skip_connection'}


def _original_key(key: str, layers: int = 1, hint_blocks: int = 2) -> str:
  """A diffusers ControlNetModel key -> its name in an original (lllyasviel) ControlNet file (no prefix)."""
  block = lambda i, j: 1 + int(i) * (layers + 1) + int(j)
  rules = [
      (r'^conv_in\.', lambda m: 'input_blocks.0.0.'),
      (r'^time_embedding\.linear_(\d)\.', lambda m: f'time_embed.{2 * (int(m[1]) - 1)}.'),
      (r'^down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.',
       lambda m: f'input_blocks.{block(m[1], m[2])}.0.{_RESNET[m[3]]}.'),
      (r'^down_blocks\.(\d+)\.attentions\.(\d+)\.', lambda m: f'input_blocks.{block(m[1], m[2])}.1.'),
      (r'^down_blocks\.(\d+)\.downsamplers\.0\.conv\.', lambda m: f'input_blocks.{block(m[1], layers)}.0.op.'),
      (r'^mid_block\.resnets\.(\d)\.(\w+)\.', lambda m: f'middle_block.{2 * int(m[1])}.{_RESNET[m[2]]}.'),
      (r'^mid_block\.attentions\.0\.', lambda m: 'middle_block.1.'),
      (r'^controlnet_down_blocks\.(\d+)\.', lambda m: f'zero_convs.{m[1]}.0.'),
      (r'^controlnet_mid_block\.', lambda m: 'middle_block_out.0.'),
      (r'^controlnet_cond_embedding\.conv_in\.', lambda m: 'input_hint_block.0.'),
      (r'^controlnet_cond_embedding\.blocks\.(\d+)\.', lambda m: f'input_hint_block.{2 * int(m[1]) + 2}.'),
      (r'^controlnet_cond_embedding\.conv_out\.', lambda m: f'input_hint_block.{2 * hint_blocks + 2}.'),
  ]
  for pattern, repl in rules:
    new, n = re.subn(pattern, repl, key)
    if n:
      return new
  raise AssertionError(f'no original name for {key}')


def _original_file(reference, path, prefix='control_model.', extra=None):
  state = {prefix + _original_key(k): v.numpy() for k, v in reference['controlnet'].state_dict().items()}
  if prefix:  # a training checkpoint's Stable Diffusion part: dropped
    state['model.diffusion_model.out.2.bias'] = np.zeros(4, np.float32)
  write_safetensors(path, {**state, **(extra or {})})
  return path


def test_original_single_file_loads_the_same_params(reference, loaded, tmp_path):
  net, params = loaded
  untold = dict(num_heads=2, norm_num_groups=8)  # a single file has no config: SD's 8 heads and 32 groups otherwise
  for prefix in ('control_model.', ''):
    net2, params2 = load_controlnet(_original_file(reference, tmp_path / f'cn{prefix}.safetensors', prefix), **untold)
    assert net2.config == net.config
    jax.tree.map(np.testing.assert_array_equal, params2, params)
  net3, _ = load_controlnet(tmp_path / 'cn.safetensors', global_pool_conditions=True)
  assert net3.config.global_pool_conditions and net3.config.num_heads == 8 and net3.config.norm_num_groups == 32


def test_errors(reference, loaded, controlnet_apply, inputs, tmp_path):
  net, params = loaded
  x, t, ctx, hint = inputs
  with pytest.raises(ValueError, match=re.escape('expects (2, 16, 16, 3)')):
    controlnet_apply({'params': params}, x, t, ctx, hint[:, :8, :8])
  with pytest.raises(ValueError, match=r"unet/config.json: not a diffusers ControlNetModel \(_class_name="):
    load_controlnet(reference['folder'] / 'unet')
  bad = {'control_model.zero_convs.9.0.weight': np.zeros((64, 64, 1, 1), np.float32),
         'control_model.extra_head.weight': np.zeros((3,), np.float32)}
  path = _original_file(reference, tmp_path / 'bad.safetensors', extra=bad)
  with pytest.raises(ValueError, match=re.escape("no known conversion: ['extra_head.weight', 'zero_convs.9.0.weight']")
                     ) as e:
    load_controlnet(path)
  assert str(path) in str(e.value)
  state = {k: v.numpy() for k, v in reference['controlnet'].state_dict().items()}
  del state['controlnet_mid_block.bias']
  with pytest.raises(WeightMismatchError, match=r'(?s)1 missing.*controlnet_mid_block\.bias'):
    convert_controlnet.build_controlnet(net.config, state, what='mine')
  with pytest.raises(ValueError, match='single files'):
    load_controlnet(reference['folder'] / 'controlnet', global_pool_conditions=True)
  with pytest.raises(ValueError, match="'rgb' or 'bgr'"):
    ControlNetConfig(controlnet_conditioning_channel_order='brg')


def _build_from_reference(ref):
  """A diffusers ControlNetModel -> (module, params) in memory (the config and names as in a folder)."""
  config = convert_controlnet.controlnet_config_from_diffusers(dict(ref.config, _class_name='ControlNetModel'))
  return convert_controlnet.build_controlnet(config, {k: v.numpy() for k, v in ref.state_dict().items()},
                                             what='reference')


def test_global_pool_and_bgr_match_diffusers(inputs):
  """Channel order 'bgr' and global pooling (the shuffle ControlNet), with guess mode (which pooling turns off)."""
  import torch
  pytest.importorskip('diffusers')
  ref = _reference_controlnet(2, controlnet_conditioning_channel_order='bgr', global_pool_conditions=True)
  net, params = _build_from_reference(ref)
  x, t, ctx, hint = inputs
  hint = hint * np.array([1.0, 0.5, 0.1], np.float32)  # channels of different means: pooling keeps their order
  apply = jax.jit(net.apply)
  down, mid = apply({'params': params}, x, t, ctx, hint, SCALE, guess_mode=True)
  with torch.no_grad():
    out = ref(_nchw(x), _torch(t), _torch(ctx), _nchw(hint), conditioning_scale=SCALE, guess_mode=True)
  want = [_nhwc(r) for r in (*out.down_block_res_samples, out.mid_block_res_sample)]
  assert mid.shape == (2, 1, 1, 64)
  for i, (a, b) in enumerate(zip((*down, mid), want, strict=True)):
    _assert_close(a, b, CONTROLNET_LAYERS, f'pooled residual {i}')
  _, unflipped = apply({'params': params}, x, t, ctx, hint[..., ::-1], SCALE)  # teeth: the channel order matters
  assert np.abs(np.asarray(unflipped) - want[-1]).max() > 100 * tolerance(CONTROLNET_LAYERS) * np.abs(want[-1]).max()


@pytest.mark.slow
def test_text_time_linear_projection_matches_diffusers(inputs):
  """SDXL's text_time conditioning, SD 2-style linear projections, per-level heads and transformer depths."""
  import torch
  pytest.importorskip('diffusers')
  ref = _reference_controlnet(
      3, block_out_channels=(16, 32), down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
      attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
      addition_embed_type='text_time', addition_time_embed_dim=8, projection_class_embeddings_input_dim=12 + 6 * 8)
  net, params = _build_from_reference(ref)
  assert net.config.depths() == (1, 2) and net.config.addition_embed_dim == 60
  x, t, ctx, hint = inputs
  pooled = np.random.default_rng(2).standard_normal((2, 12)).astype(np.float32)
  ids = np.array([[64, 48, 0, 0, 64, 48], [32, 40, 8, 4, 16, 24]], np.float32)
  down, mid = jax.jit(net.apply)({'params': params}, x, t, ctx, hint, SCALE, text_embeds=pooled, time_ids=ids)
  with torch.no_grad():
    out = ref(_nchw(x), _torch(t), _torch(ctx), _nchw(hint), conditioning_scale=SCALE,
              added_cond_kwargs={'text_embeds': _torch(pooled), 'time_ids': _torch(ids)})
  want = [_nhwc(r) for r in (*out.down_block_res_samples, out.mid_block_res_sample)]
  for i, (a, b) in enumerate(zip((*down, mid), want, strict=True)):
    _assert_close(a, b, CONTROLNET_LAYERS, f'text_time residual {i}')
