"""SD3's / Flux's FlowMatchEulerDiscreteScheduler as a diffjax plan: sigmas and sampling against diffusers."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
import tolerances

from diffjax import parameterization
from diffjax.pipelines.schedulers import DiffusersScheduler
from diffjax.samplers import sample

SD3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
FLUX = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
        "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
        "max_image_seq_len": 4096}


def test_the_flow_plan_starts_from_noise_and_ends_with_the_jump():
  sd3 = DiffusersScheduler.from_config(SD3)
  plan = sd3.plan(28)
  assert plan.ts[0] == 1.0 and np.all(np.diff(plan.ts) < 0) and plan.ts[-1] > 0
  assert plan.denoise_final and plan.init_scale == 1.0 and sd3.target == "velocity"
  # the last sigma: diffusers shifts its smallest training sigma (already shifted) once more
  once = 3 * 1e-3 / (1 + 2 * 1e-3)
  assert plan.ts[-1] == pytest.approx(3 * once / (1 + 2 * once), rel=1e-6)
  assert sd3.time_scale == 1000.0
  flux = DiffusersScheduler.from_config(FLUX)
  with pytest.raises(ValueError, match="pass mu"):
    flux.plan(4)
  with pytest.raises(NotImplementedError, match="invert_sigmas"):
    DiffusersScheduler.from_config(SD3 | {"invert_sigmas": True})


def _gaussian_velocity(mean, std):
  """E[eps - x0 | x_sigma] for x0 ~ N(mean, std^2) per coordinate, x_sigma = (1 - sigma) x0 + sigma eps."""
  def velocity(x, sigma):
    a = 1.0 - sigma
    x0 = mean + a * std**2 / (a**2 * std**2 + sigma**2) * (x - a * mean)
    return (x - x0) / sigma
  return velocity


@pytest.mark.reference
@pytest.mark.parametrize("config,steps,mu,sigmas", [
    (SD3, 1, None, None), (SD3, 4, None, None), (SD3, 28, None, None),
    (SD3 | {"shift": 1.0}, 10, None, None),
    (FLUX, 4, 0.73, "linspace"), (FLUX, 20, 1.15, "linspace"), (FLUX, 8, 0.5, None),
])
def test_flow_match_plan_and_sampling_match_diffusers(config, steps, mu, sigmas):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  ref = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
  given = np.linspace(1.0, 1 / steps, steps) if sigmas == "linspace" else None  # what Flux's pipeline passes
  ref.set_timesteps(steps, sigmas=given, mu=mu)
  ours = DiffusersScheduler.from_config(config)
  plan = ours.plan(steps, mu=mu, sigmas=given)
  np.testing.assert_array_equal(plan.ts, ref.sigmas[:-1].numpy().astype(np.float64))
  # the network's times: sigma * 1000 in float32, as a pipeline's time_scale multiplies them
  np.testing.assert_array_equal(np.asarray(ours.time_scale * jnp.asarray(plan.ts, jnp.float32)),
                                ref.timesteps.numpy())
  # Sampling: the exact velocity of Gaussian data, fed to diffusers' loop and to diffjax's sampler.
  rng = np.random.default_rng(0)
  mean, std = rng.standard_normal(16), 0.2 + rng.random(16)
  velocity = _gaussian_velocity(mean, std)
  noise = rng.standard_normal((4, 16)).astype(np.float32)
  x = torch.from_numpy(noise)
  for t in ref.timesteps:
    v = velocity(x.numpy().astype(np.float64), float(t) / 1000.0).astype(np.float32)
    x = ref.step(torch.from_numpy(v), t, x).prev_sample
  net = lambda x, t: velocity(x, t[:, None]).astype(x.dtype)
  denoise = parameterization.as_denoiser(net, ours.target, ours.process)
  got = np.asarray(sample(plan.solver, denoise, jnp.asarray(noise), jnp.asarray(plan.ts), denoise_final=True))
  # diffusers steps x + (sigma' - sigma) v, diffjax (1 - sigma') x0 + sigma' eps: the same in exact arithmetic;
  # a few roundings per step of values within |x| + |v| sigma.
  scale = float(np.abs(noise).max() + np.abs(mean).max() + 3 * std.max())
  np.testing.assert_allclose(got, x.numpy(), rtol=0, atol=tolerances.gamma(8 * steps + 8) * scale * 4)
  assert math.isfinite(float(np.abs(got).max()))
