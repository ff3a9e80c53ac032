"""diffjax entry point: flags -> config -> job.

python -m diffjax.main --config=configs/<name>.py[:arg] --workdir=DIR [--config.field=value ...]

The config is read here and nowhere deeper: jobs receive typed arguments. It is checked
against its family's declaration (``diffjax.schema``) before any job starts; a bad config
ends with one line naming the field and exit status 2 (usage), a traceback only with
``--verbosity=1``.
"""

from __future__ import annotations

import os

# Before TensorFlow is imported (tfds imports it; it only reads data here): no C++ INFO lines, and no oneDNN
# kernels, whose notice is printed before any log level applies (diffjax computes nothing with TensorFlow).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import difflib
import logging as logging_lib
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from diffjax import detection, generation, sampler_demo, schema
from diffjax.samplers import calibration
from diffjax.train import finetune, trainer, vae_trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a get_config() file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for outputs (checkpoints, logs, images).")
_MODE = flags.DEFINE_enum("mode", "run", ["run", "sample", "evaluate", "generate", "calibrate", "detect"],
                          "run: the config's job (train, train_vae, sampler_demo, generate, finetune); sample: "
                          "sample from the latest checkpoint in --workdir; evaluate: the config's evaluation of "
                          "that checkpoint (sampler and evaluation overrides apply) into --output; generate: the "
                          "same as run for a generation config (configs/generate.py); calibrate: fit samplers to "
                          "that checkpoint, or to a generation config's pretrained pipeline (config.calibration) "
                          "into --output/calibration.json (default WORKDIR/calibration.json); detect: which marks "
                          "the images config.detect.images names carry (a generation config) into "
                          "WORKDIR/detection.json.")
_PROMPTS = flags.DEFINE_multi_string("prompts", [], "--mode=sample: prompts (repeat the flag).")
_NUM_PER_PROMPT = flags.DEFINE_integer("num_samples_per_prompt", 4, "--mode=sample: images per prompt.")
_OUTPUT = flags.DEFINE_string("output", None, "--mode=sample/evaluate: output directory (default WORKDIR/samples, "
                              "WORKDIR/evaluation).")
_SEED = flags.DEFINE_integer("sample_seed", 0, "--mode=sample: seed of the initial noise.")
_STEP = flags.DEFINE_integer("step", None, "--mode=sample/evaluate/calibrate of a training config: the checkpoint "
                             "of this training step (default: the newest), e.g. to compare runs at equal FLOPs.")
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


def _unknown_override(argv) -> str | None:
  """'--config.a.b=..: config.a has no field 'b' (did you mean ..?)' for the first override naming no field."""
  config_arg = next((a[len("--config="):] for a in argv if a.startswith("--config=")), None)
  if config_arg is None:
    return None
  node_path, config = "config", schema.load_config_file(config_arg)
  for override in (a for a in argv if a.startswith("--config.")):
    node, node_path = config, "config"
    for key in override[len("--config."):].split("=", 1)[0].split("."):
      known = list(node.keys()) if hasattr(node, "keys") else []
      if key not in known:
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {node_path}.{close[0]}?)" if close else f"; it has {sorted(known)}"
        return f"{override}: {node_path} has no field {key!r}{hint}"
      node, node_path = node[key], f"{node_path}.{key}"
  return None


def parse_flags(argv):
  """absl flag parsing that ends a bad ``--config.<field>`` override with one line naming the field.

  (ml_collections raises a KeyError or AttributeError with a traceback for an unknown
  field; a wrong type is an absl ``IllegalFlagValueError`` that names flag and value.)
  """
  try:
    return flags.FLAGS(argv)
  except (flags.Error, KeyError, AttributeError) as e:
    fail(f"FATAL config error: {_unknown_override(argv) or e}")


USAGE_EXIT = 2  # a config or input that cannot be right (not a crash)


def fail(line: str) -> None:
  """Ends the program with one line on stderr and exit status 2."""
  print(line, file=sys.stderr)
  sys.exit(USAGE_EXIT)


