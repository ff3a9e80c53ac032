"""Float32 error bounds for tests, derived from the computation rather than from one CPU.

A float32 result differs between x86-64 machines because XLA picks the summation order
(blocking, vector width, FMA or not) per processor, and transcendental functions are
polynomial approximations accurate to a few units in the last place. A tolerance that
holds on every machine therefore bounds the rounding error of *any* evaluation order:
the standard forward-error bounds (Higham, "Accuracy and Stability of Numerical
Algorithms", 2nd ed., section 3.1) in terms of the unit roundoff ``U32 = 2**-24``.

``gamma(n) = n u / (1 - n u)`` bounds the relative error of n successive roundings; a sum
or dot product of n terms computed in any order is within ``gamma(n) * sum |a_i b_i|`` of
its exact value (Higham, eq. 3.5), which is what the helpers below apply.
"""

import numpy as np

U32 = 2.0**-24  # unit roundoff of float32 (half of np.finfo(np.float32).eps)

# Rounding steps charged to one transcendental function call (exp, log, sqrt, tanh ...):
# XLA's CPU approximations are accurate to a few ulp; 4 covers them with room.
TRANSCENDENTAL_OPS = 4


def gamma(n: int, u: float = U32) -> float:
  """Higham's gamma_n = n u / (1 - n u): the relative error bound of n roundings."""
  if n * u >= 1:
    raise ValueError(f"gamma({n}) is undefined for u = {u}: n u >= 1")
  return n * u / (1.0 - n * u)


def matmul_bound(a, b, extra_ops: int = 0, u: float = U32):
  """Elementwise bound on |fl(a @ b) - a @ b| for inputs exact in float64.

  ``gamma(k + extra_ops) * (|a| @ |b|)`` with k the contracted length: any summation
  order, with ``extra_ops`` more roundings per term for what produced the inputs.
  """
  a, b = np.abs(np.asarray(a, np.float64)), np.abs(np.asarray(b, np.float64))
  return gamma(a.shape[-1] + extra_ops, u) * (a @ b)


def sum_bound(terms, axis=-1, extra_ops: int = 0, u: float = U32):
  """Bound on the rounding error of ``sum(terms, axis)``: gamma(n + extra_ops) * sum |terms|."""
  terms = np.abs(np.asarray(terms, np.float64))
  return gamma(terms.shape[axis] + extra_ops, u) * terms.sum(axis)


BF16 = 2.0**-8  # unit roundoff of bfloat16 (8 significand bits)


def multilinear_bound(fn, *args, n: int, extra_ops: int = 0, u: float = U32):
  """Elementwise bound on the rounding of ``fn(*args)`` for a sum of products (matmul, conv, their VJPs).

  Every output of such an ``fn`` is a sum of at most ``n`` products of its inputs with
  nonnegative structural coefficients (repeat, pad, bias add), so in any summation order
  it is within ``gamma(n + extra_ops) * fn(|args|)`` of its exact value (Higham eq. 3.5):
  ``fn`` evaluated in float64 on the absolute values is sum |terms| for each output.
  Returns a pytree of float64 numpy arrays shaped like ``fn``'s output.
  """
  import jax
  import jax.numpy as jnp

  with jax.enable_x64(True):
    absolute = jax.tree.map(lambda a: jnp.abs(jnp.asarray(np.asarray(a, np.float64))), args)
    out = fn(*absolute)
  return jax.tree.map(lambda o: gamma(n + extra_ops, u) * np.asarray(o, np.float64), out)


def assert_within(actual, desired, bound, what=""):
  """|actual - desired| <= bound elementwise (bound broadcasts), with the worst element in the message."""
  actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
  err = np.abs(actual - desired)
  bound = np.broadcast_to(np.asarray(bound, np.float64), err.shape)
  excess = err - bound
  if excess.size and np.max(excess) > 0:
    i = np.unravel_index(np.argmax(excess), err.shape)
    raise AssertionError(
      f"{what} |difference| {err[i]:.3g} > bound {bound[i]:.3g} at {i} "
      f"({int(np.sum(excess > 0))} of {err.size} elements; max |difference| {err.max():.3g})"
    )


# Roundings charged to one sampler step with a closed-form mixture denoiser: the denoiser (the
# ``c = 24 + 2 TRANSCENDENTAL_OPS`` of test_sampler_benchmark's derived bound, plus its d-term
# sums: 8), the step's coefficients from alpha(t), sigma(t) and log-SNR (4 transcendental calls)
# and the linear combination of state and denoised value (8).
SAMPLER_STEP_OPS = 24 + 2 * TRANSCENDENTAL_OPS + 8 + 4 * TRANSCENDENTAL_OPS + 8


def sampler_rtol(steps: int, evals_per_step: int = 1, u: float = U32) -> float:
  """Relative bound on the difference of two float32 runs of the same sampling recursion.

  Two algebraically equal samplers (or one under jit and op by op) differ only in rounding:
  each step contributes at most ``SAMPLER_STEP_OPS`` roundings per denoiser evaluation relative
  to the state's magnitude, accumulated over ``steps`` (the flows here do not amplify an error
  in the state by more than O(1)); twice that bounds the difference of two runs. A wrong
  coefficient, sign or timestep moves the samples by the discretization error, O(1e-2) or more.
  """
  return 2 * gamma(steps * evals_per_step * SAMPLER_STEP_OPS, u)
