"""Loss weightings: target-independence, ELBO closed form, time samplers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import losses
from diffjax import parameterization as pz
from diffjax import processes as P


@pytest.mark.parametrize("weighting", ["snr", "min_snr", "edm", "elbo"])
@pytest.mark.parametrize("proc", [P.VPLinear(), P.EDM(), P.RectifiedFlow(), P.make_process("sd")],
                         ids=lambda p: type(p).__name__)
def test_same_x0_estimate_same_loss_whatever_the_target(proc, weighting, x64):
  """A weighting is a weight on x0 errors: predicting any target for the same x0_hat gives one loss."""
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x0 = jax.random.normal(k1, (6, 4))
  eps = jax.random.normal(k2, (6, 4))
  t = jnp.linspace(proc.t_min + 0.05 * (proc.t_max - proc.t_min), 0.95 * proc.t_max, 6)
  x0_hat = lambda x_t, tt: 0.8 * x_t + 0.1  # some imperfect estimate of x0 from x_t

  values = []
  for target in pz.TARGETS:
    predict = lambda x_t, tt, target=target: pz.from_x0(target, x0_hat(x_t, tt), x_t, tt, proc)
    values.append(losses.denoising_loss(predict, x0, eps, t, proc, target=target, weighting=weighting))
  for v in values[1:]:
    np.testing.assert_allclose(v, values[0], rtol=1e-7)


def test_uniform_weighting_is_plain_target_mse(x64):
  p = P.VPLinear()
  x0 = jax.random.normal(jax.random.key(1), (4, 3))
  eps = jax.random.normal(jax.random.key(2), (4, 3))
  t = jnp.array([0.1, 0.3, 0.6, 0.9])
  predict = lambda x_t, tt: 0.5 * x_t
  got = losses.denoising_loss(predict, x0, eps, t, p, target="eps", weighting="uniform")
  x_t = p.alpha(t)[:, None] * x0 + p.sigma(t)[:, None] * eps
  np.testing.assert_allclose(got, jnp.mean((0.5 * x_t - eps) ** 2, axis=1), rtol=1e-12)
  # min-SNR clamps the SNR weight at gamma (Hang et al. 2023).
  w = losses.x0_weight("min_snr", t, p, gamma=5.0)
  np.testing.assert_allclose(w, np.minimum(np.exp(p.log_snr(t)), 5.0))


@pytest.mark.parametrize("proc", [P.VPLinear(), P.VPCosine(), P.EDM(), P.RectifiedFlow()],
                         ids=lambda p: type(p).__name__)
def test_elbo_weighting_gives_gaussian_diffusion_loss_in_closed_form(proc, x64):
  """For x0 ~ N(0, v) and the exact denoiser, E|x0_hat - x0|^2 = v sigma^2 / (alpha^2 v + sigma^2);
  integrating the ELBO weight over [t0, t1] gives 1/2 log((1 + v SNR(t0)) / (1 + v SNR(t1)))."""
  v = 0.7
  t0, t1 = proc.t_min + 0.02 * (proc.t_max - proc.t_min), 0.98 * proc.t_max
  nodes, weights = np.polynomial.legendre.leggauss(200)
  # integrate in log-SNR-friendly pieces: split [t0, t1] geometrically to resolve the small-t end
  edges = np.geomspace(t0, t1, 40)
  total = 0.0
  for a, b in zip(edges[:-1], edges[1:], strict=True):
    t = jnp.asarray(0.5 * (b - a) * nodes + 0.5 * (a + b))
    mse = v * proc.sigma(t) ** 2 / (proc.alpha(t) ** 2 * v + proc.sigma(t) ** 2)
    total += 0.5 * (b - a) * float(jnp.sum(weights * losses.x0_weight("elbo", t, proc) * mse))
  snr = lambda t: float(jnp.exp(proc.log_snr(t)))
  assert total == pytest.approx(0.5 * np.log((1 + v * snr(t0)) / (1 + v * snr(t1))), rel=1e-6)


def test_time_samplers(x64):
  key = jax.random.key(3)
  edm = P.EDM(t_min=1e-8, t_max=1e8)
  t = losses.log_normal_time(key, (200000,), edm, p_mean=-1.2, p_std=1.2)
  assert float(jnp.mean(jnp.log(t))) == pytest.approx(-1.2, abs=0.01)
  assert float(jnp.std(jnp.log(t))) == pytest.approx(1.2, abs=0.01)
  flow = P.RectifiedFlow(t_min=0.0, t_max=1.0)
  t = losses.logit_normal_time(key, (200000,), flow, mean=0.5, std=0.8)
  logit = jnp.log(t / (1 - t))
  assert float(jnp.mean(logit)) == pytest.approx(0.5, abs=0.01)
  assert float(jnp.std(logit)) == pytest.approx(0.8, abs=0.01)
  t = losses.uniform_time(key, (1000,), P.VPLinear())
  assert float(t.min()) >= 1e-3 and float(t.max()) <= 1.0
  with pytest.raises(ValueError, match="weighting"):
    losses.x0_weight("nope", t, flow)
