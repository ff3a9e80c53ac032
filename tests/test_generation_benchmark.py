"""benchmarks/generation.py end to end on a tiny SD-architecture folder: the paired protocol's bookkeeping."""

import json
import statistics

import pytest

pytestmark = pytest.mark.reference


def test_paired_calls_and_the_reported_figures(tmp_path):
  pytest.importorskip("diffusers")
  from benchmarks import generation

  folder, out = str(tmp_path / "tiny_sd"), str(tmp_path / "bench.json")
  generation.make_folder(folder, tiny=True)
  generation.main(["--folder", folder, "--sizes", "64", "--batches", "2", "--steps", "2", "--reps", "2",
                   "--json", out])
  result = json.loads(open(out).read())
  (row,) = result["rows"]
  raw = row["raw"]
  # Two steady calls each for diffusers and the warm diffjax child, one for the cold child.
  assert len(raw["diffusers"]["times"]) == len(raw["diffjax_warm"]["times"]) == 2
  assert len(raw["diffjax_cold"]["times"]) == 1
  t_ref, t_jax = statistics.median(raw["diffusers"]["times"]), statistics.median(raw["diffjax_warm"]["times"])
  assert row["diffusers_s_per_image"] == pytest.approx(t_ref / 2)
  assert row["throughput_ratio"] == pytest.approx(t_ref / t_jax)
  pair_ratios = [a / b for a, b in zip(raw["diffusers"]["times"], raw["diffjax_warm"]["times"], strict=True)]
  assert row["pair_ratio_range"] == pytest.approx([min(pair_ratios), max(pair_ratios)])
  assert row["warm_start_s"] == pytest.approx(raw["diffjax_warm"]["first_s"] - t_jax)
  # Each child reports its own peak memory and load time.
  for side in ("diffusers", "diffjax_cold", "diffjax_warm"):
    assert raw[side]["peak_rss_gib"] > 0.1 and raw[side]["load_s"] > 0
