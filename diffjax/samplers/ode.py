"""Deterministic solvers of the probability-flow ODE, each a factory returning a Solver.

Notation (per step from t to t_next): alpha, sigma at t and alpha', sigma' at t_next;
lam = log(alpha / sigma) (DPM-Solver's lambda), h = lam' - lam > 0; D = denoise(x, t).
"EDM sigma" s = sigma / alpha and x~ = x / alpha are the variance-exploding view in
which the ODE reads dx~/ds = (x~ - D) / s (Karras et al. 2022, eq. 4).

Multistep solvers keep their history in the state: the step counter ``i``, the grid
size ``n`` (from ``init(x, ts)``), past denoiser outputs (or slopes) and their times,
most recent first; the order used at step i is selected in-graph. The lambda-based
solvers (DPM-Solver, DPM-Solver++, UniPC) use ratios (e^-h = alpha sigma' / (sigma
alpha'), h / h_prev), so they stay finite when the grid starts at alpha = 0 (lam = -inf,
a rectified flow at t = 1): a term whose weight is infinite there (an extrapolation
over an infinite lambda interval) is dropped, which is its limit where one exists. The
sigma-space solvers (heun, ipndm, lms) divide by alpha and need alpha(t) > 0.

``Solver.order`` is the asymptotic global order (tests/test_ode_solvers.py measures it).
A multistep method started with lower orders keeps the local error of its first
steps, which caps DPM-Solver++(3M), iPNDM and LMS at 2 and UniPC at 3 (see each
docstring); their higher orders still lower the error at practical step counts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.processes import Process
from diffjax.samplers.base import Solver, schedule_at


def _no_state(x, ts):
  return ()


def ddim_update(process: Process, x, x0, t, t_next):
  """First-order step given the data prediction x0: x' = alpha' x0 + sigma' eps_hat.

  This one rule is DDIM (eta = 0), Euler in the EDM sigma, Euler for rectified flow
  and DPM-Solver(++)-1. Written as (sigma'/sigma) x + (alpha' - alpha sigma'/sigma) x0
  it stays finite when alpha(t) = 0 (a flow starting from pure noise).
  """
  alpha, sigma, _ = schedule_at(process, t)
  alpha_n, sigma_n, _ = schedule_at(process, t_next)
  return _ddim(x, x0, alpha, sigma, alpha_n, sigma_n)


def _ddim(x, x0, alpha, sigma, alpha_n, sigma_n):
  ratio = sigma_n / sigma
  return ratio * x + (alpha_n - alpha * ratio) * x0


def euler(process: Process) -> Solver:
  """Euler in the EDM sigma, identical to DDIM (eta = 0) and DPM-Solver-1. Order 1."""

  def step(denoise, x, t, t_next, state, key):
    return ddim_update(process, x, denoise(x, t), t, t_next), state

  return Solver(init=_no_state, step=step, order=1, nfe_per_step=1)


def heun(process: Process) -> Solver:
  """Heun's method in the EDM sigma (Karras et al. 2022, Algorithm 1). Order 2.

  The Euler predictor is followed by the trapezoidal corrector; on x~ = x / alpha:
  x~' = x~ + (s' - s) (d + d') / 2 with d = (x~ - D) / s. Needs alpha(t) > 0.
  """

  def step(denoise, x, t, t_next, state, key):
    alpha, sigma, _ = schedule_at(process, t)
    alpha_n, sigma_n, _ = schedule_at(process, t_next)
    s, s_n = sigma / alpha, sigma_n / alpha_n
    xs = x / alpha
    d = (xs - denoise(x, t)) / s
    xs_euler = xs + (s_n - s) * d
    d_next = (xs_euler - denoise(alpha_n * xs_euler, t_next)) / s_n
    return alpha_n * (xs + (s_n - s) * 0.5 * (d + d_next)), state

  return Solver(init=_no_state, step=step, order=2, nfe_per_step=2)


# ----------------------------------------------------------------------------------
# Shared pieces of the multistep solvers.
# ----------------------------------------------------------------------------------
def _check_order(name, order, max_order):
  if not 1 <= order <= max_order:
    raise ValueError(f"{name}: order must be in 1..{max_order}, got {order}")


def _finite(c):
  """Drops a weight that is infinite (or NaN) because a step starts at alpha = 0."""
  return jnp.where(jnp.isfinite(c), c, 0.0)


def _schedule(process, t, t_next, t_hist):
  """(alpha, sigma, lam) at [t, t_next, *t_hist], in one vectorized evaluation."""
  return schedule_at(process, jnp.concatenate([jnp.stack([t, t_next]).astype(t_hist.dtype), t_hist]))


def _history_init(size, x, ts):
  """Multistep state: step counter, grid size, ``size`` past values (most recent first), their times."""
  return {"i": jnp.zeros((), jnp.int32), "n": jnp.asarray(ts.shape[0], jnp.int32),
          "hist": jnp.zeros((size,) + x.shape, x.dtype), "t": jnp.full((size,), ts[0])}


def _push(state, value, t, **extra):
  """The state after a step: ``value`` (at time t) becomes the most recent history entry."""
  hist = jnp.concatenate([value[None].astype(state["hist"].dtype), state["hist"][:-1]])
  ts = jnp.concatenate([jnp.asarray(t, state["t"].dtype)[None], state["t"][:-1]])
  return {**state, "i": state["i"] + 1, "hist": hist, "t": ts, **extra}


def _step_order(state, order, lower_order_final):
  """min(order, i + 1) (warm-up) and, with lower_order_final, at most n - i (the last steps)."""
  k = jnp.minimum(order, state["i"] + 1)
  return jnp.minimum(k, state["n"] - state["i"]) if lower_order_final else k


def _combine(c, d, hist):
  """c[0] d + sum_j c[j + 1] hist[j]."""
  return c[0] * d + jnp.tensordot(c[1:], hist[: c.shape[0] - 1], axes=1)


def _exp_update(x, sigma, sigma_n, alpha_n, combo):
  """x' = (sigma'/sigma) x + alpha' combo: the exponential integrator in data-prediction form."""
  return ((sigma_n / sigma) * x + alpha_n * combo).astype(x.dtype)


