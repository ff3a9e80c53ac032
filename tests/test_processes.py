"""Noise processes: inverses, closed-form SDE coefficients, discrete SD schedule."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import processes as P

ALL = {
    "vp_linear": P.VPLinear(),
    "vp_cosine": P.VPCosine(),
    "vp_scaled_linear": P.VPScaledLinear(),
    "sub_vp": P.SubVP(),
    "ve": P.VE(),
    "edm": P.EDM(),
    "flow": P.RectifiedFlow(),
    "flow_shift3": P.RectifiedFlow(shift=3.0),
    "sd": P.make_process("sd"),
    "discrete_linear": P.make_process("discrete_linear", beta_start=1e-4, beta_end=0.02),
    "discrete_cosine": P.make_process("discrete_cosine"),
}


def _times(p, n=37):
  lo, hi = p.t_min, p.t_max
  return jnp.linspace(lo + 1e-3 * (hi - lo), hi - 1e-3 * (hi - lo), n)


@pytest.mark.parametrize("name", sorted(ALL))
def test_log_snr_and_edm_sigma_inverses(name, x64):
  p = ALL[name]
  t = _times(p)
  np.testing.assert_allclose(p.t_from_log_snr(p.log_snr(t)), t, rtol=1e-9, atol=1e-9 * p.t_max)
  np.testing.assert_allclose(p.t_from_edm_sigma(p.edm_sigma(t)), t, rtol=1e-9, atol=1e-9 * p.t_max)
  # log-SNR strictly decreasing; alpha, sigma consistent with it.
  assert np.all(np.diff(np.asarray(p.log_snr(t))) < 0)
  np.testing.assert_allclose(p.log_snr(t), np.log(p.alpha(t) ** 2 / p.sigma(t) ** 2), rtol=1e-9, atol=1e-9)


def _closed_form_f_g2(name, t):
  """Textbook drift f and squared diffusion g^2 (Song et al. 2021, appendix B; EDM; flows)."""
  b0, b1 = 0.1, 20.0
  beta = b0 + t * (b1 - b0)
  if name == "vp_linear":
    return -0.5 * beta, beta
  if name == "sub_vp":
    return -0.5 * beta, beta * (1 - np.exp(-2 * b0 * t - (b1 - b0) * t**2))
  if name == "ve":
    s = 0.01 * (50 / 0.01) ** t
    return 0 * t, 2 * s**2 * math.log(50 / 0.01)
  if name == "edm":
    return 0 * t, 2 * t
  if name == "flow":
    return -1 / (1 - t), 2 * t / (1 - t)
  if name == "vp_scaled_linear":
    beta = 1000 * (0.00085**0.5 + t * (0.012**0.5 - 0.00085**0.5)) ** 2
    return -0.5 * beta, beta
  return None


@pytest.mark.parametrize("name", ["vp_linear", "sub_vp", "ve", "edm", "flow", "vp_scaled_linear"])
def test_sde_coefficients_match_closed_form(name, x64):
  p = ALL[name]
  t = _times(p)
  f, g2 = _closed_form_f_g2(name, np.asarray(t))
  np.testing.assert_allclose(p.drift(t), f, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(p.diffusion(t) ** 2, g2, rtol=1e-8, atol=1e-12)


def test_sd_discrete_schedule_matches_ddpm_cumprod(x64):
  p = ALL["sd"]
  betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
  alpha_bar = np.cumprod(1 - betas)
  k = jnp.arange(1000.0)
  np.testing.assert_allclose(p.alpha(k) ** 2, alpha_bar, rtol=1e-12)
  np.testing.assert_allclose(p.sigma(k) ** 2, 1 - alpha_bar, rtol=1e-12)
  # The endpoints quoted by the sampler benchmark contract.
  assert abs(float(p.edm_sigma(0.0)) - 0.0292) < 5e-5
  assert abs(float(p.edm_sigma(999.0)) - 14.61) < 5e-3
  # Between integers log(sigma/alpha) is linear (diffusers' sigma <-> timestep rule).
  mid = float(jnp.log(p.edm_sigma(10.5)))
  assert mid == pytest.approx(0.5 * float(jnp.log(p.edm_sigma(10.0)) + jnp.log(p.edm_sigma(11.0))), abs=1e-12)


def test_continuous_scaled_linear_tracks_discrete(x64):
  """The continuous SD schedule at t = k / (N - 1) is close to the discrete product."""
  cont, disc = ALL["vp_scaled_linear"], ALL["sd"]
  k = jnp.arange(50.0, 1000.0, 50.0)
  rel = np.abs(np.asarray(cont.log_alpha(k / 999.0) / disc.log_alpha(k)) - 1)
  assert rel.max() < 0.02, rel


def test_flow_shift_and_resolution_shift(x64):
  p = ALL["flow_shift3"]
  np.testing.assert_allclose(p.sigma(0.5), 0.75, rtol=1e-12)
  t = _times(p)
  np.testing.assert_allclose(p.alpha(t) + p.sigma(t), 1.0, rtol=1e-12)
  assert P.resolution_shift(256) == pytest.approx(math.exp(0.5))
  assert P.resolution_shift(4096) == pytest.approx(math.exp(1.15))


def test_vp_processes_preserve_variance(x64):
  for name in ("vp_linear", "vp_cosine", "vp_scaled_linear", "sd"):
    t = _times(ALL[name])
    np.testing.assert_allclose(ALL[name].alpha(t) ** 2 + ALL[name].sigma(t) ** 2, 1.0, rtol=1e-12)


def test_prior(x64):
  p = ALL["ve"]
  assert float(p.prior_std) == pytest.approx(math.sqrt(1 + 50.0**2))
  x = jax.random.normal(jax.random.key(0), (3, 4))
  expected = -0.5 * np.sum(np.asarray(x) ** 2) / (1 + 2500) - 6 * math.log(2 * math.pi * 2501)
  assert float(p.prior_logp(x)) == pytest.approx(expected, rel=1e-12)
  samples = p.prior_sample(jax.random.key(1), (20000,), jnp.float64)
  assert float(jnp.std(samples)) == pytest.approx(math.sqrt(2501), rel=0.02)


def test_process_is_a_jit_argument_without_recompiling():
  f = jax.jit(lambda p, t: p.sigma(t))
  for beta_max in (10.0, 20.0, 30.0):
    f(P.VPLinear(beta_max=beta_max), 0.5)
  assert f._cache_size() == 1


def test_unknown_names_fail_clearly():
  with pytest.raises(ValueError, match="unknown process"):
    P.make_process("nope")
  with pytest.raises(ValueError, match="beta schedule"):
    P.make_process("discrete_nope")
  with pytest.raises(ValueError, match="betas"):
    P.DiscreteVP.from_betas([0.5])
