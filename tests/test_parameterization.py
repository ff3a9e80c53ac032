"""Prediction-target conversions are exact inverses; EDM preconditioning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import parameterization as pz
from diffjax import processes as P

PROCS = [P.VPLinear(), P.SubVP(), P.VE(), P.EDM(), P.RectifiedFlow(shift=3.0), P.make_process("sd")]


def _pair(p, seed=0, b=5):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  x0 = jax.random.normal(k1, (b, 3, 2))
  eps = jax.random.normal(k2, (b, 3, 2))
  t = jax.random.uniform(k3, (b,), minval=p.t_min + 0.01 * (p.t_max - p.t_min), maxval=0.99 * p.t_max)
  c = lambda v: v[:, None, None]
  return x0, eps, t, c(p.alpha(t)) * x0 + c(p.sigma(t)) * eps


@pytest.mark.parametrize("target", pz.TARGETS)
@pytest.mark.parametrize("proc", PROCS, ids=lambda p: type(p).__name__)
def test_round_trips_are_exact(proc, target, x64):
  x0, eps, t, x = _pair(proc)
  pred = pz.target_from_clean(target, x0, eps, t, proc)
  np.testing.assert_allclose(pz.to_x0(target, pred, x, t, proc), x0, rtol=1e-9, atol=1e-9)
  np.testing.assert_allclose(pz.from_x0(target, x0, x, t, proc), pred, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("target", pz.TARGETS)
@pytest.mark.parametrize("proc", PROCS, ids=lambda p: type(p).__name__)
def test_x0_error_scale(proc, target, x64):
  """|target(x0 + d) - target(x0)| = k(t) |d| at fixed x_t."""
  x0, _, t, x = _pair(proc, seed=1)
  d = 1e-3 * jax.random.normal(jax.random.key(7), x0.shape)
  diff = pz.from_x0(target, x0 + d, x, t, proc) - pz.from_x0(target, x0, x, t, proc)
  k = pz.x0_error_scale(target, t, proc)[:, None, None]
  np.testing.assert_allclose(jnp.abs(diff), k * jnp.abs(d), rtol=1e-7, atol=1e-12)


def test_known_special_cases(x64):
  p = P.VPLinear()
  x0, eps, t, x = _pair(p)
  a, s = p.alpha(t)[:, None, None], p.sigma(t)[:, None, None]
  np.testing.assert_allclose(pz.target_from_clean("v", x0, eps, t, p), a * eps - s * x0)
  # For VP, x0 = alpha x - sigma v (Salimans & Ho 2022).
  v = pz.target_from_clean("v", x0, eps, t, p)
  np.testing.assert_allclose(a * x - s * v, x0, atol=1e-10)
  # Rectified flow (shift 1): velocity = eps - x0.
  f = P.RectifiedFlow()
  x0, eps, t, _ = _pair(f)
  np.testing.assert_allclose(pz.target_from_clean("velocity", x0, eps, t, f), eps - x0, atol=1e-12)


def test_as_denoiser_broadcasts_scalar_time(x64):
  p = P.VPLinear()
  x0, eps, _, _ = _pair(p)
  t = 0.3
  x = p.alpha(t) * x0 + p.sigma(t) * eps
  seen = {}

  def net(xx, tt):
    seen["t"] = tt
    return jnp.broadcast_to(eps, xx.shape)  # perfect eps prediction

  np.testing.assert_allclose(pz.as_denoiser(net, "eps", p)(x, t), x0, atol=1e-10)
  assert seen["t"].shape == (x.shape[0],)
  with pytest.raises(ValueError, match="prediction target"):
    pz.as_denoiser(net, "epsilon", p)


def test_edm_preconditioning_coefficients_and_wrapper(x64):
  sd = 0.5
  c_skip, c_out, c_in, c_noise = pz.edm_preconditioning(jnp.asarray(sd), sd)
  np.testing.assert_allclose([c_skip, c_out, c_in, c_noise], [0.5, sd / 2**0.5, 1 / (sd * 2**0.5), 0.25 * np.log(sd)])
  # A net that outputs the exact residual F = (x0 - c_skip x~) / c_out makes the wrapper exact,
  # for a VP process too (the wrapper works on x / alpha).
  p = P.VPLinear()
  x0, eps, _, _ = _pair(p)
  t = 0.4
  x = p.alpha(t) * x0 + p.sigma(t) * eps
  s = p.edm_sigma(t)
  cs, co, ci, cn = pz.edm_preconditioning(s, sd)

  def net(x_in, noise):
    np.testing.assert_allclose(noise, cn)
    return (x0 - cs * x_in / ci) / co

  np.testing.assert_allclose(pz.edm_denoiser(net, p, sd)(x, t), x0, atol=1e-10)
