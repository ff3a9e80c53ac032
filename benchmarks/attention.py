"""The attention implementations of ``diffjax.models.attention`` against each other and PyTorch SDPA.

Self-attention of (batch, tokens, heads, head_dim) queries, keys and values at 256 to 4,096 tokens,
forward only, every implementation this machine has (the CPU: xla, einsum, blocked where the length
is a multiple of 512, splash only in Pallas' interpreter so not timed; a GPU adds cudnn in bfloat16),
and ``torch.nn.functional.scaled_dot_product_attention`` on the same cores when torch is installed.
Each cell: the median of ``--reps`` jitted calls after one warm-up, in milliseconds, and its ratio
to torch's; calls alternate between implementations so that the machine's drift spreads over all.

  python benchmarks/attention.py --tokens 256,1024,4096 --batch 2 --heads 8 --head_dim 40 --reps 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.models import attention


def _implementations(tokens: int) -> list[str]:
  names = ['xla', 'einsum']
  if tokens % attention.ATTENTION_BLOCK == 0:
    names.append('blocked')
  if jax.default_backend() == 'gpu':
    names.append('cudnn')
  if jax.default_backend() == 'tpu':
    names.append('splash')
  return names


def _torch_call(q, k, v):
  try:
    import torch
  except ImportError:
    return None
  tq, tk, tv = (torch.from_numpy(np.array(a, np.float32)).transpose(1, 2).contiguous() for a in (q, k, v))

  def call():
    with torch.no_grad():
      torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
  return call


def run(tokens_list, batch, heads, head_dim, reps) -> list[dict]:
  rows = []
  for tokens in tokens_list:
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((batch, tokens, heads, head_dim)), jnp.float32) for _ in range(3))
    calls = {}
    for name in _implementations(tokens):
      dtype = jnp.bfloat16 if name == 'cudnn' else jnp.float32
      fn = jax.jit(lambda q, k, v, name=name: attention.dot_product_attention(q, k, v, implementation=name))
      args = tuple(a.astype(dtype) for a in (q, k, v))
      fn(*args).block_until_ready()  # compile and warm up
      calls[name] = lambda fn=fn, args=args: fn(*args).block_until_ready()
    torch_call = _torch_call(q, k, v)
    if torch_call is not None:
      torch_call()
      calls['torch sdpa'] = torch_call
    times = {name: [] for name in calls}
    for _ in range(reps):
      for name, call in calls.items():
        start = time.perf_counter()
        call()
        times[name].append(time.perf_counter() - start)
    medians = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    rows.append({'tokens': tokens, 'ms': medians})
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--tokens', default='256,1024,4096')
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--heads', type=int, default=8)
  parser.add_argument('--head_dim', type=int, default=40)
  parser.add_argument('--reps', type=int, default=5)
  args = parser.parse_args()
  rows = run([int(t) for t in args.tokens.split(',')], args.batch, args.heads, args.head_dim, args.reps)
  names = sorted({n for r in rows for n in r['ms']}, key=lambda n: (n == 'torch sdpa', n))
  print(f'{jax.default_backend()}, batch {args.batch}, {args.heads} heads of {args.head_dim}, float32 '
        f'(cudnn: bfloat16); median of {args.reps} calls, ms (x: torch sdpa time / this time, > 1 is faster)')
  print(f"{'tokens':>6} | " + ' | '.join(f'{n:>18}' for n in names))
  for r in rows:
    ref = r['ms'].get('torch sdpa')
    cells = []
    for n in names:
      ms = r['ms'].get(n)
      cells.append(f'{"-":>18}' if ms is None else
                   f'{ms:>9.1f} ({ref / ms:4.2f}x)' if ref and n != 'torch sdpa' else f'{ms:>18.1f}')
    print(f"{r['tokens']:>6} | " + ' | '.join(cells))


if __name__ == '__main__':
  main()
