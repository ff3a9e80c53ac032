"""diffjax entry point: flags -> config -> job.

python -m diffjax.main --config=configs/<name>.py[:arg] --workdir=DIR [--config.field=value ...]

The config is read here and nowhere deeper: jobs receive typed arguments.
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

from diffjax import sampler_demo
from diffjax.train import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a get_config() file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for outputs (checkpoints, logs, images).")
flags.mark_flags_as_required(["config", "workdir"])


def _sampler_demo(config, workdir):
  if config.mixture == "ring":
    mixture = sampler_demo.ring_mixture()
  else:
    mixture = sampler_demo.GaussianMixture.load(config.mixture)
  results = sampler_demo.run(
      process_name=config.process, mixture=mixture, solver_names=[s for s in config.samplers.split(",") if s],
      grid=config.grid, nfe=config.nfe, num_samples=config.num_samples, seed=config.seed,
      output_png=os.path.join(workdir, "samplers.png"))
  for name, sw in results.items():
    logging.info("sliced W2 %-16s %.4f", name, sw)


JOBS = {"sampler_demo": _sampler_demo, "train": lambda config, workdir: trainer.train_and_evaluate(config, workdir)}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config.job not in JOBS:
    raise app.UsageError(f"config.job={config.job!r} is not one of {sorted(JOBS)}")
  os.makedirs(_WORKDIR.value, exist_ok=True)
  JOBS[config.job](config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
