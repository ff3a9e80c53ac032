"""LoRA adapters (diffjax.adapters): merge / unmerge arithmetic, gradients, sizes, and files without PyTorch.

Bounds come from tests/tolerances.py: a merged kernel is W + c (down @ up) with c = scale * alpha / r,
computed as a float32 product over r terms and two more roundings (c itself and the product by it),
then one rounding of the sum: ``matmul_bound(down, up, extra_ops=2) * |c|`` plus ``gamma(n) * |terms|``.
A wrong scale, a transposed factor or a lost adapter moves the result by |c down @ up|, O(0.1) here.
"""

from __future__ import annotations

import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tolerances import BF16, assert_within, gamma, matmul_bound

from diffjax.adapters import DEFAULT_TARGETS, Lora, LoraConfig, init_lora, lora_files, merge, num_params, unmerge
from diffjax.adapters.lora import kernels
from diffjax.convert import WeightMismatchError, read_safetensors, write_safetensors
from diffjax.models.text import CLIP_TEXT_CONFIGS, CLIPTextConfig, CLIPTextTransformer
from diffjax.models.unet import UNET_CONFIGS, UNet, UNetConfig, init_unet

ATTENTION = 'blocks_0/attn1/to_q/kernel'


def randomized(adapters, seed: int, std=0.2):
  """``adapters`` with random ``up`` factors (a fresh adapter's are zero), so that merging changes the kernels.
  (numpy's generator: no XLA program to compile per shape.)"""
  rng = np.random.default_rng(seed)
  return {p: a.replace(up=jnp.asarray(std * rng.standard_normal(a.up.shape), jnp.float32))
          for p, a in adapters.items()}


def _params(dtype=jnp.float32):
  """A small tree: four attention Dense kernels, a 3x3 and a 1x1 Conv kernel, biases and a norm scale."""
  rng = np.random.default_rng(0)
  normal = lambda shape: jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)
  return {'blocks_0': {'attn1': {'to_q': {'kernel': normal((6, 5)), 'bias': normal((5,))},
                                 'to_k': {'kernel': normal((3, 5))}, 'to_v': {'kernel': normal((3, 5))},
                                 'to_out_0': {'kernel': normal((5, 6))}},
                       'conv1': {'kernel': normal((3, 3, 4, 7)), 'bias': normal((7,))},
                       'proj_in': {'kernel': normal((1, 1, 7, 4))}},
          'norm': {'scale': normal((6,))}}


def _adapters(params, seed=1, ranks=(2, 3)):
  """Random adapters of mixed ranks (and alphas): ``ranks[0]`` on the attention kernels, ``ranks[1]`` on convs."""
  a = init_lora(params, LoraConfig(rank=ranks[0], alpha=1.5, targets=DEFAULT_TARGETS), jax.random.key(seed))
  a |= init_lora(params, LoraConfig(rank=ranks[1], targets=(r'conv1/', r'proj_in/')), jax.random.key(seed + 1))
  return randomized(a, seed + 2)


def _delta(lora: Lora, scale: float):
  """(exact delta in float64, |c| |down| @ |up|, the float32 rounding bound of the computed delta)."""
  c = scale * lora.alpha / lora.rank
  down = np.asarray(lora.down, np.float64).reshape(-1, lora.rank)
  up = np.asarray(lora.up, np.float64)
  shape = lora.down.shape[:-1] + lora.up.shape[1:]
  return ((c * down @ up).reshape(shape), (abs(c) * np.abs(down) @ np.abs(up)).reshape(shape),
          (abs(c) * matmul_bound(down, up, extra_ops=2)).reshape(shape))


def _leaf(tree, path):
  for k in path.split('/'):
    tree = tree[k]
  return tree


def _get(tree, path):
  return np.asarray(_leaf(tree, path), np.float64)


# -- arithmetic ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_fresh_adapter_is_the_identity(dtype):
  params = _params(dtype)
  adapters = init_lora(params, LoraConfig(targets=(*DEFAULT_TARGETS, r'conv1/')), jax.random.key(1))
  assert set(adapters) == {f'blocks_0/attn1/{n}/kernel' for n in ('to_q', 'to_k', 'to_v', 'to_out_0')} | {
      'blocks_0/conv1/kernel'}
  merged = merge(params, adapters)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  for got, want in zip(jax.tree.leaves(merged), jax.tree.leaves(params), strict=True):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
  a = adapters[ATTENTION]
  assert a.alpha == 4.0 and a.down.shape == (6, 4) and a.up.shape == (4, 5) and not np.any(a.up)
  bound = 1 / np.sqrt(6)  # Kaiming uniform: U(+-1/sqrt(fan_in))
  assert 0.5 * bound < float(jnp.max(jnp.abs(a.down))) <= bound
  conv = adapters['blocks_0/conv1/kernel']
  assert conv.down.shape == (3, 3, 4, 4) and float(jnp.max(jnp.abs(conv.down))) <= 1 / np.sqrt(3 * 3 * 4)


