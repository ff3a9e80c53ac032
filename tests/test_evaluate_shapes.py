"""Per-attribute accuracy of shapes images, judged by the shapes checker."""

import itertools

import numpy as np
import pytest

from diffjax.data import shapes
from diffjax.evaluate.shapes import ATTRIBUTES, asked_attributes, attribute_accuracy


def _rendered(rng, colour_of=lambda c: c):
  """Every (colour, shape, count, position): uint8 images drawn in colour_of(colour), and the requested attributes."""
  combos = list(itertools.product(shapes.COLOURS, shapes.SHAPES, (1, 2, 3), shapes.POSITIONS))
  images = np.stack([shapes.render(colour_of(c), s, n, p, rng) for c, s, n, p in combos])
  attributes = {a: [combo[i] for combo in combos] for i, a in enumerate(("colour", "shape", "count", "position"))}
  return images, attributes


def test_rendered_images_score_one_as_uint8_floats_and_class_indices():
  images, attributes = _rendered(np.random.default_rng(0))
  perfect = dict.fromkeys(("colour", "shape", "count", "position", "all"), 1.0)
  assert attribute_accuracy(images, attributes) == perfect
  assert attribute_accuracy(images.astype(np.float32) / 127.5 - 1.0, attributes) == perfect  # model range [-1, 1]
  indices = {"colour": [list(shapes.COLOURS).index(c) for c in attributes["colour"]],
             "shape": np.array([shapes.SHAPES.index(s) for s in attributes["shape"]]),
             "count": np.array(attributes["count"], np.int32),
             "position": [shapes.POSITIONS.index(p) for p in attributes["position"]]}
  assert attribute_accuracy(images, indices) == perfect  # the dataset's ClassLabel integers


def test_wrong_colours_score_zero_on_colour_only():
  colours = list(shapes.COLOURS)
  swap = lambda c: colours[(colours.index(c) + 1) % len(colours)]
  images, attributes = _rendered(np.random.default_rng(1), colour_of=swap)
  acc = attribute_accuracy(images, attributes)
  assert acc == {"colour": 0.0, "shape": 1.0, "count": 1.0, "position": 1.0, "all": 0.0}


def test_partly_wrong_positions_and_black_images():
  images, attributes = _rendered(np.random.default_rng(2))
  opposite = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
  half = len(images) // 2
  attributes["position"] = [opposite[p] if i < half else p for i, p in enumerate(attributes["position"])]
  acc = attribute_accuracy(images, attributes)
  assert acc["position"] == acc["all"] == pytest.approx(0.5) and acc["colour"] == 1.0
  black = -np.ones(images.shape, np.float32)
  assert attribute_accuracy(black, attributes) == dict.fromkeys(("colour", "shape", "count", "position", "all"), 0.0)


def test_validates_inputs():
  images, attributes = _rendered(np.random.default_rng(3))
  with pytest.raises(ValueError, match="shape"):
    attribute_accuracy(images[:, :16], attributes)
  with pytest.raises(ValueError, match="lack"):
    attribute_accuracy(images, {"colour": attributes["colour"]})
  with pytest.raises(ValueError, match="unknown colour"):
    attribute_accuracy(images, {**attributes, "colour": ["purple"] * len(images)})
  with pytest.raises(ValueError, match="unknown shape"):
    attribute_accuracy(images, {**attributes, "shape": [3] * len(images)})
  with pytest.raises(ValueError, match="values per attribute"):
    attribute_accuracy(images[:5], attributes)


def test_a_new_colour_word_is_rendered_and_judged(tmp_path):
  """experiments/new_colour.py's folder: its captions parse with the token as a colour, the checker judges its
  images right with that colour added, and images of the data's own colours are not taken for it."""
  import json

  from PIL import Image

  from experiments.new_colour import write_folder

  colours = dict(shapes.COLOURS) | {"<purple>": (170, 40, 210)}
  captions = write_folder(str(tmp_path), "<purple>", (170, 40, 210), 12)
  lines = [json.loads(line) for line in open(tmp_path / "metadata.jsonl")]
  assert [entry["text"] for entry in lines] == captions
  imgs = np.stack([np.asarray(Image.open(tmp_path / entry["file_name"])) for entry in lines])
  asked = [shapes.parse_caption(c, colours) for c in captions]
  wanted = {a: [q[a] for q in asked] for a in ATTRIBUTES}
  assert attribute_accuracy(imgs, wanted, colours)["all"] == 1.0
  reds = np.stack([shapes.render("red", q["shape"], q["count"], q["position"], np.random.default_rng(i))
                   for i, q in enumerate(asked)])
  assert attribute_accuracy(reds, wanted, colours)["colour"] == 0.0


def test_what_an_example_asks_for_comes_from_its_labels_else_its_caption():
  labels = {"colour": 2, "shape": 2, "count": 1, "position": "top"}
  assert asked_attributes(labels, "anything") == labels
  assert asked_attributes({}, "two red squares on the left") == {"colour": "red", "shape": "square", "count": 2,
                                                                 "position": "left"}
  assert asked_attributes({}, "a <c> circle at the top") is None  # a colour word the colours do not name
  colours = dict(shapes.COLOURS) | {"<c>": (170, 40, 210)}
  assert asked_attributes({}, "a <c> circle at the top", colours)["colour"] == "<c>"
  assert asked_attributes({}, "the digit seven") is None
