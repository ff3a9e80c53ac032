"""The x4 upscaler: diffjax against diffusers' StableDiffusionUpscalePipeline on a tiny random folder.

The fixture builds a tiny random-weight upscale pipeline: a 7-channel U-Net with noise-level
class labels, linear projections and ``only_cross_attention`` on its attention level (levels
without it: tests/test_models_unet_reference.py), a 3-level VAE that upsamples 4x, the parity
tests' CLIP text encoder and tokenizer, a DDPM low-res scheduler. It saves the folder, with the
VAE config's scaling_factor set back to 0.18215 (both sides must use the pipeline's 0.08333),
and loads it with ``diffjax.pipelines.from_pretrained``. Final images in [0, 1] are compared for
the same prompts, negative prompts, low-res images, image noise (diffusers' generator replayed:
the image noise is its first draw) and initial latents (its ``latents=``). The tolerance is
test_pipelines_parity.py's ATOL = 1e-4: float32 rounding through the tiny U-Net (~1e-6 per
evaluation, tests/test_models_unet_reference.py) over a few steps and the VAE stays far below it
(measured <= 1e-5), and a different noise level moves the images by far more (checked below).
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import test_pipelines_parity as parity
from test_pipelines_parity import ATOL, NEGATIVE, PROMPTS, SCHEDULERS, SD_SCHEDULER, _nhwc, _perturb, _torch_draws

from diffjax import pipelines

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytestmark = parity.pytestmark  # reference tests, diffusers' deprecation warnings silenced

LOW = 8  # low-res pixels; latents 8 x 8, output 32 x 32
STEPS = 5
MAX_NOISE_LEVEL = 300  # not diffusers' default 350: diffjax must read it from model_index.json
NOISE_LEVEL = 40
LOW_RES_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """(diffusers upscale pipeline, diffjax pipeline, params) of one tiny random folder."""
  tmp = tmp_path_factory.mktemp("upscale")
  sd, _ = parity._tiny_pipeline(tmp, "ddim")
  torch.manual_seed(2)
  unet = _perturb(diffusers.UNet2DConditionModel(
      sample_size=LOW, in_channels=7, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
      cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8, num_class_embeds=MAX_NOISE_LEVEL + 50,
      use_linear_projection=True, only_cross_attention=(True, True)))
  vae = _perturb(diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
      down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8,
      sample_size=4 * LOW), scale=0.02)
  cls, options = SCHEDULERS["ddim"]
  ref = diffusers.StableDiffusionUpscalePipeline(
      vae=vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=unet,
      low_res_scheduler=diffusers.DDPMScheduler(**LOW_RES_SCHEDULER),
      scheduler=getattr(diffusers, cls)(**SD_SCHEDULER, prediction_type="v_prediction", **options),
      max_noise_level=MAX_NOISE_LEVEL)
  ref.set_progress_bar_config(disable=True)
  folder = tmp / "upscaler"
  ref.save_pretrained(folder)
  # diffusers' pipeline sets 0.08333 whatever the VAE config says: so must diffjax.
  config = json.loads((folder / "vae" / "config.json").read_text())
  (folder / "vae" / "config.json").write_text(json.dumps(config | {"scaling_factor": 0.18215}))
  return (ref, *pipelines.from_pretrained(folder)), folder


@pytest.fixture(scope="module")
def low_res():
  return np.random.default_rng(3).uniform(0, 1, (len(PROMPTS), LOW, LOW, 3)).astype(np.float32)


# Euler and DPM-Solver++ 2M map through the same scheduler code as for SD (test_pipelines_parity.py runs all four):
# here in the slow set, to keep the default suite's time.
@pytest.mark.parametrize("scheduler", [s if s in ("pndm", "ddim") else pytest.param(s, marks=pytest.mark.slow)
                                       for s in SCHEDULERS])
def test_upscale_matches_diffusers(models, low_res, scheduler):
  """StableDiffusionUpscalePipeline, v-prediction, CFG 9 with negative prompts, 5 steps: the same 4x images."""
  (ref_pipe, pipe, params), _ = models
  cls, options = SCHEDULERS[scheduler]
  ref_pipe.scheduler = getattr(diffusers, cls)(**SD_SCHEDULER, prediction_type="v_prediction", **options)
  plan = pipelines.DiffusersScheduler.from_config(dict(ref_pipe.scheduler.config, _class_name=cls)).plan(STEPS)
  latents = np.random.default_rng(5).standard_normal((len(PROMPTS), 4, LOW, LOW)).astype(np.float32)
  with torch.no_grad():
    ref = ref_pipe(PROMPTS, image=torch.from_numpy(low_res).permute(0, 3, 1, 2), noise_level=NOISE_LEVEL,
                   negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=9.0, output_type="np",
                   latents=torch.from_numpy(latents), generator=torch.Generator().manual_seed(11)).images
  (image_noise,) = _torch_draws(11, (len(PROMPTS), 3, LOW, LOW), 1)  # diffusers' first draw
  run = functools.partial(pipelines.upscale, pipe, params, PROMPTS, low_res, negative_prompts=NEGATIVE, plan=plan,
                          guidance_scale=9.0, noise=_nhwc(latents), image_noise=_nhwc(image_noise))
  out = run(noise_level=NOISE_LEVEL)
  assert isinstance(pipe, pipelines.UpscalePipeline) and pipe.target == "v"
  assert pipe.max_noise_level == MAX_NOISE_LEVEL and pipe.size_multiple == 2
  assert out.images.shape == ref.shape == (len(PROMPTS), 4 * LOW, 4 * LOW, 3)
  assert out.latents.shape == (len(PROMPTS), LOW, LOW, 4) and out.record["noise_level"] == NOISE_LEVEL
  diff = float(np.max(np.abs(out.images - ref)))
  print(f"upscale[{scheduler}] max abs diff {diff:.2e}")
  assert diff <= ATOL, diff
  if scheduler == "ddim":  # the check has teeth (noise_level is traced: no recompilation)
    other = run(noise_level=NOISE_LEVEL + 10)
    assert float(np.max(np.abs(other.images - ref))) > 10 * ATOL


def test_upscale_seeds_and_bad_input(models, low_res):
  """Per-image seeds for the latents and the image noise, and one-line ValueErrors naming what is wrong."""
  (_, pipe, params), folder = models
  # The folder's scheduler (DDIM) with STEPS steps: the program of the DDIM parity case, no new compilation.
  run = functools.partial(pipelines.upscale, pipe, params, PROMPTS, plan=pipelines.plan_for(pipe, STEPS),
                          negative_prompts=NEGATIVE)
  out = run(low_res[:1], seed=[4, 9])  # one low-res image for both prompts
  other = run(low_res[:1], seed=[4, 10])
  np.testing.assert_array_equal(out.images[0], other.images[0])
  assert np.max(np.abs(out.images[1] - other.images[1])) > 10 * ATOL
  assert out.record["task"] == "upscale" and out.record["seeds"] == [4, 9] and out.record["height"] == 4 * LOW
  for bad, what in ((-1, r"\[0, 300\]"), (MAX_NOISE_LEVEL + 1, r"\[0, 300\]"), (2.5, "integer"), (True, "integer")):
    with pytest.raises(ValueError, match=what) as e:
      run(low_res, noise_level=bad)
    assert "noise_level" in str(e.value) and "\n" not in str(e.value)
  for image, what in ((low_res[0, ..., 0], r"\(B, H, W, 3\)"), (np.ones((LOW, LOW, 4), np.float32), r"\(B, H, W, 3\)"),
                      (low_res[:, :7, :7], "7 x 7: height and width must be multiples of 2"),
                      (2.0 * low_res, r"\[0, 1\]"), (np.concatenate([low_res, low_res[:1]]), "3 images for 2 prompts")):
    with pytest.raises(ValueError, match=what) as e:
      run(image)
    assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="image_noise has shape"):
    run(low_res, image_noise=np.zeros((len(PROMPTS), LOW, LOW, 4), np.float32))
  plain = pipelines.Pipeline(**{f: getattr(pipe, f) for f in ("tokenize", "encode_text", "predict", "process",
                                                              "target", "latent_channels")})
  with pytest.raises(ValueError, match="needs an UpscalePipeline"):
    pipelines.upscale(plain, params, PROMPTS, low_res)
  index = json.loads((folder / "model_index.json").read_text())
  (folder / "model_index.json").write_text(json.dumps(index | {"low_res_scheduler": [None, None]}))
  try:
    with pytest.raises(ValueError, match="lacks low_res_scheduler"):
      pipelines.from_pretrained(folder)
  finally:
    (folder / "model_index.json").write_text(json.dumps(index))


def test_generation_job_upscales_an_image_file(models, low_res, tmp_path):
  """--config.task=upscale: the job's images are the host entry's for the same seeds; tasks are matched to folders."""
  from PIL import Image

  from configs import generate as generate_config
  from diffjax import generation
  from diffjax.schema import ConfigError
  (_, pipe, params), folder = models
  Image.fromarray((low_res[0] * 255).round().astype(np.uint8)).save(tmp_path / "small.png")
  config = generate_config.get_config("tiny")
  config.update(pretrained=str(folder), task="upscale", init_image=str(tmp_path / "small.png"), noise_level=40,
                prompts=(PROMPTS[0],), compilation_cache="", seed=7)
  config.sampler.steps = 2
  record = generation.generate(config, str(tmp_path / "out"))
  saved = np.load(tmp_path / "out" / "samples.npz")["images"]
  assert saved.shape == (1, 4 * LOW, 4 * LOW, 3) and record["noise_level"] == 40
  image = np.asarray(Image.open(tmp_path / "small.png"), np.float32) / 255.0
  direct = pipelines.upscale(pipe, params, [PROMPTS[0]], image, noise_level=40, plan=pipelines.plan_for(pipe, 2),
                             guidance_scale=config.sampler.guidance_scale, seed=[7])
  assert np.abs(saved[0].astype(int) - np.round(direct.images[0] * 255).astype(int)).max() <= 1
  with pytest.raises(ConfigError, match="does task 'upscale' and only that"):
    generation.generate(_txt2img(config), str(tmp_path / "bad"))
  with pytest.raises(ValueError, match="use pipelines.upscale"):
    pipelines.generate(pipe, params, [PROMPTS[0]], height=4 * LOW, width=4 * LOW)


def _txt2img(config):
  config = config.copy_and_resolve_references()
  config.task, config.height, config.width = "txt2img", 4 * LOW, 4 * LOW
  return config


def test_upscale_on_a_two_device_mesh_matches_one_device(models, low_res):
  """``upscale(mesh=)``: the images split over two devices are the one-device images (bound: the mesh test's)."""
  from test_pipelines_mesh import IMAGE_ATOL, SPY, on_two_devices

  _, folder = models
  np.save(folder.parent / "low_res.npy", low_res[:2])
  out = on_two_devices(
      SPY + "import json, sys, jax, numpy as np\n"
      "from diffjax import pipelines\n"
      "pipe, params = pipelines.from_pretrained(sys.argv[1])\n"
      "low, mesh = np.load(sys.argv[2]), jax.make_mesh((2,), ('data',))\n"
      "run = lambda **kw: pipelines.upscale(pipe, params, ['a cat', 'a dog'], low, noise_level=40,\n"
      "                                     plan=pipelines.plan_for(pipe, 3), **kw).images\n"
      "one, split = run(), run(mesh=mesh)\n"
      "print(json.dumps(dict(diff=float(np.abs(one - split).max()), rows=float(np.abs(split[0] - split[1]).max()),\n"
      "                      split_over=SPLIT_OVER)))",
      folder, folder.parent / "low_res.npy")
  assert out["split_over"] == [2], out  # the mesh call split its images over both devices
  assert out["diff"] <= IMAGE_ATOL and out["rows"] > 100 * IMAGE_ATOL, out
