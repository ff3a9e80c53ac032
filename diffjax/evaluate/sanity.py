"""The sanity suite a sample metric must pass before anyone reads it.

Against a fixed reference set of real images, a metric is computed for

* the floor: real images the reference does not hold (another split);
* those real images degraded step by step, by fidelity degradations (``FIDELITY``: Gaussian
  noise, Gaussian blur, pixel shuffling, saturation) and diversity ones (``DIVERSITY``:
  dropping classes, collapsing each class to a few images repeated: the clean-but-collapsed
  look of strong guidance), each at ``LEVELS[kind]``, mildest first.

A metric passes when, for every degradation it is meant to see, its value worsens at every
step from the floor on (``BETTER`` gives the direction): the Frechet distance and KID must see
all six, precision and density the fidelity ones, recall and coverage the diversity ones
(outliers inflate the generated radii of recall, so noise can raise it: that is what
precision is for). ``run`` returns the table; ``failures`` lists what a metric got wrong.
Images are float in [-1, 1], (N, H, W, C); labels (N,) ints (classes or attribute pairs).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

from diffjax.evaluate.metrics import BETTER, compare

FIDELITY = ("noise", "blur", "shuffle", "saturation")
DIVERSITY = ("drop_classes", "collapse")
LEVELS = {
    "noise": (0.1, 0.2, 0.4, 0.8),  # standard deviation of added Gaussian noise (images in [-1, 1])
    "blur": (0.5, 1.0, 1.5, 2.5),  # Gaussian blur standard deviation, pixels
    "shuffle": (0.05, 0.15, 0.3, 0.6),  # fraction of each image's pixels permuted among themselves
    "saturation": (1.5, 2.5, 4.0, 8.0),  # gain: x -> clip(gain x, -1, 1)
    "drop_classes": (0.8, 0.6, 0.4, 0.3),  # fraction of the classes kept
    "collapse": (8, 4, 2, 1),  # distinct images kept per class, repeated to the set's size
}
SEES = {"frechet_distance": FIDELITY + DIVERSITY, "kid": FIDELITY + DIVERSITY, "precision": FIDELITY,
        "density": FIDELITY, "recall": DIVERSITY, "coverage": DIVERSITY}


def degrade(kind: str, level, images: np.ndarray, labels: np.ndarray, pool: tuple[np.ndarray, np.ndarray],
            rng: np.random.Generator) -> np.ndarray:
  """``images`` (N, H, W, C) degraded by ``kind`` at ``level``; the diversity ones draw N images from ``pool``
  ((images, labels), real images besides the reference) so that the set keeps its size."""
  n = len(images)
  if kind == "noise":
    return np.clip(images + level * rng.standard_normal(images.shape), -1.0, 1.0)
  if kind == "blur":
    return ndimage.gaussian_filter(images, sigma=(0, level, level, 0), mode="nearest")
  if kind == "shuffle":
    flat = images.reshape(n, -1, images.shape[-1]).copy()
    count = int(round(level * flat.shape[1]))
    for row in flat:
      chosen = rng.choice(flat.shape[1], count, replace=False)
      row[chosen] = row[rng.permutation(chosen)]
    return flat.reshape(images.shape)
  if kind == "saturation":
    return np.clip(level * images, -1.0, 1.0)
  # The classes and images kept come from one fixed order, so each level keeps a subset of the last one's.
  pool_images, pool_labels = pool
  order = np.random.default_rng(0)
  classes = order.permutation(np.unique(pool_labels))
  if kind == "drop_classes":
    kept = classes[:max(1, int(round(level * len(classes))))]
    candidates = np.flatnonzero(np.isin(pool_labels, kept))
    return pool_images[rng.choice(candidates, n, replace=len(candidates) < n)]
  if kind == "collapse":
    chosen = np.concatenate([order.permutation(np.flatnonzero(pool_labels == c))[:level] for c in np.sort(classes)])
    return pool_images[chosen[rng.permutation(np.arange(n) % len(chosen))]]
  raise ValueError(f"unknown degradation {kind!r}: use one of {FIDELITY + DIVERSITY}")


def run(features: Callable[[np.ndarray], np.ndarray], reference: np.ndarray, real: tuple[np.ndarray, np.ndarray],
        pool: tuple[np.ndarray, np.ndarray], *, seed: int = 0, groups: int = 10) -> dict:
  """{"floor": metrics, kind: [metrics per level]} of ``features`` (images -> (N, d)).

  reference: the real images every set is compared with; real: (images, labels) of other real
  images, the floor and what the fidelity degradations start from; pool: (images, labels) the
  diversity degradations draw from. Each metrics entry is ``metrics.compare``'s dict of Estimates.
  """
  rng = np.random.default_rng(seed)
  ref = features(reference)
  table = {"floor": compare(ref, features(real[0]), groups=groups, seed=seed)}
  for kind in FIDELITY + DIVERSITY:
    table[kind] = [compare(ref, features(degrade(kind, level, *real, pool, rng)), groups=groups, seed=seed)
                   for level in LEVELS[kind]]
  return table


def failures(table: dict) -> dict[str, list[str]]:
  """For each metric, the degradations (of those it must see) at which it did not worsen step by step."""
  out = {}
  for metric, kinds in SEES.items():
    sign = 1.0 if BETTER[metric] == "lower" else -1.0  # worse = larger sign * value
    bad = []
    for kind in kinds:
      values = [table["floor"][metric].value] + [m[metric].value for m in table[kind]]
      steps = np.diff(sign * np.asarray(values))
      bad += [f"{kind} step {i + 1}" for i in np.flatnonzero(steps <= 0)]
    out[metric] = bad
  return out


def markdown(table: dict, metric: str) -> str:
  """One metric's table: a row per degradation, the floor and every level, value +- standard error."""
  rows = [f"| {metric} | floor | " + " | ".join(f"level {i + 1}" for i in range(4)) + " |", "|---" * 6 + "|"]
  floor = table["floor"][metric]
  for kind in FIDELITY + DIVERSITY:
    cells = " | ".join(f"{m[metric].value:.4g} +- {m[metric].se:.2g}" for m in table[kind])
    levels = ", ".join(str(v) for v in LEVELS[kind])
    rows.append(f"| {kind} ({levels}) | {floor.value:.4g} +- {floor.se:.2g} | {cells} |")
  return "\n".join(rows)