def test_merge_matches_float64_and_unmerge_inverts_it():
  """Mixed ranks (2 on Dense, 3 on Conv kernels), alpha != rank, scale 0.7; 1x1 and 3x3 convolutions."""
  params, adapters = _params(), _adapters(_params())
  merged = merge(params, (adapters, 0.7))
  restored = unmerge(merged, (adapters, 0.7))
  for path, lora in adapters.items():
    w, got = _get(params, path), _get(merged, path)
    d, size, err = _delta(lora, 0.7)
    assert float(np.max(np.abs(d))) > 0.05  # the check has teeth: the delta is far above the bound
    assert_within(got, w + d, gamma(1) * (np.abs(w) + size) + (1 + gamma(1)) * err, f'merge {path}')
    assert_within(_get(restored, path), w, gamma(3) * (np.abs(w) + size + err) + 2 * err, f'unmerge {path}')
  for other in ('blocks_0/attn1/to_q/bias', 'norm/scale'):  # untouched leaves are untouched
    np.testing.assert_array_equal(_get(merged, other), _get(params, other))


def test_several_adapters_with_scales_equal_sequential_merges():
  params = _params()
  a, b = _adapters(params, seed=1), _adapters(params, seed=5, ranks=(3, 1))
  b = {k: v for k, v in b.items() if 'conv1' not in k}  # b adapts a subset of a's kernels
  both = merge(params, (a, 0.7), (b, -1.3))
  sequential = merge(merge(params, (a, 0.7)), (b, -1.3))
  traced = jax.jit(lambda s, t: merge(params, (a, s), (b, t)))(0.7, -1.3)  # scales traced, not static
  for path in a:
    _, size_a, err_a = _delta(a[path], 0.7)
    size_b, err_b = _delta(b[path], -1.3)[1:] if path in b else (0.0, 0.0)
    bound = gamma(3) * (np.abs(_get(params, path)) + size_a + size_b) + 2 * (err_a + err_b)
    assert_within(_get(both, path), _get(sequential, path), bound, path)
    assert_within(_get(traced, path), _get(sequential, path), bound, path)
  np.testing.assert_array_equal(_get(merge(params, (a, 0.0)), ATTENTION), _get(params, ATTENTION))


def test_bfloat16_base_gets_the_float32_delta_rounded_once():
  params32 = _params()
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params32)
  adapters = _adapters(params32)
  merged = merge(params, adapters)
  for path, lora in adapters.items():
    got = _get(merged, path)
    assert _leaf(merged, path).dtype == jnp.bfloat16
    w = _get(params, path)
    d, size, err = _delta(lora, 1.0)
    # one bfloat16 rounding of the float32 sum (a bfloat16 delta added would round twice)
    assert_within(got, w + d, BF16 * (np.abs(w) + size) + 2 * err, path)


# -- training ----------------------------------------------------------------------------------------------------------
def test_gradient_reaches_the_adapters_alone():
  """For loss = sum(G * W'), dL/d up = c down^T G and dL/d down = c G up^T; alpha is no leaf; optax fits a target."""
  params, adapters = _params(), _adapters(_params())
  assert len(jax.tree.leaves(adapters)) == 2 * len(adapters)  # down and up, never alpha
  rng = np.random.default_rng(7)
  g = {p: jnp.asarray(rng.standard_normal(kernels(params)[p].shape), jnp.float32) for p in adapters}
  loss = lambda a: sum(jnp.sum(g[p] * kernels(merge(params, a))[p].astype(jnp.float32)) for p in a)
  grads = jax.grad(loss)(adapters)
  for p, lora in adapters.items():
    c, r = lora.alpha / lora.rank, lora.rank
    down, up, gp = (np.asarray(x, np.float64) for x in (lora.down, lora.up, g[p]))
    gp2, down2 = gp.reshape(-1, gp.shape[-1]), down.reshape(-1, r)
    assert grads[p].alpha == lora.alpha and grads[p].down.dtype == jnp.float32
    assert_within(grads[p].up, c * down2.T @ gp2, 2 * c * matmul_bound(down2.T, gp2, extra_ops=2), f'd up {p}')
    assert_within(np.asarray(grads[p].down).reshape(-1, r), c * gp2 @ up.T,
                  2 * c * matmul_bound(gp2, up.T, extra_ops=2), f'd down {p}')

  # Adam on the adapters alone fits a low-rank change of a frozen bfloat16 base (whose rounding the gradients see).
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  target = merge(params, _adapters(_params(), seed=9))
  fresh = init_lora(params, LoraConfig(rank=3, targets=DEFAULT_TARGETS), jax.random.key(3))
  fit = lambda a: sum(jnp.sum((kernels(merge(params, a))[p].astype(jnp.float32) -
                               kernels(target)[p].astype(jnp.float32)) ** 2) for p in a)
  opt = optax.adam(0.05)

  @jax.jit
  def step(a, state):
    value, grad = jax.value_and_grad(fit)(a)
    updates, state = opt.update(grad, state, a)
    return optax.apply_updates(a, updates), state, value

  a, state = fresh, opt.init(fresh)
  first = None
  for _ in range(100):
    a, state, value = step(a, state)
    first = value if first is None else first
  assert float(fit(a)) < 0.05 * float(first)
  assert jax.tree.structure(state[0].mu) == jax.tree.structure(fresh)  # the optimizer holds the adapters alone


