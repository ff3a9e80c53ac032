"""Inpainting: diffjax against diffusers' StableDiffusionInpaintPipeline, and RePaint on Gaussian data.

The parity tests build tiny random-weight inpainting pipelines (a 9-channel, mask-conditioned
U-Net and a 4-channel one, which diffusers inpaints by blending), save them, load the folders
with ``diffjax.pipelines.from_pretrained`` and compare final images in [0, 1] for the same
prompts, negative prompts, image, mask and random draws (diffusers' generator replayed, or its
``latents=``). The tolerance is test_pipelines_parity.py's ATOL = 1e-4: far above float32
rounding through the tiny U-Net and VAE (the measured differences are ~2e-6) and far below what
a wrong choice moves (checked: the other pixel of each 2 x 2 block for the latent mask, the
posterior mean for its sample).

The RePaint test needs no reference library: for Gaussian data the exact denoiser is affine,
so every step of the path is an affine map plus independent Gaussian noise, and the mean and
covariance of the result follow in closed form (float64 numpy below, written from the
DDPM posterior and the forward process, not from diffjax's code).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gaussian_oracle import gaussian_pipeline
from test_pipelines_parity import (
    ATOL,
    NEGATIVE,
    PROMPTS,
    SCHEDULERS,
    SD_SCHEDULER,
    SIZE,
    _nhwc,
    _perturb,
    _tiny_pipeline,
    _torch_draws,
)

from diffjax import pipelines
from diffjax.pipelines.inpaint import RePaint, inpaint_blended, repaint_schedule
from diffjax.processes import DiscreteVP
from diffjax.samplers import grids, make_solver

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

pytestmark = [pytest.mark.reference, pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

STEPS = 8
LATENT = (len(PROMPTS), 4, SIZE // 2, SIZE // 2)  # NCHW, as torch draws them


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """{channels: (diffusers inpainting pipeline, diffjax pipeline, params)} for 4- and 9-channel U-Nets."""
  tmp = tmp_path_factory.mktemp("inpaint")
  sd, _ = _tiny_pipeline(tmp, "ddim")
  torch.manual_seed(1)
  unet9 = _perturb(diffusers.UNet2DConditionModel(
      sample_size=8, in_channels=9, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
      cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8))
  out = {}
  for channels, unet in ((4, sd.unet), (9, unet9)):
    ref = diffusers.StableDiffusionInpaintPipeline(**dict(sd.components, unet=unet))
    ref.set_progress_bar_config(disable=True)
    ref.save_pretrained(tmp / f"inpaint{channels}")
    out[channels] = (ref, *pipelines.from_pretrained(tmp / f"inpaint{channels}"))
  return out


@pytest.fixture(scope="module")
def inputs():
  """Image (B, H, W, 3) and a per-pixel random mask (B, H, W, 1) in [0, 1]: the binarization threshold
  and which pixel of each 2 x 2 block the latent mask takes both change the result."""
  rng = np.random.default_rng(3)
  return (rng.uniform(0, 1, (len(PROMPTS), SIZE, SIZE, 3)).astype(np.float32),
          rng.uniform(0, 1, (len(PROMPTS), SIZE, SIZE, 1)).astype(np.float32))


def _draws(channels, strength, latents):
  """The generator's draws in diffusers' order: the image's posterior noise (4-channel U-Net, or
  strength < 1), the initial noise (unless ``latents`` is given), the masked image's posterior noise."""
  names = (["image"] if channels == 4 or strength < 1 else []) + ([] if latents is not None else ["noise"])
  names.append("masked")
  draws = dict(zip(names, _torch_draws(11, LATENT, len(names)), strict=True))
  noise = draws["noise"] if latents is None else latents
  image_noise = np.stack([_nhwc(draws.get("image", np.zeros(LATENT, np.float32))), _nhwc(draws["masked"])])
  return _nhwc(noise), image_noise


@pytest.mark.parametrize("channels,scheduler,strength,given_latents", [
    (9, "ddim", 1.0, True), (9, "euler", 0.6, False), (4, "ddim", 1.0, True), (4, "dpmpp_2m", 0.75, False)])
