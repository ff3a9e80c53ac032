"""Every config file passes its family's declaration, and every bad single override is one error naming its field.

The bad overrides come from two sources: generated from each declared field (a value of the
wrong type, each bound crossed, non-finite floats, an unknown choice, a sequence element out
of range), applied to every config file of the family; and written out by hand for the
cross-field rules and the cases a new user hit (learning rate -1 or nan, EMA decay 2,
guidance scale inf, norm groups that do not divide the channels, 0 heads, an unknown data
set, solver options the solver does not take). Validation only: nothing is built or trained.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Mapping

import ml_collections
import pytest

from configs import default, generate, sampler_demo, shapes_ldm, shapes_mmdit, shapes_vae
from diffjax import schema
from diffjax.schema import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {  # every config file and variant of the repository, by family
    "train": [default.get_config(), default.get_config("tiny"), shapes_ldm.get_config(), shapes_ldm.get_config("tiny"),
              shapes_mmdit.get_config(), shapes_mmdit.get_config("tiny")],
    "train_vae": [shapes_vae.get_config(), shapes_vae.get_config("tiny")],
    "generate": [generate.get_config(), generate.get_config("tiny")],
    "sampler_demo": [sampler_demo.get_config(), sampler_demo.get_config("tiny")],
}


def _with(config, field: str, value):
  """A copy of ``config`` with ``field`` (dotted) set to ``value``, whatever its type (as a Python-built config)."""
  d = config.to_dict()
  node, keys = d, field.split(".")
  for k in keys[:-1]:
    node = node[k]
  node[keys[-1]] = value
  return ml_collections.ConfigDict(d)


def _bad_values(spec: schema.Field) -> list:
  """Values ``spec`` must refuse: the wrong type, each bound crossed, non-finite, unknown choices, bad elements."""
  bad = []
  if str in spec.types:
    bad.append(3)
  elif Mapping in spec.types:
    bad.append("x")
  else:
    bad.append("not a number")
  if spec.choices is not None:
    bad.append("no_such_choice")
  numeric = float in spec.types or int in spec.types
  if numeric:
    if int in spec.types and float not in spec.types:
      bad.append(True)  # a bool is not a count
    if float in spec.types:
      bad += [math.nan, math.inf, -math.inf]
    if spec.lo is not None:
      below = spec.lo if spec.lo_open else spec.lo - 1
      if below not in spec.special:
        bad.append(type(spec.lo)(below) if float not in spec.types else float(below))
    if spec.hi is not None:
      bad.append(spec.hi if spec.hi_open else spec.hi + 1)
  if spec.each is not None:
    if spec.each.lo is not None:
      bad.append((spec.each.lo - 1,))
    if bool in spec.each.types:
      bad.append((1,))
    if spec.min_len:
      bad.append(())
  return bad


def _fields(spec: dict, prefix: str = ""):
  for key, f in spec.items():
    if key == "optional":
      continue
    if isinstance(f, dict):
      yield from _fields(f, prefix + key + ".")
    else:
      yield prefix + key, f


def _generated():
  cases = []
  for family, (fields, _) in schema.FAMILIES.items():
    for field, spec in _fields(fields):
      if field == "job":
        continue
      for value in _bad_values(spec):
        cases.append((family, field, value))
  return cases


GENERATED = _generated()
HAND_WRITTEN = [  # (family, field, value, the field the message must name)
    ("train", "optim.learning_rate", -1.0, "optim.learning_rate"),
    ("train", "optim.learning_rate", math.nan, "optim.learning_rate"),
    ("train", "train.ema_decay", 2.0, "train.ema_decay"),
    ("train", "sampler.guidance_scale", math.inf, "sampler.guidance_scale"),
    ("train", "data.image_size", 0, "data.image_size"),
    ("train", "data.image_size", 7, "data.image_size"),  # not a multiple of 2**(levels - 1)
    ("train", "model.norm_groups", 7, "model.norm_groups"),
    ("train", "model.num_heads", 0, "model.num_heads"),
    ("train", "model.num_heads", 5, "model.num_heads"),  # does not divide the attending channels
    ("train", "model.text_heads", 3, "model.text_heads"),
    ("train", "data.max_caption_length", 0, "data.max_caption_length"),
    ("train", "data.name", "nosuchdataset", "data.name"),
    ("train", "sampler.options", {"order": 9}, "sampler.options"),
    ("train", "sampler.name", "nosuchsolver", "sampler.name"),
    ("train", "optim.warmup_steps", 10**6, "optim.warmup_steps"),
    ("train", "model.attention_levels", (True,), "model.attention_levels"),
    ("train", "diffusion.process_options", {"nosuch": 1}, "diffusion.process_options"),
    ("train", "mesh.rules", (("embed", "tensor"),), "mesh.rules"),
    ("train", "train.cond_dropout", 1.0, "train.cond_dropout"),
    ("train", "optim.b2", 1.0, "optim.b2"),
    ("train_vae", "vae.norm_groups", 5, "vae.norm_groups"),
    ("train_vae", "data.image_size", 30, "data.image_size"),
    ("train_vae", "vae.reconstruction", "l3", "vae.reconstruction"),
    ("train_vae", "optim.learning_rate", 0.0, "optim.learning_rate"),
    ("generate", "sampler.name", "nosuchsolver", "sampler.name"),
    ("generate", "sampler.options", {"eta": 0.5}, "sampler.options"),  # with sampler.name "" set below
    ("generate", "strength", 1.5, "strength"),
    ("generate", "seed", -1, "seed"),
    ("generate", "repaint.jump_length", 3, "repaint"),
    ("generate", "task", "outpaint", "task"),
    ("generate", "mask_image", "", "mask_image"),  # with task inpaint, set below
    ("sampler_demo", "samplers", "euler,nosuch", "samplers"),
    ("sampler_demo", "nfe", 0, "nfe"),
]
UNET_ONLY = {("train", "data.image_size")}  # the U-Net's halvings refuse it; an MMDiT's patches of 1 take it
SETUP = {("generate", "sampler.options"): {"sampler.name": "dpmpp_2m"},
         ("generate", "mask_image"): {"task": "inpaint", "init_image": "x.png"}}


def test_every_config_file_passes():
  for family, configs in CONFIGS.items():
    for config in configs:
      schema.validate(config)
      assert config.job == family


def test_at_least_100_generated_cases():
  assert len(GENERATED) + len(HAND_WRITTEN) * sum(map(len, CONFIGS.values())) >= 100
  assert len(GENERATED) >= 100, len(GENERATED)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_generated_bad_overrides_name_the_field(family):
  """Each generated bad value, on every config of its family: one ConfigError naming the field."""
  checked = 0
  for fam, field, value in GENERATED:
    if fam != family:
      continue
    for config in CONFIGS[family]:
      try:
        node = config
        for k in field.split("."):
          node = node[k]
      except KeyError:  # an optional field this config does not set
        continue
      with pytest.raises(ConfigError) as e:
        schema.validate(_with(config, field, value))
      message = str(e.value)
      assert message.startswith(f"config.{field} ") and "\n" not in message, (field, value, message)
      checked += 1
  assert checked >= 10


@pytest.mark.parametrize("family,field,value,named", HAND_WRITTEN)
def test_hand_written_bad_overrides_name_the_field(family, field, value, named):
  for config in CONFIGS[family]:
    if (family, field) in UNET_ONLY and config.model.get("backbone") == "mmdit":
      continue
    for other, v in SETUP.get((family, field), {}).items():
      config = _with(config, other, v)
    with pytest.raises(ConfigError, match=rf"^config\.{named.replace('.', r'[.]')} "):
      schema.validate(_with(config, field, value))


@pytest.mark.parametrize("config,field,value,message", [
    (shapes_ldm.get_config(), "model.width", 64,
     "config.model.width = 64 is invalid: expected no value: it belongs to model.backbone = 'mmdit'"),
    (shapes_mmdit.get_config(), "model.channels", (32, 64),
     "config.model.channels = (32, 64) is invalid: expected no value: it belongs to model.backbone = 'unet'"),
    (shapes_mmdit.get_config(), "model.backbone", "unet",
     "config.model.channels is missing: expected a value: model.backbone = 'unet' needs it"),
    (shapes_mmdit.get_config(), "model.patch_size", 3, "config.model.patch_size = 3 is invalid: expected a divisor "
     "of data.image_size=32"),
    (shapes_mmdit.get_config(), "model.num_heads", 5, "config.model.num_heads = 5 is invalid: expected a divisor of "
     "model.width=128"),
])
def test_backbone_fields(config, field, value, message):
  """Each backbone's fields are required with it and refused with the other, by name."""
  with pytest.raises(ConfigError) as e:
    schema.validate(_with(config, field, value))
  assert str(e.value) == message


