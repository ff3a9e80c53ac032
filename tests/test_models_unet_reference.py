"""U-Net parity with diffusers' UNet2DConditionModel (tiny random models, several configurations) and export."""

import jax
import numpy as np
import pytest

from diffjax.convert import load_pretrained, save_pretrained

pytestmark = pytest.mark.reference

PARITY_CONFIGS = {
    # 1x1-conv projections, one attention level, 2 heads
    'conv_proj': dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=('DownBlock2D',
                      'CrossAttnDownBlock2D'), up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'),
                      cross_attention_dim=24, attention_head_dim=2, norm_num_groups=8),
    # linear projections (SD 2), 3 levels (channel multipliers 1, 2, 2), per-level heads, 2 transformer layers
    'linear_proj_multihead': dict(block_out_channels=(16, 32, 32), layers_per_block=2,
                                  down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'),
                                  up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'),
                                  cross_attention_dim=16, attention_head_dim=(1, 4, 8), use_linear_projection=True,
                                  transformer_layers_per_block=2, norm_num_groups=8),
    # pixel-space style: class labels, scale-shift norm, other timestep convention, 3 -> 6 channels
    'class_scale_shift': dict(in_channels=3, out_channels=6, block_out_channels=(16, 32), layers_per_block=1,
                              down_block_types=('CrossAttnDownBlock2D',) * 2,
                              up_block_types=('CrossAttnUpBlock2D',) * 2,
                              cross_attention_dim=8, attention_head_dim=4, norm_num_groups=4, num_class_embeds=5,
                              resnet_time_scale_shift='scale_shift', flip_sin_to_cos=False, freq_shift=1),
    # pooled-vector conditioning ("projection" class embedding)
    'pooled_projection': dict(block_out_channels=(16, 32), layers_per_block=1,
                              down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
                              up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), cross_attention_dim=8,
                              attention_head_dim=2, norm_num_groups=8, class_embed_type='projection',
                              projection_class_embeddings_input_dim=12),
    # x4 upscaler style: [latents, low-res RGB] in, noise-level class labels, linear projections, the
    # transformers' first attention on the context (only_cross_attention) on level 1, not on level 2
    'upscaler': dict(in_channels=7, out_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
                     down_block_types=('DownBlock2D',) + ('CrossAttnDownBlock2D',) * 2,
                     up_block_types=('CrossAttnUpBlock2D',) * 2 + ('UpBlock2D',), cross_attention_dim=12,
                     attention_head_dim=2, norm_num_groups=4, num_class_embeds=20, use_linear_projection=True,
                     only_cross_attention=(True, True, False)),
}


def _torch_unet(name, table=PARITY_CONFIGS):
  torch = pytest.importorskip('torch')
  diffusers = pytest.importorskip('diffusers')
  torch.manual_seed(0)
  m = diffusers.UNet2DConditionModel(sample_size=8, **table[name])
  with torch.no_grad():
    for p in m.parameters():  # move norms off (1, 0) and biases off 0
      p.add_(0.05 * torch.randn_like(p))
  return m.eval()


def _torch_forward(m, x, t, ctx, labels):
  import torch
  to = lambda a: torch.from_numpy(np.asarray(a))
  with torch.no_grad():
    y = m(to(x).permute(0, 3, 1, 2), to(t), to(ctx), class_labels=None if labels is None else to(labels)).sample
  return y.permute(0, 2, 3, 1).numpy()


def _labels(name, batch=2):
  if name == 'class_scale_shift':
    return np.array([1, 4])
  if name == 'upscaler':
    return np.array([3, 17])
  if name == 'pooled_projection':
    return np.random.default_rng(1).standard_normal((batch, 12)).astype(np.float32)
  return None


@pytest.mark.parametrize('name', list(PARITY_CONFIGS))
def test_unet_matches_diffusers(name, tmp_path):
  ref = _torch_unet(name)
  ref.save_pretrained(tmp_path / 'unet')
  net, params = load_pretrained(tmp_path / 'unet')
  size = 16 if name == 'linear_proj_multihead' else 8
  x, t, ctx = _inputs(net.config, size=size)
  labels = _labels(name)
  y = jax.jit(net.apply)({'params': params}, x, t, ctx, labels)
  diff = float(np.abs(np.asarray(y) - _torch_forward(ref, x, t, ctx, labels)).max())
  print(f'unet[{name}] max abs diff {diff:.2e}')
  # per conv / attention layer and side ~lambda sqrt(k) u = 4.3e-6 (k = 9 C_in <= 9 * 64, lambda = 3,
  # probabilistic bound) relative to the GroupNorm-restored scale; a random walk over ~30 layers and both
  # sides, x sqrt(60): 3.3e-5 x max|activation| (O(1)) <= 1e-4 (measured <= 3.0e-6)
  assert diff <= 1e-4


