"""Image helpers: uint8 conversion, grids and the labelled sample grid."""

import numpy as np
import pytest
from PIL import Image

from diffjax import images


def test_to_uint8_and_grid():
  np.testing.assert_array_equal(images.to_uint8(np.array([-1.0, 0.0, 1.0, 3.0])), [0, 128, 255, 255])
  imgs = np.arange(6 * 2 * 2, dtype=np.uint8).reshape(6, 2, 2, 1)
  g = images.grid(imgs, rows=2, pad=1)
  assert g.shape == (2 * 3 + 1, 3 * 3 + 1, 1)
  np.testing.assert_array_equal(g[4:6, 7:9], imgs[5])  # row 1, column 2


def test_labeled_grid_keeps_the_images_and_adds_labels(tmp_path):
  rng = np.random.default_rng(0)
  imgs = rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)
  out = images.save_labeled_grid(imgs, ["a red circle", "two blue squares"], str(tmp_path / "g.png"), min_width=40)
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "g.png")), out)
  g = images.grid(imgs, rows=2)
  scale = -(-40 // g.shape[1])
  text_w = out.shape[1] - g.shape[1] * scale
  assert out.shape[0] == g.shape[0] * scale and text_w > 20
  np.testing.assert_array_equal(out[:, text_w:], np.repeat(np.repeat(g, scale, 0), scale, 1))
  assert (out[:, :text_w] < 128).any()  # some text was drawn on the white margin
  with pytest.raises(ValueError, match="labelled rows"):
    images.save_labeled_grid(imgs, ["a", "b", "c", "d"], str(tmp_path / "x.png"))