def _lagrange(nodes, k):
  """C (P, P) with L_j(u) = sum_i C[j, i] u^i: the Lagrange basis on the first k nodes (rows j >= k zero)."""
  p = nodes.shape[0]
  idx = jnp.arange(p)
  c = jnp.zeros((p, p), nodes.dtype).at[:, 0].set(1.0)
  for m in range(p):  # multiply row j by (u - x_m) / (x_j - x_m)
    use = (idx != m) & (idx < k) & (m < k)
    den = jnp.where(use, nodes - nodes[m], 1.0)
    c = jnp.where(use[:, None], (jnp.pad(c[:, :-1], ((0, 0), (1, 0))) - nodes[m] * c) / den[:, None], c)
  return jnp.where((idx < k)[:, None], c, 0.0)


# ----------------------------------------------------------------------------------
# DPM-Solver (noise prediction, singlestep).
# ----------------------------------------------------------------------------------
def _phi1m1(z):
  """(e^z - 1) / z - 1."""
  return jnp.expm1(z) / z - 1.0


def dpm_solver(process: Process, order: int = 2) -> Solver:
  """Singlestep DPM-Solver-1/2/3 in noise-prediction form (Lu et al. 2022, eq. 3.7 and Algorithms 1-2).

  With eps = (x - alpha D) / sigma, h = lam' - lam and intermediate times s_k at
  lam + r_k h (``process.t_from_log_snr``):

  * order 1: x' = (alpha'/alpha) x - sigma' (e^h - 1) eps(x, t)  (DDIM);
  * order 2, r1 = 1/2: u = [order 1 to s1], x' = [order 1] - sigma' / (2 r1) (e^h - 1) (eps(u, s1) - eps(x, t));
  * order 3, r1 = 1/3, r2 = 2/3: u1 = [order 1 to s1], D1 = eps(u1, s1) - eps(x, t),
    u2 = [order 1 to s2] - sigma_s2 r2 / r1 ((e^{r2 h} - 1) / (r2 h) - 1) D1,
    x' = [order 1] - sigma' / r2 ((e^h - 1) / h - 1) (eps(u2, s2) - eps(x, t)).

  The order-1 part is evaluated as ``ddim_update`` (algebraically equal, finite at
  alpha = 0); a step from alpha = 0 (h = inf) reduces to it. Option ``order`` 1..3 is
  the global order; ``order`` evaluations per step.
  """
  _check_order("dpm_solver", order, 3)
  rs = {1: (), 2: (0.5,), 3: (1.0 / 3.0, 2.0 / 3.0)}[order]

  def step(denoise, x, t, t_next, state, key):
    (alpha, alpha_n), (sigma, sigma_n), (lam, lam_n) = schedule_at(process, jnp.stack([t, t_next]))
    h = lam_n - lam
    d0 = denoise(x, t)
    x_next = _ddim(x, d0, alpha, sigma, alpha_n, sigma_n).astype(x.dtype)
    if order == 1:
      return x_next, state
    eps0 = (x - alpha * d0) / sigma
    s = process.t_from_log_snr(2.0 * jnp.where(jnp.isfinite(h), lam + jnp.asarray(rs) * h, lam_n))
    a_s, sig_s, _ = schedule_at(process, s)
    ex = (slice(None),) + (None,) * x.ndim
    u = _ddim(x[None], d0[None], alpha, sigma, a_s[ex], sig_s[ex]).astype(x.dtype)  # order 1 to each s_k

    def eps_diff(k, u_k):  # eps(u_k, s_k) - eps(x, t)
      return (u_k - a_s[k] * denoise(u_k, s[k])) / sig_s[k] - eps0

    if order == 2:
      x_next = x_next - _finite(sigma_n / (2 * rs[0]) * jnp.expm1(h)) * eps_diff(0, u[0])
    else:
      r1, r2 = rs
      u2 = (u[1] - _finite(sig_s[1] * r2 / r1 * _phi1m1(r2 * h)) * eps_diff(0, u[0])).astype(x.dtype)
      x_next = x_next - _finite(sigma_n / r2 * _phi1m1(h)) * eps_diff(1, u2)
    return x_next.astype(x.dtype), state

  return Solver(init=_no_state, step=step, order=order, nfe_per_step=order)


