"""grain input pipelines for image-text data.

``load_source`` gives a random-access source (a TFDS ``array_record`` data source:
the embedded datasets are built locally on first use; any other TFDS name is read
with ``tfds.data_source`` where it can be downloaded). ``image_text_dataset`` turns
it into a sharded, seeded, shuffled, augmented, tokenized, batched and prefetched
``grain.IterDataset`` whose iterator state (``get_state``/``set_state``) is
checkpointed with the model for exact resumption.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import grain
import numpy as np
from PIL import Image

EMBEDDED = {
    "digits_captions": "diffjax.data.digits:DigitsCaptions",
    "shapes_captions": "diffjax.data.shapes:ShapesCaptions",
}


def caption_text(caption) -> str:
  """A caption as stored by TFDS (UTF-8 bytes) or already text, as ``str``."""
  return caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)


def load_source(name: str, split: str, data_dir: str | None = None):
  """A random-access data source of TFDS dataset ``name``, split ``split`` (slices such as "train[:512]" and
  unions such as "train+held_out" too, TFDS's split syntax).

  Embedded datasets (``EMBEDDED``) are built into ``data_dir`` on first use, offline.
  """
  import tensorflow_datasets as tfds  # heavy import, only when data is needed

  if name in EMBEDDED:
    module, cls = EMBEDDED[name].split(":")
    builder = getattr(__import__(module, fromlist=[cls]), cls)(data_dir=data_dir)
    builder.download_and_prepare()
    splits = sorted(builder.info.splits)
    if any(part.split("[")[0].strip() not in splits for part in split.split("+")):
      raise ValueError(f"dataset {name!r} has splits {splits}, not {split!r}")
    return builder.as_data_source(split=split)
  return tfds.data_source(name, split=split, data_dir=data_dir)


@dataclasses.dataclass(frozen=True)
class ImageTextOptions:
  """How examples become training batches.

  Attributes:
    batch_size: examples per batch on this process (global batch / process count).
    image_size: output height = width in pixels (bilinear resize when it differs).
    max_shift: random translation of up to this many pixels (zero padded); 0 = none.
    image_key, caption_key: feature names in the source.
    extra_keys: integer features passed through (labels, attributes).
  """

  batch_size: int
  image_size: int
  max_shift: int = 0
  image_key: str = "image"
  caption_key: str = "caption"
  extra_keys: tuple = ()


def _prepare(example, options: ImageTextOptions, tokenize: Callable[[str], np.ndarray]):
  image = np.asarray(example[options.image_key])
  if image.shape[0] != options.image_size or image.shape[1] != options.image_size:
    channels = image.shape[-1]
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    image = np.asarray(pil.resize((options.image_size,) * 2, Image.BILINEAR)).reshape(
        options.image_size, options.image_size, channels)
  out = {"image": image.astype(np.float32) / 127.5 - 1.0,
         "tokens": np.asarray(tokenize(caption_text(example[options.caption_key])), np.int32)}
  for key in options.extra_keys:
    out[key] = np.asarray(example[key], np.int32)
  return out


def _shift(example, rng: np.random.Generator, max_shift: int):
  dy, dx = rng.integers(-max_shift, max_shift + 1, size=2)
  image = np.roll(example["image"], (dy, dx), axis=(0, 1))
  h, w = image.shape[:2]
  fill = -1.0  # background (black) in [-1, 1]
  if dy > 0:
    image[:dy] = fill
  elif dy < 0:
    image[h + dy:] = fill
  if dx > 0:
    image[:, :dx] = fill
  elif dx < 0:
    image[:, w + dx:] = fill
  return {**example, "image": image}


def image_text_dataset(source, options: ImageTextOptions, tokenize: Callable[[str], np.ndarray], *, seed: int,
                       shard_index: int = 0, shard_count: int = 1, num_epochs: int | None = None,
                       shuffle: bool = True, prefetch_threads: int = 2) -> grain.IterDataset:
  """Batches of {"image": (B, S, S, C) float32 in [-1, 1], "tokens": (B, L) int32, extra keys (B,)}.

  Args:
    source: random-access source (``load_source``).
    options: ``ImageTextOptions``.
    tokenize: caption string -> (L,) int token ids (fixed L).
    seed: shuffling and augmentation seed; the same on every process.
    shard_index, shard_count: this process's share (``jax.process_index()``,
      ``jax.process_count()``). Every process walks the same shuffled, augmented
      stream of global batches of ``shard_count * batch_size`` examples and takes rows
      ``[shard_index * batch_size, (shard_index + 1) * batch_size)`` of each, so the
      global batches (and the iterator states) do not depend on the process count.
    num_epochs: None repeats forever.
    shuffle: reshuffle every epoch.
  """
  augment = (lambda ex, rng: _shift(ex, rng, options.max_shift)) if options.max_shift else None
  return _batched(source, lambda ex: _prepare(ex, options, tokenize), augment, options.batch_size, seed=seed,
                  shard_index=shard_index, shard_count=shard_count, num_epochs=num_epochs, shuffle=shuffle,
                  prefetch_threads=prefetch_threads)


def latent_text_dataset(source, batch_size: int, tokenize: Callable[[str], np.ndarray], *, seed: int,
                        shard_index: int = 0, shard_count: int = 1, num_epochs: int | None = None,
                        shuffle: bool = True, prefetch_threads: int = 2) -> grain.IterDataset:
  """Batches of cached latents: {"latent_mean", "latent_std": (B, h, w, c) float32, "tokens": (B, L) int32,
  "index": (B,) int32 (position in the source)}.

  ``source[i]`` is {"latent_mean", "latent_std", "caption"} (e.g. ``diffjax.train.latent.LatentCache``).
  Sharding, seeded shuffling, batching and the checkpointable iterator state are those of
  ``image_text_dataset`` (same arguments).
  """

  def prepare(ex):
    return {"latent_mean": np.asarray(ex["latent_mean"], np.float32), "latent_std": np.asarray(ex["latent_std"],
            np.float32), "tokens": np.asarray(tokenize(caption_text(ex["caption"])), np.int32),
            "index": np.int32(ex["index"])}

  return _batched(source, prepare, None, batch_size, seed=seed, shard_index=shard_index, shard_count=shard_count,
                  num_epochs=num_epochs, shuffle=shuffle, prefetch_threads=prefetch_threads)


def _batched(source, prepare, augment, batch_size: int, *, seed, shard_index, shard_count, num_epochs, shuffle,
             prefetch_threads) -> grain.IterDataset:
  """source -> this shard -> seeded (re)shuffle -> repeat -> prepare -> augment(ex, rng) -> batches -> prefetch."""
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
  ds = grain.MapDataset.source(source)
  if len(ds) < batch_size * shard_count:
    raise ValueError(f"the source has {len(ds)} examples, fewer than one global batch of "
                     f"{shard_count} x {batch_size}")
  ds = ds.seed(seed)
  if shuffle:
    ds = ds.shuffle()
  ds = ds.repeat(num_epochs).map(prepare)
  if augment is not None:
    ds = ds.random_map(augment)
  # local batch j is part j % shard_count of global batch j // shard_count
  ds = ds.batch(batch_size, drop_remainder=True)
  ds = ds[:len(ds) - len(ds) % shard_count][shard_index::shard_count]
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=prefetch_threads, prefetch_buffer_size=4))