@pytest.mark.parametrize("config,changes,message", [
    (shapes_ldm.get_config(), {"repa": {"weight": 0.5, "layer": 1, "projector_width": 8}, "vae.workdir": "v"},
     "config.repa.weight = 0.5 is invalid: expected 0 with model.backbone = 'unet' (representation alignment reads "
     "a transformer's image tokens)"),
    (shapes_mmdit.get_config(), {"repa.weight": 0.5},
     "config.repa.weight = 0.5 is invalid: expected 0 without a latent model's VAE (vae.workdir): its encoder gives "
     "the target features"),
    (shapes_mmdit.get_config(), {"repa.weight": 0.5, "vae.workdir": "v"},
     "config.data.cache_latents = True is invalid: expected False with repa.weight > 0 (the targets are the VAE "
     "encoder's features of each batch's images)"),
    (shapes_mmdit.get_config(), {"repa.weight": 0.5, "vae.workdir": "v", "data.cache_latents": False,
                                 "repa.layer": 5},
     "config.repa.layer = 5 is invalid: expected a block of the transformer: 1 <= layer <= model.depth=4"),
])
def test_representation_alignment_fields(config, changes, message):
  for field, value in changes.items():
    config = _with(config, field, value)
  with pytest.raises(ConfigError) as e:
    schema.validate(config)
  assert str(e.value) == message
  config = _with(config, "repa.weight", 0.0)  # off: nothing else is checked
  if config.model.get("backbone") == "mmdit":
    schema.validate(config)


def test_a_missing_backbone_field_is_named():
  config = shapes_mmdit.get_config()
  del config.model["depth"]
  with pytest.raises(ConfigError, match=r"^config\.model\.depth is missing: expected a value: model.backbone = "):
    schema.validate(config)


@pytest.mark.parametrize("override,named", [("--config.optim.learning_rate=-1", "optim.learning_rate")])
def test_command_line_is_one_line_and_exit_status_2(tmp_path, override, named):
  out = subprocess.run([sys.executable, "-m", "diffjax.main", "--config=configs/default.py:tiny",
                        f"--workdir={tmp_path}", override], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith(f"FATAL config error: config.{named} = ") and "Traceback" not in out.stderr, out.stderr


def test_sample_without_a_checkpoint_is_one_line(tmp_path):
  out = subprocess.run([sys.executable, "-m", "diffjax.main", "--config=configs/default.py:tiny",
                        f"--workdir={tmp_path}", "--mode=sample"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert out.stderr.strip().splitlines()[-1] == f"FATAL error: no checkpoint under {tmp_path}/checkpoints: train first"
