"""The 1,797 real 8x8 handwritten digits that scikit-learn ships, with varied captions.

Built locally as a TFDS dataset (array_record, no download, no TensorFlow):

  builder = DigitsCaptions(data_dir=...); builder.download_and_prepare()
  source = builder.as_data_source()["train"]      # grain-compatible random access

Each example: ``image`` uint8 (8, 8, 1) in [0, 255] (the 0..16 ink levels scaled),
``label`` 0..9, ``caption`` one of several phrasings naming the digit, chosen per
example with a fixed seed. Splits: ``train`` (1,497) and ``test`` (300), a fixed
random split.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from diffjax.data.encoding import png_file

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {digit}",
    "a handwritten {digit}",
    "the digit {word}",
    "a drawing of the number {word}",
    "{word}, written by hand",
    "an image of a {digit}",
    "a scanned handwritten {word}",
)
NUM_TEST = 300


def caption_for(label: int, template: int) -> str:
  return CAPTION_TEMPLATES[template].format(word=NUMBER_WORDS[label], digit=label)


def prompt_for(label: int) -> str:
  """The evaluation prompt for a digit: "a handwritten digit seven"."""
  return caption_for(label, 0)


class DigitsCaptions(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's handwritten digits with captions (see module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def __init__(self, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1), encoding_format="png"),
            "label": tfds.features.ClassLabel(names=list(NUMBER_WORDS)),
            "caption": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    from sklearn.datasets import load_digits  # ships the data; no download

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    return {"train": self._generate_examples(digits, order[NUM_TEST:]),
            "test": self._generate_examples(digits, order[:NUM_TEST])}

  def _generate_examples(self, digits, indices):
    rng = np.random.default_rng(1)
    templates = rng.integers(len(CAPTION_TEMPLATES), size=len(digits.target))
    for i in indices:
      label = int(digits.target[i])
      image = np.round(digits.images[i] * (255.0 / 16.0)).astype(np.uint8)[..., None]
      yield int(i), {"image": png_file(image), "label": label, "caption": caption_for(label, int(templates[i]))}
