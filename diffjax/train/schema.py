"""The fields a training config may have, and the check that finds unknown, missing or mistyped ones.

``TRAIN_FIELDS`` lists, per section, every field ``train_and_evaluate`` reads and the
type it expects (``configs/default.py`` has all of them). A field the trainer starts
reading is added here; a typo'd key in a config built in Python or a file then fails
with one ``ConfigError`` that names it, instead of being silently ignored.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping

_NUMBER = (int, float)
_SEQUENCE = (tuple, list)

# name -> expected type(s) of a field, or {field: type(s)} of a section.
TRAIN_FIELDS: dict[str, dict[str, type | tuple] | type | tuple] = {
    "job": str,
    "seed": int,
    "data": dict(name=str, data_dir=str, train_split=str, batch_size=int, image_size=int, channels=int,
                 max_shift=int, max_caption_length=int, cache_latents=bool),
    "model": dict(channels=_SEQUENCE, layers_per_block=int, attention_levels=_SEQUENCE, num_heads=int,
                  text_width=int, text_layers=int, text_heads=int, norm_groups=int, dropout=_NUMBER,
                  mid_block_attention=bool, remat=bool),
    "diffusion": dict(process=str, process_options=Mapping, target=str, weighting=str, weighting_options=Mapping,
                      time_sampler=str, time_sampler_options=Mapping, time_scale=_NUMBER),
    "optim": dict(learning_rate=_NUMBER, warmup_steps=int, final_lr_fraction=_NUMBER, grad_clip=_NUMBER,
                  b1=_NUMBER, b2=_NUMBER, weight_decay=_NUMBER, grad_accum_steps=int),
    "train": dict(num_steps=int, cond_dropout=_NUMBER, ema_decay=_NUMBER, compute_dtype=str, log_every=int,
                  checkpoint_every=int, keep_checkpoints=int, profile_steps=int),
    "sampler": dict(name=str, options=Mapping, grid=str, nfe=int, guidance_scale=_NUMBER),
    "mesh": dict(data=int, fsdp=int, rules=_SEQUENCE),
    "eval": dict(samples_per_prompt=int, digits_per_prompt=int, shapes_prompts=int, shapes_samples_per_prompt=int,
                 shapes_splits=_SEQUENCE),
    # latent diffusion (branch `latent`): the frozen VAE's workdir, the text encoder
    "vae": dict(workdir=str),
    "text": dict(mode=str, path=str),
    "distributed": dict(coordinator_address=str, num_processes=int, process_id=int),
    "prompts": _SEQUENCE,
}
# Fields that may be absent (the trainer has a default for them).
OPTIONAL = frozenset({"distributed", "prompts", "mesh.rules", "eval.digits_per_prompt", "sampler.options",
                      "diffusion.process_options", "diffusion.weighting_options", "diffusion.time_sampler_options",
                      "data.cache_latents", "vae", "text", "eval.shapes_prompts", "eval.shapes_samples_per_prompt",
                      "eval.shapes_splits", "train.profile_steps"})


class ConfigError(ValueError):
  """An invalid config: the message names the field (``config.section.key``) and what is expected."""


def _did_you_mean(key: str, known) -> str:
  close = difflib.get_close_matches(key, list(known), n=1)
  return f" (did you mean {close[0]!r}?)" if close else ""


def _type_ok(value, expected) -> bool:
  expected = expected if isinstance(expected, tuple) else (expected,)
  if isinstance(value, bool) and bool not in expected:  # True is an int, but not a step count
    return False
  if Mapping in expected and hasattr(value, "keys") and hasattr(value, "items"):  # dict or ConfigDict
    return True
  return isinstance(value, tuple(t for t in expected if t is not Mapping))


def _type_name(expected) -> str:
  expected = expected if isinstance(expected, tuple) else (expected,)
  return " or ".join("dict" if t is Mapping else t.__name__ for t in expected)


def check_fields(config, fields=None, optional=OPTIONAL, prefix: str = "") -> None:
  """Raises ``ConfigError`` for the first unknown, missing or mistyped field of ``config``.

  Args:
    config: a ``ConfigDict`` (or nested mapping).
    fields: ``{name: type}`` for a field, ``{name: {...}}`` for a section (default
      ``TRAIN_FIELDS``); ``Mapping`` stands for a dict-valued field (not checked inside).
    optional: dotted names (``"section"``, ``"section.field"``) that may be missing.
    prefix: the dotted path of ``config`` inside the whole config (for messages).
  """
  fields = TRAIN_FIELDS if fields is None else fields
  where = f"config.{prefix[:-1]}" if prefix else "config"
  for key in config.keys():
    if key not in fields:
      raise ConfigError(f"config.{prefix}{key} is not a known field{_did_you_mean(key, fields)}; "
                        f"{where} has {sorted(fields)}")
  for key, expected in fields.items():
    path = prefix + key
    if key not in config:
      if path in optional:
        continue
      raise ConfigError(f"config.{path} is missing")
    value = config[key]
    if isinstance(expected, dict):
      if not _type_ok(value, Mapping):
        raise ConfigError(f"config.{path} must be a section (dict of fields), got {value!r}")
      check_fields(value, expected, optional, prefix=path + ".")
    elif not _type_ok(value, expected):
      raise ConfigError(f"config.{path} = {value!r} has type {type(value).__name__}, expected {_type_name(expected)}")
