"""The metric sanity suite: what each degradation does, how a verdict is reached, and the verdicts themselves.

The last two tests are the suite itself on the embedded digits and shapes, in the feature
spaces the trainer measures in (``evaluate.features``): every metric must pass it (the shapes
one is marked slow: building the 22,000 shapes images takes minutes). ``benchmarks/metric_sanity.py``
prints the same tables for the feature space's towers alone and for raw pixels.
"""

import numpy as np
import pytest

from diffjax.evaluate import digits, features, intervals, sanity
from diffjax.evaluate.shapes import real_shapes


def _labelled(n=60, classes=6, seed=0):
  """Distinct 4x4 one-channel 'images' (each holds its index) with balanced labels."""
  rng = np.random.default_rng(seed)
  images = np.linspace(-0.9, 0.9, n)[:, None, None, None] * np.ones((n, 4, 4, 1))
  return images, rng.permutation(np.arange(n) % classes)


def _identity(images, reference):
  """Index of each image in ``reference`` (the images are told apart by their value)."""
  return np.array([int(np.argmin(np.abs(reference[:, 0, 0, 0] - x[0, 0, 0]))) for x in images])


def test_diversity_degradations_keep_size_classes_and_real_images():
  images, labels = _labelled()
  pool_images, pool_labels = _labelled(seed=1)
  pool_images = pool_images + 0.01  # pool images differ from the set's own
  rng = np.random.default_rng(0)
  for level in sanity.LEVELS["collapse"]:
    out = sanity.degrade("collapse", level, images, labels, (pool_images, pool_labels), rng)
    index = _identity(out, images)
    assert out.shape == images.shape
    np.testing.assert_array_equal(labels[index], labels)  # every image replaced by one of its own class
    for c in np.unique(labels):
      assert len(np.unique(index[labels == c])) == level
  kept_before = None
  for level in sanity.LEVELS["drop_classes"]:
    out = sanity.degrade("drop_classes", level, images, labels, (pool_images, pool_labels), rng)
    from_pool = np.abs(out[:, 0, 0, 0, None] - pool_images[None, :, 0, 0, 0]).min(1) < 1e-12
    untouched = np.all(out == images, axis=(1, 2, 3))
    assert np.all(from_pool ^ untouched)
    kept = set(labels[untouched])
    pool_classes = set(pool_labels[_identity(out[from_pool] - 0.01, pool_images - 0.01)])
    assert pool_classes <= kept and len(kept) == max(1, round(level * 6))
    assert kept_before is None or kept <= kept_before  # each level keeps a subset of the milder one's classes
    kept_before = kept


def test_fidelity_degradations():
  rng = np.random.default_rng(0)
  images = np.zeros((400, 8, 8, 1))
  noisy = sanity.degrade("noise", 0.2, images, None, None, rng)
  assert abs(noisy.std() - 0.2) < 0.01  # 25,600 draws: the std's relative error is ~0.5%
  assert np.array_equal(sanity.degrade("saturation", 4.0, np.full((1, 2, 2, 1), 0.1), None, None, rng),
                        np.full((1, 2, 2, 1), 0.4))
  assert sanity.degrade("saturation", 4.0, np.full((1, 2, 2, 1), -0.5), None, None, rng).min() == -1.0
  ramp = np.arange(64.0).reshape(1, 8, 8, 1) / 64
  shuffled = sanity.degrade("shuffle", 0.35, ramp, None, None, rng)
  assert sorted(shuffled.ravel()) == sorted(ramp.ravel())
  assert 0 < np.sum(shuffled != ramp) <= round(0.35 * 64)
  blurred = sanity.degrade("blur", 0.125, np.pad(np.ones((1, 1, 1, 1)), ((0, 0), (7, 8), (7, 8), (0, 0))), None, None,
                           rng)
  # sigma = 0.125 * 16 px = 2 px: an impulse's peak becomes the 2-D Gaussian's 1 / (2 pi sigma^2).
  assert blurred.max() == pytest.approx(1.0 / (2.0 * np.pi * 2.0**2), rel=1e-3)
  with pytest.raises(ValueError, match="unknown degradation"):
    sanity.degrade("jpeg", 50, images, None, None, rng)


def _table(values: dict[str, list[float]]) -> dict:
  """A sanity table whose every draw of every cell holds one value per metric: values[kind] = [floor, l1, ..., l4]."""
  cell = lambda v: [{m: intervals.Estimate(v if m in ("precision", "recall") else 0.0, 0.0, "") for m in sanity.SEES}]
  floor = next(iter(values.values()))[0]
  levels = lambda k: values[k][1:] if k in values else [floor - 0.1 * i for i in range(1, 5)]
  return {"floor": cell(floor)} | {k: [cell(v) for v in levels(k)] for k in sanity.FIDELITY + sanity.DIVERSITY}


def test_verdicts():
  # precision and recall hold the values; the other metrics stay at 0 (no worsening: they fail everything).
  out = sanity.failures(_table({"noise": [0.9, 0.8, 0.8, 0.5, 0.1], "collapse": [0.9, 0.3, 0.0, 0.0, 0.0]}))
  assert out["precision"] == ["noise step 2"]  # a tie away from the worst value fails
  assert out["recall"] == []  # recall at 0, its worst value, cannot fall further
  out = sanity.failures(_table({"drop_classes": [0.9, 0.8, 0.85, 0.5, 0.1]}))
  assert out["recall"] == ["drop_classes step 2"] and out["precision"] == []
  assert len(out["frechet_distance"]) == 24  # six degradations, four steps each, none worsening
  with pytest.raises(ValueError, match="2 <= n"):
    sanity.run(lambda x: x.reshape(len(x), -1), *_labelled()[:1], _labelled(), 60)


@pytest.fixture(scope="module")
def digit_data(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  return data_dir, digits.real_digits(data_dir, "test", 8)[0], digits.real_digits(data_dir, "train", 8)


def test_every_metric_passes_in_the_trainers_digit_feature_space(digit_data, tmp_path):
  data_dir, test, train = digit_data
  networks = features.digit_networks(str(tmp_path), data_dir, image_size=8, seed=0)
  assert networks == features.SHIPPED  # nothing trained: the shipped networks
  space = features.digit_feature_space(*networks, train[0])
  verdict = features.reportable(space, str(tmp_path), test, train, n=len(test))
  assert verdict["failures"] == {m: [] for m in sanity.SEES}  # every metric passes every degradation
  assert verdict["passed"] == list(sanity.SEES)
  assert features.reportable(space, str(tmp_path), test, train, n=len(test)) == verdict  # the cached verdict


@pytest.mark.slow  # builds the shapes data set (minutes): python -m pytest -m slow tests/test_evaluate_sanity.py
def test_every_metric_passes_in_the_trainers_shapes_feature_space(tmp_path):
  data_dir = str(tmp_path / "tfds")
  path = features.shapes_network(str(tmp_path), data_dir, seed=0)
  assert path == features.SHIPPED_SHAPES
  train = features.shapes_real(data_dir)
  space = features.shapes_feature_space(path, train[0])
  n = 36 * 8  # configs/shapes_ldm.py: 36 captions x 8 samples per split
  verdict = features.reportable(space, str(tmp_path), real_shapes(data_dir, "validation")[0],
                                train, n=n)
  assert verdict["passed"] == list(sanity.SEES), verdict["failures"]
