"""benchmarks/generation.py end to end on tiny folders: the paired protocol's bookkeeping, and that each child
ran the architecture and precision asked for (SD 1.5 in float32; SDXL in half precision)."""

import json
import statistics

import pytest

pytestmark = pytest.mark.reference


# The SDXL case (~1 minute, most of it compiling bfloat16 programs) is in the slow set: the default suite's time.
@pytest.mark.parametrize("arch, precision, reps", [("sd15", "float32", 2),
                                                   pytest.param("sdxl", "half", 1, marks=pytest.mark.slow)])
def test_paired_calls_and_the_reported_figures(tmp_path, arch, precision, reps):
  pytest.importorskip("diffusers")
  import torch

  from benchmarks import generation

  folder, out = str(tmp_path / f"tiny_{arch}"), str(tmp_path / "bench.json")
  generation.make_folder(folder, tiny=True, arch=arch)
  generation.main(["--folder", folder, "--arch", arch, "--precision", precision, "--sizes", "64", "--batches", "2",
                   "--steps", "2", "--reps", str(reps), "--json", out])
  result = json.loads(open(out).read())
  assert (result["arch"], result["precision"]) == (arch, precision)
  (row,) = result["rows"]
  raw = row["raw"]
  # reps steady calls each for diffusers and the warm diffjax child, one for the cold child.
  assert len(raw["diffusers"]["times"]) == len(raw["diffjax_warm"]["times"]) == reps
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
  # ... and what it ran in: diffjax's U-Net params in bfloat16 for half precision; diffusers in float16 on CUDA,
  # bfloat16 on a CPU, with PyTorch's SDPA either way.
  half = "float16" if torch.cuda.is_available() else "bfloat16"
  ran_on = row["ran_on"]
  assert ran_on["diffjax"]["dtype"] == raw["diffjax_cold"]["dtype"] == ("float32" if precision == "float32"
                                                                        else "bfloat16")
  assert ran_on["diffusers"]["dtype"] == f"torch.{'float32' if precision == 'float32' else half}"
  assert ran_on["diffusers"]["attention"] == "AttnProcessor2_0"
  assert ran_on["diffusers"]["device"].startswith("cuda" if torch.cuda.is_available() else "cpu")
  # A folder of the other architecture is refused before any child starts.
  other = "sdxl" if arch == "sd15" else "sd15"
  with pytest.raises(SystemExit, match=generation.ARCHS[arch][0]):
    generation.main(["--folder", folder, "--arch", other])