# ----------------------------------------------------------------------------------
# DPM-Solver++ (data prediction, multistep).
# ----------------------------------------------------------------------------------
def _dpmpp_weights(h, h0, h1, d2_weight=1.0):
  """Weights of (D_i, D_{i-1}, D_{i-2}) in the 1st order, 2M and 3M updates."""
  g1 = -jnp.expm1(-h)
  zero = jnp.zeros_like(h)

  def first():
    return jnp.stack([g1, zero, zero])

  def second():
    q = h / (2.0 * h0)
    return jnp.stack([g1 * (1.0 + q), -g1 * q, zero])

  def third():
    a, b, c, d = h / h0, h / h1, h0 / (h0 + h1), h / (h0 + h1)
    phi2 = 1.0 + jnp.expm1(-h) / h
    phi3 = d2_weight * (0.5 - (h + jnp.expm1(-h)) / h**2)
    e0 = phi2 * (1.0 + c) + phi3 * d  # weight of D1_0
    e1 = -phi2 * c - phi3 * d  # weight of D1_1
    return jnp.stack([g1 + e0 * a, -e0 * a + e1 * b, -e1 * b])

  return [first, second, third]


def dpmpp_multistep(process: Process, order: int = 2, lower_order_final: bool = True,
                    corrected: bool = False) -> Solver:
  """Multistep DPM-Solver++(2M) / (3M) in data-prediction form (Lu et al. 2022b, Algorithm 2).

  x' = (sigma'/sigma) x + alpha' (...) with D_j the denoiser outputs at the grid points
  (D_0 now), h = lam' - lam and h0, h1 the two previous lambda steps:

  * 1st order: (1 - e^-h) D_0  (DDIM);
  * 2M: (1 - e^-h) [(1 + 1/(2r)) D_0 - 1/(2r) D_1], r = h0 / h (Algorithm 2; diffusers'
    ``midpoint`` solver type and k-diffusion's ``sample_dpmpp_2m``);
  * 3M: (1 - e^-h) D_0 + phi2 D1 + phi3 D2 with D1_0 = (D_0 - D_1) h / h0,
    D1_1 = (D_1 - D_2) h / h1, D1 = D1_0 + h0 / (h0 + h1) (D1_0 - D1_1),
    D2 = h / (h0 + h1) (D1_0 - D1_1), phi2 = 1 + (e^-h - 1) / h and
    phi3 = 1/2 - (e^-h - 1 + h) / h^2 (the reference code's third-order update).

  The order at solver step i of an n-point grid is min(order, i + 1) and, with
  ``lower_order_final``, at most n - i (3M's last solver step is 2nd order; the final
  jump to sigma = 0 is the driver's denoise, 1st order). Options: ``order`` 1..3,
  ``lower_order_final``. Global order 2 for both: the 1st-order first step has local
  error O(h^2), and 3M's D2 term has half the weight of the quadratic term of the
  exponential integral (D2 ~ h^2 D''/2 gets h/6 where h^2 D''/2 needs h/3), so its
  local error stays O(h^3) too; 3M only has the smaller error constant. 1 evaluation
  per step. ``corrected=True`` (registered as ``dpmpp_3m_corrected``) gives D2 its full
  weight 2 phi3: the exponential integrator's third-order term is then exact and the
  local error is O(h^4) after the warm-up.
  """
  _check_order("dpmpp_multistep", order, 3)

  def init(x, ts):
    return _history_init(max(order - 1, 1), x, ts)

  def step(denoise, x, t, t_next, state, key):
    d = denoise(x, t)
    alpha, sigma, lam = _schedule(process, t, t_next, state["t"])
    h0 = lam[0] - lam[2]
    h1 = lam[2] - lam[-1] if order > 2 else h0
    k = _step_order(state, order, lower_order_final)
    c = jax.lax.switch(k - 1, _dpmpp_weights(lam[1] - lam[0], h0, h1, 2.0 if corrected else 1.0)[:order])
    x_next = _exp_update(x, sigma[0], sigma[1], alpha[1], _combine(c[: 1 + state["hist"].shape[0]], d, state["hist"]))
    return x_next, _push(state, d, t)

  return Solver(init=init, step=step, order=min(order, 2), nfe_per_step=1)


