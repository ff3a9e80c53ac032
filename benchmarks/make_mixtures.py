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

``python -m benchmarks.make_mixtures --random SEED [SEED ...] --out DIR`` writes mixtures the
benchmark has never seen, ``DIR/random<SEED>.npz``, drawn from a family (``random_mixture``) wider
than the three above: any d in [2, 256], 2 to 32 components, sharp or broad, isotropic or not,
means that are independent or image-like: what the fitted sampler's robustness is measured on.
"""

from __future__ import annotations

import argparse
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


def random_mixture(rng) -> tuple[tuple, str]:
  """((weights, means, variances), description) of one mixture from a wide family.

  d log-uniform in [2, 256]; K uniform in [2, 32]; weights uniform in [0.2, 1.8] (normalized);
  means N(0, s^2) per coordinate with s log-uniform in [0.3, 1.5], or (for d >= 16, 30% of the
  time; d is then rounded to a square) s times smooth fields as in gmm256; modes sharp (standard
  deviations log-uniform in [0.01, 0.1], down to a third of SD's smallest noise level) or broad
  ([0.1, 1]); isotropic (one standard deviation per component) or anisotropic (per coordinate,
  spread over up to two decades below the component's).
  """
  d = int(np.clip(np.round(np.exp(rng.uniform(np.log(2), np.log(256)))), 2, 256))
  k = int(rng.integers(2, 33))
  spread = float(np.exp(rng.uniform(np.log(0.3), np.log(1.5))))
  smooth = d >= 16 and rng.uniform() < 0.3
  side = int(round(np.sqrt(d)))
  d = side * side if smooth else d
  means = spread * (_smooth_field(rng, k, side=side) if smooth else rng.standard_normal((k, d)))
  sharp, isotropic = rng.uniform() < 0.5, rng.uniform() < 0.5
  lo, hi = (0.01, 0.1) if sharp else (0.1, 1.0)
  std = np.exp(rng.uniform(np.log(lo), np.log(hi), (k, 1)))
  if not isotropic:
    std = std * 10.0 ** rng.uniform(-2.0, 0.0, (k, d))  # up to two decades below the component's scale
  variances = np.broadcast_to(std**2, (k, d)).copy()
  weights = rng.uniform(0.2, 1.8, k)
  what = (f"d={d} K={k} {'sharp' if sharp else 'broad'} {'isotropic' if isotropic else 'anisotropic'} "
          f"{'smooth-field' if smooth else 'gaussian'} means (spread {spread:.2f})")
  return (weights / weights.sum(), means, variances), what


def random_draw(seed: int) -> tuple[tuple, str]:
  """``random_mixture`` number ``seed`` (its own generator: the same mixture whatever else was drawn)."""
  return random_mixture(np.random.default_rng([seed, 7]))


def write(path, arrays) -> pathlib.Path:
  """(weights, means, variances) to the npz file ``path`` (the format of ``GaussianMixture.load``)."""
  np.savez_compressed(path, **dict(zip(("weights", "means", "variances"), arrays, strict=True)))
  return pathlib.Path(path)


def write_random(seed: int, out) -> tuple[pathlib.Path, str]:
  """(path, description) of ``random_draw(seed)`` written to ``out/random<seed>.npz``."""
  arrays, what = random_draw(seed)
  return write(pathlib.Path(out) / f"random{seed}.npz", arrays), what


MIXTURES = {"gmm2d": (gmm2d, 0), "gmm64": (gmm64, 1), "gmm256": (gmm256, 2)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--random", type=int, nargs="*", help="seeds of random_mixture draws (else: the three files)")
  parser.add_argument("--out", default=str(DATA_DIR), help="directory to write to")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  if args.random is None:
    made = [(name, fn(np.random.default_rng(seed)), "") for name, (fn, seed) in MIXTURES.items()]
  else:
    made = [(f"random{seed}", *random_draw(seed)) for seed in args.random]
  for name, (w, m, v), what in made:
    write(out / f"{name}.npz", (w, m, v))
    print(f"{name}: K={len(w)}, d={m.shape[1]}, data std {np.sqrt(np.mean(v) + np.var(m)):.3f}, "
          f"min/max variance {v.min():.2e}/{v.max():.2e} {what}")


if __name__ == "__main__":
  main()
