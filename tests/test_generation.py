"""The generation job (configs/generate.py, diffjax.generation) on a tiny random-weight Stable Diffusion folder."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from test_pipelines_parity import SIZE, _tiny_pipeline

from configs import generate as generate_config
from diffjax import generation
from diffjax.schema import ConfigError

pytest.importorskip("diffusers")
pytestmark = [pytest.mark.reference, pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return _tiny_pipeline(tmp_path_factory.mktemp("sd"), "ddim")[1]


def _config(folder, **fields):
  config = generate_config.get_config("tiny")
  config.pretrained = str(folder)
  config.height = config.width = SIZE
  config.prompts = ("a photo of a cat", "a painting of a mountain lake at sunset")
  config.sampler.steps = 3
  config.compilation_cache = ""  # the cache is process-wide: not in the test process (the CLI test checks it)
  config.update(fields)
  return config


def test_writes_images_npz_and_a_record_that_reproduces_each_image(folder, tmp_path):
  config = _config(folder, num_per_prompt=2, batch_size=3, negative_prompt="blurry", seed=5)  # batches of 3 and 1
  record = generation.generate(config, str(tmp_path / "out"))
  npz = np.load(tmp_path / "out" / "samples.npz")
  assert npz["images"].shape == (4, SIZE, SIZE, 3) and npz["images"].dtype == np.uint8
  assert list(npz["prompts"]) == [p for p in config.prompts for _ in range(2)]
  assert list(npz["seeds"]) == [5, 6, 7, 8]
  on_disk = json.loads((tmp_path / "out" / "generation.json").read_text())
  assert on_disk == record and record["kind"] == "diffusers" and record["task"] == "txt2img"
  assert [r["file"] for r in record["images"]] == ["0000.png", "0001.png", "0002.png", "0003.png"]
  for i, r in enumerate(record["images"]):
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / r["file"])), npz["images"][i])
  assert record["negative_prompts"] == ["blurry"] and record["plan"]["solver"] == "ddim"
  unet = "unet/diffusion_pytorch_model.safetensors"
  assert record["weights_sha256"][unet] == hashlib.sha256((folder / unet).read_bytes()).hexdigest()
  assert len(set(npz["images"].reshape(4, -1).sum(1).tolist())) == 4  # four different images
  # image 2 alone, from its seed in the record, at batch 1: the same image (its noise depends on its seed only;
  # only XLA's batch-size-dependent rounding may differ, ~1e-6 of the [0, 1] range: at most one uint8 level)
  third = record["images"][2]
  alone = _config(folder, prompts=(third["prompt"],), negative_prompt="blurry", seed=third["seed"], batch_size=1)
  generation.generate(alone, str(tmp_path / "alone"))
  again = np.asarray(Image.open(tmp_path / "alone" / "0000.png")).astype(int)
  assert np.abs(again - npz["images"][2]).max() <= 1


def test_img2img_from_an_image_file(folder, tmp_path):
  rgb = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), np.uint8)
  Image.fromarray(rgb).save(tmp_path / "init.png")
  config = _config(folder, task="img2img", init_image=str(tmp_path / "init.png"), strength=0.6, height=0, width=0)
  record = generation.generate(config, str(tmp_path / "out"))
  assert record["task"] == "img2img" and record["strength"] == 0.6 and record["first_step"] == 2  # int(3 * 0.6) = 1
  assert np.load(tmp_path / "out" / "samples.npz")["images"].shape == (2, SIZE, SIZE, 3)


def test_inpaint_from_image_and_mask_files(folder, tmp_path):
  """A 4-channel folder inpaints by blending (RePaint on request); the record says how; sizes are checked."""
  rgb = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), np.uint8)
  Image.fromarray(rgb).save(tmp_path / "init.png")
  mask = np.zeros((SIZE, SIZE), np.uint8)
  mask[:, SIZE // 2:] = 255
  Image.fromarray(mask).save(tmp_path / "mask.png")
  Image.fromarray(mask[:, :-2]).save(tmp_path / "narrow.png")
  files = dict(task="inpaint", init_image=str(tmp_path / "init.png"), mask_image=str(tmp_path / "mask.png"))
  record = generation.generate(_config(folder, **files, repaint=dict(jump_length=1, jump_n_sample=2)),
                               str(tmp_path / "out"))
  assert (record["task"], record["mode"], record["strength"]) == ("inpaint", "blended", 1.0)
  assert record["repaint"] == {"jump_length": 1, "jump_n_sample": 2}
  assert np.load(tmp_path / "out" / "samples.npz")["images"].shape == (2, SIZE, SIZE, 3)
  with pytest.raises(ConfigError, match="config.mask_image .* make the mask the init image's size"):
    generation.generate(_config(folder, **(files | dict(mask_image=str(tmp_path / "narrow.png")))), str(tmp_path))
  with pytest.raises(ConfigError, match="config.mask_image: .* image mode RGB, expected L"):
    generation.generate(_config(folder, **(files | dict(mask_image=str(tmp_path / "init.png")))), str(tmp_path))


@pytest.mark.parametrize("fields, message", [
    (dict(task="inpaint", init_image="x.png"), "config.mask_image = '' is invalid"),
    (dict(repaint=dict(jump_length=3, jump_n_sample=0)), "config.repaint"),
    (dict(repaint=dict(jump_length=3, jump_n_sample=3)), "config.repaint is an option of inpainting"),
    (dict(task="inpaint2"), "config.task"),
    (dict(strength=1.5, task="img2img", init_image="x.png"), "config.strength"),
    (dict(task="img2img"), "config.init_image = '' is invalid"),
    (dict(num_per_prompt=0), "config.num_per_prompt"),
    (dict(prompts=()), "config.prompts"),
    (dict(dtype="int8"), "config.dtype"),
    (dict(pretrained="/nonexistent"), "config.pretrained"),
])
def test_bad_settings_name_the_field(folder, tmp_path, fields, message):
  with pytest.raises(ConfigError, match=message):
    generation.generate(_config(folder, **fields), str(tmp_path))


def test_bad_files_name_the_file(folder, tmp_path):
  with pytest.raises(ConfigError, match="neither a diffusers pipeline folder"):
    generation.generate(_config(folder, pretrained=str(tmp_path)), str(tmp_path / "out"))
  (tmp_path / "sd.safetensors").write_bytes(b"")
  with pytest.raises(ConfigError, match="config.tokenizer is empty: the single file"):
    generation.generate(_config(folder, pretrained=str(tmp_path / "sd.safetensors")), str(tmp_path / "out"))
  Image.fromarray(np.zeros((SIZE, SIZE, 4), np.uint8)).save(tmp_path / "rgba.png")
  Image.fromarray(np.zeros((SIZE, 2 * SIZE, 3), np.uint8)).save(tmp_path / "wide.png")
  (tmp_path / "junk.png").write_bytes(b"not an image")
  for name, message in [("rgba.png", "image mode RGBA, expected RGB"), ("wide.png", f"is {2 * SIZE}x{SIZE}"),
                        ("junk.png", "not a readable image"), ("missing.png", "no such image file")]:
    config = _config(folder, task="img2img", init_image=str(tmp_path / name))
    with pytest.raises(ConfigError, match=message):
      generation.generate(config, str(tmp_path / "out"))
  with pytest.raises(ConfigError, match="config.sampler.grid = .nope. is invalid"):
    generation.generate(_config(folder, sampler=dict(name="euler", grid="nope", steps=3, guidance_scale=7.5,
                                                     guidance_rescale=0.0)), str(tmp_path / "out"))


def test_lora_files_are_merged_with_their_scales_and_recorded(folder, tmp_path):
  import jax

  from diffjax.adapters import LoraConfig, init_lora, lora_files

  _, params, _ = generation.load_cached(str(folder))
  adapters = init_lora(params["unet"], LoraConfig(rank=2), jax.random.key(0))
  adapters = {p: a.replace(up=jax.random.normal(jax.random.key(i), a.up.shape)) for i, (p, a) in
              enumerate(sorted(adapters.items()))}  # a fresh adapter is the identity: give it an effect
  lora = tmp_path / "style.safetensors"
  lora_files.write_lora(lora, {"unet": adapters})
  prompts = dict(prompts=("a photo of a cat",))
  plain = generation.generate(_config(folder, **prompts), str(tmp_path / "plain"))
  zero = generation.generate(_config(folder, lora=(f"{lora}:0",), **prompts), str(tmp_path / "zero"))
  full = generation.generate(_config(folder, lora=(str(lora),), **prompts), str(tmp_path / "full"))
  npz = {k: np.load(tmp_path / k / "samples.npz")["images"] for k in ("plain", "zero", "full")}
  np.testing.assert_array_equal(npz["zero"], npz["plain"])  # scale 0 adds exactly 0 to every kernel
  assert np.abs(npz["full"].astype(int) - npz["plain"]).max() > 10
  assert "lora" not in plain and [(f["scale"], f["file"]) for f in zero["lora"]] == [(0.0, str(lora))]
  assert full["lora"][0]["sha256"] == hashlib.sha256(lora.read_bytes()).hexdigest()
  assert generation.lora_entry("C:/a:b.safetensors") == ("C:/a:b.safetensors", 1.0)
  # A file for other layers, or no file: one line naming config.lora.
  bad = tmp_path / "bad.safetensors"
  lora_files.write_lora(bad, {"unet": {"no/such/layer/kernel": next(iter(adapters.values()))}})
  with pytest.raises(ConfigError, match=r"(?s)config\.lora: .*bad\.safetensors.*no such layer"):
    generation.generate(_config(folder, lora=(str(bad),)), str(tmp_path / "bad"))
  with pytest.raises(ConfigError, match=r"config\.lora: .*missing\.safetensors is not a file"):
    generation.generate(_config(folder, lora=(str(tmp_path / "missing.safetensors"),)), str(tmp_path / "bad"))


def test_command_line(folder, tmp_path):
  """``--mode=generate`` runs the job, quietly, and fills the compilation cache."""
  base = [sys.executable, "-m", "diffjax.main", "--config=configs/generate.py:tiny", f"--workdir={tmp_path}",
          f"--config.pretrained={folder}", f"--config.height={SIZE}", f"--config.width={SIZE}",
          "--config.sampler.steps=2", "--config.prompts=('a photo of a cat',)",
          f"--config.compilation_cache={tmp_path / 'cache'}"]
  out = subprocess.run(base + ["--mode=generate"], capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert (tmp_path / "0000.png").exists() and "done: NNNN.png, samples.npz, generation.json" in out.stderr
  assert any((tmp_path / "cache").iterdir())  # the compiled programs, for the next run
  assert "Creating a new" not in out.stderr and "oneDNN custom operations" not in out.stderr  # third-party INFO
  # (a bad override's one-line error and exit status 2: tests/test_config_fields.py)


def test_a_second_job_on_unchanged_files_reuses_the_loaded_pipeline(folder):
  first = generation.load_cached(str(folder))
  assert generation.load_cached(str(folder)) is first  # its compiled programs too
  weights = next(folder.glob("unet/*.safetensors"))
  os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
  assert generation.load_cached(str(folder)) is not first  # a changed weight file is read again


@pytest.mark.slow  # about 60 s (the calibration itself is tests/test_calibration.py's, in the default suite)
def test_calibrate_a_pretrained_pipeline_then_generate_with_the_fitted_sampler(folder, tmp_path):
  """--mode=calibrate of a generation config fits samplers to the folder's pipeline (txt2img, guided as
  configured); sampler.name=fitted then generates with them, and a run guided otherwise is refused."""
  from diffjax.samplers import calibration

  config = _config(folder, negative_prompt="blurry")
  config.calibration.update(dict(budgets=(2, 3), batch=4, validation_batch=4, lattice=8, chunk=4))
  path = str(tmp_path / "calibration.json")
  record = generation.calibrate_pretrained(config, path)
  assert sorted(record["samplers"], key=int) == ["2", "3"]
  assert record["key"]["negative_prompt"] == "blurry" and record["key"]["height"] == SIZE
  assert all(np.isfinite(record["samplers"][k]["calib_rmse"]) for k in ("2", "3"))
  config.sampler.update(dict(name="fitted", calibration=path, steps=3))
  fitted = generation.generate(config, str(tmp_path / "fitted"))
  assert fitted["plan"]["solver"] == "fitted" and len(fitted["plan"]["ts"]) == 3
  images = np.load(tmp_path / "fitted" / "samples.npz")["images"]
  assert images.shape == (2, SIZE, SIZE, 3) and len({img.tobytes() for img in images}) == 2
  config.sampler.guidance_scale = 3.0
  with pytest.raises(calibration.CalibrationError, match="calibrated for guidance_scale = 7.5, this run has 3.0"):
    generation.generate(config, str(tmp_path / "refused"))
  config.sampler.update(dict(guidance_scale=7.5, steps=4))
  with pytest.raises(calibration.CalibrationError, match="no fitted sampler for 4 evaluations"):
    generation.generate(config, str(tmp_path / "refused"))
  config.sampler.calibration = ""
  with pytest.raises(ConfigError, match="sampler.calibration"):
    generation.generate(config, str(tmp_path / "no_file"))
