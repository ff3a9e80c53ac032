"""The feature spaces sample metrics are measured in for the embedded data sets, and the metrics they may report.

``digit_feature_space`` joins two networks trained on the real training split only: the
digit classifier's embedding (``digits``: it knows which digit an image shows, so dropped
and collapsed classes move it) and the contrastive encoder's (``contrastive``: trained to
ignore only where a digit sits, so noise, blur and shuffled pixels move it, which a
classifier trained to be right on any digit learns to ignore). Each tower is divided by its
RMS norm over the training split and weighted by ``WEIGHTS``. Alone, each fails the sanity
suite (the classifier's precision rises under mild noise; the contrastive features' Frechet
distance and KID fall as classes are dropped, their precision and density rise under mild
noise); joined, every metric passes (``benchmarks/metric_sanity.py``, the README's table).
The contrastive weight is the suite's choice: at 0.75 every metric passed in three draws of
the suite (seeds 0-2); at 0.5 precision failed the mildest noise at seed 2, and at 1 (in a run
that scaled the towers by their norms on the test split) density failed it at seed 0.

For the shapes, ``shapes_feature_space`` is a contrastive encoder alone (trained on
``SHAPES_TRAIN``): colour and shape are most of what a flat-coloured image holds, and every
metric passes with it (the suite's classes are the colour/shape pairs).

The networks for 8x8 digits and for the shapes ship with diffjax (``SHIPPED``,
``SHIPPED_SHAPES``): every run measures in the same space. ``reportable`` runs the sanity
suite (``sanity``) once per feature space and workdir, keeps its verdict in
``sanity_<version>.json`` and returns the metrics that passed: the trainer reports only those.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable

import numpy as np
from absl import logging

from diffjax.evaluate import contrastive, digits, metrics, sanity, shapes

VERSION = "digits-classifier+contrastive-v1"
WEIGHTS = (1.0, 0.75)  # classifier, contrastive tower (module docstring)
SHIPPED_SIZE = 8
_WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
SHIPPED = tuple(os.path.join(_WEIGHTS_DIR, f"digit_{net}_8px.npz") for net in ("classifier", "contrastive"))
SHAPES_VERSION = "shapes-contrastive-v1"
SHAPES_TRAIN = "train[:4000]"  # what the shapes encoder trains on and the suite draws from
SHAPES_CONTRASTIVE_STEPS = 300
SHIPPED_SHAPES = os.path.join(_WEIGHTS_DIR, "shapes_contrastive.npz")


@dataclasses.dataclass(frozen=True)
class FeatureSpace:
  """images (N, H, W, C) in [-1, 1] -> features (N, d) float64: the towers' outputs, each over its scale, joined.

  scales: each tower's RMS feature norm over the real training split over its weight.
  """

  name: str
  towers: tuple[Callable[[np.ndarray], np.ndarray], ...]
  scales: tuple[float, ...]
  files: dict[str, str]  # file name -> SHA-256 of the weights each tower was loaded from

  def __call__(self, images) -> np.ndarray:
    return np.concatenate([tower(images) / scale for tower, scale in zip(self.towers, self.scales, strict=True)], 1)

  def record(self) -> dict:
    """What eval.json says of the feature space: its name (version), the weight files and their hashes."""
    return {"name": self.name, "scales": list(self.scales), "files": dict(self.files)}


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def digit_networks(workdir: str, data_dir: str | None, *, image_size: int, seed: int) -> tuple[str, str]:
  """Paths of (the digit classifier, the contrastive encoder) for ``image_size``.

  At 8x8: the networks shipped in ``SHIPPED`` (trained once, with seed
  0, by this very code; the same weights for every run and machine, so that numbers compare
  across workdirs, as FID's one Inception does). Otherwise: cached in ``workdir``, trained
  there (with ``seed``) on first use.
  """
  if image_size == SHIPPED_SIZE and all(map(os.path.exists, SHIPPED)):
    return SHIPPED
  classifier_path = os.path.join(workdir, "digit_classifier.npz")
  encoder_path = os.path.join(workdir, "contrastive_encoder.npz")
  digits.cached_digit_classifier(classifier_path, data_dir, image_size=image_size, seed=seed)
  train, _ = digits.real_digits(data_dir, "train", image_size)
  contrastive.cached_encoder(encoder_path, train, seed=seed)
  return classifier_path, encoder_path


def digit_feature_space(classifier_path: str, encoder_path: str, train: np.ndarray) -> FeatureSpace:
  """The digits feature space (module docstring) of the two networks' files (``digit_networks``);
  ``train`` (N, S, S, 1): the real training digits at the resolution judged (the towers' scales)."""
  classifier, _, saved_size = digits.load_digit_classifier(classifier_path)
  if saved_size != train.shape[1]:
    raise ValueError(f"{classifier_path} judges {saved_size}x{saved_size} digits, not {train.shape[1:3]}")
  towers = (lambda x: digits.features(classifier, x), _encoder_tower(encoder_path, train))
  return _joined(VERSION, towers, WEIGHTS, train, (classifier_path, encoder_path))


def _encoder_tower(path: str, train: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
  encoder, shape = contrastive.load_encoder(path)
  if shape != train.shape[1:]:
    raise ValueError(f"{path} encodes images of shape {shape}, not {train.shape[1:]}")
  return lambda x: contrastive.features(encoder, x)


def _joined(name: str, towers, weights, train: np.ndarray, paths) -> FeatureSpace:
  """The towers, each over its RMS feature norm on ``train`` over its weight, with their files' hashes."""
  scales = tuple(float(np.sqrt(np.mean(np.sum(tower(train) ** 2, axis=1)))) / weight
                 for tower, weight in zip(towers, weights, strict=True))
  return FeatureSpace(name, tuple(towers), scales, {os.path.basename(p): _sha256(p) for p in paths})


def shapes_real(data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
  """(images, colour/shape pair labels) of the shapes training images the encoder and the suite use."""
  images, attributes = shapes.real_shapes(data_dir, SHAPES_TRAIN)
  return images, shapes.pair_labels(attributes)


def shapes_network(workdir: str, data_dir: str | None, *, seed: int) -> str:
  """Path of the shapes contrastive encoder: shipped (``SHIPPED_SHAPES``), else trained into ``workdir``."""
  if os.path.exists(SHIPPED_SHAPES):
    return SHIPPED_SHAPES
  path = os.path.join(workdir, "shapes_contrastive_encoder.npz")
  contrastive.cached_encoder(path, shapes_real(data_dir)[0], seed=seed, steps=SHAPES_CONTRASTIVE_STEPS)
  return path


def shapes_feature_space(encoder_path: str, train: np.ndarray) -> FeatureSpace:
  """The shapes feature space (module docstring): the contrastive encoder alone; ``train`` the images of
  ``shapes_real`` (the tower's scale)."""
  return _joined(SHAPES_VERSION, (_encoder_tower(encoder_path, train),), (1.0,), train, (encoder_path,))


def reportable(space: FeatureSpace, workdir: str, reference: np.ndarray, real: tuple[np.ndarray, np.ndarray], *,
               n: int, repeats: int = 5) -> dict:
  """The sanity verdict of ``space``: {"passed": [metrics], "failures": {metric: [steps]}, ...}.

  Read from ``workdir/sanity_<version>.json`` when it was computed by this suite version for
  these weight files, set sizes and repeats; otherwise the suite runs (``sanity.run``: ``reference`` the images
  every set is compared with, ``real`` (images, labels) the floor and pool, ``n`` the set
  size the metrics will be computed at) and the verdict is written there.
  """
  path = os.path.join(workdir, f"sanity_{space.name}.json")
  key = {"suite": sanity.VERSION, "files": space.files, "n": n, "reference": len(reference), "real": len(real[0]),
         "repeats": repeats}
  verdict = None
  if os.path.exists(path):
    with open(path) as f:
      verdict = json.load(f)
  if verdict is None or verdict.get("key") != key:
    start = time.time()
    table = sanity.run(space, reference, real, n, repeats=repeats, groups=min(10, n))
    verdict = {"key": key, "failures": sanity.failures(table), "seconds": round(time.time() - start, 1)}
    with open(path, "w") as f:
      json.dump(verdict, f, indent=2)
  verdict = verdict | {"passed": [m for m in sanity.SEES if not verdict["failures"][m]]}
  logging.info("metric sanity suite of %s: passed %s, failed %s", space.name, verdict["passed"],
               {m: b for m, b in verdict["failures"].items() if b})
  return verdict


def report(space: FeatureSpace, verdict: dict, real, generated, compared: str) -> dict:
  """{"metrics": the metrics that passed the sanity suite (``verdict``) as records with intervals,
  "not_reported": {metric: why}, "features": the feature space's record} of generated vs real images."""
  estimates = metrics.compare(space(real), space(generated), groups=min(10, len(generated)))
  return {"metrics": {m: estimates[m].record() | {"features": space.name} for m in verdict["passed"]},
          "not_reported": {m: "failed the sanity suite at " + ", ".join(steps)
                           for m, steps in verdict["failures"].items() if steps},
          "features": space.record() | {"compared": compared}}