def test_rank_8_attention_lora_is_a_small_fraction_of_sd15():
  """The issue's budget: rank <= 8 on SD 1.5's attention is <= 5% of its U-Net (shapes only, nothing computed)."""
  shapes = nn.meta.unbox(jax.eval_shape(lambda: init_unet(UNet(UNET_CONFIGS['sd15']), jax.random.key(0))))
  counts = {r: num_params(jax.eval_shape(lambda r=r: init_lora(shapes, LoraConfig(rank=r), jax.random.key(0))))
            for r in (4, 8)}
  assert counts[4] == 797_184  # 128 projections x r (in + out): peft's count for diffusers' default LoRA
  assert counts[8] == 2 * counts[4] and counts[8] <= 0.05 * num_params(shapes)


# -- errors ------------------------------------------------------------------------------------------------------------
def test_errors_name_targets_and_paths():
  params = _params()
  with pytest.raises(ValueError, match=r"match no kernel: \['nope/'\]"):
    init_lora(params, LoraConfig(targets=(*DEFAULT_TARGETS, 'nope/')), jax.random.key(0))
  adapters = _adapters(params)
  bad = adapters | {'blocks_0/attn2/to_k/kernel': adapters[ATTENTION],  # no such kernel
                    'blocks_0/attn1/to_q/bias': adapters[ATTENTION],  # not a kernel
                    'blocks_0/attn1/to_out_0/kernel': adapters[ATTENTION]}  # (6, 5) factors on a (5, 6) kernel
  with pytest.raises(ValueError) as e:
    merge(params, bad)
  message = str(e.value)
  assert '2 paths not in the params, 1 mis-shaped' in message
  for path in ('blocks_0/attn2/to_k/kernel', 'blocks_0/attn1/to_q/bias',
               'blocks_0/attn1/to_out_0/kernel: kernel (5, 6)'):
    assert path in message


# -- files -------------------------------------------------------------------------------------------------------------
SDXL_UNET = UNetConfig(block_out_channels=(16, 32), layers_per_block=2, attention_levels=(False, True), num_heads=2,
                       transformer_depth=(1, 2), cross_attention_dim=32, use_linear_projection=True, norm_num_groups=8,
                       addition_time_embed_dim=8, addition_embed_dim=16 + 6 * 8)


