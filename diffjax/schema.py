"""Every field of every config family, declared once, and the check every job runs before it builds anything.

A family is the ``config.job`` a config file sets (``train``, ``train_vae``, ``generate``,
``sampler_demo``). ``FAMILIES[job]`` declares each field (``Field``: type, range, choices,
what every element of a sequence must be) and the rules that relate fields (``Rule``:
channels vs groups vs heads, warm-up vs steps, the sampler's options against its factory,
the data set against the registered builders). ``validate(config)`` checks a config against
its family and raises one ``ConfigError`` naming the field, the value and what is expected:

  config.optim.learning_rate = -1.0 is invalid: expected a finite float > 0

Floats must be finite wherever they are declared (``nan`` and ``inf`` are refused), a
decay or probability lies in its interval, counts are ints (``True`` is not a step count).
A job's own checks of files (does the pretrained folder exist) follow this one.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any


class ConfigError(ValueError):
  """An invalid config: the message names the field (``config.section.key``) and what is expected."""


def load_config_file(spec: str):
  """The config of a config file named as ``--config`` names it, ``path[:arg]``: its ``get_config(arg)``."""
  file, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_config_file", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


# ----------------------------------------------------------------------------------
# Fields.
# ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Field:
  """One config field: its type(s) and the values it may take.

  Attributes:
    types: accepted Python types (``Mapping`` for a dict-valued field; bool is never an int).
    lo, hi: bounds of a number (closed, unless ``lo_open`` / ``hi_open``); floats must be finite.
    choices: allowed values, or a function returning them (evaluated when checked).
    each: the ``Field`` every element of a sequence must satisfy; ``min_len``: its least length.
    special: values accepted besides the range (e.g. -1 for "all devices"), with ``special_means``.
    optional: the field may be absent (the job has a default).
    note: said after what is expected (e.g. what 0 means).
  """

  types: tuple
  lo: float | None = None
  hi: float | None = None
  lo_open: bool = False
  hi_open: bool = False
  choices: Iterable | Callable[[], Iterable] | None = None
  each: Field | None = None
  min_len: int = 0
  special: tuple = ()
  special_means: str = ""
  optional: bool = False
  note: str = ""

  def expected(self) -> str:
    """What a valid value is, in words."""
    if self.choices is not None:
      return f"one of {sorted(self._choices(), key=str)}"
    if float in self.types:
      parts = ["a finite float"]
    elif self.types == (int,):
      parts = ["an int"]
    else:
      parts = [" or ".join("dict" if t is Mapping else t.__name__ for t in self.types)]
    if self.lo is not None and self.hi is not None:
      parts.append(f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}")
    elif self.lo is not None:
      parts.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
    elif self.hi is not None:
      parts.append(f"{'<' if self.hi_open else '<='} {self.hi:g}")
    if self.each is not None:
      parts.append(f"of {self.each.expected()}" + (f", at least {self.min_len}" if self.min_len else ""))
    special = f", or {' / '.join(map(str, self.special))} ({self.special_means})" if self.special else ""
    return " ".join(parts) + special + (f" ({self.note})" if self.note else "")

  def _choices(self) -> list:
    return list(self.choices() if callable(self.choices) else self.choices)

  def type_ok(self, value) -> bool:
    if isinstance(value, bool) and bool not in self.types:
      return False
    if Mapping in self.types and hasattr(value, "keys") and hasattr(value, "items"):
      return True
    return isinstance(value, tuple(t for t in self.types if t is not Mapping))

  def value_ok(self, value) -> bool:
    if self.special and isinstance(value, int | float | str) and value in self.special:
      return True
    if self.choices is not None and value not in self._choices():
      return False
    if isinstance(value, float) and not math.isfinite(value):
      return False
    if isinstance(value, int | float) and not isinstance(value, bool):
      if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
        return False
      if self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi)):
        return False
    if self.each is not None:
      items = list(value)
      if len(items) < self.min_len:
        return False
      return all(self.each.type_ok(v) and self.each.value_ok(v) for v in items)
    return True


_NUMBER = (float, int)


def integer(lo=None, hi=None, **kw) -> Field:
  return Field((int,), lo=lo, hi=hi, **kw)


def real(lo=None, hi=None, **kw) -> Field:
  return Field(_NUMBER, lo=lo, hi=hi, **kw)


def text(choices=None, **kw) -> Field:
  return Field((str,), choices=choices, **kw)


def sequence(each: Field | None = None, min_len: int = 0, **kw) -> Field:
  return Field((tuple, list), each=each, min_len=min_len, **kw)


FLAG = Field((bool,))
MAPPING = Field((Mapping,))
FITTED = "fitted"  # sampler.name of a calibrated sampler (diffjax.samplers.calibration.FITTED)
COUNT = integer(1)  # a positive count: steps, sizes, batch
NONNEG = integer(0)
PROBABILITY = real(0.0, 1.0, hi_open=True)  # dropout, decays: [0, 1)
POSITIVE = real(0.0, lo_open=True)


@dataclasses.dataclass(frozen=True)
class Rule:
  """A relation between fields: ``ok(config)``; else ``field`` is named with ``expected(config)``.

  ``when(config)``: the rule applies only then (default always).
  """

  field: str
  ok: Callable[[Any], bool]
  expected: Callable[[Any], str]
  when: Callable[[Any], bool] = lambda c: True


# ----------------------------------------------------------------------------------
# Choices from the registries (imported when checked: the schema stays cheap to import).
# ----------------------------------------------------------------------------------
def _watermarks():
  from diffjax import watermark

  return watermark.KINDS


def _solvers():
  from diffjax.samplers import SOLVERS
  return SOLVERS


def _train_samplers():
  """The solvers, and 'fitted' (a calibrated sampler, ``sampler.calibration``)."""
  return list(_solvers()) + [FITTED]


def _grids():
  from diffjax.samplers import grids
  return grids.GRIDS


def _processes():
  from diffjax import processes
  return list(processes.PROCESSES) + ["sd"] + [f"discrete_{s}" for s in processes.BETA_SCHEDULES]


def _attention_implementations():
  from diffjax.models import attention
  return list(attention.IMPLEMENTATIONS)


def _targets():
  from diffjax import parameterization
  return parameterization.TARGETS


def _weightings():
  from diffjax import losses
  return losses.WEIGHTINGS


def _time_samplers():
  from diffjax import losses
  return losses.TIME_SAMPLERS


TEXT_MODES = ("joint", "frozen_pretrained")  # how the text encoder trains with the U-Net (train/latent.py)


def _text_modes():
  return TEXT_MODES


def dataset_known(name: str) -> bool:
  """An embedded data set, or a builder registered with tensorflow-datasets (``name[:version]`` / ``name/config``)."""
  from diffjax.data.pipeline import EMBEDDED
  if name in EMBEDDED:
    return True
  import tensorflow_datasets as tfds  # heavy: only for a name that is not embedded
  return name.split("/")[0].split(":")[0] in tfds.list_builders()


def _grid_problem(c) -> str | None:
  """Why ``sampler.grid`` cannot serve ``diffusion.process`` (a log-SNR grid from pure noise), or None."""
  from diffjax import processes
  if _process_problem(c) or c.sampler.grid not in _grids():
    return None  # reported by their own rules
  try:
    _grids()[c.sampler.grid](processes.make_process(c.diffusion.process, **c.diffusion.get("process_options", {})), 2)
  except ValueError as e:
    return f"a grid this process can start on: {e}"
  return None


def _start_problem(c) -> str | None:
  """Why ``sampler.name`` cannot start where ``diffusion.process`` is pure noise (``samplers.start_problem``)."""
  from diffjax import processes, samplers
  # (its rule follows those of diffusion.process_options and sampler.grid, and check_rules stops at the first that
  # fails: the process and the grid are valid here)
  process = processes.make_process(c.diffusion.process, **c.diffusion.get("process_options", {}))
  return samplers.start_problem(c.sampler.name, process, _grids()[c.sampler.grid](process, 2)[0])


def solver_options_problem(name: str, options: Mapping, process_name: str = "sd") -> str | None:
  """Why ``options`` cannot configure solver ``name`` (unknown keywords, or its factory refuses them), or None."""
  from diffjax import processes
  solvers = _solvers()
  if name not in solvers:
    return None  # the name's own check reports it
  params = list(inspect.signature(solvers[name]).parameters)[1:]  # after the process
  unknown = sorted(set(options) - set(params))
  if unknown:
    return f"{unknown} are not options of sampler {name!r} (it takes {params})"
  try:
    solvers[name](processes.make_process(process_name), **dict(options))
  except (ValueError, TypeError) as e:
    return f"sampler {name!r} refuses them: {e}"
  return None


# ----------------------------------------------------------------------------------
# The families.
# ----------------------------------------------------------------------------------
DTYPES = ("float32", "bfloat16", "float16")
SPLIT = text()
OPTIM = dict(learning_rate=POSITIVE, warmup_steps=NONNEG, final_lr_fraction=real(0.0, 1.0), grad_clip=POSITIVE,
             b1=PROBABILITY, b2=PROBABILITY, weight_decay=real(0.0), grad_accum_steps=COUNT)
MESH = dict(data=integer(1, special=(-1,), special_means="what fsdp leaves"), fsdp=COUNT)
CHANNELS = sequence(COUNT, min_len=1)


def _levels(channels) -> int:
  return 2 ** (len(channels) - 1)


def _mesh_rules_problem(config):
  from diffjax.train import sharding
  return sharding.check_rules(config.mesh.get("rules", sharding.DEFAULT_RULES), sharding.MESH_AXES)


def _process_problem(config) -> str | None:
  from diffjax import processes
  try:
    processes.make_process(config.diffusion.process, **config.diffusion.get("process_options", {}))
  except (ValueError, TypeError, KeyError) as e:
    return str(e)
  return None


def _attention_channels(m) -> list[int]:
  """Channels of the U-Net levels (and mid block) that attend."""
  levels = [ch for ch, a in zip(m.channels, m.attention_levels, strict=False) if a]
  return levels + ([m.channels[-1]] if m.mid_block_attention else [])


def _divides(k: int, values) -> bool:
  return k > 0 and all(v % k == 0 for v in values)


# --mode=calibrate (samplers.calibration): budgets (evaluations), noise batches, reference lattice and tolerance
CALIBRATION = dict(budgets=sequence(integer(2), min_len=1), batch=COUNT, validation_batch=COUNT, lattice=integer(2),
                   tol=POSITIVE, chunk=COUNT, seed=NONNEG, prompts=sequence(text(), optional=True),
                   restarts=integer(1, optional=True), refine=integer(0, optional=True),
                   minutes=real(0.0, optional=True), optional=True)
FITTED_RULES = (
    Rule("sampler.calibration", lambda c: bool(c.sampler.get("calibration")),
         lambda c: "a calibration file (--mode=calibrate writes it: calibration.json) for sampler.name='fitted'",
         when=lambda c: c.sampler.name == FITTED),
    Rule("sampler.options", lambda c: not c.sampler.get("options"),
         lambda c: "empty for sampler.name='fitted' (its coefficients come from the calibration)",
         when=lambda c: c.sampler.name == FITTED),
    Rule("calibration.budgets", lambda c: max(c.calibration.budgets) <= c.calibration.lattice,
         lambda c: f"evaluation counts <= calibration.lattice={c.calibration.lattice}",
         when=lambda c: c.get("calibration") is not None),
)
# The denoiser of the train family (``trainer.build_model``): a U-Net, or SD3's MMDiT on patches. Each backbone's own
# fields are required with it and refused with the other (``BACKBONE_RULES``); num_heads serves both.
BACKBONES = ("unet", "mmdit")
UNET_FIELDS = dict(channels=CHANNELS, layers_per_block=COUNT, attention_levels=sequence(FLAG, min_len=1),
                   norm_groups=COUNT, dropout=PROBABILITY, mid_block_attention=FLAG)
MMDIT_FIELDS = dict(width=COUNT, depth=COUNT, patch_size=COUNT, qk_norm=FLAG)


def _backbone(c) -> str:
  return c.model.get("backbone", "unet")


def _backbone_rules() -> tuple[Rule, ...]:
  rules = []
  for backbone, fields in (("unet", UNET_FIELDS), ("mmdit", MMDIT_FIELDS)):
    other = "mmdit" if backbone == "unet" else "unet"
    for name in fields:
      rules.append(Rule(f"model.{name}", lambda c, n=name: n in c.model,
                        lambda c, b=backbone: f"a value: model.backbone = {b!r} needs it",
                        when=lambda c, b=backbone: _backbone(c) == b))
      rules.append(Rule(f"model.{name}", lambda c, n=name: n not in c.model,
                        lambda c, b=backbone: f"no value: it belongs to model.backbone = {b!r}",
                        when=lambda c, o=other: _backbone(c) == o))
  return tuple(rules)


BACKBONE_RULES = _backbone_rules()


def _unet(c) -> bool:
  return _backbone(c) == "unet"


TRAIN = dict(
    job=text(("train",)), seed=NONNEG,
    data=dict(name=text(), data_dir=text(), train_split=SPLIT, batch_size=COUNT, image_size=COUNT, channels=COUNT,
              max_shift=NONNEG, max_caption_length=integer(2), cache_latents=Field((bool,), optional=True)),
    model=dict(backbone=text(BACKBONES, optional=True, note="default 'unet'"),
               **{k: dataclasses.replace(f, optional=True) for k, f in UNET_FIELDS.items()},
               **{k: dataclasses.replace(f, optional=True) for k, f in MMDIT_FIELDS.items()},
               num_heads=COUNT, text_width=COUNT, text_layers=COUNT, text_heads=COUNT, remat=FLAG,
               attention=text(_attention_implementations, optional=True)),
    diffusion=dict(process=text(_processes), process_options=Field((Mapping,), optional=True), target=text(_targets),
                   weighting=text(_weightings), weighting_options=Field((Mapping,), optional=True),
                   time_sampler=text(_time_samplers), time_sampler_options=Field((Mapping,), optional=True),
                   time_scale=POSITIVE),
    optim=OPTIM,
    train=dict(num_steps=COUNT, cond_dropout=PROBABILITY, ema_decay=PROBABILITY, compute_dtype=text(DTYPES),
               log_every=COUNT, checkpoint_every=COUNT, keep_checkpoints=COUNT,
               profile_steps=integer(0, optional=True)),
    sampler=dict(name=text(_train_samplers), options=Field((Mapping,), optional=True), grid=text(_grids), nfe=COUNT,
                 guidance_scale=real(0.0), calibration=text(optional=True)),
    calibration=CALIBRATION,
    mesh=MESH | dict(rules=Field((tuple, list), optional=True)),
    eval=dict(samples_per_prompt=NONNEG, digits_per_prompt=integer(0, optional=True),
              sanity_repeats=integer(1, optional=True),
              shapes_prompts=integer(0, optional=True), shapes_samples_per_prompt=integer(0, optional=True),
              shapes_splits=sequence(text(), optional=True)),
    vae=dict(workdir=text(), optional=True),
    text=dict(mode=text(_text_modes), path=text(), optional=True),
    distributed=dict(coordinator_address=text(), num_processes=COUNT, process_id=NONNEG, optional=True),
    prompts=sequence(text(), optional=True),
    watermark=text(_watermarks, optional=True), watermark_seed=integer(0, 2**32 - 1, optional=True),
    watermark_radius=real(0.0, optional=True, note="0: 10/64 of the latent's side"),
    repa=dict(weight=real(0.0, note="0: off"), layer=COUNT, projector_width=COUNT, optional=True),
)


def _repa_on(c) -> bool:
  return c.get("repa") is not None and c.repa.weight > 0


REPA_RULES = (  # train/repa.py: an MMDiT's image tokens aligned with the frozen VAE encoder's features of the batch
    Rule("repa.weight", lambda c: not _unet(c),
         lambda c: "0 with model.backbone = 'unet' (representation alignment reads a transformer's image tokens)",
         when=_repa_on),
    Rule("repa.weight", lambda c: c.get("vae") is not None and bool(c.vae.workdir),
         lambda c: "0 without a latent model's VAE (vae.workdir): its encoder gives the target features",
         when=_repa_on),
    Rule("data.cache_latents", lambda c: not c.data.get("cache_latents"),
         lambda c: "False with repa.weight > 0 (the targets are the VAE encoder's features of each batch's images)",
         when=_repa_on),
    Rule("repa.layer", lambda c: c.repa.layer <= c.model.depth,
         lambda c: f"a block of the transformer: 1 <= layer <= model.depth={c.model.depth}",
         when=lambda c: _repa_on(c) and not _unet(c)),
)
TRAIN_RULES = (
    Rule("optim.warmup_steps", lambda c: c.optim.warmup_steps < c.train.num_steps,
         lambda c: f"0 <= warmup_steps < train.num_steps={c.train.num_steps}"),
    *BACKBONE_RULES,
    *REPA_RULES,
    Rule("model.attention_levels", lambda c: len(c.model.attention_levels) == len(c.model.channels),
         lambda c: f"one entry per level of model.channels ({len(c.model.channels)})", when=_unet),
    Rule("data.image_size", lambda c: c.data.image_size % _levels(c.model.channels) == 0,
         lambda c: f"a multiple of 2**(levels - 1) = {_levels(c.model.channels)}", when=_unet),
    Rule("model.norm_groups", lambda c: _divides(c.model.norm_groups, c.model.channels),
         lambda c: f"a divisor of every entry of model.channels {tuple(c.model.channels)}", when=_unet),
    Rule("model.num_heads", lambda c: _divides(c.model.num_heads, _attention_channels(c.model)),
         lambda c: f"a divisor of the channels of every attention level {_attention_channels(c.model)}",
         when=_unet),
    Rule("model.num_heads", lambda c: c.model.width % c.model.num_heads == 0,
         lambda c: f"a divisor of model.width={c.model.width}", when=lambda c: not _unet(c)),
    Rule("model.patch_size", lambda c: c.data.image_size % c.model.patch_size == 0,  # latents: latent.build too
         lambda c: f"a divisor of data.image_size={c.data.image_size}", when=lambda c: not _unet(c)),
    Rule("model.text_heads", lambda c: c.model.text_width % c.model.text_heads == 0,
         lambda c: f"a divisor of model.text_width={c.model.text_width}",
         when=lambda c: c.get("text") is None or c.text.mode != "frozen_pretrained"),
    Rule("data.name", lambda c: dataset_known(c.data.name),
         lambda c: "an embedded data set (digits_captions, shapes_captions) or a tensorflow-datasets builder"),
    Rule("sampler.options", lambda c: solver_options_problem(c.sampler.name, c.sampler.get("options", {}),
                                                             c.diffusion.process) is None,
         lambda c: solver_options_problem(c.sampler.name, c.sampler.get("options", {}), c.diffusion.process)),
    *FITTED_RULES,
    Rule("diffusion.process_options", lambda c: _process_problem(c) is None, _process_problem),
    Rule("sampler.grid", lambda c: _grid_problem(c) is None, _grid_problem),
    Rule("sampler.name", lambda c: _start_problem(c) is None, _start_problem),
    Rule("mesh.rules", lambda c: _mesh_rules_problem(c) is None, _mesh_rules_problem),
    Rule("distributed.process_id", lambda c: c.distributed.process_id < c.distributed.num_processes,
         lambda c: f"0 <= process_id < distributed.num_processes={c.distributed.num_processes}",
         when=lambda c: c.get("distributed") is not None),
    Rule("distributed.coordinator_address", lambda c: ":" in c.distributed.coordinator_address,
         lambda c: "host:port of process 0 when num_processes > 1",
         when=lambda c: c.get("distributed") is not None and c.distributed.num_processes > 1),
)

TRAIN_VAE = dict(
    job=text(("train_vae",)), seed=NONNEG,
    data=dict(name=text(), data_dir=text(), train_split=SPLIT, eval_split=SPLIT, batch_size=COUNT, image_size=COUNT,
              channels=COUNT, max_shift=NONNEG, max_caption_length=COUNT),
    vae=dict(channels=CHANNELS, layers_per_block=COUNT, latent_channels=COUNT, norm_groups=COUNT,
             mid_block_attention=FLAG, reconstruction=text(("l1", "l2")), kl_weight=real(0.0), disc_weight=real(0.0),
             disc_start=NONNEG, disc_channels=COUNT, disc_layers=COUNT),
    optim=OPTIM,
    train=dict(num_steps=COUNT, ema_decay=PROBABILITY, log_every=COUNT, checkpoint_every=COUNT, keep_checkpoints=COUNT),
    mesh=MESH,
    eval=dict(num_images=COUNT, scale_images=COUNT, grid_images=NONNEG),
)
TRAIN_VAE_RULES = (
    Rule("optim.warmup_steps", lambda c: c.optim.warmup_steps < c.train.num_steps,
         lambda c: f"0 <= warmup_steps < train.num_steps={c.train.num_steps}"),
    Rule("data.image_size", lambda c: c.data.image_size % _levels(c.vae.channels) == 0,
         lambda c: f"a multiple of the downsampling factor 2**(levels - 1) = {_levels(c.vae.channels)}"),
    Rule("vae.norm_groups", lambda c: _divides(c.vae.norm_groups, c.vae.channels),
         lambda c: f"a divisor of every entry of vae.channels {tuple(c.vae.channels)}"),
    Rule("data.name", lambda c: dataset_known(c.data.name),
         lambda c: "an embedded data set (digits_captions, shapes_captions) or a tensorflow-datasets builder"),
)

GENERATE = dict(
    job=text(("generate",)), pretrained=text(), tokenizer=text(), prediction_type=text(
        ("", "epsilon", "v_prediction", "sample")), lora=sequence(text(), optional=True),
    task=text(("txt2img", "img2img", "inpaint", "upscale")),
    prompts=sequence(text(), min_len=1), negative_prompt=text(), num_per_prompt=COUNT, height=NONNEG, width=NONNEG,
    init_image=text(), mask_image=text(), strength=real(0.0, 1.0, note="0: the task's default"),
    repaint=dict(jump_length=NONNEG, jump_n_sample=NONNEG), noise_level=NONNEG,
    seed=integer(0, 2**32 - 1), batch_size=COUNT, dtype=text(DTYPES), compilation_cache=text(),
    sampler=dict(name=text(), grid=text(_grids), steps=COUNT, options=Field((Mapping,), optional=True),
                 guidance_scale=real(0.0), guidance_rescale=real(0.0, 1.0), calibration=text(optional=True)),
    calibration=CALIBRATION,
    watermark=text(_watermarks), watermark_seed=integer(0, 2**32 - 1),
    watermark_radius=real(0.0, note="0: 10/64 of the latent's side"),
    detect=dict(images=text(), alpha=real(0.0, 1.0, lo_open=True, hi_open=True),
                decoder_steps=integer(0, optional=True)),
    controlnet=sequence(text(), optional=True), control_image=sequence(text(), optional=True),
    controlnet_scale=sequence(real(), min_len=1, optional=True),
    control_start=sequence(real(0.0, 1.0), min_len=1, optional=True),
    control_end=sequence(real(0.0, 1.0), min_len=1, optional=True), guess_mode=Field((bool,), optional=True),
)
CONTROL_DEFAULTS = dict(controlnet=(), control_image=(), controlnet_scale=(1.0,), control_start=(0.0,),
                        control_end=(1.0,), guess_mode=False)  # what an absent ControlNet field means


def control_field(c, field: str):
  """A ControlNet field of a generation config, its default (``CONTROL_DEFAULTS``) when absent (tuples as tuples)."""
  value = c.get(field, CONTROL_DEFAULTS[field])
  return tuple(value) if isinstance(value, tuple | list) else value


def _one_or_each(field: str) -> Rule:
  """``field`` has one value for all ControlNets or one per ControlNet."""
  return Rule(field, lambda c: len(control_field(c, field)) in (1, len(control_field(c, "controlnet"))),
              lambda c: f"one value for all ControlNets or one per ControlNet ({len(control_field(c, 'controlnet'))})",
              when=lambda c: bool(control_field(c, "controlnet")))


def _starts_before_ends(c) -> bool:
  start, end = control_field(c, "control_start"), control_field(c, "control_end")
  n = max(len(start), len(end))
  return all(s < e for s, e in zip(start * (n // len(start)), end * (n // len(end)), strict=False))


GENERATE_RULES = (
    Rule("sampler.name", lambda c: c.sampler.name in ("", FITTED, *_solvers()),
         lambda c: f"'' (the folder's scheduler), '{FITTED}' (sampler.calibration) or one of {sorted(_solvers())}"),
    Rule("sampler.options", lambda c: solver_options_problem(c.sampler.name, c.sampler.get("options", {})) is None,
         lambda c: solver_options_problem(c.sampler.name, c.sampler.get("options", {})),
         when=lambda c: c.sampler.name not in ("", FITTED)),
    *FITTED_RULES,
    Rule("height", lambda c: c.height > 0, lambda c: "positive (0 only with an init image: its size)",
         when=lambda c: c.task == "txt2img"),
    Rule("width", lambda c: c.width > 0, lambda c: "positive (0 only with an init image: its size)",
         when=lambda c: c.task == "txt2img"),
    Rule("init_image", lambda c: bool(c.init_image), lambda c: "an RGB image file (img2img, inpaint, upscale)",
         when=lambda c: c.task != "txt2img"),
    Rule("mask_image", lambda c: bool(c.mask_image), lambda c: "a grey mask file (white = regenerate)",
         when=lambda c: c.task == "inpaint"),
    Rule("repaint", lambda c: (c.repaint.jump_length > 0) == (c.repaint.jump_n_sample > 0),
         lambda c: "both jump_length and jump_n_sample >= 1, or both 0 (off)"),
    Rule("control_image", lambda c: len(control_field(c, "control_image")) == len(control_field(c, "controlnet")),
         lambda c: f"one image file per ControlNet in config.controlnet ({len(control_field(c, 'controlnet'))})"),
    *(_one_or_each(f) for f in ("controlnet_scale", "control_start", "control_end")),
    Rule("control_end", _starts_before_ends, lambda c: "after control_start for every ControlNet (start < end)",
         when=lambda c: bool(control_field(c, "controlnet"))),
)

SAMPLER_DEMO = dict(
    job=text(("sampler_demo",)), seed=NONNEG, process=text(_processes), mixture=text(), samplers=text(),
    grid=text(_grids), nfe=COUNT, num_samples=COUNT,
)
SAMPLER_DEMO_RULES = (
    Rule("samplers", lambda c: bool(c.samplers.split(",")) and all(s in _solvers() for s in c.samplers.split(",")),
         lambda c: f"comma-separated names of {sorted(_solvers())}"),
)

FINETUNE = dict(
    job=text(("finetune",)), seed=NONNEG, base=text(), vae_workdir=text(),
    method=text(("lora", "full", "textual_inversion", "controlnet")),
    lora=dict(rank=COUNT, alpha=POSITIVE, targets=sequence(text(), min_len=1)),
    textual_inversion=dict(token=text(), initializer=text(), num_vectors=COUNT),
    controlnet=dict(conditioning=text(("mask", "edges")), scale=real(0.0),
                    embedding_channels=sequence(COUNT, min_len=1), eval_split=SPLIT),
    instance=dict(split=SPLIT, caption_contains=text(), folder=text(), prompt=text(), num_images=COUNT,
                  batch_size=COUNT),
    prior=dict(weight=real(0.0, note="0: no prior preservation"), num_images=COUNT, split=SPLIT,
               prompts=sequence(text()), batch_size=COUNT),
    optim=OPTIM,
    train=dict(num_steps=COUNT, cond_dropout=PROBABILITY, ema_decay=PROBABILITY, log_every=COUNT,
               checkpoint_every=COUNT, keep_checkpoints=COUNT),
    eval=dict(prompts=integer(0, note="0: no evaluation"), samples_per_prompt=COUNT,
              token_colour=text(optional=True)),
)
FINETUNE_RULES = (
    Rule("optim.warmup_steps", lambda c: c.optim.warmup_steps < c.train.num_steps,
         lambda c: f"0 <= warmup_steps < train.num_steps={c.train.num_steps}"),
    Rule("base", lambda c: bool(c.base), lambda c: "a diffjax training workdir (config.json and checkpoints/)"),
    Rule("textual_inversion.token", lambda c: len(c.textual_inversion.token.strip()) >= 2,
         lambda c: "a new token of at least two characters (e.g. '<my-colour>')",
         when=lambda c: c.method == "textual_inversion"),
)

FAMILIES = {"train": (TRAIN, TRAIN_RULES), "train_vae": (TRAIN_VAE, TRAIN_VAE_RULES),
            "generate": (GENERATE, GENERATE_RULES), "sampler_demo": (SAMPLER_DEMO, SAMPLER_DEMO_RULES),
            "finetune": (FINETUNE, FINETUNE_RULES)}


# ----------------------------------------------------------------------------------
# The check.
# ----------------------------------------------------------------------------------
def _did_you_mean(key: str, known) -> str:
  close = difflib.get_close_matches(key, list(known), n=1)
  return f" (did you mean {close[0]!r}?)" if close else ""


def _section_optional(spec: dict) -> tuple[dict, bool]:
  spec = dict(spec)
  return spec, bool(spec.pop("optional", False))


def check_fields(config, fields: Mapping, prefix: str = "") -> None:
  """``ConfigError`` for the first unknown, missing, mistyped or out-of-range field of ``config`` against ``fields``.

  ``fields`` maps a name to a ``Field`` or to the dict of a section (``optional=True`` in it
  marks the whole section optional).
  """
  known = {k for k in fields if k != "optional"}
  where = f"config.{prefix[:-1]}" if prefix else "config"
  for key in config.keys():
    if key not in known:
      raise ConfigError(f"config.{prefix}{key} is not a known field{_did_you_mean(key, known)}; "
                        f"{where} has {sorted(known)}")
  for key in sorted(known, key=list(fields).index):
    spec, path = fields[key], prefix + key
    section = isinstance(spec, dict)
    if section:
      spec, optional = _section_optional(spec)
    else:
      optional = spec.optional
    if key not in config:
      if optional:
        continue
      raise ConfigError(f"config.{path} is missing")
    value = config[key]
    if section:
      if not (hasattr(value, "keys") and hasattr(value, "items")):
        raise ConfigError(f"config.{path} must be a section (dict of fields), got {value!r}")
      check_fields(value, spec, prefix=path + ".")
    elif not spec.type_ok(value):
      names = " or ".join("dict" if t is Mapping else t.__name__ for t in spec.types)
      raise ConfigError(f"config.{path} = {value!r} has type {type(value).__name__}, expected {names}")
    elif not spec.value_ok(value):
      raise ConfigError(f"config.{path} = {value!r} is invalid: expected {spec.expected()}")


def _value(config, field: str):
  node = config
  for key in field.split("."):
    node = node[key]
  return node


def check_rules(config, rules: Iterable[Rule]) -> None:
  for rule in rules:
    if rule.when(config) and not rule.ok(config):
      try:
        value = _value(config, rule.field)
      except KeyError:  # an optional field that this config needs
        raise ConfigError(f"config.{rule.field} is missing: expected {rule.expected(config)}") from None
      raise ConfigError(f"config.{rule.field} = {value!r} is invalid: expected {rule.expected(config)}")


def validate(config, job: str | None = None) -> None:
  """Checks ``config`` against the family of ``job`` (default ``config.job``): fields first, then rules."""
  job = job or config.get("job")
  if job not in FAMILIES:
    raise ConfigError(f"config.job = {job!r} is invalid: expected one of {sorted(FAMILIES)}")
  fields, rules = FAMILIES[job]
  check_fields(config, fields)
  check_rules(config, rules)
