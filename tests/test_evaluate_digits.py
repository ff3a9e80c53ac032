"""The digit classifier: prompt accuracy, and Frechet distance in its embedding."""

import numpy as np
import pytest

from diffjax.evaluate import digits
from diffjax.evaluate.frechet import feature_frechet_distance


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def trained(data_dir):
  """(params, test accuracy) of the classifier trained once at 8x8."""
  return digits.train_digit_classifier(data_dir, image_size=8, seed=0)


@pytest.fixture(scope="module")
def real(data_dir):
  return {split: digits.real_digits(data_dir, split, 8) for split in ("train", "test")}


def test_classifier_accuracy_and_prompt_accuracy(trained, real):
  params, accuracy = trained
  images, labels = real["test"]
  assert images.shape == (300, 8, 8, 1) and -1 <= images.min() and images.max() <= 1
  assert accuracy >= 0.97
  assert digits.prompt_accuracy(params, images, labels) == pytest.approx(accuracy)
  shuffled = np.random.default_rng(0).permutation(labels)
  assert 0.03 <= digits.prompt_accuracy(params, images, shuffled) <= 0.2  # chance is 0.1
  assert digits.logits(params, images).shape == (300, 10)
  assert digits.features(params, images).shape == (300, digits.FEATURES)
  with pytest.raises(ValueError, match="one label per image"):
    digits.prompt_accuracy(params, images, labels[:10])
  with pytest.raises(ValueError, match="shape"):
    digits.features(params, images[..., 0])


def test_accepts_16x16_images(trained, data_dir):
  """The 8x8-trained network also reads the pipeline's 16x16 (bilinear upsampled) digits."""
  images, labels = digits.real_digits(data_dir, "test", 16)
  assert images.shape == (300, 16, 16, 1)
  assert digits.prompt_accuracy(trained[0], images, labels) >= 0.95


def test_frechet_distance_separates_real_from_noise_and_wrong_class(trained, real):
  params = trained[0]
  fd = lambda x, y: feature_frechet_distance(digits.features(params, x), digits.features(params, y))
  (train, train_labels), (test, _) = real["train"], real["test"]
  same = fd(train[:300], test)
  noise = np.random.default_rng(0).uniform(-1, 1, test.shape).astype(np.float32)
  to_noise = fd(noise, test)
  only_zeros = fd(train[train_labels == 0], test)
  assert 0 < same < to_noise / 10 and same < only_zeros / 10, (same, to_noise, only_zeros)
  assert fd(test, test) == pytest.approx(0.0, abs=1e-6)


def test_save_load_and_cache(trained, real, tmp_path, monkeypatch):
  params, accuracy = trained
  path = str(tmp_path / "sub" / "digits_classifier.npz")
  digits.save_digit_classifier(path, params, accuracy, 8)
  loaded, loaded_accuracy, image_size = digits.load_digit_classifier(path)
  images = real["test"][0]
  np.testing.assert_array_equal(digits.logits(loaded, images), digits.logits(params, images))
  assert (loaded_accuracy, image_size) == (accuracy, 8)

  def train_again(data_dir, *, image_size, seed):
    return params, -float(image_size)

  monkeypatch.setattr(digits, "train_digit_classifier", train_again)
  assert digits.cached_digit_classifier(path, None, image_size=8, seed=0)[1] == accuracy  # loaded, not trained
  assert digits.cached_digit_classifier(path, None, image_size=16, seed=0)[1] == -16.0  # other size: retrained
  assert digits.load_digit_classifier(path)[2] == 16  # and saved over the old one
  np.savez(tmp_path / "other.npz", test_accuracy=1.0, image_size=8, **{"params/Dense_0/kernel": np.zeros(3)})
  with pytest.raises(ValueError, match="DigitCNN"):
    digits.load_digit_classifier(str(tmp_path / "other.npz"))
  assert digits.cached_digit_classifier(str(tmp_path / "other.npz"), None, image_size=8, seed=0)[1] == -8.0
  assert digits.load_digit_classifier(str(tmp_path / "other.npz"))[1] == -8.0  # replaced by a good one