@pytest.fixture(scope='module')
def shapes():
  """Parameter shapes of an SD 1.x-like and an SDXL-like pipeline (U-Nets and CLIP text encoders)."""
  def clip(config):
    return jax.eval_shape(lambda: CLIPTextTransformer(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  unet = lambda c: nn.meta.unbox(jax.eval_shape(lambda: init_unet(UNet(c), jax.random.key(0))))
  text = nn.meta.unbox(clip(CLIP_TEXT_CONFIGS['tiny'])['params'])
  text_2 = nn.meta.unbox(clip(CLIPTextConfig(vocab_size=100, hidden_size=24, intermediate_size=32, num_layers=2,
                                             num_heads=2, projection_dim=16))['params'])
  return {'sd': {'unet': unet(UNET_CONFIGS['tiny']), 'text_encoder': text},
          'sdxl': {'unet': unet(SDXL_UNET), 'text_encoder': text, 'text_encoder_2': text_2}}


def _file_adapters(models, seed=0):
  """Random adapters of mixed ranks and per-layer alphas for every model of a pipeline's shapes."""
  targets = {'unet': [(2, 1.0, DEFAULT_TARGETS), (3, 5.0, (r'resnets_\d+/conv1/', r'time_emb_proj/', r'samplers_0/',
                                                          r'proj_in/', r'add_embedding/')), (1, None, ('ff/net_2/',))],
             'text_encoder': [(2, 0.5, (r'(q|k|v)_proj/',)), (4, 3.0, ('mlp/fc1/',))],
             'text_encoder_2': [(3, 1.0, (r'out_proj/', 'text_projection/'))]}
  out = {}
  for i, (model, params) in enumerate(sorted(models.items())):
    a = {}
    for j, (rank, alpha, t) in enumerate(targets[model]):
      t = tuple(x for x in t if any(re.search(x, p) for p in kernels(params)))
      a |= init_lora(params, LoraConfig(rank=rank, alpha=alpha, targets=t), jax.random.key(seed + 10 * i + j))
    out[model] = randomized(a, seed + 100 + i)
  return out


def _assert_same_adapters(got, want):
  assert set(got) == set(want)
  for model in want:
    assert set(got[model]) == set(want[model]), model
    for path, lora in want[model].items():
      back = got[model][path]
      assert back.alpha == lora.alpha, path
      np.testing.assert_array_equal(back.down, lora.down)
      np.testing.assert_array_equal(back.up, lora.up)


@pytest.mark.parametrize('pipeline,format,original', [('sd', 'diffusers', False), ('sd', 'kohya', False),
                                                       ('sdxl', 'diffusers', False), ('sdxl', 'kohya', True)])
def test_files_round_trip(tmp_path, shapes, pipeline, format, original):
  """write_lora then read_lora gives the same factors (float32, exact) and per-layer alphas, mixed ranks, LoCon."""
  models = shapes[pipeline]
  adapters = _file_adapters(models)
  file = tmp_path / 'lora.safetensors'
  lora_files.write_lora(file, adapters, format=format, kohya_unet_params=models['unet'] if original else None)
  keys = set(read_safetensors(file))
  if format == 'kohya':
    te = 'lora_te1_' if pipeline == 'sdxl' else 'lora_te_'
    assert any(k.startswith(te + 'text_model_encoder_layers_0_self_attn_q_proj.') for k in keys)
    block = 1 if pipeline == 'sdxl' else 0  # SDXL's level 1 has two transformer blocks
    unet = (f'input_blocks_4_1_transformer_blocks_{block}_attn1_to_q' if original else
            f'down_blocks_1_attentions_0_transformer_blocks_{block}_attn1_to_q')
    assert f'lora_unet_{unet}.alpha' in keys
  else:
    assert 'text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight' in keys
  _assert_same_adapters(lora_files.read_lora(file, models), adapters)


def test_older_diffusers_names_and_peft_metadata(tmp_path, shapes):
  """``lora.down/up``, ``lora_linear_layer`` and attention-processor names read as the peft ones; alphas from
  peft's alpha_pattern (regex suffix match, first match wins), lora_alpha's default 8 and rsLoRA."""
  models = shapes['sd']
  adapters = _file_adapters(models)
  file = tmp_path / 'peft.safetensors'
  lora_files.write_lora(file, adapters)
  state = read_safetensors(file)
  renames = [('.lora_A.weight', '.lora.down.weight'), ('.lora_B.weight', '.lora.up.weight')]
  old = {}
  for k, v in state.items():
    if k.startswith('text_encoder.') and '.mlp.' in k:
      k = k.replace('.lora_A.', '.lora_linear_layer.down.').replace('.lora_B.', '.lora_linear_layer.up.')
    elif k.startswith('text_encoder.'):  # processor names: self_attn.to_q_lora.down.weight
      k = k.replace('.q_proj.lora_A.', '.to_q_lora.down.').replace('.q_proj.lora_B.', '.to_q_lora.up.')
      k = k.replace('text_model.', '')  # transformers 5 names
    elif '.attn1.to_out.0.' in k:
      k = k.replace('.to_out.0.lora_A.', '.processor.to_out_lora.down.').replace('.to_out.0.lora_B.',
                                                                                '.processor.to_out_lora.up.')
    else:
      for a, b in renames:
        k = k.replace(a, b)
    old[k] = v
  assert any('.processor.to_out_lora.' in k for k in old) and any('.to_q_lora.' in k for k in old)
  meta = {'unet.lora_alpha': 2.5, 'text_encoder.r': 2, 'text_encoder.use_rslora': True,
          'unet.alpha_pattern': {r'attn2\.to_(k|v)': 6.0, '^down_blocks.1.attentions.0.proj_in': 7.0}}
  write_safetensors(file, old, {'format': 'pt', 'lora_adapter_metadata': json.dumps(meta)})
  back = lora_files.read_lora(file, models)
  for model in adapters:
    for path, lora in adapters[model].items():
      got = back[model][path]
      np.testing.assert_array_equal(got.down, lora.down)
      np.testing.assert_array_equal(got.up, lora.up)
      if model == 'text_encoder':
        want = 8 * np.sqrt(lora.rank)  # peft's default lora_alpha, rsLoRA's alpha / sqrt(r) as alpha' / r
      elif '/attn2/to_k/' in path or '/attn2/to_v/' in path:
        want = 6.0
      else:
        want = 7.0 if path == 'down_blocks_1/attentions_0/proj_in/kernel' else 2.5
      assert got.alpha == pytest.approx(want), path


QUERY = 'lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q'


def _kohya_file(tmp_path, shapes):
  """(models, file, its tensors) of a kohya file of random adapters for the SD 1.x-like shapes."""
  models, file = shapes['sd'], tmp_path / 'kohya.safetensors'
  lora_files.write_lora(file, _file_adapters(models), format='kohya')
  return models, file, dict(read_safetensors(file))


def test_unmappable_keys_are_listed_in_one_error(tmp_path, shapes):
  """Every key that maps to no layer (DoRA, LoHa, LoKr, diff, unknown modules, models not given), never skipped."""
  models, file, state = _kohya_file(tmp_path, shapes)
  x = np.zeros((2, 2), np.float32)
  extra = {f'{QUERY}.dora_scale': x, 'lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a': x,
           'lora_unet_mid_block_attentions_0_proj_out.lokr_w1': x, 'lora_unet_conv_in.diff': x,
           'lora_unet_conv_in.diff_b': x, 'lora_unet_no_such_layer.lora_down.weight': x,
           'lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight': x,
           'unet.no_such.lora_A.weight': x, 'optimizer_state': x}
  write_safetensors(file, state | extra)
  with pytest.raises(WeightMismatchError) as e:
    lora_files.read_lora(file, models)
  message = str(e.value)
  assert message.startswith(f'{file}: {len(extra)} LoRA keys map to no layer')
  for key in extra:
    assert key in message
  for reason in ('DoRA', 'LoHa', 'LoKr', 'a full weight difference', "no 'text_encoder_2' parameters given",
                 'not a LoRA key', 'no such layer'):
    assert reason in message


def test_incomplete_and_misshaped_layers_are_named(tmp_path, shapes):
  models, file, state = _kohya_file(tmp_path, shapes)
  q, k = QUERY, QUERY.removesuffix('_q') + '_k'
  del state[f'{q}.lora_up.weight']
  state[f'{k}.lora_up.weight'] = state[f'{k}.lora_up.weight'][:, :1]  # rank 1 up for a rank 2 down
  write_safetensors(file, state)
  with pytest.raises(WeightMismatchError) as e:
    lora_files.read_lora(file, models)
  message = str(e.value)
  assert '2 layers do not fit' in message
  assert f'{q}.lora_down.weight' in message and 'no up factor' in message
  assert f'{k}.lora_down.weight (2, 64) and {k}.lora_up.weight (64, 1) do not fit the kernel (64, 64)' in message


def test_merge_lora_files_onto_pipeline_params(tmp_path, shapes):
  """Several files with scales onto a pipeline's params: each model merged once, the others passed through."""
  params = {'unet': jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes['sd']['unet']),
            'text_encoder': jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes['sd']['text_encoder']),
            'vae': {'conv': {'kernel': jnp.ones((3, 3, 4, 4))}}}
  a, b = _file_adapters(shapes['sd'], seed=0), _file_adapters(shapes['sd'], seed=1)
  del b['text_encoder']
  lora_files.write_lora(tmp_path / 'a.safetensors', a)
  lora_files.write_lora(tmp_path / 'b.safetensors', b, format='kohya')
  merged = lora_files.merge_lora_files(params, str(tmp_path / 'a.safetensors'), (tmp_path / 'b.safetensors', 0.5))
  assert merged['vae'] is params['vae']
  want = {'unet': merge(params['unet'], a['unet'], (b['unet'], 0.5)), 'text_encoder': merge(params['text_encoder'],
                                                                                            a['text_encoder'])}
  for model, tree in want.items():
    for got, w in zip(jax.tree.leaves(merged[model]), jax.tree.leaves(tree), strict=True):
      np.testing.assert_array_equal(got, w)
