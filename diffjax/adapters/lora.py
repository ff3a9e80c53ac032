"""Low-rank adapters (LoRA, Hu et al. 2022) as a pure transformation of a Flax parameter tree.

A LoRA adds ``(alpha / r) down @ up`` to a kernel; nothing in the model changes. The adapters
of a model are a flat dict keyed by the kernel's '/'-joined parameter path::

  {'down_blocks_1/attentions_0/transformer_blocks_0/attn1/to_q/kernel': Lora(down, up, alpha), ...}

with, for a kernel W of
  * a Dense layer, (in, out):            down (in, r),          up (r, out);
  * a Conv layer, HWIO (kh, kw, in, out): down (kh, kw, in, r),  up (r, out).

The Conv form is kohya's LoCon: a kh x kw convolution to r channels, then a 1x1 convolution to
``out``, which composes to the convolution with kernel ``down @ up`` (contracting r). Rank and
alpha are per layer, so a file's mixed ranks are representable. ``alpha`` is static pytree
metadata (a Python float), not a leaf: ``jax.grad``, ``optax`` and ``jax.jit`` see exactly the
trainable ``down`` and ``up`` arrays (float32), and a different alpha, like a different rank, is a
different tree structure. The dict is keyed by path string rather than nested like the params so
that a file's layers, a regex target and an error message all name a layer the same way.

Training updates the adapters alone against a frozen base (which may be bfloat16)::

  base = ...                                      # e.g. params['unet'] of a pipeline
  adapters = init_lora(base, LoraConfig(rank=4), jax.random.key(0))
  opt = optax.adamw(1e-4)
  opt_state = opt.init(adapters)                  # moments for down and up only

  @jax.jit
  def step(adapters, opt_state, batch):
    loss, grads = jax.value_and_grad(lambda a: loss_fn(merge(base, a), batch))(adapters)
    updates, opt_state = opt.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss

No optax partition (``multi_transform``) is needed: the base is an argument of ``loss_fn``, not
of the optimizer. Params are plain (unboxed) trees, as pipelines and the trainer hold them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct, traverse_util

# diffusers' LoRA training default: the U-Net's attention projections (``to_out.0`` is ``to_out_0`` here).
DEFAULT_TARGETS = (r'(^|/)to_q/kernel$', r'(^|/)to_k/kernel$', r'(^|/)to_v/kernel$', r'(^|/)to_out_0/kernel$')


@struct.dataclass
class Lora:
  """One layer's factors: ``down`` (in, r) or (kh, kw, in, r), ``up`` (r, out); ``alpha`` static."""

  down: jax.Array
  up: jax.Array
  alpha: float = struct.field(pytree_node=False)

  @property
  def rank(self) -> int:
    return self.up.shape[0]

  def delta(self, scale=1.0) -> jax.Array:
    """``scale * (alpha / r) * down @ up`` in float32, shaped like the kernel."""
    # HIGHEST: a float32 product on accelerators too (their default multiplies in bfloat16).
    prod = jnp.einsum('...r,ro->...o', self.down.astype(jnp.float32), self.up.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
    return prod * (scale * (self.alpha / self.rank))


Adapters = dict[str, Lora]


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which kernels get adapters, and their size.

  Attributes:
    rank: r of every adapter made (mixed ranks: the union ``a | b`` of two ``init_lora`` results).
    alpha: the scale numerator (delta = alpha / r * down @ up); None means alpha = rank (scale 1).
    targets: regular expressions searched (``re.search``) in the '/'-joined path of each kernel
      (Dense or Conv); a kernel matching any of them is adapted. E.g. add ``r'ff/net_'`` for the
      feed-forward layers, ``r'resnets_\\d+/conv[12]/'`` for ResNet convolutions (LoCon), or use
      ``(r'(q|k|v|out)_proj/',)`` for a CLIP text encoder.
  """

  rank: int = 4
  alpha: float | None = None
  targets: tuple[str, ...] = DEFAULT_TARGETS

  def __post_init__(self):
    if not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f'LoRA rank must be a positive integer, got {self.rank!r}')


def kernels(params: Mapping) -> dict[str, jax.Array]:
  """{'/'-joined path: kernel} of every Dense (2-d) and Conv (4-d) kernel of a parameter tree."""
  flat = traverse_util.flatten_dict(nn.meta.unbox(params), sep='/')
  return {p: w for p, w in flat.items() if p.rsplit('/', 1)[-1] == 'kernel' and len(w.shape) in (2, 4)}


def init_lora(params: Mapping, config: LoraConfig, rng: jax.Array) -> Adapters:
  """Fresh adapters for the kernels of ``params`` that ``config.targets`` select.

  ``down`` is Kaiming-uniform, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = kh * kw * in (the
  init of PyTorch's layers, which peft and kohya keep); ``up`` is zero, so a fresh adapter leaves
  the model unchanged. Float32. ValueError naming every target that matches no kernel.
  """
  ks = kernels(params)
  unused = [t for t in config.targets if not any(re.search(t, p) for p in ks)]
  if unused:
    raise ValueError(f'LoRA targets match no kernel: {unused}; kernels look like {sorted(ks)[:3]} '
                     f'(of {len(ks)})')
  paths = sorted(p for p in ks if any(re.search(t, p) for t in config.targets))
  alpha = float(config.rank if config.alpha is None else config.alpha)
  # variance_scaling(1/3, fan_in, uniform) is U(+-sqrt(3 / (3 fan_in))) = PyTorch's kaiming_uniform(a=sqrt(5)).
  init = jax.nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')
  out = {}
  for key, p in zip(jax.random.split(rng, len(paths)), paths, strict=True):
    shape = ks[p].shape
    out[p] = Lora(down=init(key, (*shape[:-1], config.rank), jnp.float32),
                  up=jnp.zeros((config.rank, shape[-1]), jnp.float32), alpha=alpha)
  return out


def _weighted(adapters) -> list[tuple[Adapters, object]]:
  """``merge``'s arguments as (adapters, scale) pairs: a bare adapters dict has scale 1."""
  return [(a, 1.0) if isinstance(a, Mapping) else tuple(a) for a in adapters]


def check_adapters(params: Mapping, adapters: Adapters, what: str = 'adapters') -> None:
  """ValueError naming every adapter whose path is not a kernel of ``params`` or whose factors do not fit it."""
  _check_fit(kernels(params), adapters, what)


def _check_fit(ks: Mapping[str, jax.Array], adapters: Adapters, what: str) -> None:
  missing = sorted(p for p in adapters if p not in ks)
  bad = []
  for p, a in sorted(adapters.items()):
    if p in ks:
      shape, r = tuple(ks[p].shape), a.up.shape[0]
      if tuple(a.down.shape) != (*shape[:-1], r) or tuple(a.up.shape) != (r, shape[-1]):
        bad.append(f'{p}: kernel {shape}, down {tuple(a.down.shape)}, up {tuple(a.up.shape)} '
                   f'(need down {(*shape[:-1], r)}, up {(r, shape[-1])})')
  if missing or bad:
    lines = [f'{what} do not fit the parameters ({len(missing)} paths not in the params, {len(bad)} mis-shaped):']
    lines += [f'  not a kernel of the params: {p}' for p in missing] + [f'  mis-shaped: {b}' for b in bad]
    raise ValueError('\n'.join(lines))


def _apply(params: Mapping, adapters, sign: float) -> dict:
  ks = kernels(params)  # once, for every adapter set
  deltas = {}
  for a, scale in _weighted(adapters):
    _check_fit(ks, a, 'adapters')
    for p, lora in a.items():
      d = lora.delta(scale)
      deltas[p] = d if p not in deltas else deltas[p] + d
  flat = traverse_util.flatten_dict(params, sep='/')
  for p, d in deltas.items():
    w = flat[p]
    # One rounding to the kernel's dtype: a bfloat16 base gets the float32 sum, not a bfloat16 delta added.
    flat[p] = (w.astype(jnp.float32) + sign * d).astype(w.dtype)
  return traverse_util.unflatten_dict(flat, sep='/')


def merge(params: Mapping, *adapters: Adapters | tuple[Adapters, float]) -> dict:
  """``params`` with W + sum_i scale_i (alpha / r) down @ up for every adapted kernel W.

  Each argument after ``params`` is an adapters dict (scale 1) or an ``(adapters, scale)`` pair;
  a scale may be traced (sweeping it under ``jit`` does not recompile). The deltas are summed in
  float32 and added to W in float32, then cast to W's dtype. Differentiable in the adapters (and
  the scales). ValueError naming the paths of adapters that do not fit ``params``.
  """
  return _apply(params, adapters, 1.0)


def unmerge(params: Mapping, *adapters: Adapters | tuple[Adapters, float]) -> dict:
  """The inverse of ``merge`` (same arguments): subtracts the deltas again (exact up to float rounding)."""
  return _apply(params, adapters, -1.0)


def num_params(tree) -> int:
  """Number of array elements in a pytree: adapters (down and up; alpha is not a leaf) or params.

  Works on shapes: ``num_params(jax.eval_shape(lambda: init_lora(shapes, config, key)))`` allocates nothing.
  """
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
