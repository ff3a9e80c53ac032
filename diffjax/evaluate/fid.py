"""FID (Heusel et al. 2017) with the FID Inception (``diffjax.models.inception``) and user-provided weights.

  params = load_fid_inception("pt_inception-2015-12-05-6726825d.safetensors")   # or .pth, allow_pickle=True
  feats = inception_features(params, images)            # images (N, H, W, 3) float in [0, 1]
  save_statistics("ref.npz", *frechet.feature_statistics(feats))   # mu, sigma: the .npz pytorch-fid reads
  fid(params, generated_images, reference="ref.npz")

The weights are pytorch-fid's state dict (``FID_WEIGHTS_URL``'s file, or the same tensors
as safetensors); nothing is downloaded. Conventions (clean-fid's point: they move FID by
whole points): float images in [0, 1] at their own resolution, resized to 299 inside the
network bilinearly without antialiasing as pytorch-fid does; no uint8 quantization here
(quantize before calling to match a pipeline that saves PNGs first). Statistics are float64,
covariance with ddof = 1 (numpy's ``np.cov``, as pytorch-fid).
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.convert.files import read_weights
from diffjax.convert.keys import IGNORED_KEYS, flax_from_state_dict
from diffjax.evaluate.batching import apply_in_batches
from diffjax.evaluate.frechet import feature_statistics, frechet_distance
from diffjax.models.inception import FEATURES, FIDInception

FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
_UNUSED = (re.compile(r"^fc\."),)  # the 1008-class head: FID reads the pooled features
_BATCH = 50


def param_shapes() -> dict:
  return jax.eval_shape(FIDInception().init, jax.random.key(0), jnp.zeros((1, 75, 75, 3)))["params"]


def fid_params_from_state_dict(state, what: str = "checkpoint") -> dict:
  """FIDInception params from a pytorch-fid / torchvision-layout state dict {name: array}."""
  return flax_from_state_dict(state, param_shapes(), ignore=IGNORED_KEYS + _UNUSED, what=what, convert=jnp.asarray)


def load_fid_inception(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict:
  """FIDInception params of a weight file (``.safetensors``; the released ``.pth`` needs ``allow_pickle``)."""
  p = os.fspath(path)
  if not os.path.isfile(p):
    raise FileNotFoundError(f"{p} does not exist (the FID Inception weights: {FID_WEIGHTS_URL})")
  return fid_params_from_state_dict(read_weights(p, allow_pickle), what=p)


@jax.jit
def _features(params, images):
  return FIDInception().apply({"params": params}, images)


def inception_features(params, images, batch_size: int = _BATCH) -> np.ndarray:
  """(N, 2048) float64 pool3 features of images (N, H, W, 3) float in [0, 1], in batches of ``batch_size``."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3 or not len(images):
    raise ValueError(f"need RGB images (N >= 1, H, W, 3) in [0, 1], got shape {images.shape}")
  if not np.issubdtype(images.dtype, np.floating) or images.min() < 0.0 or images.max() > 1.0:
    raise ValueError("images must be float in [0, 1] (divide uint8 images by 255)")
  return apply_in_batches(lambda x: _features(params, x.astype(np.float32)), images, batch_size).astype(np.float64)


def save_statistics(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> None:
  """``mu`` (2048,) and ``sigma`` (2048, 2048) as pytorch-fid's reference .npz."""
  with open(os.fspath(path), "wb") as f:  # an open file: np.savez would append .npz to another suffix
    np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of a pytorch-fid .npz (checked: 2048-d)."""
  p = os.fspath(path)
  with np.load(p) as data:
    if "mu" not in data.files or "sigma" not in data.files:
      raise ValueError(f"{p}: a reference statistics file holds 'mu' and 'sigma', found {data.files}")
    mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
  if mu.shape != (FEATURES,) or sigma.shape != (FEATURES, FEATURES):
    raise ValueError(f"{p}: mu {mu.shape} and sigma {sigma.shape} are not the FID Inception's {FEATURES}-d statistics")
  return mu, sigma


def fid(params, images, *, reference: str | os.PathLike | None = None, real_images=None) -> float:
  """FID of ``images`` against a statistics file (``reference``) or a set of ``real_images`` (both [0, 1])."""
  if (reference is None) == (real_images is None):
    raise ValueError("give exactly one of reference (a .npz of mu and sigma) and real_images")
  ref = load_statistics(reference) if reference is not None else feature_statistics(
      inception_features(params, real_images))
  return frechet_distance(*feature_statistics(inception_features(params, images)), *ref)