# ----------------------------------------------------------------------------------
# UniPC (data prediction, multistep predictor-corrector).
# ----------------------------------------------------------------------------------
def _unipc_weights(h, r, m, variant):
  """Weights W_j = B(h) rho_j / r_j of the differences (D_j - D_0) in UniP / UniC (data prediction).

  r (P,): node positions (lam_j - lam) / h, the first m in use. UniPC's order
  conditions R_m(h) rho = g(h) / B(h) (Zhao et al. 2023) say that the update integrates
  the polynomial through the nodes exactly against the exponential weight:
  -sum_j W_j r_j^k = int_0^h e^-(h - tau) (tau / h)^k dtau, k = 1..m. So B rho_j is
  the functional u^(k-1) -> g_k applied to the Lagrange basis polynomial of node j (no
  solve; B cancels), with g_k from diffusers' h_phi_k recursion. For m = 1, rho = 1/2
  (UniP-2 and UniC-1 of the paper and diffusers). Nodes at lam = -inf get weight 0.
  """
  p = r.shape[0]
  hh = -h
  g, hp, fact = [], jnp.expm1(hh) / hh - 1.0, 1.0
  for k in range(1, p + 1):  # g_k = k! h phi_{k+1}(h), by phi_{k+1} = (phi_k - 1/k!) / h
    g.append(hp * fact)
    fact *= k + 1
    hp = hp / hh - 1.0 / fact
  idx = jnp.arange(p)
  k_eff = jnp.sum(jnp.cumprod((idx < m) & jnp.isfinite(r)))
  r = jnp.where(idx < k_eff, r, 1.0)
  b_rho = _lagrange(r, k_eff) @ jnp.stack(g)
  b_h = hh if variant == "bh1" else jnp.expm1(hh)
  b_rho = jnp.where(m == 1, jnp.where(idx == 0, 0.5 * b_h, 0.0), b_rho)
  return _finite(jnp.where(idx < k_eff, b_rho / r, 0.0))


