"""Generates the three Gaussian-mixture data sets of the sampler accuracy benchmark.

``python -m benchmarks.make_mixtures`` (re)writes, deterministically (numpy seed per file):

* ``gmm2d.npz``: 2-D, 25 sharp modes on a jittered 5 x 5 lattice of spacing 0.8,
  per-axis std log-uniform in [0.03, 0.1] (the smallest is about SD's sigma_min = 0.029),
  weights uniform in [0.5, 1.5] (normalized).
* ``gmm64.npz``: 64-D, 12 components, means N(0, 0.7^2 I), strongly anisotropic diagonal
  variances 10^U(-3, 0) (a condition number up to 1000 within each component).
* ``gmm256.npz``: 256-D "image-like", 10 components whose means are smooth 16 x 16
  random fields with a power spectrum decaying as (1 + |f| / 1.5)^-4 (f in cycles per
  image), scaled to std 0.8; per-pixel variances 0.003 + 0.03 s^2 with s another smooth
  field of unit std (smooth, spatially varying noise).

Each file holds ``weights`` (K,), ``means`` (K, d), ``variances`` (K, d) in float64,
the format of ``diffjax.analytic.GaussianMixture.load``.
"""

from __future__ import annotations

import pathlib

import numpy as np

DATA_DIR = pathlib.Path(__file__).resolve().parent / "data"


def gmm2d(rng):
  """25 sharp modes on a jittered 5 x 5 lattice."""
  g = np.arange(-2, 3) * 0.8
  means = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
  means = means + rng.uniform(-0.15, 0.15, means.shape)
  std = np.exp(rng.uniform(np.log(0.03), np.log(0.1), means.shape))
  weights = rng.uniform(0.5, 1.5, len(means))
  return weights / weights.sum(), means, std**2


def gmm64(rng, k=12, d=64):
  """Anisotropic components: variances spread over three decades in every component."""
  means = 0.7 * rng.standard_normal((k, d))
  variances = 10.0 ** rng.uniform(-3.0, 0.0, (k, d))
  weights = rng.uniform(0.5, 1.5, k)
  return weights / weights.sum(), means, variances


def _smooth_field(rng, n, side=16, decay=4.0, f0=1.5):
  """(n, side*side) Gaussian random fields with power spectrum (1 + |f| / f0)^-decay, unit std."""
  f = np.fft.fftfreq(side) * side
  fr = np.hypot(f[:, None], f[None, :])
  amp = (1.0 + fr / f0) ** (-decay / 2)
  white = rng.standard_normal((n, side, side))
  field = np.real(np.fft.ifft2(np.fft.fft2(white) * amp))
  field = field.reshape(n, -1)
  return (field - field.mean(1, keepdims=True)) / field.std(1, keepdims=True)


def gmm256(rng, k=10):
  """16 x 16 smooth patterns with a decaying spectrum and smooth per-pixel noise levels."""
  means = 0.8 * _smooth_field(rng, k)
  variances = 0.003 + 0.03 * _smooth_field(rng, k) ** 2
  weights = rng.uniform(0.5, 1.5, k)
  return weights / weights.sum(), means, variances


MIXTURES = {"gmm2d": (gmm2d, 0), "gmm64": (gmm64, 1), "gmm256": (gmm256, 2)}


def main():
  DATA_DIR.mkdir(parents=True, exist_ok=True)
  for name, (fn, seed) in MIXTURES.items():
    w, m, v = fn(np.random.default_rng(seed))
    np.savez_compressed(DATA_DIR / f"{name}.npz", weights=w, means=m, variances=v)
    print(f"{name}: K={len(w)}, d={m.shape[1]}, data std {np.sqrt(np.mean(v) + np.var(m)):.3f}, "
          f"min/max variance {v.min():.2e}/{v.max():.2e}")


if __name__ == "__main__":
  main()
