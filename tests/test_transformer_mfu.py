"""benchmarks/transformer_mfu.py: its FLOP count is the models' matrix products, and its MFU is that count over the
step time and the peak. Timings are never asserted."""

import dataclasses
import math

import pytest

from benchmarks import transformer_mfu as tm
from diffjax.models.dit import DIT_CONFIGS


def test_the_flop_count_is_the_dit_matrix_products():
  """Two DiT-XL/2 blocks at 256 px (width W = 1152, T = 256 tokens, batch 2), lowered only: XLA's count of the
  forward against the matrix products counted by hand (2 FLOPs per multiply-add)."""
  config = dataclasses.replace(DIT_CONFIGS['dit_xl_2_256'], num_layers=2)
  b, t, w, layers, p, c = 2, 256, config.width, 2, config.patch_size, config.in_channels
  forward, train = tm.step_flops('dit', tm.Preset(config, (32, 32, c), b))
  # per block: adaLN (W -> 6 W, once per sample), q k v and out projections, Q K^T and A V, the 4x MLP
  blocks = layers * b * (2 * w * 6 * w + 4 * 2 * t * w * w + 2 * 2 * t * t * w + 2 * 2 * t * w * 4 * w)
  embeddings = (2 * b * t * p * p * c * w          # patches
                + 2 * b * (256 * w + w * w)        # the timestep MLP (256 sinusoids)
                + 2 * b * w * 2 * w                # the output's shift and scale
                + 2 * b * t * w * p * p * config.outputs)  # the output projection
  products = blocks + embeddings
  # XLA also counts the elementwise work (norms, GELU, softmax): O(1/W) and O(heads / W) of the products, ~0.3%
  assert products <= forward <= 1.02 * products, forward / products
  # the backward of every product is two products of the same size: a training step is ~3 forwards
  assert 2.9 <= train / forward <= 3.2, train / forward


@pytest.mark.parametrize('name', ['dit', 'mmdit'])
def test_the_script_reports_mfu_as_flops_over_time_and_peak(name, tmp_path):
  peak = 1e12
  row, = tm.main(['--models', name, '--preset', 'tiny', '--reps', '2', '--peak', str(peak),
                  '--json', str(tmp_path / 'mfu.json')])
  assert row['model'] == name and len(row['times']) == 2 and row['step_s'] > 0
  assert all(math.isfinite(v) for v in row['losses'])
  forward, train = tm.step_flops(name, tm.PRESETS['tiny'][name])
  assert row['flops'] == train and row['forward_flops'] == forward
  assert row['mfu'] == pytest.approx(train / row['step_s'] / peak, rel=1e-12)
  assert row['tokens'] == row['batch'] * tm.tokens_per_sample(name, tm.PRESETS['tiny'][name])
  assert row['cudnn_attention_calls'] == 0  # no GPU here: the default attention is not cuDNN
