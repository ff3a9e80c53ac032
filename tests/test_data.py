"""Embedded TFDS datasets, the shapes checker, and the grain pipeline."""

import collections

import numpy as np
import pytest

from diffjax.data import digits, pipeline, shapes


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _bytes_tokenize(text, length=40):
  return np.frombuffer(text.encode().ljust(length, b"\0")[:length], np.uint8)


def test_digits_builder_is_the_real_sklearn_data(data_dir):
  from sklearn.datasets import load_digits

  train = pipeline.load_source("digits_captions", "train", data_dir)
  test = pipeline.load_source("digits_captions", "test", data_dir)
  assert (len(train), len(test)) == (1497, 300)
  ref = load_digits()
  ex = train[0]
  assert ex["image"].shape == (8, 8, 1) and ex["image"].dtype == np.uint8
  # every example is one of sklearn's images with its label, and its caption names that label
  scaled = np.round(ref.images * 255 / 16)
  matches = [i for i in range(len(ref.target)) if np.array_equal(scaled[i], ex["image"][..., 0])]
  assert matches and all(ref.target[i] == ex["label"] for i in matches)
  captions = collections.Counter()
  for i in range(200):
    e = train[i]
    caption = e["caption"].decode()
    assert digits.NUMBER_WORDS[e["label"]] in caption or str(e["label"]) in caption
    captions[caption.replace(digits.NUMBER_WORDS[e["label"]], "#").replace(str(e["label"]), "#")] += 1
  assert len(captions) == len(digits.CAPTION_TEMPLATES)  # varied phrasings
  assert digits.prompt_for(7) == "a handwritten digit seven"
  with pytest.raises(ValueError, match="splits"):
    pipeline.load_source("digits_captions", "validation", data_dir)
  both = pipeline.load_source("digits_captions", "train+test[:10]", data_dir)  # a union: train, then test's first 10
  assert len(both) == 1507
  np.testing.assert_array_equal(both[1500]["image"], test[3]["image"])
  with pytest.raises(ValueError, match="splits"):
    pipeline.load_source("digits_captions", "train+validation", data_dir)


def test_shapes_checker_recovers_every_attribute_of_rendered_images():
  rng = np.random.default_rng(0)
  for colour in shapes.COLOURS:
    for shape in shapes.SHAPES:
      for count in (1, 2, 3):
        for position in shapes.POSITIONS:
          judged = shapes.check(shapes.render(colour, shape, count, position, rng))
          assert (judged["colour"], judged["shape"], judged["count"]) == (colour, shape, count)
          assert position in judged["positions"]
  assert shapes.check(np.zeros((32, 32, 3), np.uint8))["count"] == 0
  assert shapes.caption("red", "circle", 2, "left") == "two red circles on the left"
  assert shapes.caption("blue", "square", 1, "top") == "a blue square at the top"


def test_shapes_splits_hold_out_combinations(data_dir):
  held = pipeline.load_source("shapes_captions", "held_out", data_dir)
  train = pipeline.load_source("shapes_captions", "train", data_dir)
  colours, kinds = list(shapes.COLOURS), list(shapes.SHAPES)
  pair = lambda e: (colours[e["colour"]], kinds[e["shape"]])
  assert all(pair(train[i]) not in shapes.HELD_OUT for i in range(0, len(train), 97))
  assert all(pair(held[i]) in shapes.HELD_OUT for i in range(0, len(held), 13))
  e = held[3]
  assert shapes.check(e["image"])["colour"] == colours[e["colour"]]


def _collect(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


def test_pipeline_batches_determinism_and_exact_resume(data_dir):
  src = pipeline.load_source("digits_captions", "train", data_dir)
  opts = pipeline.ImageTextOptions(batch_size=8, image_size=16, max_shift=1, extra_keys=("label",))
  ds = pipeline.image_text_dataset(src, opts, _bytes_tokenize, seed=3)
  batches = _collect(ds, 4)
  b = batches[0]
  assert b["image"].shape == (8, 16, 16, 1) and b["image"].dtype == np.float32
  assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
  assert b["tokens"].shape == (8, 40) and b["label"].shape == (8,)
  again = _collect(pipeline.image_text_dataset(src, opts, _bytes_tokenize, seed=3), 4)
  for x, y in zip(batches, again, strict=True):
    np.testing.assert_array_equal(x["image"], y["image"])
  other = _collect(pipeline.image_text_dataset(src, opts, _bytes_tokenize, seed=4), 1)[0]
  assert not np.array_equal(other["label"], b["label"]) or not np.array_equal(other["image"], b["image"])
  # the iterator position round-trips: resuming from a saved state continues identically
  it = iter(ds)
  next(it), next(it)
  state = it.get_state()
  expected = next(it)
  resumed = iter(pipeline.image_text_dataset(src, opts, _bytes_tokenize, seed=3))
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["image"], expected["image"])


def test_pipeline_shards_are_disjoint_and_cover_an_epoch(data_dir):
  src = pipeline.load_source("digits_captions", "test", data_dir)  # 300 examples
  opts = pipeline.ImageTextOptions(batch_size=50, image_size=8, extra_keys=("label",))
  seen = []
  for shard in range(2):
    ds = pipeline.image_text_dataset(src, opts, _bytes_tokenize, seed=0, shard_index=shard, shard_count=2,
                                     num_epochs=1)
    seen.append(np.concatenate([b["image"].reshape(50, -1) for b in ds]))
  assert [len(s) for s in seen] == [150, 150]
  rows = {r.tobytes() for r in np.concatenate(seen)}
  assert len(rows) >= 290  # a few digits are pixel-identical duplicates in the source
  with pytest.raises(ValueError, match="shard_index"):
    pipeline.image_text_dataset(src, opts, _bytes_tokenize, seed=0, shard_index=2, shard_count=2)


def test_process_shards_of_a_batch_make_up_the_single_process_batch(data_dir):
  """The global batches (augmentation included) do not depend on the number of processes."""
  src = pipeline.load_source("digits_captions", "test", data_dir)
  whole = pipeline.image_text_dataset(src, pipeline.ImageTextOptions(batch_size=12, image_size=8, max_shift=1),
                                      _bytes_tokenize, seed=5)
  local = pipeline.ImageTextOptions(batch_size=4, image_size=8, max_shift=1)
  parts = [iter(pipeline.image_text_dataset(src, local, _bytes_tokenize, seed=5, shard_index=i, shard_count=3))
           for i in range(3)]
  for batch in _collect(whole, 30):  # 360 examples: past the end of the first epoch
    pieces = [next(p) for p in parts]
    for key in ("image", "tokens"):
      np.testing.assert_array_equal(np.concatenate([piece[key] for piece in pieces]), batch[key])
