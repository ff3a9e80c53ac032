"""Inversion (image -> noise) against the closed-form probability-flow map of Gaussian data.

With the exact denoiser of N(mu, C) the flow from the grid's least noisy time to its noisiest
is an affine map (gaussian_oracle.flow_map), so the inverted noise has an exact value. The
error of each solver must fall at its order when the grid is refined (DDIM 1, DPM-Solver++ 2M
2; measured 0.209 -> 0.104 and 0.035 -> 0.009 at 20 -> 40 evaluations), and sampling back
from the inverted noise on the same grid must return the image at least at that order. Float32
rounding (~1e-6) is four orders below the errors compared.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from gaussian_oracle import flow_map, gaussian_pipeline

from diffjax import pipelines
from diffjax.pipelines.inversion import invert_images
from diffjax.processes import DiscreteVP

H = W = 2
D = H * W * 3
MU = np.linspace(-0.2, 0.2, D)
COV = 0.3 * 0.9 ** np.abs(np.arange(D)[:, None] - np.arange(D)[None])
PROCESS = DiscreteVP.from_schedule("scaled_linear", 1000, 0.00085, 0.012)  # SD's
PIPE = gaussian_pipeline(PROCESS, MU, COV, latent_channels=3)
X0 = np.clip(np.random.default_rng(0).multivariate_normal(MU, COV, 8), -1.0, 1.0)
IMAGES = ((X0 + 1.0) / 2.0).reshape(8, H, W, 3).astype(np.float32)


def _errors(name: str, nfe: int) -> tuple[float, float]:
  """(max error of the inverted noise vs the exact flow, max error of the image sampled back from it)."""
  plan = pipelines.Plan.native(PROCESS, name, nfe, "karras")
  inv = invert_images(PIPE, {}, IMAGES, height=H, width=W, plan=plan)
  at = lambda t: (float(PROCESS.alpha(jnp.float32(t))), float(PROCESS.sigma(jnp.float32(t))))
  x0 = (2.0 * IMAGES.astype(np.float64) - 1.0).reshape(8, D)
  exact = flow_map(MU, COV, x0, at(plan.ts[-1]), at(plan.ts[0])) / plan.init_scale
  # Back down the same grid to the state at its last point (no final jump: that is where inversion started).
  back = pipelines.generate(PIPE, {}, [""] * 8, height=H, width=W, plan=dataclasses.replace(plan, denoise_final=False),
                            guidance_scale=1.0, noise=inv.noise)
  return (float(np.abs(inv.noise.reshape(8, D) - exact).max()),
          float(np.abs(back.latents.reshape(8, D) - x0).max()))


@pytest.mark.parametrize("name,order", [("ddim", 1), ("dpmpp_2m", 2)])
def test_inversion_converges_to_the_exact_flow(name, order):
  (inv20, back20), (inv40, back40) = _errors(name, 20), _errors(name, 40)
  print(f"{name}: inversion {inv20:.3e} -> {inv40:.3e}, round trip {back20:.3e} -> {back40:.3e}")
  assert order - 0.3 < np.log2(inv20 / inv40) < order + 0.3
  assert np.log2(back20 / back40) > order - 0.3  # at least the order (the two directions' errors partly cancel)
  assert inv40 < 0.15 and back40 < 0.1  # and the errors are small in absolute terms


def test_inversion_refuses_stochastic_solvers_and_bad_images():
  with pytest.raises(ValueError, match="deterministic"):
    invert_images(PIPE, {}, IMAGES, height=H, width=W, plan=pipelines.Plan.native(PROCESS, "ddpm", 10, "karras"))
  with pytest.raises(ValueError, match="init image is 2 x 2"):
    invert_images(PIPE, {}, IMAGES, height=4, width=4, plan=pipelines.Plan.native(PROCESS, "ddim", 10, "karras"))


def _linear_vae_pipeline(mix: np.ndarray, encoder_gain: float) -> pipelines.Pipeline:
  """PIPE with a linear 'VAE': decode(z) = z @ mix per pixel, and an encoder that is off by ``encoder_gain``."""
  mix_j, unmix_j = jnp.asarray(mix, jnp.float32), jnp.asarray(np.linalg.inv(mix), jnp.float32)
  return dataclasses.replace(PIPE, decode=lambda params, z: z @ mix_j,
                             encode_image=lambda params, x, noise: encoder_gain * (x @ unmix_j))


def test_decoder_inversion_finds_the_exact_inverse_of_a_linear_decoder():
  """With decode(z) = z M (M invertible) the pixel error is a convex quadratic whose minimum is x M^-1 exactly:
  from an encoder that is half the inverse, Adam must reach it (relative error 0.5 -> < 1e-3), image by image,
  and never leave an image worse than the encoder left it."""
  mix = np.array([[1.0, 0.3, -0.2], [0.1, 0.8, 0.25], [-0.3, 0.2, 1.2]])
  pipe = _linear_vae_pipeline(mix, 0.5)
  exact = (2.0 * IMAGES - 1.0) @ np.linalg.inv(mix)
  plan = pipelines.Plan.native(PROCESS, "ddim", 10, "karras")
  plain = invert_images(pipe, {}, IMAGES, height=H, width=W, plan=plan)
  refined = invert_images(pipe, {}, IMAGES, height=H, width=W, plan=plan, decoder_steps=300, decoder_learning_rate=0.1)
  relative = lambda z: float(np.linalg.norm(z - exact) / np.linalg.norm(exact))
  print(f"latent error: encoder {relative(plain.latents):.3e}, decoder inversion {relative(refined.latents):.3e}")
  assert abs(relative(plain.latents) - 0.5) < 1e-6
  assert relative(refined.latents) < 1e-3
  errors = refined.record["decoder_inversion"]["pixel_rms_error"]
  assert all(r <= e for r, e in zip(errors["refined"], errors["encoder"], strict=True))
  # The better latents give the better noise: the flow inverted from the exact latents (encoder gain 1).
  exact_noise = invert_images(_linear_vae_pipeline(mix, 1.0), {}, IMAGES, height=H, width=W, plan=plan).noise
  assert np.abs(refined.noise - exact_noise).max() < 1e-2 * np.abs(exact_noise).max()
  assert np.abs(plain.noise - exact_noise).max() > 0.1 * np.abs(exact_noise).max()


def test_decoder_inversion_needs_a_decoder():
  plan = pipelines.Plan.native(PROCESS, "ddim", 10, "karras")
  with pytest.raises(ValueError, match="needs a pipeline with a decoder"):
    invert_images(PIPE, {}, IMAGES, height=H, width=W, plan=plan, decoder_steps=10)
