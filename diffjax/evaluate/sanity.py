"""The sanity suite a sample metric must pass before anyone reads it.

Against a fixed reference set of real images, a metric is computed for

* the floor: n real images the reference does not hold (another split);
* those n images degraded step by step, by fidelity degradations (``FIDELITY``: Gaussian
  noise, Gaussian blur, pixel shuffling, saturation) and diversity ones (``DIVERSITY``:
  dropping classes, collapsing each class to a few images repeated: the clean-but-collapsed
  look of strong guidance), each at ``LEVELS[kind]``, mildest first. Every level is a
  visible change (``benchmarks/metric_sanity.py`` draws them); the degradations keep the set's
  size and its class proportions, and the diversity ones keep real images untouched.

Every set is built ``repeats`` times, each from another random split of the real images into
the n floor images and the pool the diversity degradations draw from (and other noise), and a
metric's value at a cell is the mean over those draws: what the suite judges is how the
metric's expectation moves, not one draw's sampling noise.

A metric passes when, for every degradation it is meant to see, its mean worsens at every
step from the floor on (``BETTER`` gives the direction), a tie counting only where both values
sit at the metric's worst possible value (``WORST``: a recall of 0 cannot fall further). A
step whose images equal the milder level's in every draw is no step and is not judged
(flat-coloured shapes are fully saturated at gain 2.5: gains 4 and 8 change nothing). The
Frechet distance and KID must see all six degradations, precision and density the fidelity
ones, recall and coverage the diversity ones (noise need not lower a diversity metric: that
is what precision is for). ``run`` returns the table, ``failures``
what each metric got wrong, ``markdown`` a table per metric.
Images are float in [-1, 1], (N, H, W, C); labels (N,) ints (classes or attribute pairs).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

from diffjax.evaluate.metrics import BETTER, compare

VERSION = 3  # of the rules, levels and metric definitions (3: capped recall); other versions are recomputed
FIDELITY = ("noise", "blur", "shuffle", "saturation")
DIVERSITY = ("drop_classes", "collapse")
LEVELS = {
    "noise": (0.2, 0.4, 0.6, 0.9),  # standard deviation of added Gaussian noise (images in [-1, 1])
    "blur": (0.0625, 0.09375, 0.125, 0.1875),  # Gaussian blur standard deviation, in image heights (1-3 px at 16)
    "shuffle": (0.1, 0.2, 0.35, 0.6),  # fraction of each image's pixels permuted among themselves
    "saturation": (1.5, 2.5, 4.0, 8.0),  # gain: x -> clip(gain x, -1, 1)
    "drop_classes": (0.8, 0.6, 0.4, 0.2),  # fraction of the classes kept
    "collapse": (8, 4, 2, 1),  # distinct images kept per class, repeated to the set's size
}
SEES = {"frechet_distance": FIDELITY + DIVERSITY, "kid": FIDELITY + DIVERSITY, "precision": FIDELITY,
        "density": FIDELITY, "recall": DIVERSITY, "coverage": DIVERSITY}
WORST = {"frechet_distance": np.inf, "kid": np.inf, "precision": 0.0, "recall": 0.0, "density": 0.0,
         "coverage": 0.0}


def degrade(kind: str, level, images: np.ndarray, labels: np.ndarray, pool: tuple[np.ndarray, np.ndarray],
            rng: np.random.Generator) -> np.ndarray:
  """``images`` (N, H, W, C) with ``labels`` (N,) degraded by ``kind`` at ``level``.

  drop_classes replaces the images of the dropped classes by images of the kept ones drawn
  from ``pool`` ((images, labels), real images besides ``images``); collapse replaces the
  images of each class by ``level`` of them, repeated. Both keep a fixed order of classes and
  images, so that each level keeps a subset of what the milder one kept.
  """
  n = len(images)
  if kind == "noise":
    return np.clip(images + level * rng.standard_normal(images.shape), -1.0, 1.0)
  if kind == "blur":
    sigma = level * images.shape[1]
    return ndimage.gaussian_filter(images, sigma=(0, sigma, sigma, 0), mode="nearest")
  if kind == "shuffle":
    flat = images.reshape(n, -1, images.shape[-1]).copy()
    count = int(round(level * flat.shape[1]))
    for row in flat:
      chosen = rng.choice(flat.shape[1], count, replace=False)
      row[chosen] = row[rng.permutation(chosen)]
    return flat.reshape(images.shape)
  if kind == "saturation":
    return np.clip(level * images, -1.0, 1.0)
  order = np.random.default_rng(0)  # the fixed order of classes (and of images within a class)
  classes = order.permutation(np.unique(labels))
  out = images.copy()
  if kind == "drop_classes":
    kept = classes[:max(1, int(round(level * len(classes))))]
    dropped = np.flatnonzero(~np.isin(labels, kept))
    pool_images, pool_labels = pool
    candidates = np.flatnonzero(np.isin(pool_labels, kept))
    if not len(candidates):
      raise ValueError(f"the pool holds no image of the kept classes {kept.tolist()}")
    out[dropped] = pool_images[rng.choice(candidates, len(dropped), replace=len(candidates) < len(dropped))]
    return out
  if kind == "collapse":
    for c in classes:
      members = order.permutation(np.flatnonzero(labels == c))
      out[members] = images[members[np.arange(len(members)) % min(level, len(members))]]
    return out
  raise ValueError(f"unknown degradation {kind!r}: use one of {FIDELITY + DIVERSITY}")


def run(features: Callable[[np.ndarray], np.ndarray], reference: np.ndarray, real: tuple[np.ndarray, np.ndarray],
        n: int, *, repeats: int = 5, seed: int = 0, groups: int = 10) -> dict:
  """The suite of ``features`` (images (N, H, W, C) -> (N, d)).

  reference: the real images every set is compared with; real: (images, labels) of other real
  images, split ``repeats`` times at random into n floor images and the pool.
  Returns {"floor": [metrics per draw], kind: [[metrics per draw] per level], "unchanged":
  {kind: [per level: the images equal the milder level's in every draw]}}, each metrics entry
  ``metrics.compare``'s dict of Estimates.
  """
  images, labels = real
  if not 2 <= n < len(images):
    raise ValueError(f"need 2 <= n < {len(images)} (the rest is the pool), got n = {n}")
  rng = np.random.default_rng(seed)
  ref = features(reference)
  table = {"floor": []} | {kind: [[] for _ in LEVELS[kind]] for kind in FIDELITY + DIVERSITY}
  table["unchanged"] = {kind: [True] * len(LEVELS[kind]) for kind in FIDELITY + DIVERSITY}
  for _ in range(repeats):
    order = rng.permutation(len(images))
    floor, floor_labels = images[order[:n]], labels[order[:n]]
    pool = images[order[n:]], labels[order[n:]]
    measure = lambda x: compare(ref, features(x), groups=groups, seed=seed)
    table["floor"].append(measure(floor))
    for kind in FIDELITY + DIVERSITY:
      before = floor
      for i, level in enumerate(LEVELS[kind]):
        degraded = degrade(kind, level, floor, floor_labels, pool, rng)
        table["unchanged"][kind][i] &= bool(np.array_equal(degraded, before))
        table[kind][i].append(measure(degraded))
        before = degraded
  return table


def _mean(draws: list[dict], metric: str) -> tuple[float, float]:
  """(mean over draws, its standard error) of one metric."""
  values = np.array([d[metric].value for d in draws])
  return float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else np.nan


def failures(table: dict) -> dict[str, list[str]]:
  """For each metric, the degradations (of those it must see) at which its mean did not worsen step by step."""
  out = {}
  for metric, kinds in SEES.items():
    sign = 1.0 if BETTER[metric] == "lower" else -1.0  # worse = larger sign * value
    bad = []
    for kind in kinds:
      values = [_mean(table["floor"], metric)[0]] + [_mean(draws, metric)[0] for draws in table[kind]]
      unchanged = table.get("unchanged", {}).get(kind, [False] * len(values))
      for i, (before, after) in enumerate(zip(values, values[1:], strict=False)):
        at_worst = before == after == WORST[metric]
        if sign * after <= sign * before and not at_worst and not unchanged[i]:
          bad.append(f"{kind} step {i + 1}")
    out[metric] = bad
  return out


def markdown(table: dict, metric: str) -> str:
  """One metric's table: a row per degradation, the floor and every level, mean +- its standard error."""
  cell = lambda draws: "{:.4g} +- {:.2g}".format(*_mean(draws, metric))
  rows = [f"| {metric} | floor | " + " | ".join(f"level {i + 1}" for i in range(4)) + " |", "|---" * 6 + "|"]
  for kind in FIDELITY + DIVERSITY:
    levels = ", ".join(str(v) for v in LEVELS[kind])
    rows.append(f"| {kind} ({levels}) | {cell(table['floor'])} | " + " | ".join(cell(d) for d in table[kind]) + " |")
  return "\n".join(rows)


def summary(tables: dict[str, dict]) -> str:
  """A markdown table: a row per feature space, a column per metric, "passes" or the steps it failed."""
  rows = ["| features | " + " | ".join(SEES) + " |", "|---" * (len(SEES) + 1) + "|"]
  for name, table in tables.items():
    bad = failures(table)
    rows.append(f"| {name} | " + " | ".join("passes" if not bad[m] else "fails: " + ", ".join(bad[m])
                                            for m in SEES) + " |")
  return "\n".join(rows)
