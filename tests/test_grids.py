"""Time grids: endpoints, spacing laws, DDIM spacings, validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import processes as P
from diffjax.samplers import grids

SD = P.make_process("sd")


def test_karras_grid_is_rho_warped_in_edm_sigma(x64):
  ts = grids.karras(SD, 10, 0.05, 10.0, 7.0)
  s = np.asarray(SD.edm_sigma(ts))
  np.testing.assert_allclose([s[0], s[-1]], [10.0, 0.05], rtol=1e-9)
  np.testing.assert_allclose(np.diff(s ** (1 / 7)), (0.05 ** (1 / 7) - 10 ** (1 / 7)) / 9, rtol=1e-9)
  # default range is the process's own: 14.61 .. 0.0292 for SD
  s = SD.edm_sigma(grids.karras(SD, 5))
  np.testing.assert_allclose([s[0], s[-1]], [SD.edm_sigma(999.0), SD.edm_sigma(0.0)], rtol=1e-9)


@pytest.mark.parametrize("proc", [SD, P.VPLinear(), P.EDM(), P.RectifiedFlow(shift=3.0, t_max=0.99)],
                         ids=lambda p: type(p).__name__)
def test_spacing_laws(proc, x64):
  lam = np.asarray(proc.log_snr(grids.log_snr_uniform(proc, 7)))
  np.testing.assert_allclose(np.diff(lam), np.full(6, (lam[-1] - lam[0]) / 6), rtol=1e-8)
  t = np.asarray(grids.uniform_t(proc, 5))
  np.testing.assert_allclose(t, np.linspace(proc.t_max, proc.t_min, 5))
  q = np.asarray(grids.quadratic_t(proc, 5))
  np.testing.assert_allclose(np.sqrt((q - proc.t_min) / (proc.t_max - proc.t_min)), np.linspace(1, 0, 5), atol=1e-12)
  for ts in (lam, t, q):
    assert len(ts) in (5, 7)


def test_ddim_spacings_match_their_definitions():
  np.testing.assert_array_equal(grids.ddim_timesteps(1000, 4, "leading", steps_offset=1), [751, 501, 251, 1])
  np.testing.assert_array_equal(grids.ddim_timesteps(1000, 4, "trailing"), [999, 749, 499, 249])
  np.testing.assert_array_equal(grids.ddim_timesteps(1000, 4, "linspace"), [999, 666, 333, 0])
  with pytest.raises(ValueError, match="spacing"):
    grids.ddim_timesteps(1000, 4, "nope")
  with pytest.raises(ValueError, match="n <="):
    grids.ddim_timesteps(10, 11)


@pytest.mark.parametrize("model", sorted(grids.AYS_SIGMAS))
def test_align_your_steps_gives_the_published_sigmas(model, x64):
  published = np.asarray(grids.AYS_SIGMAS[model])
  s = np.asarray(SD.edm_sigma(grids.GRIDS[f"ays_{model}"](SD, 10)))  # 10 steps: the table, less its sigma_min
  np.testing.assert_allclose(s[0], SD.edm_sigma(999.0), rtol=1e-9)  # 14.615 is 14.6146 rounded up: clipped
  np.testing.assert_allclose(s[1:], published[1:10], rtol=1e-9)
  # Other step counts: log-linear interpolation of the table to n + 1 values (a hand-made case: n = 5
  # puts value j at table position 2j, where no interpolation is needed), all inside SD's range.
  np.testing.assert_allclose(np.asarray(SD.edm_sigma(grids.align_your_steps(SD, 5, model)))[1:],
                             published[2:10:2], rtol=1e-9)
  between = np.asarray(SD.edm_sigma(grids.align_your_steps(SD, 20, model)))  # midpoints: geometric means
  np.testing.assert_allclose(between[3:20:2], np.sqrt(published[1:10] * published[2:11]), rtol=1e-9)
  for n in (2, 4, 7, 25):
    grids.check_grid(SD, grids.align_your_steps(SD, n, model))  # strictly decreasing noise
  with pytest.raises(ValueError, match="published"):
    grids.align_your_steps(SD, 10, "sd3")


def test_grid_arguments_can_be_traced():
  f = jax.jit(lambda a, b, r: grids.karras(SD, 6, a, b, r))
  f(0.1, 5.0, 7.0)
  f(0.2, 4.0, 3.0)
  assert f._cache_size() == 1


def test_user_grid_validation():
  np.testing.assert_array_equal(grids.check_grid(SD, [900.0, 500.0, 10.0]), [900.0, 500.0, 10.0])
  with pytest.raises(ValueError, match="decreasing"):
    grids.check_grid(SD, [10.0, 500.0])
  with pytest.raises(ValueError, match="1-D"):
    grids.check_grid(SD, [[1.0]])
  assert jnp.asarray(grids.check_grid(SD, [3.0])).shape == (1,)
