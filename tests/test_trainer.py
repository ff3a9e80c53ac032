"""The main job end to end on the tiny digits config, and config validation."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import default
from configs import generate as generate_config
from diffjax import generation
from diffjax.evaluate import features, metrics
from diffjax.samplers import calibration
from diffjax.schema import ConfigError
from diffjax.train import trainer

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_tiny_run_trains_checkpoints_and_samples(tmp_path):
  config = default.get_config("tiny")
  state = trainer.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == config.train.num_steps
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]
  grid = np.asarray(Image.open(tmp_path / "samples.png"))
  assert grid.shape[0] >= 10 * 8 and grid.shape[2] == 3  # ten labelled prompt rows (RGB for the labels)
  assert os.listdir(tmp_path / "tensorboard" / "plugins" / "profile")  # clu Profile action (train.profile_steps)
  scores = json.loads((tmp_path / "eval.json").read_text())
  assert scores["num_samples"] == 10 and 0.0 <= scores["prompt_accuracy"] <= 1.0
  assert scores["classifier_test_accuracy"] > 0.95
  # Every sample metric is reported (with its interval, in the shipped feature space) or named as not passing the
  # sanity suite (one draw at ten samples here).
  assert sorted([*scores["metrics"], *scores["not_reported"]]) == sorted(metrics.BETTER)
  assert scores["features"]["files"].keys() == {os.path.basename(p) for p in features.SHIPPED}
  for record in scores["metrics"].values():
    assert record["features"] == features.VERSION and record["ci95"][0] <= record["value"] <= record["ci95"][1]

  # --mode=evaluate: the same config re-evaluates the checkpoint exactly; a sampler override changes the samples
  again = trainer.evaluate_checkpoint(config, str(tmp_path), str(tmp_path / "again"))
  assert again == scores == json.loads((tmp_path / "again" / "eval.json").read_text())
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "again" / "samples.png")), grid)
  config.sampler.name = "euler"
  trainer.evaluate_checkpoint(config, str(tmp_path), str(tmp_path / "euler"))
  assert json.loads((tmp_path / "euler" / "eval.json").read_text())["num_samples"] == 10
  assert not np.array_equal(np.asarray(Image.open(tmp_path / "euler" / "samples.png")), grid)

  # the workdir is a pretrained model: the generation job on it gives --mode=sample's images (both run
  # diffjax.pipelines.generate with seed + i per image on the latest EMA weights and the same sampler)
  sampled = trainer.sample_from_checkpoint(config, str(tmp_path), config.prompts[:2], 2, str(tmp_path / "sample"))
  job = generate_config.get_config()
  job.update(dict(pretrained=str(tmp_path), prompts=tuple(config.prompts[:2]), num_per_prompt=2,
                  height=config.data.image_size, width=config.data.image_size))
  job.sampler.update(dict(name=config.sampler.name, grid=config.sampler.grid, steps=config.sampler.nfe,
                          guidance_scale=config.sampler.guidance_scale))
  record = generation.generate(job, str(tmp_path / "generated"))
  assert record["kind"] == "diffjax" and record["step"] == 6 and record["weights_sha256"]
  np.testing.assert_array_equal(np.load(tmp_path / "generated" / "samples.npz")["images"], sampled)
  assert json.loads((tmp_path / "sample" / "samples.json").read_text())["step"] == 6
  # --step: an earlier checkpoint's EMA weights; a step that was not kept is refused naming those kept
  early = trainer.sample_from_checkpoint(config, str(tmp_path), config.prompts[:2], 2, str(tmp_path / "early"), step=3)
  assert json.loads((tmp_path / "early" / "samples.json").read_text())["step"] == 3 and early.shape == sampled.shape
  (_, (ema3, _), step3), (_, (ema6, _), step6) = (trainer.load_components(config, str(tmp_path), s) for s in (3, None))
  assert (step3, step6) == (3, 6)
  assert any(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), ema3, ema6)))
  with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 4 .*the steps kept are \[3, 6\]"):
    trainer.evaluate_checkpoint(config, str(tmp_path), str(tmp_path / "none"), step=4)


@pytest.mark.slow  # about 2 minutes: a tiny run, then calibration, fitted sampling and the held-out benchmark
def test_calibrated_samplers_of_a_tiny_run(tmp_path):
  config = default.get_config("tiny")
  config.train.profile_steps = 0
  trainer.train_and_evaluate(config, str(tmp_path))
  sampled = trainer.sample_from_checkpoint(config, str(tmp_path), config.prompts[:2], 2, str(tmp_path / "sample"))
  # --mode=calibrate fits samplers to the checkpoint; sampler.name=fitted samples and evaluates with them, and
  # refuses a calibration made for another guidance scale, and any use while training
  # refine: Levenberg-Marquardt takes forward-mode Jacobians through the U-Net (its CPU upsampling included)
  config.calibration.update(dict(budgets=(2, 3), batch=16, validation_batch=16, lattice=8, chunk=16, restarts=2,
                                 refine=1))
  path = str(tmp_path / "calibration.json")
  made = trainer.calibrate_checkpoint(config, str(tmp_path), path)
  assert sorted(made["samplers"], key=int) == ["2", "3"] and made["key"]["guidance_scale"] == 2.0
  assert all(made["samplers"][k]["refine_iterations"] in (0, 1) for k in ("2", "3"))  # (0: no step lowered it)
  # calibration.restarts reached each search (both budgets have >= 2 starting grids on an 8-point lattice)
  assert [made["samplers"][k]["descents"] for k in ("2", "3")] == [2, 2]
  config.sampler.update(dict(name="fitted", calibration=path, nfe=3))
  fitted = trainer.sample_from_checkpoint(config, str(tmp_path), config.prompts[:2], 2, str(tmp_path / "fitted"))
  assert fitted.shape == sampled.shape and not np.array_equal(fitted, sampled)
  assert json.loads((tmp_path / "fitted" / "samples.json").read_text())["plan"]["solver"] == "fitted"
  trainer.evaluate_checkpoint(config, str(tmp_path), str(tmp_path / "fitted_eval"))
  assert json.loads((tmp_path / "fitted_eval" / "eval.json").read_text())["num_samples"] == 10
  # the held-out benchmark of a calibration: fitted vs classic on other noise and unseen prompts, and at another
  # guidance scale (the values are meaningless for a 6-step model: they must exist and be finite)
  out = tmp_path / "held_out.json"
  subprocess.run([sys.executable, "benchmarks/calibrated_checkpoint.py", "--config=configs/default.py:tiny",
                  f"--workdir={tmp_path}", f"--calibration={path}", "--batch=8", "--nfe=2", "--guidance=2,3",
                  "--sets=unseen", "--solvers=euler", "--check=4", f"--json={out}"], check=True, cwd=ROOT)
  rows = json.loads(out.read_text())["rows"]
  assert [(r["guidance"], r["transfer"], r["nfe"]) for r in rows] == [(2.0, False, 2), (3.0, True, 2)]
  assert all(np.isfinite([r["fitted"], r["best"], r["best_2x"], r["reference_error"]]).all() for r in rows)
  assert rows[0]["best_name"].startswith("euler/") and len(rows[0]["classic"]) == 3  # one solver, three grids
  config.sampler.guidance_scale = 3.0
  # several calibrations on one held-out batch: each file's RMSE, and transfer marked against each file's own scale
  path3 = str(tmp_path / "calibration3.json")
  trainer.calibrate_checkpoint(config, str(tmp_path), path3)
  subprocess.run([sys.executable, "benchmarks/calibrated_checkpoint.py", "--config=configs/default.py:tiny",
                  f"--workdir={tmp_path}", f"--calibration={path},{path3}", "--batch=8", "--nfe=2", "--guidance=2,3",
                  "--sets=unseen", "--solvers=euler", "--check=4", f"--json={out}"], check=True, cwd=ROOT)
  both = json.loads(out.read_text())["rows"]
  assert [r["fitted"] for r in both] == [r["fitted"] for r in rows]  # the first file's column is the table's
  assert [{f: v["transfer"] for f, v in r["fitted_by_file"].items()} for r in both] == [
      {path: False, path3: True}, {path: True, path3: False}]
  assert all(np.isfinite(v["rmse"]) for r in both for v in r["fitted_by_file"].values())
  with pytest.raises(calibration.CalibrationError, match="calibrated for guidance_scale = 2.0, this run has 3.0"):
    trainer.sample_from_checkpoint(config, str(tmp_path), config.prompts[:1], 1, str(tmp_path / "refused"))
  with pytest.raises(ConfigError, match="not while training"):
    trainer.train_and_evaluate(config, str(tmp_path / "train_fitted"))


@pytest.mark.parametrize("field, value, message", [
    ("sampler.name", "nope", "sampler.name"),
    ("diffusion.target", "epsilon", "diffusion.target"),
    ("optim.warmup_steps", 100, "optim.warmup_steps"),
    ("calibration.restarts", 0, "calibration.restarts"),
])
def test_invalid_config_names_the_field(field, value, message):
  config = default.get_config("tiny")
  section, key = field.split(".")
  config[section][key] = value
  with pytest.raises(ValueError, match=message):
    trainer.validate(config)
