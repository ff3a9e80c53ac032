"""The latent mark (diffjax.watermark.latent) and the marks in the pipelines and the jobs.

The latent mark's two promises are checked as what they are, statements about distributions:
over the key's draw the marked noise is standard normal (its sample covariance is the identity
within sampling error), and for any fixed image the detection score is standard normal over
the key's draw (a Kolmogorov-Smirnov test over 2,000 keys, and its mean and variance within
their sampling error), which is what makes its p-value exact. Through a pipeline whose network
is the exact denoiser of Gaussian data (the probability-flow map is then affine and inversion
recovers the noise up to the solver's error), marked images are found and unmarked ones are not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gaussian_oracle import gaussian_pipeline
from PIL import Image
from scipy import stats

from diffjax import images, pipelines
from diffjax import watermark as wm
from diffjax.processes import DiscreteVP
from diffjax.watermark import latent

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_marked_noise_is_standard_normal_over_keys_and_fixes_only_the_low_frequencies():
  n, shape = 4000, (8, 8, 1)
  mask = latent.low_pass_mask(8, 8, 2.0)
  noise = np.random.default_rng(0).standard_normal((n,) + shape).astype(np.float32)
  keys = np.stack([latent.key_field(latent.LatentKey(seed=s), shape) for s in range(n)])
  marked = np.asarray(latent.project(jnp.asarray(noise), mask) * -1 + noise + latent.project(jnp.asarray(keys), mask))
  one = np.asarray(latent.mark_noise(noise[:1], latent.LatentKey(seed=0, radius=2.0, min_rank=0)))
  np.testing.assert_allclose(one, marked[:1], atol=1e-5)  # mark_noise is this formula
  flat = marked.reshape(n, -1).astype(np.float64)
  # Sample covariance of N standard normal vectors: entries have std sqrt(2 / N) (diagonal) and sqrt(1 / N); 5.5
  # of those bound the largest of the 2,080 distinct entries except with probability ~1e-4.
  cov = np.cov(flat, rowvar=False)
  assert np.abs(cov - np.eye(64)).max() < 5.5 * np.sqrt(2.0 / n)
  assert np.abs(flat.mean(0)).max() < 5.5 / np.sqrt(n)
  # For one fixed key the mark is exactly the key's low-pass part; the rest of the noise is untouched.
  key = latent.LatentKey(seed=5, radius=2.0, min_rank=0)
  out = latent.mark_noise(noise[:16], key)
  low = latent.project(jnp.asarray(latent.key_field(key, shape)), mask)
  np.testing.assert_allclose(latent.project(out, mask), np.broadcast_to(low, out.shape), atol=1e-5)
  rest = noise[:16] - latent.project(jnp.asarray(noise[:16]), mask)
  np.testing.assert_allclose(out - latent.project(out, mask), rest, atol=1e-5)


def _structured_field(shape) -> np.ndarray:
  """A fixed 'inverted noise' that is nothing like white noise: smooth ramps, a bright blob, heavy tails."""
  h, w, c = shape
  yy, xx = np.mgrid[0:h, 0:w] / h
  rng = np.random.default_rng(3)
  base = np.stack([np.sin(5 * xx + k) + 3 * np.exp(-40 * ((xx - 0.3) ** 2 + (yy - 0.6) ** 2)) for k in range(c)], -1)
  return (base + rng.standard_t(2, size=shape)).astype(np.float32)


def test_the_detection_score_is_standard_normal_over_keys_for_a_fixed_image():
  z = _structured_field((16, 16, 2))
  scores = np.stack([latent.detect(z, latent.LatentKey(seed=s, radius=3.0)).scores[0] for s in range(2000)])
  for j in range(scores.shape[1]):  # identity, crop 0.75, crop 0.5: each exactly N(0, 1) given the image
    column = scores[:, j]
    assert stats.kstest(column, "norm").pvalue > 1e-3, j
    assert abs(column.mean()) < 5 / np.sqrt(2000) and abs(column.var() - 1) < 5 * np.sqrt(2 / 2000), j


def test_marked_noise_is_found_cropped_or_not_and_unmarked_noise_and_constants_are_not():
  key = latent.LatentKey(seed=11)
  noise = np.random.default_rng(1).standard_normal((16, 32, 32, 4)).astype(np.float32)
  marked = latent.mark_noise(noise, key)
  found = latent.detect(marked, key)
  mask = latent.low_pass_mask(32, 32, key.radius_for(32, 32))
  g_low = latent.project(jnp.asarray(latent.key_field(key, (32, 32, 4))), mask)
  # Identity hypothesis on the exact noise: score = <g, P g> / |P g| = |P g| (~ sqrt(rank) = sqrt(320) here).
  np.testing.assert_allclose(found.scores[:, 0], np.sqrt(np.sum(np.asarray(g_low, np.float64) ** 2)), rtol=1e-4)
  assert found.scores[0, 0] > 15 and np.all(found.p_values < 1e-40)
  assert np.all(latent.detect(noise, key).p_values > 1e-4)  # 16 unmarked: none near a claim
  assert np.all(latent.detect(marked, latent.LatentKey(seed=12)).p_values > 1e-4)  # another key finds nothing
  cropped = jax.vmap(lambda x: latent.crop_and_rescale(x, 0.75))(marked)
  found = latent.detect(cropped, key)
  assert np.all(found.scores[:, 1] > found.scores[:, 0]) and np.all(found.p_values < 1e-10)
  assert latent.detect(np.zeros((32, 32, 4), np.float32), key).p_values[0] == 1.0


def test_bad_latent_keys_and_noise_shapes_are_refused():
  with pytest.raises(ValueError, match="radius 5"):
    latent.low_pass_mask(8, 8, 5)
  with pytest.raises(ValueError, match="inverted noise"):
    latent.detect(np.zeros((4, 4), np.float32), latent.LatentKey(seed=0))
  with pytest.raises(ValueError, match="watermark must be"):
    wm.from_config("pixel+stamp", 0)
  assert wm.from_config("none", 0) == wm.NONE and wm.from_config("pixel+latent", 7).latent.seed == 7
  # A latent too small to carry a detectable mark (rank < MIN_RANK: the digits' 8 x 8 x 1) is left unmarked, said so.
  noise = np.ones((1, 8, 8, 1), np.float32)
  same, record = wm.DEFAULT.mark_noise(noise, drawn=True)
  assert same is noise and not record["applied"] and "below the 64" in record["reason"]
  with pytest.raises(ValueError, match="below the 64"):
    latent.mark_noise(noise, wm.DEFAULT.latent)


def test_pixel_mark_of_float_images_and_what_cannot_carry_it():
  rng = np.random.default_rng(0)
  photo = np.clip(rng.normal(0.5, 0.15, (2, 256, 320, 3)), 0, 1).astype(np.float32)
  marked, record = wm.DEFAULT.mark_images(photo)
  assert record["applied"] and record["scheme"] == "dwtDct" and len(record["bits"]) == 48
  assert np.abs(marked - photo).max() < 0.2 and np.abs(marked - photo).mean() < 0.01  # invisible, and on uint8 levels
  np.testing.assert_array_equal(np.round(marked * 255) / 255, marked)
  decoded = wm.dwt_dct.decode(np.round(marked * 255).astype(np.uint8), 48)
  assert (decoded.bits == np.asarray(wm.DEFAULT.pixel_bits, bool)).mean(axis=1).min() >= 0.9
  for shape, why in [((1, 64, 64, 3), "at least 256"), ((1, 256, 256, 1), "RGB")]:
    same, record = wm.DEFAULT.mark_images(np.full(shape, 0.5, np.float32))
    assert not record["applied"] and why in record["reason"] and np.all(same == 0.5)
  assert wm.pixel_p_value(48, 48) == 0.5**48 and wm.pixel_p_value(0, 48) == 1.0


H = W = 16
PROCESS = DiscreteVP.from_schedule("scaled_linear", 1000, 0.00085, 0.012)
PIPE = gaussian_pipeline(PROCESS, np.zeros(H * W * 3), 0.09 * np.eye(H * W * 3), latent_channels=3)
KEY = wm.LatentKey(seed=3, radius=3.0)


def test_generated_images_carry_the_latent_mark_and_inversion_finds_it():
  plan = pipelines.Plan.native(PROCESS, "dpmpp_2m", 20, "karras")
  mark = wm.Watermark(pixel_bits=None, latent=KEY)
  out = pipelines.generate(PIPE, {}, [""] * 6, height=H, width=W, plan=plan, guidance_scale=1.0, seed=0,
                           watermark=mark)
  plain = pipelines.generate(PIPE, {}, [""] * 6, height=H, width=W, plan=plan, guidance_scale=1.0, seed=0,
                             watermark=wm.NONE)
  assert out.record["watermark"]["latent"]["applied"] and out.record["watermark"]["pixel"] is None
  assert plain.record["watermark"] == {"pixel": None, "latent": None}
  given = pipelines.generate(PIPE, {}, [""], height=H, width=W, plan=plan, guidance_scale=1.0,
                             noise=np.zeros((1, H, W, 3)), watermark=mark)
  assert given.record["watermark"]["latent"]["applied"] is False  # a caller's noise is used as given
  for result, claimed in ((out, True), (plain, False)):
    inverted = pipelines.invert_images(PIPE, {}, result.images, height=H, width=W, plan=plan)
    p = latent.detect(inverted.noise, KEY).p_values
    print("p-values", p)
    assert np.all(p < 1e-6) if claimed else np.all(p > 1e-4)


def test_detect_job_reports_each_image_and_survives_bad_files(tmp_path):
  """--mode=detect on a diffjax pipeline's marked PNGs, an unmarked one, a constant one and a truncated file."""
  from diffjax import detection

  rng = np.random.default_rng(2)
  photo = np.clip(rng.normal(0.5, 0.15, (256, 256, 3)), 0, 1).astype(np.float32)
  marked, _ = wm.DEFAULT.mark_images(photo[None])
  folder = tmp_path / "images"
  folder.mkdir()
  images.save_png(images.to_uint8(marked[0], 0.0, 1.0), str(folder / "marked.png"))
  images.save_png(images.to_uint8(photo, 0.0, 1.0), str(folder / "plain.png"))
  Image.new("RGB", (300, 300), (128, 128, 128)).save(folder / "grey.png")
  Image.new("RGB", (64, 64), (10, 20, 30)).save(folder / "small.png")
  (folder / "broken.png").write_bytes((folder / "plain.png").read_bytes()[:200])
  Image.new("RGBA", (300, 300), (1, 2, 3, 4)).save(folder / "alpha.png")
  config = _generate_config(detect=dict(images=str(folder), alpha=1e-3), watermark="pixel")
  result = detection.detect(config, str(tmp_path / "out"))
  rows = {os.path.basename(r["file"]): r for r in result["images"]}
  assert rows["marked.png"]["marked"] and rows["marked.png"]["pixel"]["bit_accuracy"] >= 0.9
  assert not rows["plain.png"]["marked"] and not rows["grey.png"]["marked"]
  assert "at least 256" in rows["small.png"]["pixel"]["error"] and not rows["small.png"]["marked"]
  assert "not a readable image" in rows["broken.png"]["error"] and "mode RGBA" in rows["alpha.png"]["error"]
  assert json.load(open(tmp_path / "out" / "detection.json"))["images"] == result["images"]