def test_inpaint_matches_diffusers(models, inputs, channels, scheduler, strength, given_latents):
  """StableDiffusionInpaintPipeline, CFG 7.5 with negative prompts, 8 steps: the same images from diffjax.

  9 channels: the U-Net sees [latents, mask, masked-image latents] (both CFG halves). 4 channels:
  after every step the known region is the image latents re-noised to the next timestep with the
  initial noise, the clean latents after the last (DDIM's lands at alpha_bar_0 < 1, a grid without
  the final jump). Strength < 1 starts from the image latents noised to the strength's first step.
  """
  ref_pipe, pipe, params = models[channels]
  cls, options = SCHEDULERS[scheduler]
  ref_pipe.scheduler = getattr(diffusers, cls)(**SD_SCHEDULER, **options)
  plan = pipelines.DiffusersScheduler.from_config(dict(ref_pipe.scheduler.config, _class_name=cls)).plan(STEPS)
  image, mask = inputs
  latents = np.random.default_rng(5).standard_normal(LATENT).astype(np.float32) if given_latents else None
  with torch.no_grad():
    ref = ref_pipe(PROMPTS, image=torch.from_numpy(image).permute(0, 3, 1, 2),
                   mask_image=torch.from_numpy(mask).permute(0, 3, 1, 2), strength=strength, negative_prompt=NEGATIVE,
                   height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=7.5, output_type="np",
                   latents=None if latents is None else torch.from_numpy(latents),
                   generator=torch.Generator().manual_seed(11)).images
  noise, image_noise = _draws(channels, strength, latents)
  run = functools.partial(pipelines.inpaint, pipe, params, PROMPTS, negative_prompts=NEGATIVE, height=SIZE,
                          width=SIZE, plan=plan, guidance_scale=7.5, noise=noise, strength=strength)
  out = run(image, mask, image_noise=image_noise)
  assert isinstance(pipe, pipelines.InpaintingPipeline) == (channels == 9) and pipe.latent_channels == 4
  assert out.record["mode"] == ("conditioned" if channels == 9 else "blended")
  assert out.images.shape == ref.shape == (len(PROMPTS), SIZE, SIZE, 3)
  diff = float(np.max(np.abs(out.images - ref)))
  assert diff <= ATOL, diff
  # The check has teeth (same shapes: no recompilation).
  if scheduler == "ddim":
    # The latent mask from the odd pixels of each 2 x 2 block (what jax.image.resize 'nearest' picks).
    odd = np.repeat(np.repeat(mask[:, 1::2, 1::2], 2, axis=1), 2, axis=2)
    other = run(image, odd if channels == 4 else mask,
                image_noise=image_noise if channels == 4 else np.stack([image_noise[0], 0 * image_noise[1]]))
    # (9 channels: the posterior mean of the masked image instead of its sample.)
    assert float(np.max(np.abs(other.images - ref))) > 10 * ATOL


def test_repaint_host_entry_keeps_the_known_region():
  """``inpaint(..., repaint=RePaint(...))`` end to end on a pixel-space pipeline (the images are the
  latents; a stand-in x0 network): the record, resampling changes the result, and the known pixels
  come out exactly (the last blend copies them), at strength 1 and below."""
  process = DiscreteVP.from_schedule("scaled_linear", 1000, 0.00085, 0.012)
  pipe = pipelines.Pipeline(tokenize=lambda prompts: (np.zeros((len(prompts), 1), np.int32),) * 2,
                            encode_text=lambda p, ids, m: jnp.zeros((ids.shape[0], 1, 1)),
                            predict=lambda p, x, t, c: 0.5 * jnp.tanh(x), process=process, target="x0",
                            latent_channels=3, encode_image=lambda p, images, noise: images)
  rng = np.random.default_rng(7)
  image = rng.uniform(0, 1, (2, 4, 4, 3)).astype(np.float32)
  mask = rng.uniform(0, 1, (4, 4)) >= 0.5  # one bool mask for both
  run = functools.partial(pipelines.inpaint, pipe, None, ["a", "b"], image, mask, height=4, width=4,
                          plan=pipelines.plan_for(pipe, 6, sampler="ddim", grid="uniform_t"), guidance_scale=2.0)
  known = np.broadcast_to(~mask, (2, 4, 4))
  for strength in (1.0, 0.5):
    out = run(strength=strength, repaint=RePaint(jump_length=2, jump_n_sample=3))
    assert out.record["repaint"] == {"jump_length": 2, "jump_n_sample": 3} and out.record["mode"] == "blended"
    assert out.record["first_step"] == (0 if strength == 1.0 else 3)
    np.testing.assert_array_equal(out.latents[known], (2.0 * image - 1.0)[known])  # a copy: exactly equal
  plain = run(strength=0.5)  # deterministic DDIM: only the RePaint path's jumps draw noise
  assert np.max(np.abs(plain.latents - out.latents)[~known]) > 1e-2


