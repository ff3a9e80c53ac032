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