def _generate_config(**overrides):
  sys.path.insert(0, os.path.join(ROOT, "configs"))
  import generate as generate_config  # configs/generate.py

  config = generate_config.get_config()
  for k, v in overrides.items():
    config[k] = v
  return config


def test_detect_mode_needs_marks_to_look_for(tmp_path):
  out = subprocess.run([sys.executable, "-m", "diffjax.main", "--mode=detect", "--config=configs/generate.py",
                        f"--workdir={tmp_path}", "--config.watermark=none", f"--config.detect.images={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True)
  assert out.returncode != 0 and "config.watermark = 'none'" in out.stderr


def test_detect_job_finds_the_latent_mark_by_inverting_the_pipeline(tmp_path, monkeypatch):
  """--mode=detect with the latent mark: marked PNGs of the Gaussian pipeline are found, unmarked ones are not, a
  grey file the RGB pipeline cannot invert gets its own error (the pipeline is handed to the job in place of a
  folder's)."""
  from diffjax import detection, generation

  plan = pipelines.Plan.native(PROCESS, "dpmpp_2m", 20, "karras")
  folder = tmp_path / "images"
  folder.mkdir()
  for name, mark, seed in (("marked", wm.Watermark(pixel_bits=None, latent=KEY), 0), ("plain", wm.NONE, 10)):
    out = pipelines.generate(PIPE, {}, [""] * 3, height=H, width=W, plan=plan, guidance_scale=1.0, seed=seed,
                             watermark=mark)
    for i, image in enumerate(out.images):
      images.save_png(images.to_uint8(image, 0.0, 1.0), str(folder / f"{name}{i}.png"))
  Image.new("L", (H, W), 7).save(folder / "grey.png")
  monkeypatch.setattr(generation, "load_cached", lambda *args: (PIPE, {}, {}))
  config = _generate_config(detect=dict(images=str(folder), alpha=1e-6), watermark="latent", watermark_radius=3.0,
                            watermark_seed=KEY.seed, pretrained=str(tmp_path), height=H, width=W, compilation_cache="")
  config.sampler.update(dict(name="dpmpp_2m", grid="karras", steps=20))
  rows = {os.path.basename(r["file"]): r for r in detection.detect(config, str(tmp_path / "out"))["images"]}
  print({k: r.get("latent") for k, r in rows.items()})
  assert all(rows[f"marked{i}.png"]["marked"] for i in range(3))
  assert not any(rows[f"plain{i}.png"]["marked"] for i in range(3))
  assert "3-channel" in rows["grey.png"]["latent"]["error"] and not rows["grey.png"]["marked"]