def test_unet_export_roundtrip_to_diffusers(tmp_path):
  import torch
  from diffusers import UNet2DConditionModel

  name = 'linear_proj_multihead'
  ref = _torch_unet(name)
  ref.save_pretrained(tmp_path / 'a')
  net, params = load_pretrained(tmp_path / 'a')
  save_pretrained(net, params, tmp_path / 'b')
  back = UNet2DConditionModel.from_pretrained(tmp_path / 'b').eval()
  sa, sb = ref.state_dict(), back.state_dict()
  assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
  x, t, ctx = _inputs(net.config, size=16)
  np.testing.assert_array_equal(_torch_forward(back, x, t, ctx, None), _torch_forward(ref, x, t, ctx, None))


def _inputs(cfg, batch=2, size=8, length=5, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, size, size, cfg.in_channels)).astype(np.float32)
  t = np.linspace(1.0, 900.0, batch).astype(np.float32)
  ctx = rng.standard_normal((batch, length, cfg.cross_attention_dim)).astype(np.float32)
  return x, t, ctx


# SDXL-like: text_time added embedding (pooled text 12 + 6 time ids x 8), per-level transformer depths,
# no attention on the first level, linear projections, per-level heads
SDXL_CONFIG = {'sdxl': dict(block_out_channels=(16, 32, 32), layers_per_block=1,
                            down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'),
                            up_block_types=('CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'),
                            cross_attention_dim=16, attention_head_dim=(2, 4, 8), use_linear_projection=True,
                            transformer_layers_per_block=(1, 2, 3), norm_num_groups=8, addition_embed_type='text_time',
                            addition_time_embed_dim=8, projection_class_embeddings_input_dim=12 + 6 * 8)}


def test_unet_text_time_matches_diffusers(tmp_path):
  """SDXL's added conditioning (text_embeds, time_ids) and per-level depths, and the config's round trip."""
  import torch
  from diffusers import UNet2DConditionModel

  ref = _torch_unet('sdxl', SDXL_CONFIG)
  ref.save_pretrained(tmp_path / 'a')
  net, params = load_pretrained(tmp_path / 'a')
  assert net.config.depths() == (1, 2, 3) and net.config.addition_embed_dim == 60
  x, t, ctx = _inputs(net.config)
  pooled = np.random.default_rng(2).standard_normal((2, 12)).astype(np.float32)
  ids = np.array([[64, 48, 0, 0, 64, 48], [32, 40, 8, 4, 16, 24]], np.float32)  # (orig h, w, crop y, x, target h, w)
  apply = jax.jit(net.apply)
  y = apply({'params': params}, x, t, ctx, text_embeds=pooled, time_ids=ids)
  to = lambda a: torch.from_numpy(np.asarray(a))
  with torch.no_grad():
    want = ref(to(x).permute(0, 3, 1, 2), to(t), to(ctx),
               added_cond_kwargs={'text_embeds': to(pooled), 'time_ids': to(ids)}).sample.permute(0, 2, 3, 1).numpy()
  diff = float(np.abs(np.asarray(y) - want).max())
  print(f'unet[sdxl] max abs diff {diff:.2e}')
  # as in test_unet_matches_diffusers (~30 layers here); the time-id sinusoids add |id| x a few ulp <= 64 x 4.8e-7
  # = 3e-5 to unit-scale features before two linear layers with ~1/sqrt(fan_in) weights
  assert diff <= 1e-4
  # the check has teeth: other time ids move the output by far more
  other = apply({'params': params}, x, t, ctx, text_embeds=pooled, time_ids=ids + 1.0)
  assert float(np.abs(np.asarray(other) - want).max()) > 10 * 1e-4
  with pytest.raises(ValueError, match='text_time'):
    net.apply({'params': params}, x, t, ctx)
  save_pretrained(net, params, tmp_path / 'b')
  back = UNet2DConditionModel.from_pretrained(tmp_path / 'b')
  assert {k: back.config[k] for k in SDXL_CONFIG['sdxl']} == {
      k: list(v) if isinstance(v, tuple) else v for k, v in SDXL_CONFIG['sdxl'].items()}
  sa, sb = ref.state_dict(), back.state_dict()
  assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