JOBS = {"sampler_demo": _sampler_demo, "train": lambda config, workdir: trainer.train_and_evaluate(config, workdir),
        "train_vae": lambda config, workdir: vae_trainer.train_vae(config, workdir),
        "generate": lambda config, workdir: generation.generate(config, workdir),
        "finetune": lambda config, workdir: finetune.finetune(config, workdir)}
OUTPUTS = {  # what a job leaves in --workdir, for the summary at the end
    "train": "checkpoints/, tensorboard/, config.json, samples.png, eval.json",
    "train_vae": "checkpoints/, tensorboard/, vae/ (the exported AutoencoderKL)",
    "sampler_demo": "samplers.png", "generate": "NNNN.png, samples.npz, generation.json",
    "finetune": "checkpoints/, prior.npz, lora.safetensors / learned_embeds.safetensors / controlnet/ (by method), "
                "finetune.png or control.png, eval.json"}
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class _OwnInfoOnly(logging_lib.Filter):
  """Passes warnings and errors of everyone, and INFO lines only of diffjax's own code."""

  def filter(self, record: logging_lib.LogRecord) -> bool:
    return record.levelno >= logging_lib.WARNING or record.pathname.startswith(PACKAGE_DIR)


def quiet_third_party_logs() -> None:
  """Third-party INFO lines (orbax, tfds, grain, jax ...) are dropped unless ``--verbosity`` is 1 or more."""
  if flags.FLAGS.verbosity < 1:
    for handler in logging_lib.getLogger().handlers:
      handler.addFilter(_OwnInfoOnly())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config.job not in JOBS:
    raise app.UsageError(f"config.job={config.job!r} is not one of {sorted(JOBS)}")
  schema.validate(config)  # every family, before anything is built or written
  quiet_third_party_logs()
  os.makedirs(_WORKDIR.value, exist_ok=True)
  if _MODE.value == "generate" and config.job != "generate":
    raise app.UsageError(f"--mode=generate needs a generation config (configs/generate.py), not job {config.job!r}")
  if _MODE.value == "detect":
    if config.job != "generate":
      raise app.UsageError(f"--mode=detect needs a generation config (configs/generate.py), not job {config.job!r}")
    detection.detect(config, _OUTPUT.value or _WORKDIR.value)
    return
  if _MODE.value == "calibrate" and config.job in ("train", "generate"):
    path = os.path.join(_OUTPUT.value or _WORKDIR.value, "calibration.json")
    if config.job == "train":
      trainer.calibrate_checkpoint(config, _WORKDIR.value, path, _STEP.value)
    else:
      generation.calibrate_pretrained(config, path)
    logging.info("done: %s (sample with --config.sampler.name=fitted --config.sampler.calibration=%s)", path, path)
    return
  if _MODE.value in ("sample", "evaluate", "calibrate") and config.job != "train":
    raise app.UsageError(f"--mode={_MODE.value} needs a diffusion config (job 'train'), not job {config.job!r}")
  if _MODE.value == "evaluate":
    output = _OUTPUT.value or os.path.join(_WORKDIR.value, "evaluation")
    trainer.evaluate_checkpoint(config, _WORKDIR.value, output, _STEP.value)
    logging.info("done: eval.json and the sample grids are in %s", output)
    return
  if _MODE.value == "sample":
    prompts = list(_PROMPTS.value) or list(config.get("prompts", ()))
    output = _OUTPUT.value or os.path.join(_WORKDIR.value, "samples")
    trainer.sample_from_checkpoint(config, _WORKDIR.value, prompts, _NUM_PER_PROMPT.value, output, _SEED.value,
                                   _STEP.value)
    logging.info("done: grid.png, samples.npz and samples.json are in %s", output)
    return
  JOBS[config.job](config, _WORKDIR.value)
  logging.info("done: %s in %s", OUTPUTS[config.job], os.path.abspath(_WORKDIR.value))


def run() -> None:
  try:
    app.run(main, flags_parser=parse_flags)
  except (schema.ConfigError, FileNotFoundError, calibration.CalibrationError) as e:  # one line, no traceback
    if flags.FLAGS.is_parsed() and flags.FLAGS.verbosity >= 1:
      traceback.print_exc()
    fail(f"FATAL {'config error' if isinstance(e, schema.ConfigError) else 'error'}: {e}")


if __name__ == "__main__":
  run()
