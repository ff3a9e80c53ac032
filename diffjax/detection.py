"""The detection job: which of diffjax's marks do these images carry? (``--mode=detect``)

``detect(config, output_dir)`` reads the images ``config.detect.images`` names (a folder, a glob
or comma-separated files) and reports, per image:

* pixel mark (dwtDct): the payload bits read back, how many match ``config.watermark``'s payload,
  the p-value of that many matches by chance (bits as fair coins: ``watermark.pixel_p_value``);
* latent mark: the image inverted to its initial noise by the pretrained pipeline (``config.pretrained``,
  the empty prompt, guidance 1, ``config.sampler``'s plan; resized to ``height`` x ``width`` first
  when it differs), the key's score per geometric hypothesis and the exact p-value
  (``watermark.latent.detect``);
* the decision: a mark is found when its p-value is below ``config.detect.alpha``.

An image that cannot be read or cannot carry a mark gets an ``error`` for that mark and the
rest of the batch goes on; a constant image is never said to carry a mark. Writes
``detection.json`` into ``output_dir`` and logs a table.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import tqdm
from absl import logging
from PIL import Image

from diffjax import generation, images, pipelines, schema
from diffjax import watermark as wm
from diffjax.schema import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def image_files(spec: str) -> list[str]:
  """A folder (its image files), a glob, or comma-separated paths -> sorted file paths (ConfigError if none)."""
  if os.path.isdir(spec):
    files = [os.path.join(spec, f) for f in os.listdir(spec) if f.lower().endswith(IMAGE_SUFFIXES)]
  elif any(ch in spec for ch in "*?["):
    files = glob.glob(spec)
  else:
    files = [f for f in spec.split(",") if f]
  if not files:
    raise ConfigError(f"config.detect.images = {spec!r} names no image files (a folder, a glob or comma-separated "
                      f"paths)")
  return sorted(files)


def pixel_report(image: np.ndarray, bits: tuple[int, ...], alpha: float) -> dict:
  """image (H, W, 3) float in [0, 1] -> the dwtDct payload read back and the decision."""
  reason = wm.pixel_unsupported(image.shape)
  if reason:
    return {"error": reason}
  decoded = wm.dwt_dct.decode(np.round(image * 255.0).astype(np.uint8), len(bits))
  matches = int(np.sum(decoded.bits == np.asarray(bits, bool)))
  p = 1.0 if _constant(image) else wm.pixel_p_value(matches, len(bits))
  return {"bit_accuracy": matches / len(bits), "p_value": p, "detected": bool(p < alpha),
          "bits": "".join("1" if b else "0" for b in decoded.bits)}


def _load(path: str) -> np.ndarray:
  """(H, W, 3) of an RGB file, (H, W, 1) of a grey one (a pixel-space model's); ValueError otherwise."""
  try:
    return images.load_image(path, 3)
  except ValueError as rgb_error:
    try:
      return images.load_image(path, 1)
    except ValueError:
      raise rgb_error from None


def _constant(image: np.ndarray) -> bool:
  return bool(np.ptp(image) == 0.0)


def _fit(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """image (H, W, C) in [0, 1] at height x width (bicubic when it differs, as an editor would resize it)."""
  if image.shape[:2] == (height, width):
    return image
  pil = Image.fromarray(np.round((image[..., 0] if image.shape[-1] == 1 else image) * 255.0).astype(np.uint8))
  return (np.asarray(pil.resize((width, height), Image.BICUBIC), np.float32) / 255.0).reshape(height, width, -1)


def latent_reports(pipe, params, batch: list[np.ndarray], key: wm.LatentKey, plan, height: int, width: int,
                   alpha: float, decoder_steps: int = 0) -> list[dict]:
  """Images (each (H, W, C) in [0, 1], C the pipeline's) -> their latent-mark reports (inverted in one call;
  ``decoder_steps``: ``pipelines.invert_images``' decoder inversion)."""
  fitted = np.stack([_fit(x, height, width) for x in batch])
  inverted = pipelines.invert_images(pipe, params, fitted, "", height=height, width=width, plan=plan,
                                     decoder_steps=decoder_steps if pipe.decode is not None else 0)
  found = wm.latent.detect(inverted.noise, key)
  out = []
  for x, scores, p in zip(batch, found.scores, found.p_values, strict=True):
    p = 1.0 if _constant(x) else float(p)
    out.append({"scores": dict(zip(found.hypotheses, map(float, scores), strict=True)), "p_value": p,
                "detected": bool(p < alpha), "resized": list(x.shape[:2]) != [height, width]})
  return out


def detect(config, output_dir: str) -> dict:
  """Runs the detection ``config`` describes (``config.detect``, ``config.watermark``) into ``output_dir``."""
  schema.validate(config, "generate")
  try:
    mark = wm.from_config(config.watermark, config.watermark_seed, config.watermark_radius)
  except ValueError as e:
    raise ConfigError(f"config.watermark: {e}") from None
  if mark == wm.NONE:
    raise ConfigError("config.watermark = 'none': name the marks to look for ('pixel+latent', 'pixel', 'latent')")
  alpha = float(config.detect.alpha)
  files = image_files(config.detect.images)
  rows, loaded = [], []
  for path in files:
    row = {"file": path}
    try:
      image = _load(path)
    except ValueError as e:  # unreadable, truncated, another mode: this image only
      rows.append(row | {"error": str(e)})
      continue
    row["size"] = list(image.shape[:2])
    if mark.pixel_bits is not None:
      row["pixel"] = pixel_report(image, mark.pixel_bits, alpha)
    rows.append(row)
    loaded.append((row, image))
  if mark.latent is not None and loaded:
    generation.validate(config)  # the pretrained pipeline inverts the images
    generation.use_compilation_cache(config.compilation_cache)
    pipe, params, provenance = generation.load_cached(config.pretrained, generation.DTYPES[config.dtype],
                                                      config.tokenizer, config.prediction_type)
    params, _ = generation.with_loras(config, params, provenance)  # invert with the weights that generated
    if isinstance(pipe, pipelines.InpaintingPipeline | pipelines.UpscalePipeline):
      raise ConfigError(f"config.pretrained = {config.pretrained}: the latent mark is read by inverting a "
                        f"text-to-image pipeline, not a {type(pipe).__name__}")
    s = config.sampler
    try:
      plan = pipelines.plan_for(pipe, s.steps, s.name or None, s.grid, **s.get("options", {}))
    except (ValueError, NotImplementedError) as e:
      raise ConfigError(f"config.sampler (the inversion's plan): {e}") from None
    channels = 3 if pipe.encode_image is not None else pipe.latent_channels
    for row, image in loaded:
      if image.shape[-1] != channels:
        row["latent"] = {"error": f"the pipeline inverts {channels}-channel images, this one has {image.shape[-1]}"}
    invertible = [(row, image) for row, image in loaded if "latent" not in row]
    for start in tqdm.trange(0, len(invertible), config.batch_size, desc="inverting", unit="batch",
                             dynamic_ncols=True):
      chunk = invertible[start:start + config.batch_size]
      reports = latent_reports(pipe, params, [x for _, x in chunk], mark.latent, plan, config.height, config.width,
                               alpha, config.detect.get("decoder_steps", 0))
      for (row, _), report in zip(chunk, reports, strict=True):
        row["latent"] = report
  for row in rows:
    found = [name for name in ("pixel", "latent") if row.get(name, {}).get("detected")]
    row["marked"] = bool(found)
    row["marks_found"] = found
  result = {"watermark": mark.record(), "alpha": alpha, "pretrained": config.pretrained, "images": rows}
  os.makedirs(output_dir, exist_ok=True)
  with open(os.path.join(output_dir, "detection.json"), "w") as f:
    json.dump(result, f, indent=2)
  for row in rows:
    logging.info("%s: %s", row["file"], _summary(row))
  logging.info("%d of %d images carry a mark (p < %g); detection.json in %s", sum(r["marked"] for r in rows),
               len(rows), alpha, output_dir)
  return result


def _summary(row: dict) -> str:
  if "error" in row:
    return f"error: {row['error']}"
  parts = []
  for name in ("pixel", "latent"):
    r = row.get(name)
    if r is None:
      continue
    parts.append(f"{name} {r['error']}" if "error" in r else
                 f"{name} p={r['p_value']:.2g} {'MARKED' if r['detected'] else 'no mark'}")
  return "; ".join(parts)
