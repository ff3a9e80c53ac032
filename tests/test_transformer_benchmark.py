"""benchmarks/transformer_step.py on the tiny size: it runs both frameworks on the same weights and reports what it
says it measures (finite positive times of both sides, the ratios of those times, parity within its bound).
Timings are never asserted."""

import json
import math
import statistics

import pytest

# ~1 min of compilation (8 programs); the slow set: python -m pytest -m slow tests/test_transformer_benchmark.py
pytestmark = [pytest.mark.reference, pytest.mark.slow]


def test_every_backbone_is_timed_on_both_sides_with_the_same_weights(tmp_path):
  pytest.importorskip('torch')
  pytest.importorskip('diffusers')
  from benchmarks import transformer_step

  out = tmp_path / 'bench.json'
  # One torch thread: on a loaded 2-core host, PyTorch's two OpenMP threads can take 100x longer per tiny call.
  transformer_step.main(['--sizes', 'tiny', '--reps', '1', '--batch', '2', '--torch_threads', '1',
                         '--json', str(out)])
  result = json.loads(out.read_text())
  assert result['torch_threads'] == 1 and result['reps'] == 1 and result['batch'] == 2
  rows = {r['model']: r for r in result['rows']}
  assert sorted(rows) == sorted(transformer_step.MODELS)
  for model, row in rows.items():
    assert row['size'] == 'tiny' and row['diffusers_class'] == transformer_step.DIFFUSERS_CLASSES[model]
    # the same trained parameters on both sides (diffjax may hold diffusers' buffers too, frozen)
    assert row['params_torch'] == row['params_diffjax'] > 0
    assert row['params_frozen'] == (16 * 16 * 16 if model == 'mmdit' else 0)  # SD3's position table
    for step in ('forward', 'train'):
      timing = row[step]
      times = timing['times']
      assert len(times['torch']) == len(times['diffjax']) == 1
      assert all(math.isfinite(t) and t > 0 for side in ('torch', 'diffjax') for t in times[side])
      assert timing['torch_s'] == statistics.median(times['torch'])
      assert timing['diffjax_s'] == statistics.median(times['diffjax'])
      assert timing['ratio'] == pytest.approx(timing['torch_s'] / timing['diffjax_s'])
      assert timing['ratio_range'][0] <= timing['ratio'] <= timing['ratio_range'][1]
      assert math.isfinite(timing['diffjax_compile_s']) and timing['diffjax_compile_s'] > 0
    parity = row['parity']
    assert parity['ok'], (model, parity)
    for what in ('forward', 'loss', 'grads'):
      assert 0 <= parity[what] <= transformer_step.PARITY_BOUND, (model, what, parity)
    assert parity['loss_torch'] > 0 and parity['loss_diffjax'] > 0