def unipc(process: Process, order: int = 2, variant: str = "bh2", lower_order_final: bool = True,
          use_corrector: bool = True) -> Solver:
  """UniPC (Zhao et al. 2023): UniP-p predictor and UniC corrector, data prediction, multistep.

  Step i gets x_i (the last predictor output), evaluates D_i = D(x_i, t_i) once and

  1. (i > 0) corrects the previous step with UniC: x_i^c = (sigma_i / sigma_{i-1})
     x_{i-1}^c + alpha_i [(1 - e^-h) D_{i-1} - sum_j W_j (D_j - D_{i-1})] over the nodes
     D_i and the older D's, from that step's origin x_{i-1}^c;
  2. predicts x_{i+1} from x_i^c with UniP-p: the same form over D_i and the p - 1
     previous D's.

  W_j = B(h) rho_j / r_j (``_unipc_weights``); ``variant`` picks B(h) = h ("bh1") or
  e^h - 1 ("bh2"), which only matters for the one-node rho = 1/2 cases. The predictor
  order at step i is min(order, i + 1) and, with ``lower_order_final``, at most n - i;
  the corrector uses the order of the step it corrects. This is diffusers'
  UniPCMultistepScheduler (predict_x0) on the same grid, whose final step returns D at
  the last, uncorrected x: the driver's final denoise. bh1 skips the correction of a
  step from alpha = 0 (B(h) = inf), where diffusers' bh1 gives NaN.

  Options: ``order`` p in 1..6, ``variant``, ``lower_order_final``, ``use_corrector``.
  Global order with the corrector min(p + 1, 3): the warm-up step is UniP-1 + UniC-1
  (local error O(h^3)) and with ``lower_order_final`` the last predictor of p = 3 is
  UniP-2 (without it, p = 3 shows order 4 over practical step counts, the tiny
  warm-up error aside). Without the corrector min(p, 2). 1 evaluation per step.
  """
  _check_order("unipc", order, 6)
  if variant not in ("bh1", "bh2"):
    raise ValueError(f"unipc: variant must be 'bh1' or 'bh2', got {variant!r}")
  p = order

  def init(x, ts):
    return {**_history_init(p, x, ts), "x_prev": x, "k_prev": jnp.ones((), jnp.int32)}

  def step(denoise, x, t, t_next, state, key):
    d, hist = denoise(x, t), state["hist"]
    alpha, sigma, lam = _schedule(process, t, t_next, state["t"])  # at t, t_next, t_{i-1}, t_{i-2}, ...
    k = _step_order(state, p, lower_order_final)
    h_c, h = lam[0] - lam[2], lam[1] - lam[0]  # the step to correct, the step to predict
    nodes = jnp.stack([jnp.concatenate([jnp.ones_like(lam[:1]), (lam[3:] - lam[2]) / h_c]), (lam[2:] - lam[0]) / h])
    w_c, w = jax.vmap(_unipc_weights, (0, 0, 0, None))(jnp.stack([h_c, h]), nodes, jnp.stack([state["k_prev"], k - 1]),
                                                        variant)
    if use_corrector:  # UniC from the previous origin x_prev over (D_{i-1}; D_i, D_{i-2}, ...)
      combo = (jnp.sum(w_c) - jnp.expm1(-h_c)) * hist[0] - w_c[0] * d - jnp.tensordot(w_c[1:], hist[1:], axes=1)
      x = jnp.where(state["i"] > 0, _exp_update(state["x_prev"], sigma[2], sigma[0], alpha[0], combo), x)
    c = jnp.concatenate([(jnp.sum(w) - jnp.expm1(-h))[None], -w])  # UniP over (D_i; D_{i-1}, ...)
    x_next = _exp_update(x, sigma[0], sigma[1], alpha[1], _combine(c, d, hist))
    return x_next, _push(state, d, t, x_prev=x, k_prev=k)

  return Solver(init=init, step=step, order=min(p + 1, 3) if use_corrector else min(p, 2), nfe_per_step=1)


# ----------------------------------------------------------------------------------
# Linear multistep in the EDM sigma: iPNDM and LMS.
# ----------------------------------------------------------------------------------
_IPNDM = np.array([[1, 0, 0, 0], [3 / 2, -1 / 2, 0, 0], [23 / 12, -16 / 12, 5 / 12, 0],
                   [55 / 24, -59 / 24, 37 / 24, -9 / 24]])


