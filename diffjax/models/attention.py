"""One attention function for every model, with implementations chosen by name.

``dot_product_attention(q, k, v, *, mask, bias, scale, is_causal, implementation)`` computes
softmax(scale q k^T + bias, masked) v for (B, T, N, H) queries and (B, S, N, H) keys and values.
Implementations (``IMPLEMENTATIONS``), all the same function up to rounding:

* ``'xla'``: ``jax.nn.dot_product_attention(implementation='xla')``.
* ``'einsum'``: logits, a float32 softmax and the weighted sum as three plain XLA ops; the
  reference the others are tested against, and on XLA:CPU faster than ``'xla'`` at 1,024 tokens.
* ``'blocked'``: (block x block) tiles with an online softmax (``blocked_attention``): memory
  O(T block) instead of O(T S), the memory-efficient attention of Rabe & Staats (2021) computed
  as flash attention is; no mask or bias; T and S multiples of ``ATTENTION_BLOCK``.
* ``'cudnn'``: cuDNN's fused flash attention (``jax.nn.dot_product_attention(implementation=
  'cudnn')``): GPUs, float16/bfloat16, head size a multiple of 8.
* ``'splash'``: Pallas' TPU splash attention (``make_splash_mha``), no bias, T and S multiples of
  128; on other backends it runs only in Pallas' interpreter (``interpret=True``, for tests).
* ``'auto'`` (also None): cuDNN for 16-bit inputs on GPUs (falling back to XLA where cuDNN
  rejects the shapes), splash on TPUs where it applies, the tiles for long unmasked
  self-attention on the CPU, XLA otherwise.

Models take the name as a field (``attention_impl``) so a config chooses it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

IMPLEMENTATIONS = ('auto', 'xla', 'einsum', 'blocked', 'cudnn', 'splash')

# On XLA:CPU the (B, N, T, S) logits of long self-attention make several passes over memory
# (4096 tokens at batch 2, 8 heads: 1 GB): blocking with an online softmax keeps each block smaller.
# Measured for (2, 4096, 8, 40) on a 2-core CPU in session 7: 1.60 s (jax.nn.dot_product_attention,
# XLA) -> 0.31 s; torch's scaled_dot_product_attention 0.30 s. Session 13, same shape on a slower
# host: 0.54 -> 0.38 s (torch 0.24 s) from the two reductions below; (8, 4096, 8, 40): 2.99 -> 1.73 s
# (torch 1.04 s); (8, 1024, 8, 80): 0.34 -> 0.27 s (torch 0.10 s).
ATTENTION_BLOCK = 512
BLOCKED_MIN_KEYS = 1024  # also 3x faster at 1024 keys (0.082 -> 0.026 s at batch 2, 8 heads)
SPLASH_BLOCK = 128  # splash attention's tiles: sequence lengths must be multiples of it


def dot_product_attention(q: Array, k: Array, v: Array, *, mask: Array | None = None, bias: Array | None = None,
                          scale: float | None = None, is_causal: bool = False,
                          implementation: str | None = None) -> Array:
  """Multi-head attention on (B, T, N, H) queries and (B, S, N, H) keys/values -> (B, T, N, H).

  Args:
    mask: boolean, broadcastable to (B, N, T, S), True = attend.
    bias: added to the logits, broadcastable to (B, N, T, S).
    scale: the logits' factor (None: 1 / sqrt(H)).
    is_causal: query t attends to keys s <= t (T == S).
    implementation: a name in ``IMPLEMENTATIONS`` (module docstring); None means ``'auto'``. A named
      implementation that cannot serve the call raises ValueError saying why.
  """
  impl = implementation or 'auto'
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f'attention implementation {impl!r} is not one of {IMPLEMENTATIONS}')
  kw = dict(mask=mask, bias=bias, scale=scale, is_causal=is_causal)
  if impl == 'auto':
    impl = _choose(q, k, **kw)
  if impl == 'cudnn' and implementation in (None, 'auto'):
    try:
      return jax.nn.dot_product_attention(q, k, v, implementation='cudnn', **kw)
    except (ValueError, NotImplementedError, RuntimeError):
      impl = 'xla'  # cuDNN rejects these shapes: XLA serves them
  if impl in ('xla', 'cudnn'):
    return jax.nn.dot_product_attention(q, k, v, implementation=impl, **kw)
  if impl == 'einsum':
    return einsum_attention(q, k, v, **kw)
  if impl == 'blocked':
    why = _blocked_refusal(q, k, **kw)
    if why:
      raise ValueError(f"attention implementation 'blocked' {why}")
    return blocked_attention(q, k, v)
  why = _splash_refusal(q, k, mask=mask, bias=bias)
  if why:
    raise ValueError(f"attention implementation 'splash' {why}")
  return splash_attention(q, k, v, scale=scale, is_causal=is_causal, interpret=jax.default_backend() != 'tpu')


def _choose(q, k, *, mask, bias, scale, is_causal) -> str:
  backend = jax.default_backend()
  half = q.dtype in (jnp.bfloat16, jnp.float16)
  if backend == 'gpu' and half:
    return 'cudnn'
  if backend == 'tpu' and not _splash_refusal(q, k, mask=mask, bias=bias):
    return 'splash'
  if backend == 'cpu' and not _blocked_refusal(q, k, mask=mask, bias=bias, scale=scale, is_causal=is_causal) \
     and k.shape[1] >= BLOCKED_MIN_KEYS:
    return 'blocked'
  return 'xla'


def _blocked_refusal(q, k, *, mask, bias, scale, is_causal) -> str:
  if mask is not None or bias is not None or scale is not None or is_causal:
    return 'takes no mask, bias, scale or causal flag'
  if q.shape[1] % ATTENTION_BLOCK or k.shape[1] % ATTENTION_BLOCK:
    return f'needs sequence lengths that are multiples of {ATTENTION_BLOCK}, got {q.shape[1]} and {k.shape[1]}'
  return ''


def _splash_refusal(q, k, *, mask, bias) -> str:
  if mask is not None or bias is not None:
    return 'takes no mask array or bias (only the causal flag)'
  if q.shape[1] % SPLASH_BLOCK or k.shape[1] % SPLASH_BLOCK:
    return f'needs sequence lengths that are multiples of {SPLASH_BLOCK}, got {q.shape[1]} and {k.shape[1]}'
  return ''


def einsum_attention(q: Array, k: Array, v: Array, *, mask: Array | None = None, bias: Array | None = None,
                     scale: float | None = None, is_causal: bool = False) -> Array:
  """Softmax attention as logits, a float32 softmax and a weighted sum (arguments as ``dot_product_attention``).

  A row whose keys are all masked gets zero weights (an output of 0).
  """
  dtype = q.dtype
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  logits = jnp.einsum('btnh,bsnh->bnts', q, k).astype(jnp.float32) * scale
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if is_causal:
    causal = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
    mask = causal if mask is None else jnp.logical_and(mask, causal)
  if mask is not None:
    logits = jnp.where(mask, logits, -jnp.inf)
  top = jnp.max(logits, axis=-1, keepdims=True)
  top = jnp.where(jnp.isfinite(top), top, 0.0)  # a fully masked row: exp(-inf) = 0 everywhere
  p = jnp.exp(logits - top)
  total = jnp.sum(p, axis=-1, keepdims=True)
  weights = jnp.where(total > 0, p / jnp.where(total > 0, total, 1.0), 0.0)
  return jnp.einsum('bnts,bsnh->btnh', weights.astype(v.dtype), v).astype(dtype)


def _row_max(s: Array) -> Array:
  """``s.max(-1)``, by halving the last axis with elementwise maxima down to 32 entries first.

  XLA:CPU rewrites a reduction over more than 32 entries into a windowed reduction that it
  runs an order of magnitude slower than an elementwise loop (120 ms for a (8, 8, 512, 512)
  block, 40% of the attention's time); elementwise maxima of the two halves are exact.
  """
  while s.shape[-1] > 32 and s.shape[-1] % 2 == 0:
    half = s.shape[-1] // 2
    s = jnp.maximum(s[..., :half], s[..., half:])
  return s.max(-1)


def blocked_attention(q: Array, k: Array, v: Array, block: int = ATTENTION_BLOCK) -> Array:
  """Softmax attention (B, T, N, H) x (B, S, N, H) -> (B, T, N, H) in (block x block) tiles, no mask.

  Per query block, a scan over key blocks keeps the running maximum m and the unnormalised
  output of the online softmax (Milakov & Gimelshein 2018): with a new block's logits s,
  m' = max(m, max s), acc' = acc e^(m - m') + e^(s - m') [v, 1]. The values carry a column of
  ones, so the softmax normaliser (its last column) comes out of the same matrix product
  instead of a separate reduction. T and S must be multiples of ``block``.
  Exact up to rounding (float32 accumulation); differentiable (the scan is).
  """
  dtype = q.dtype
  B, T, N, H = q.shape
  S = k.shape[1]
  qt, kt, vt = (jnp.swapaxes(a, 1, 2).astype(jnp.float32) for a in (q, k, v))  # (B, N, L, H)
  qt = qt * H ** -0.5
  vt = jnp.concatenate([vt, jnp.ones((B, N, S, 1), jnp.float32)], axis=-1)
  # Blocks along a leading axis, for lax.map / lax.scan to step through: (L / block, B, N, block, H).
  blocks = lambda a: jnp.moveaxis(a.reshape(B, N, a.shape[2] // block, block, a.shape[3]), 2, 0)
  kb, vb = blocks(kt), blocks(vt)

  def one_query_block(qc):  # (B, N, block, H)
    def step(carry, kv):
      m, acc = carry
      kc, vc = kv
      s = jnp.einsum('bnth,bnsh->bnts', qc, kc)
      m_new = jnp.maximum(m, _row_max(s))
      p, decay = jnp.exp(s - m_new[..., None]), jnp.exp(m - m_new)
      return (m_new, acc * decay[..., None] + jnp.einsum('bnts,bnsh->bnth', p, vc)), None

    init = (jnp.full(qc.shape[:3], -jnp.inf), jnp.zeros((*qc.shape[:3], H + 1)))
    (_, acc), _ = jax.lax.scan(step, init, (kb, vb))
    return acc[..., :H] / acc[..., H:]

  out = jax.lax.map(one_query_block, blocks(qt))  # (T / block, B, N, block, H)
  return jnp.moveaxis(out, 0, 2).reshape(B, N, T, H).swapaxes(1, 2).astype(dtype)


@functools.lru_cache(maxsize=16)
def _splash_kernel(heads: int, queries: int, keys: int, is_causal: bool, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
  one = masks.CausalMask((queries, keys)) if is_causal else masks.FullMask((queries, keys))
  with jax.ensure_compile_time_eval():  # the kernel's mask tables are constants, even when built under a trace
    return kernel.make_splash_mha(masks.MultiHeadMask([one] * heads), head_shards=1, q_seq_shards=1,
                                  interpret=interpret)


def splash_attention(q: Array, k: Array, v: Array, *, scale: float | None = None, is_causal: bool = False,
                     interpret: bool = False) -> Array:
  """Pallas' TPU splash attention on (B, T, N, H) -> (B, T, N, H); T, S multiples of ``SPLASH_BLOCK``.

  The kernel takes one sequence's (N, L, H) arrays and unscaled logits: queries are scaled here
  and the batch is a vmap. ``interpret``: run the kernel in Pallas' interpreter (any backend).
  """
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  run = _splash_kernel(q.shape[2], q.shape[1], k.shape[1], bool(is_causal), bool(interpret))
  heads_first = lambda a: jnp.swapaxes(a, 1, 2)  # (B, N, L, H)
  out = jax.vmap(run)(heads_first(q * np.asarray(scale, q.dtype)), heads_first(k), heads_first(v))
  return jnp.swapaxes(out, 1, 2).astype(q.dtype)