def test_bad_input(models, inputs):
  image, mask = inputs
  _, pipe4, params4 = models[4]
  _, pipe9, params9 = models[9]
  run = functools.partial(pipelines.inpaint, pipe4, params4, PROMPTS, height=SIZE, width=SIZE,
                          plan=pipelines.plan_for(pipe4, 2))
  with pytest.raises(ValueError, match="mask is 8 x 8, the image 16 x 16"):
    run(image, mask[:, :8, :8])
  with pytest.raises(ValueError, match="single-channel"):
    run(image, np.repeat(mask, 3, axis=-1))
  with pytest.raises(ValueError, match=r"mask must be bool or float in \[0, 1\]"):
    run(image, 2.0 * mask)
  with pytest.raises(ValueError, match=r"mask must be bool or float in \[0, 1\]"):
    run(image, (mask > 0.5).astype(np.int32))
  for bad in (0.0, 1.5, -0.2):
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
      run(image, mask, strength=bad)
  with pytest.raises(ValueError, match="3 masks for 2 prompts"):
    run(image, np.concatenate([mask, mask[:1]]))
  with pytest.raises(ValueError, match=r"image_noise \(image, masked image\) has shape"):
    run(image, mask, image_noise=np.zeros((len(PROMPTS), SIZE // 2, SIZE // 2, 4), np.float32))
  with pytest.raises(ValueError, match="mask-conditioned"):
    pipelines.inpaint(pipe9, params9, PROMPTS, image, mask, height=SIZE, width=SIZE, repaint=RePaint())
  with pytest.raises(ValueError, match="jump_length"):
    RePaint(jump_length=0)


def test_repaint_schedule():
  # N = 6, L = 2, r = 2: jump points 5 and 3 (index 1 is less than L below the top); each revisited once.
  np.testing.assert_array_equal(repaint_schedule(6, RePaint(2, 2)), [0, 1, 2, 3, 2, 1, 2, 3, 4, 5, 4, 3, 4, 5])
  np.testing.assert_array_equal(repaint_schedule(7, RePaint(3, 1)), np.arange(7))  # r = 1: no resampling
  path = repaint_schedule(50, RePaint(10, 10))
  steps = np.diff(path)
  assert path[0] == 0 and path[-1] == 49 and set(steps) == {-1, 1} and path.min() == 0
  # (N - 1) down steps plus (r - 1) L more per jump point (49, 39, 29, 19: those at least L below the top).
  assert np.sum(steps == 1) == 49 + 4 * 9 * 10 and np.sum(steps == -1) == 4 * 9 * 10


# ----------------------------------------------------------------------------------
# RePaint on Gaussian data: moments in closed form.
# ----------------------------------------------------------------------------------
D = 4  # a 2 x 2 one-channel "image"
MU = np.array([0.3, -0.2, 0.1, 0.4])
COV = 0.9 ** np.abs(np.arange(D)[:, None] - np.arange(D)[None])  # strongly correlated pixels
KNOWN = np.array([True, True, False, False])
X0 = np.where(KNOWN, [2.0, 1.5, 0.0, 0.0], 0.0)  # the known pixels; the unknown ones are ignored


def _repaint_moments(alpha, sigma, path):
  """Exact mean (D,) and covariance (D, D) of RePaint with DDPM steps, from x ~ N(0, I) at path[0].

  alpha, sigma: float64 at the grid points; path: grid indices. Down (i -> i + 1): the DDPM
  posterior q(x' | x, x0 = D(x)), in x~ = x / alpha the Brownian bridge N(D + k (x~ - D), s'^2 (1 - k)),
  k = s'^2 / s^2, s = sigma / alpha; then the known pixels drawn from N(alpha' X0, sigma'^2).
  Up: x' = (alpha' / alpha) x + N(0, sigma'^2 - (alpha' sigma / alpha)^2). Last: x = D(x) at the
  final grid point, the known pixels X0.
  """
  keep = np.diag((~KNOWN).astype(np.float64))
  eye = np.eye(D)

  def denoiser(i):  # D(x) = g x + c
    g = alpha[i] * COV @ np.linalg.inv(alpha[i] ** 2 * COV + sigma[i] ** 2 * eye)
    return g, MU - alpha[i] * g @ MU

  m, s = np.zeros(D), eye.copy()
  for i, j in zip(path[:-1], path[1:], strict=True):
    if j > i:
      g, c = denoiser(i)
      k = (sigma[j] / alpha[j]) ** 2 / (sigma[i] / alpha[i]) ** 2
      a = alpha[j] * ((1 - k) * g + k / alpha[i] * eye)
      m, s = a @ m + alpha[j] * (1 - k) * c, a @ s @ a.T + sigma[j] ** 2 * (1 - k) * eye
      m, s = keep @ m + (eye - keep) @ (alpha[j] * X0), keep @ s @ keep + sigma[j] ** 2 * (eye - keep)
    else:
      r = alpha[j] / alpha[i]
      m, s = r * m, r**2 * s + (sigma[j] ** 2 - (r * sigma[i]) ** 2) * eye
  g, c = denoiser(path[-1])
  m, s = g @ m + c, g @ s @ g.T
  return keep @ m + (eye - keep) @ X0, keep @ s @ keep


def test_repaint_gaussian_moments():
  """RePaint with DDPM steps and the exact denoiser of correlated Gaussian data, 20 points, 8192 samples.

  The known pixels come out exactly; the unknown ones have the closed-form mean and variance
  (``_repaint_moments``) within 5 standard errors of the sample mean (sqrt(var / n)) and variance
  (var sqrt(2 / (n - 1))). Float32 rounding (~1e-6 relative) is far below those (~1e-2).
  And resampling does what it is for: its mean of the unknown pixels is closer to the true
  conditional mean E[x_u | x_k] than plain blending's on the same grid, by more than half (RePaint
  is not exact: 0.14 (closed form) against 0.57 (sampled, standard error 0.01) measured).
  """
  process = DiscreteVP.from_schedule("scaled_linear", 1000, 0.00085, 0.012)
  pipe = gaussian_pipeline(process, MU, COV)
  n = 8192
  ts = np.asarray(grids.ddim_timesteps(1000, 20, "leading", 1), np.float64)
  region = jnp.broadcast_to(jnp.asarray((~KNOWN).astype(np.float32)).reshape(1, 2, 2, 1), (n, 2, 2, 1))
  image_latents = jnp.broadcast_to(jnp.asarray(X0, jnp.float32).reshape(1, 2, 2, 1), (n, 2, 2, 1))
  ids = jnp.zeros((n, 1), jnp.int32)
  noise = jax.random.normal(jax.random.key(1), (n, 2, 2, 1))
  repaint = RePaint(jump_length=2, jump_n_sample=5)
  samples = {}
  for name, options in (("repaint", repaint), ("blended", None)):
    fn = jax.jit(functools.partial(inpaint_blended, pipe, solver=make_solver("ddpm", process), repaint=options,
                                   decode=False))
    out = fn(None, ids, ids, ids[:1], ids[:1], image_latents, region, noise, jnp.asarray(ts), 1.0, jax.random.key(2),
             init_scale=1.0)
    samples[name] = np.asarray(out, np.float64).reshape(n, D)
    np.testing.assert_array_equal(samples[name][:, KNOWN], np.broadcast_to(X0[KNOWN], (n, 2)))
  alpha, sigma = (np.asarray(f(jnp.asarray(ts, jnp.float32)), np.float64) for f in (process.alpha, process.sigma))
  mean, cov = _repaint_moments(alpha, sigma, repaint_schedule(len(ts), repaint))
  var = np.diag(cov)[~KNOWN]
  x = samples["repaint"][:, ~KNOWN]
  assert np.all(np.abs(x.mean(0) - mean[~KNOWN]) <= 5 * np.sqrt(var / n)), (x.mean(0), mean[~KNOWN])
  assert np.all(np.abs(x.var(0) - var) <= 5 * var * np.sqrt(2 / (n - 1))), (x.var(0), var)
  c_uk, c_kk = COV[~KNOWN][:, KNOWN], COV[KNOWN][:, KNOWN]
  conditional = MU[~KNOWN] + c_uk @ np.linalg.solve(c_kk, X0[KNOWN] - MU[KNOWN])
  err_repaint = np.max(np.abs(mean[~KNOWN] - conditional))
  err_blended = np.max(np.abs(samples["blended"][:, ~KNOWN].mean(0) - conditional))
  assert err_repaint < 0.5 * err_blended, (err_repaint, err_blended)
