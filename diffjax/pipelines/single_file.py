"""Original single-file Stable Diffusion 1.x / 2.x checkpoints -> a ``Pipeline``.

A single file (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``)
holds the three networks but no tokenizer and no scheduler. The tokenizer is a folder the
caller names (CLIP ViT-L/14's ``vocab.json`` + ``merges.txt`` for SD 1.x, OpenCLIP's, which
is the same BPE with pad token ``!``, for SD 2.x): nothing is downloaded. The scheduler is
the one the family's reference diffusers folder ships, which is what diffusers'
``from_single_file`` fetches for it:

* SD 1.x (a CLIP text encoder): ``stable-diffusion-v1-5``'s PNDM, epsilon prediction;
* SD 2.x (an OpenCLIP text encoder): ``stable-diffusion-2-1``'s DDIM, v-prediction, except
  for a checkpoint saved at ``global_step`` 875000 (the 512 px SD 2 base), which predicts
  epsilon (diffusers' heuristic). ``prediction_type=`` overrides either.

Both use scaled-linear betas 0.00085..0.012 over 1000 steps, ``leading`` spacing with
``steps_offset`` 1 and ``set_alpha_to_one`` False.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from diffjax.convert import ldm
from diffjax.convert.files import read_weights
from diffjax.convert.pretrained import models_from_ldm
from diffjax.pipelines import programs
from diffjax.pipelines.core import Pipeline
from diffjax.pipelines.schedulers import DiffusersScheduler
from diffjax.pipelines.stable_diffusion import assemble, load_tokenizer

_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
          "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading"}
SCHEDULER_DEFAULTS = {
    "sd1": {"_class_name": "PNDMScheduler", "skip_prk_steps": True, "prediction_type": "epsilon"} | _BETAS,
    "sd2": {"_class_name": "DDIMScheduler", "clip_sample": False, "prediction_type": "v_prediction"} | _BETAS,
}
SD2_BASE_GLOBAL_STEP = 875000  # the SD 2 (512 px, epsilon) release; diffusers' from_single_file keys on it


def scheduler_for(family: str, global_step: int | None = None, prediction_type: str | None = None) -> dict:
  """The diffusers scheduler config of a single file of ``family`` ('sd1' or 'sd2')."""
  config = dict(SCHEDULER_DEFAULTS[family])
  if family == "sd2" and global_step == SD2_BASE_GLOBAL_STEP:
    config["prediction_type"] = "epsilon"
  if prediction_type is not None:  # checked by DiffusersScheduler.from_config
    config["prediction_type"] = prediction_type
  return config


def from_single_file(path: str | os.PathLike, *, tokenizer: str | os.PathLike, prediction_type: str | None = None,
                     dtype=jnp.float32, param_dtype=jnp.float32, allow_pickle: bool = False) -> tuple[Pipeline, dict]:
  """(pipeline, params) of an original SD 1.x / 2.x checkpoint file; params as ``from_pretrained``'s.

  Args:
    path: the ``.safetensors`` file (``.ckpt`` with ``allow_pickle``, which can run code).
    tokenizer: a CLIP tokenizer folder (``vocab.json`` + ``merges.txt`` or ``tokenizer.json``,
      optional ``tokenizer_config.json``), e.g. a diffusers folder's ``tokenizer/``.
    prediction_type: overrides the family's default (module docstring).
    dtype, param_dtype: as in ``from_pretrained``.
  """
  file = os.fspath(path)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{file} does not exist")
  programs.preload()  # read the recently used compiled programs while the weights load
  state = read_weights(file, allow_pickle)
  step = state.get("global_step")
  step = int(np.asarray(step).reshape(-1)[0]) if step is not None and np.size(step) == 1 else None
  family = "sd2" if any(k.startswith(ldm.OPENCLIP_PREFIX) for k in state) else "sd1"
  loaded = models_from_ldm(state, file, dtype=dtype, param_dtype=param_dtype)
  del state
  missing = [k for k in ("unet", "vae", "text_encoder") if k not in loaded]
  if missing:
    raise ValueError(f"{file}: a Stable Diffusion checkpoint needs a U-Net, an autoencoder and a text encoder; "
                     f"it lacks {', '.join(missing)}")
  (unet, p_unet), (vae, p_vae), (text, p_text) = (loaded[k] for k in ("unet", "vae", "text_encoder"))
  where = f"{file} (scheduler defaults of {family})"
  scheduler = DiffusersScheduler.from_config(scheduler_for(family, step, prediction_type), where=where)
  pipe = assemble(unet, vae, text, load_tokenizer(os.fspath(tokenizer)), scheduler, where=file)
  return pipe, {"unet": p_unet, "vae": p_vae, "text_encoder": p_text}
