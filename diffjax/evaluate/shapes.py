"""Per-attribute accuracy of generated shapes images, judged by ``diffjax.data.shapes.check``; real shapes images."""

from __future__ import annotations

import numpy as np

from diffjax.data import pipeline, shapes

ATTRIBUTES = ("colour", "shape", "count", "position")
_VOCABULARY = {"colour": tuple(shapes.COLOURS), "shape": shapes.SHAPES, "position": shapes.POSITIONS}


def _names(values, attribute: str, colours=None) -> list:
  """Attribute values as names: strings pass through, integers are TFDS class indices (count stays an int)."""
  if attribute == "count":
    return [int(v) for v in values]
  vocabulary = tuple(colours) if attribute == "colour" and colours is not None else _VOCABULARY[attribute]
  index = lambda i: vocabulary[i] if 0 <= i < len(vocabulary) else f"index {i}"
  names = [v.decode() if isinstance(v, bytes) else v if isinstance(v, str) else index(int(v)) for v in values]
  unknown = sorted({n for n in names if n not in vocabulary})
  if unknown:
    raise ValueError(f"unknown {attribute} values {unknown}; expected one of {vocabulary} or their indices")
  return names


def _unit_range(images) -> np.ndarray:
  """float64 images in [0, 1] from uint8 in [0, 255] or float in [-1, 1] (clipped)."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images / 255.0
  return (np.clip(images.astype(np.float64), -1.0, 1.0) + 1.0) / 2.0


def attribute_accuracy(images, attributes, colours: dict | None = None) -> dict[str, float]:
  """Fraction of images whose colour, shape, count and position match what their captions asked for.

  Args:
    images: (N, 32, 32, 3), float in [-1, 1] (model outputs; clipped) or uint8 in [0, 255].
    attributes: {"colour", "shape", "count", "position"} -> (N,) sequences of the requested
      values: names ("red", "circle", 2, "left") or the dataset's integer class indices
      (as ``ShapesCaptions`` stores them; count is the number itself, 1-3).
  Returns:
    {"colour", "shape", "count", "position", "all"} -> accuracy in [0, 1]. A position is
    right if ``check`` finds every shape inside that half (a shape in a corner is right
    for two positions); "all" is the fraction with every attribute right. An empty
    (e.g. black) image is wrong on every attribute.
    colours: the colours told apart, name -> RGB (None: the data's four; e.g. with a learnt
      token's colour added, the colour asked for by name).
  """
  images = _unit_range(images)
  if images.ndim != 4 or images.shape[1:] != (shapes.SIZE, shapes.SIZE, 3) or not len(images):
    raise ValueError(f"need images of shape (N >= 1, {shapes.SIZE}, {shapes.SIZE}, 3), got {images.shape}")
  missing = [a for a in ATTRIBUTES if a not in attributes]
  if missing:
    raise ValueError(f"attributes lack {missing}")
  wanted = {a: _names(attributes[a], a, colours) for a in ATTRIBUTES}
  if any(len(v) != len(images) for v in wanted.values()):
    raise ValueError(f"need {len(images)} values per attribute, got { {a: len(v) for a, v in wanted.items()} }")
  judged = [shapes.check(image, colours or shapes.COLOURS) for image in images]
  right = {a: np.array([j[a] == w for j, w in zip(judged, wanted[a], strict=True)], bool)
           for a in ("colour", "shape", "count")}
  right["position"] = np.array([w in j["positions"] for j, w in zip(judged, wanted["position"], strict=True)], bool)
  right["all"] = np.logical_and.reduce([right[a] for a in ATTRIBUTES])
  return {k: float(v.mean()) for k, v in right.items()}


def asked_attributes(record: dict, caption: str, colours: dict | None = None) -> dict | None:
  """What a shapes example asks for: its labels ({attribute: value} for every one of ``ATTRIBUTES``), else its
  caption's words (``data.shapes.parse_caption`` with ``colours``, e.g. a textual-inversion token as a colour);
  None when neither says."""
  if all(a in record for a in ATTRIBUTES):
    return {a: record[a] for a in ATTRIBUTES}
  try:
    return shapes.parse_caption(caption, shapes.COLOURS if colours is None else colours)
  except ValueError:
    return None


def mask_iou(images, wanted: np.ndarray) -> np.ndarray:
  """(N,) intersection over union of where ``images`` (N, H, W, C) uint8 have shapes (``shapes.control_map``'s mask)
  and the masks ``wanted`` (N, H, W) bool; 1 where both are empty."""
  got = shapes.control_map(np.asarray(images, np.float32) / 127.5 - 1.0, "mask")[..., 0] > 0.5
  union = (got | wanted).sum((1, 2))
  return np.where(union > 0, (got & wanted).sum((1, 2)) / np.maximum(union, 1), 1.0)


def real_shapes(data_dir: str | None, split: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """A ``shapes_captions`` split (slices such as "train[:4000]" too) as the pipeline serves it.

  Returns images (N, 32, 32, 3) float32 in [-1, 1] and {attribute: (N,) int32} (TFDS class
  indices; count is the number 1-3) for ``ATTRIBUTES``.
  """
  source = pipeline.load_source("shapes_captions", split, data_dir)
  options = pipeline.ImageTextOptions(batch_size=len(source), image_size=shapes.SIZE, extra_keys=ATTRIBUTES)
  batch = next(iter(pipeline.image_text_dataset(source, options, lambda caption: np.zeros(1, np.int32), seed=0,
                                                num_epochs=1, shuffle=False)))
  return batch["image"], {a: batch[a] for a in ATTRIBUTES}


def pair_labels(attributes: dict[str, np.ndarray]) -> np.ndarray:
  """(N,) the colour/shape pair of each image as one int: colour * len(SHAPES) + shape."""
  return np.asarray(attributes["colour"]) * len(shapes.SHAPES) + np.asarray(attributes["shape"])