def _sigma_multistep(process, order, weights) -> Solver:
  """Adams-Bashforth on dx~/ds = d, d = (x~ - D) / s: x~' = x~ + sum_j c_j d_{i-j}.

  ``weights(k, s_nodes, s_next)`` gives c (order,) for the nodes s_i, s_{i-1}, ... of
  which the first k = min(order, i + 1) are used. Needs alpha(t) > 0.
  """

  def init(x, ts):
    return _history_init(max(order - 1, 1), x, ts)

  def step(denoise, x, t, t_next, state, key):
    alpha, _, lam = _schedule(process, t, t_next, state["t"])
    s = jnp.exp(-lam)
    xs = x / alpha[0]
    d = (xs - denoise(x, t)) / s[0]
    c = weights(_step_order(state, order, False), jnp.concatenate([s[:1], s[2:]])[:order], s[1])
    return (alpha[1] * (xs + _combine(c, d, state["hist"]))).astype(x.dtype), _push(state, d, t)

  return Solver(init=init, step=step, order=min(order, 2), nfe_per_step=1)


def _lms_weights(k, s_nodes, s_next):
  """c_j = int_{s_0}^{s'} L_j(s) ds (Lagrange basis on the first k nodes), exactly.

  In u = (s - s_0) / (s' - s_0) the basis is expanded in monomials and integrated
  over [0, 1] (int u^i = 1 / (i + 1)): jit-friendly, exact for the polynomial degree.
  """
  h = s_next - s_nodes[0]
  moments = 1.0 / jnp.arange(1, s_nodes.shape[0] + 1, dtype=s_nodes.dtype)
  return h * (_lagrange((s_nodes - s_nodes[0]) / h, k) @ moments)


def ipndm(process: Process, order: int = 4) -> Solver:
  """Improved PNDM (iPNDM of Zhang & Chen 2023, the DEIS paper): fixed-coefficient Adams-Bashforth.

  Linear multistep on the EDM-sigma ODE dx~/ds = (x~ - D) / s: x~' = x~ + (s' - s)
  sum_j c_j d_{i-j} with the uniform-step Adams-Bashforth coefficients (1), (3, -1)/2,
  (23, -16, 5)/12, (55, -59, 37, -9)/24 and lower orders for warm-up (order
  min(order, i + 1) at step i). Options: ``order`` 1..4. On grids not uniform in s the
  fixed coefficients are exact only to first order in the step-size ratios, and the
  Euler warm-up step has local error O(h^2): global order min(order, 2). Needs
  alpha > 0. 1 evaluation per step.
  """
  _check_order("ipndm", order, 4)
  table = jnp.asarray(_IPNDM[:order, :order])
  return _sigma_multistep(process, order, lambda k, s_nodes, s_next: (s_next - s_nodes[0]) * table[k - 1])


def lms(process: Process, order: int = 4) -> Solver:
  """Linear multistep in the EDM sigma (k-diffusion's ``sample_lms``): variable-step Adams-Bashforth.

  x~' = x~ + sum_j c_j d_{i-j} on dx~/ds = (x~ - D) / s, where c_j is the exact integral
  over [s_i, s_{i+1}] of the Lagrange basis polynomial of node s_{i-j} on the nodes
  s_i, ..., s_{i-k+1}, k = min(order, i + 1) (``_lms_weights``). Options: ``order``
  1..4. The Euler warm-up step has local error O(h^2) where the steps in s are large,
  so the global order is min(order, 2); orders 3 and 4 lower the error constant (and
  show slopes near 3 over practical step counts). Needs alpha > 0. 1 evaluation per
  step.
  """
  _check_order("lms", order, 4)
  return _sigma_multistep(process, order, _lms_weights)


