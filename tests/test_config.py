"""Bad configs fail before any work with one error that names the field (command line and Python)."""

import os
import subprocess
import sys

import ml_collections
import pytest

from configs import default
from diffjax import main
from diffjax.schema import ConfigError
from diffjax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGV = ["diffjax.main", "--config=configs/default.py:tiny", "--workdir=/tmp/unused"]


@pytest.mark.parametrize("override, message", [
    ("--config.train.nmu_steps=5", "config.train has no field 'nmu_steps' (did you mean config.train.num_steps?)"),
    ("--config.trian.num_steps=5", "config has no field 'trian' (did you mean config.train?)"),
    ("--config.train.num_steps=abc", "--config.train.num_steps=abc: invalid literal for int()"),
    ("--config.optim.learning_rate=fast", "--config.optim.learning_rate=fast"),
])
def test_bad_command_line_override_is_one_error_naming_the_field(override, message, monkeypatch, capsys):
  monkeypatch.setattr(sys, "argv", ARGV + [override])  # ml_collections reads the overrides from sys.argv
  with pytest.raises(SystemExit) as e:
    main.parse_flags(sys.argv)
  line = capsys.readouterr().err.strip()
  assert e.value.code == 2 and line.startswith("FATAL config error: ") and message in line, line


def test_command_line_error_is_one_line_without_traceback(tmp_path):
  out = subprocess.run([sys.executable, "-m", "diffjax.main", "--config=configs/default.py:tiny",
                        f"--workdir={tmp_path}", "--config.train.nmu_steps=5"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 2
  errors = [line for line in out.stderr.splitlines() if "Error" in line or "FATAL" in line]
  assert errors == ["FATAL config error: --config.train.nmu_steps=5: config.train has no field 'nmu_steps' "
                    "(did you mean config.train.num_steps?)"], out.stderr[-3000:]


def test_mesh_and_distributed_fields_are_overridable_from_the_command_line(monkeypatch):
  monkeypatch.setattr(sys, "argv", ARGV + ["--config.mesh.fsdp=2", '--config.mesh.rules=(("mlp", "fsdp"),)',
                                           "--config.distributed.num_processes=2", "--config.distributed.process_id=1",
                                           "--config.distributed.coordinator_address=127.0.0.1:1234"])
  main.parse_flags(sys.argv)
  config = main._CONFIG.value
  assert config.mesh.fsdp == 2 and tuple(map(tuple, config.mesh.rules)) == (("mlp", "fsdp"),)
  assert (config.distributed.num_processes, config.distributed.process_id) == (2, 1)
  trainer.validate(config)


def _set(config, field, value):
  section, key = field.split(".")
  config[section][key] = value


@pytest.mark.parametrize("field, value, message", [
    ("optim.grad_accum_steps", 0, r"config.optim.grad_accum_steps = 0 is invalid: expected an int >= 1"),
    ("train.num_steps", 0, "config.train.num_steps"),
    ("mesh.fsdp", 0, "config.mesh.fsdp"),
    ("mesh.data", 0, "config.mesh.data"),
    ("mesh.rules", (("embed", "tensor"),), r"config.mesh.rules .* names \['tensor'\]"),
    ("mesh.rules", (("hidden", "fsdp"),), r"config.mesh.rules .* names 'hidden'"),
    ("distributed.process_id", 1, r"config.distributed.process_id = 1 is invalid: expected 0 <= process_id < "),
    ("train.compute_dtype", "float8", "config.train.compute_dtype"),
])
def test_impossible_setting_names_the_field(field, value, message):
  config = default.get_config("tiny")
  _set(config, field, value)
  with pytest.raises(ConfigError, match=message):
    trainer.validate(config)


def test_distributed_needs_a_coordinator():
  config = default.get_config("tiny")
  config.distributed.num_processes = 2
  with pytest.raises(ConfigError, match="config.distributed.coordinator_address"):
    trainer.validate(config)


@pytest.mark.parametrize("mesh, batch, message", [
    ((3, 2), 12, "config.mesh.data = 3 is invalid: expected data x fsdp = 8"),
    ((-1, 3), 24, "config.mesh.fsdp = 3 is invalid: expected a divisor of the 8 devices"),
    ((-1, 16), 16, "config.mesh.fsdp = 16 is invalid"),
    ((-1, 2), 12, "config.data.batch_size = 12 is invalid: expected a multiple of the data-parallel size"),
])
def test_mesh_or_batch_that_does_not_fit_the_devices_names_the_field(mesh, batch, message):
  config = default.get_config("tiny")
  (config.mesh.data, config.mesh.fsdp), config.data.batch_size = mesh, batch
  with pytest.raises(ConfigError, match=message):
    trainer.validate_topology(config, num_devices=8, num_processes=2)


def test_meshes_that_fit_the_devices_pass():
  config = default.get_config("tiny")
  for data, fsdp in [(-1, 1), (-1, 8), (2, 4), (8, 1)]:
    config.mesh.data, config.mesh.fsdp = data, fsdp
    trainer.validate_topology(config, num_devices=8, num_processes=2)


def test_typo_in_a_config_built_in_python_names_the_field():
  config = default.get_config("tiny")
  config.train.nmu_steps = 5  # an unlocked ConfigDict accepts a new key; the trainer would ignore it
  with pytest.raises(ConfigError, match=r"config.train.nmu_steps is not a known field \(did you mean 'num_steps'\?\)"):
    trainer.validate(config)
  config = default.get_config("tiny")
  config.optimizer = {"learning_rate": 1.0}
  with pytest.raises(ConfigError, match=r"config.optimizer is not a known field \(did you mean 'optim'\?\)"):
    trainer.validate(config)


def test_missing_and_mistyped_fields_of_a_dict_built_config():
  base = default.get_config("tiny").to_dict()
  missing = {**base, "train": {k: v for k, v in base["train"].items() if k != "num_steps"}}
  with pytest.raises(ConfigError, match="config.train.num_steps is missing"):
    trainer.validate(ml_collections.ConfigDict(missing))
  mistyped = {**base, "train": {**base["train"], "num_steps": "100"}}
  with pytest.raises(ConfigError, match="config.train.num_steps = '100' has type str, expected int"):
    trainer.validate(ml_collections.ConfigDict(mistyped))
  boolean = {**base, "data": {**base["data"], "batch_size": True}}
  with pytest.raises(ConfigError, match="config.data.batch_size = True has type bool"):
    trainer.validate(ml_collections.ConfigDict(boolean))
  no_section = {k: v for k, v in base.items() if k != "sampler"}
  with pytest.raises(ConfigError, match="config.sampler is missing"):
    trainer.validate(ml_collections.ConfigDict(no_section))
  trainer.validate(ml_collections.ConfigDict(base))
