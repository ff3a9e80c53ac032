"""Procedural coloured shapes with compositional captions, and a checker that judges images.

Each 32x32 RGB image (black background) holds ``count`` (1-3) identical filled
shapes of one ``colour`` and ``shape`` inside one half of the canvas (``position``):
caption "two red circles on the left". Colour/shape pairs in ``HELD_OUT`` never
appear in ``train``: split ``held_out`` has only them, to measure compositional
generalization; ``validation`` has the training combinations.

``check(image)`` recovers (colour, shape, count, position) from an image by simple
image analysis, so generated samples can be judged per attribute.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw
from scipy import ndimage

from diffjax.data.encoding import png_file

SIZE = 32
COLOURS = {"red": (230, 30, 30), "green": (30, 200, 30), "blue": (40, 60, 240), "yellow": (230, 220, 30)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom")
COUNT_WORDS = ("one", "two", "three")
HELD_OUT = (("blue", "triangle"), ("yellow", "circle"), ("green", "square"))
_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}  # area / bounding-box area
SPLIT_SIZES = {"train": 20000, "validation": 1000, "held_out": 1000}


def caption(colour: str, shape: str, count: int, position: str) -> str:
  noun = shape + ("s" if count > 1 else "")
  where = f"on the {position}" if position in ("left", "right") else f"at the {position}"
  article = "a" if count == 1 else COUNT_WORDS[count - 1]
  return f"{article} {colour} {noun} {where}"


def parse_caption(text: str, colours=COLOURS) -> dict:
  """The inverse of ``caption``: {"colour", "shape", "count", "position"}; ValueError for other text (a colour
  word not in ``colours``)."""
  words = text.split()
  counts = {"a": 1, **{w: i + 1 for i, w in enumerate(COUNT_WORDS)}}
  if len(words) != 6 or words[0] not in counts or words[1] not in colours:
    raise ValueError(f"not a shapes caption: {text!r}")
  count, shape = counts[words[0]], words[2].removesuffix("s") if words[0] != "a" else words[2]
  out = {"colour": words[1], "shape": shape, "count": count, "position": words[-1]}
  if shape not in SHAPES or words[-1] not in POSITIONS or caption(**out) != text:
    raise ValueError(f"not a shapes caption: {text!r}")
  return out


CONTROL_KINDS = ("mask", "edges")
_INK = 0.2  # a pixel brighter than this (in [0, 1], any channel) belongs to a shape: the background is black


def control_map(images: np.ndarray, kind: str = "mask") -> np.ndarray:
  """Where the shapes of ``images`` (N, H, W, C) in [-1, 1] are, as ControlNet control images (N, H, W, 3) float32
  in {0, 1}: "mask" (every shape pixel) or "edges" (shape pixels with a background 4-neighbour)."""
  if kind not in CONTROL_KINDS:
    raise ValueError(f"control map kind must be one of {CONTROL_KINDS}, got {kind!r}")
  ink = ((np.asarray(images, np.float32) + 1.0) / 2.0).max(axis=-1) > _INK
  if kind == "edges":
    inside = ndimage.binary_erosion(ink, structure=np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], bool),
                                    border_value=0)
    ink = ink & ~inside
  return np.repeat(ink[..., None], 3, axis=-1).astype(np.float32)


def _region(position):
  """(x0, y0, x1, y1) of the canvas half for ``position``."""
  h = SIZE // 2
  return {"left": (0, 0, h, SIZE), "right": (h, 0, SIZE, SIZE), "top": (0, 0, SIZE, h), "bottom": (0, h, SIZE, SIZE)}[
      position]


def render(colour: str, shape: str, count: int, position: str, rng: np.random.Generator,
           colours: dict = COLOURS) -> np.ndarray:
  """uint8 (32, 32, 3) image of ``count`` non-touching shapes in the ``position`` half (``colours``: name -> RGB)."""
  x0, y0, x1, y1 = _region(position)
  image = Image.new("RGB", (SIZE, SIZE))
  draw = ImageDraw.Draw(image)
  # One slot per shape along the half's long side, jittered inside it: never touching.
  vertical = position in ("left", "right")
  slot = SIZE / count
  boxes = []
  for k in range(count):
    s = int(rng.integers(6, 9))
    along = int(k * slot + 1 + rng.integers(0, max(int(slot) - s - 1, 1)))
    across = int(rng.integers(1, SIZE // 2 - s))
    bx, by = (x0 + across, along) if vertical else (along, y0 + across)
    boxes.append((bx, by, s))
  for bx, by, s in boxes:
    box = (bx, by, bx + s - 1, by + s - 1)
    fill = tuple(colours[colour])
    if shape == "circle":
      draw.ellipse(box, fill=fill)
    elif shape == "square":
      draw.rectangle(box, fill=fill)
    else:
      draw.polygon([(bx, by + s - 1), (bx + s - 1, by + s - 1), (bx + (s - 1) / 2, by)], fill=fill)
  return np.asarray(image)


def check(image, colours: dict = COLOURS) -> dict:
  """Judges an image: {"colour", "shape", "count", "positions"}.

  ``positions`` lists every half that contains all the shapes (a shape in the top-left
  corner is both "on the left" and "at the top"); a caption's position is right if it
  is in this list. colour/shape are None for an empty image.

  Args:
    image: (32, 32, 3) array, uint8 in [0, 255] or float in [0, 1].
    colours: the colours told apart (name -> RGB): the shapes' mean colour's nearest.
  """
  img = np.asarray(image, np.float64)
  if img.max() > 1.5:
    img = img / 255.0
  mask = img.max(axis=-1) > 0.4
  labels, n = ndimage.label(mask)
  sizes = ndimage.sum(mask, labels, range(1, n + 1)) if n else np.zeros(0)
  keep = [i + 1 for i, sz in enumerate(sizes) if sz >= 8]  # ignore specks
  if not keep:
    return {"colour": None, "shape": None, "count": 0, "positions": []}
  fg = np.isin(labels, keep)
  mean_rgb = img[fg].mean(axis=0) * 255
  colour = min(colours, key=lambda c: np.sum((np.asarray(colours[c]) - mean_rgb) ** 2))
  fills = []
  for i in keep:
    ys, xs = np.nonzero(labels == i)
    fills.append(len(xs) / ((np.ptp(xs) + 1) * (np.ptp(ys) + 1)))
  shape = min(_FILL, key=lambda s: abs(_FILL[s] - float(np.median(fills))))
  ys, xs = np.nonzero(fg)
  h = SIZE // 2
  inside = {"left": xs.max() < h, "right": xs.min() >= h, "top": ys.max() < h, "bottom": ys.min() >= h}
  return {"colour": colour, "shape": shape, "count": len(keep), "positions": [p for p in POSITIONS if inside[p]]}


def combinations(split: str):
  """The (colour, shape) pairs of a split."""
  pairs = [(c, s) for c in COLOURS for s in SHAPES]
  if split == "held_out":
    return [p for p in pairs if p in HELD_OUT]
  return [p for p in pairs if p not in HELD_OUT]


class ShapesCaptions(tfds.core.GeneratorBasedBuilder):
  """Procedural shapes with compositional captions (see module docstring)."""

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
            "image": tfds.features.Image(shape=(SIZE, SIZE, 3), encoding_format="png"),
            "caption": tfds.features.Text(),
            "colour": tfds.features.ClassLabel(names=list(COLOURS)),
            "shape": tfds.features.ClassLabel(names=list(SHAPES)),
            "count": tfds.features.Scalar(np.int32),
            "position": tfds.features.ClassLabel(names=list(POSITIONS)),
        }),
    )

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split, seed) for seed, split in enumerate(SPLIT_SIZES)}

  def _generate_examples(self, split, seed):
    rng = np.random.default_rng(seed)
    pairs = combinations(split)
    for i in range(SPLIT_SIZES[split]):
      colour, shape = pairs[int(rng.integers(len(pairs)))]
      count, position = int(rng.integers(1, 4)), POSITIONS[int(rng.integers(len(POSITIONS)))]
      image = render(colour, shape, count, position, rng)
      yield i, {"image": png_file(image), "caption": caption(colour, shape, count, position), "colour": colour,
                "shape": shape, "count": count, "position": position}