def pndm(process: Process, combine: str = "eps") -> Solver:
  """PNDM as Stable Diffusion runs it (Liu et al. 2022, "PLMS"; diffusers' PNDMScheduler, skip_prk_steps).

  The first step is Heun's method (the eps prediction averaged between x and the Euler
  predictor at t'), the next ones fixed-coefficient Adams-Bashforth of orders 2, 3, 4 in
  eps, all on the EDM-sigma ODE dx~/ds = eps (the DDIM transfer with the combined eps,
  PNDM's eq. 9). The history holds the eps at the start of each step; the Heun
  predictor's evaluation is not kept. So N steps cost N + 1 evaluations (``warmup_nfe``
  = 1) and diffusers' N-step PLMS is this solver on its N + 1 distinct timesteps, the
  last step going to alpha_bar_0 (``set_alpha_to_one=False``). Global order 2 on grids
  not uniform in s (fixed coefficients). Needs alpha > 0.

  ``combine="v"`` averages and combines v = alpha eps - sigma x0 instead and turns the
  combination into eps with the step's own x and time, eps = alpha(t) v + sigma(t) x
  (what diffusers' PNDMScheduler does with ``prediction_type="v_prediction"``: it combines
  the network's raw outputs). Only the weighting of the history differs from "eps".
  """
  if combine not in ("eps", "v"):
    raise ValueError(f"pndm: combine must be 'eps' or 'v', got {combine!r}")
  table = jnp.asarray(_IPNDM)

  def init(x, ts):
    return _history_init(3, x, ts)

  def step(denoise, x, t, t_next, state, key):
    alpha, sigma, lam = _schedule(process, t, t_next, state["t"])
    s = jnp.exp(-lam)
    h, xs = s[1] - s[0], x / alpha[0]
    euler = lambda x0: xs + h * (xs - x0) / s[0]  # the Euler predictor (scaled) from x0 at (x, t)

    # Both evaluations of the first step go through one call site (a scan of two, the second
    # skipped after the first step), so a network is traced and compiled once per program.
    def evaluate(x0s, j):
      def call():
        x_in = jnp.where(j == 0, x, alpha[1] * euler(x0s[0]).astype(x.dtype))
        return x0s.at[j].set(denoise(x_in, jnp.where(j == 0, t, t_next)).astype(x0s.dtype))
      return jax.lax.cond((j == 0) | (state["i"] == 0), call, lambda: x0s), None

    (x0, x0_euler), _ = jax.lax.scan(evaluate, jnp.zeros((2,) + x.shape, jnp.promote_types(x.dtype, jnp.float32)),
                                     jnp.arange(2))
    d = (xs - x0) / s[0]
    # What the history combines (q), and eps of a combination of q at (x, t).
    as_q = (lambda e, x0, k: alpha[k] * e - sigma[k] * x0) if combine == "v" else (lambda e, x0, k: e)
    to_eps = (lambda q: alpha[0] * q + sigma[0] * x) if combine == "v" else (lambda q: q)
    q = as_q(d, x0, 0)

    def heun():
      xs_euler = euler(x0)
      return xs + h * to_eps(0.5 * (q + as_q((xs_euler - x0_euler) / s[1], x0_euler, 1)))

    def adams_bashforth():
      return xs + h * to_eps(_combine(table[jnp.minimum(state["i"], 3)], q, state["hist"]))

    xs_next = jax.lax.cond(state["i"] == 0, heun, adams_bashforth)
    return (alpha[1] * xs_next).astype(x.dtype), _push(state, q, t)

  return Solver(init=init, step=step, order=2, nfe_per_step=1, warmup_nfe=1)


def ipndm_v(process: Process, order: int = 4) -> Solver:
  """iPNDM with Adams-Bashforth coefficients for non-uniform steps: the method of ``lms``.

  The exact variable-step Adams-Bashforth weights are the Lagrange-basis integrals, so
  this is ``lms`` under iPNDM's name. (The "iPNDM_v" of Zhou et al. 2024's code, as in
  ComfyUI, uses weights that are exact only for equal steps at orders 3-4.) Options:
  ``order`` 1..4; global order min(order, 2) (Euler warm-up). Needs alpha > 0. 1
  evaluation per step.
  """
  _check_order("ipndm_v", order, 4)
  return _sigma_multistep(process, order, _lms_weights)


ODE_SOLVERS = {
    "euler": euler,
    "heun": heun,
    "dpm_solver": dpm_solver,
    "dpmpp_2m": functools.partial(dpmpp_multistep, order=2),
    "dpmpp_3m": functools.partial(dpmpp_multistep, order=3),
    "dpmpp_3m_corrected": functools.partial(dpmpp_multistep, order=3, corrected=True),
    "unipc": unipc,
    "unipc_bh1": functools.partial(unipc, variant="bh1"),
    "unipc_bh2": functools.partial(unipc, variant="bh2"),
    "ipndm": ipndm,
    "ipndm_v": ipndm_v,
    "pndm": pndm,
    "lms": lms,
}
