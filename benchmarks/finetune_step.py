"""Time and memory of a LoRA training step against a full fine-tuning step, same U-Net, same batch, one run.

Both steps are ``diffjax/train/finetune.py``'s, reduced to the U-Net and plain Adam (the job adds
gradient clipping, weight decay and the text encoder): an epsilon-MSE loss on random latents,
context and timesteps, its gradient and an Adam update, jitted with the trained state donated.
``full``: the gradient and Adam moments of every U-Net weight. ``lora``: rank-r adapters on the
attention projections (``diffjax.adapters``' default targets), merged into the frozen base inside
the step (optionally a bfloat16 base: ``--base_dtype``); the gradient and moments of the adapters
alone. Calls alternate between the two (the machine's drift spreads over both); each cell is the
median of ``--reps`` steady calls. Memory is XLA's own account of the compiled step
(``memory_analysis``: arguments, outputs, temporaries), not a process measurement.

  python benchmarks/finetune_step.py --unet sd15 --size 32 --batch 1 --rank 4 --reps 3
  python benchmarks/finetune_step.py --unet tiny --size 8 --batch 4 --reps 5     # seconds
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from diffjax.adapters import LoraConfig, init_lora, merge, num_params  # noqa: E402
from diffjax.models.unet import UNET_CONFIGS, UNet  # noqa: E402

MB = 2 ** 20


def _loss(net, params, batch):
  pred = net.apply({'params': params}, batch['x'], batch['t'], batch['context'])
  return jnp.mean((pred.astype(jnp.float32) - batch['eps']) ** 2)


def build(unet: str, size: int, batch: int, rank: int, base_dtype: str, seed: int = 0):
  """{method: (jitted step, state, frozen, batch, trained count)} for 'full' and 'lora'."""
  cfg = UNET_CONFIGS[unet]
  net = UNet(cfg)
  keys = jax.random.split(jax.random.key(seed), 6)
  data = {'x': jax.random.normal(keys[0], (batch, size, size, cfg.in_channels)),
          'eps': jax.random.normal(keys[1], (batch, size, size, cfg.out_channels)),
          't': jax.random.uniform(keys[2], (batch,), maxval=999.0),
          'context': jax.random.normal(keys[3], (batch, 77, cfg.cross_attention_dim))}
  params = nn.meta.unbox(jax.jit(lambda: net.init(keys[4], data['x'], data['t'], data['context'])['params'])())
  tx = optax.adam(1e-4)

  def full_step(state, frozen, b):
    p, opt = state
    grads = jax.grad(lambda q: _loss(net, q, b))(p)
    updates, opt = tx.update(grads, opt, p)
    return optax.apply_updates(p, updates), opt

  def lora_step(state, base, b):
    a, opt = state
    grads = jax.grad(lambda q: _loss(net, merge(base, q), b))(a)
    updates, opt = tx.update(grads, opt, a)
    return optax.apply_updates(a, updates), opt

  adapters = init_lora(params, LoraConfig(rank=rank), keys[5])
  base = jax.tree.map(lambda w: jnp.array(w, base_dtype, copy=True), params)  # (the full step donates params)
  return {'full': (jax.jit(full_step, donate_argnums=0), (params, tx.init(params)), None, data, num_params(params)),
          'lora': (jax.jit(lora_step, donate_argnums=0), (adapters, tx.init(adapters)), base, data,
                   num_params(adapters)),
          'total': num_params(params)}


def run(unet: str, size: int, batch: int, rank: int, base_dtype: str, reps: int) -> list[dict]:
  built = build(unet, size, batch, rank, base_dtype)
  total = built.pop('total')
  rows, states = {}, {}
  for name, (step, state, frozen, data, count) in built.items():
    compiled = step.lower(state, frozen, data).compile()
    mem = compiled.memory_analysis()
    start = time.perf_counter()
    states[name] = jax.block_until_ready(step(state, frozen, data))
    rows[name] = {'method': name, 'trained': count, 'fraction': count / total, 'compile_and_first_s':
                  time.perf_counter() - start, 'times': [],
                  'arguments_mb': mem.argument_size_in_bytes / MB, 'temp_mb': mem.temp_size_in_bytes / MB,
                  'outputs_mb': mem.output_size_in_bytes / MB,
                  'optimizer_mb': sum(x.nbytes for x in jax.tree.leaves(state[1])) / MB}
  for _ in range(reps):
    for name, (step, _, frozen, data, _) in built.items():
      start = time.perf_counter()
      states[name] = jax.block_until_ready(step(states[name], frozen, data))
      rows[name]['times'].append(time.perf_counter() - start)
  for r in rows.values():
    r['step_s'] = statistics.median(r.pop('times'))
  return list(rows.values())


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--unet', default='sd15', choices=sorted(UNET_CONFIGS))
  parser.add_argument('--size', type=int, default=32, help='latent side (SD: image side / 8)')
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--rank', type=int, default=4)
  parser.add_argument('--base_dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--reps', type=int, default=3)
  args = parser.parse_args()
  rows = run(args.unet, args.size, args.batch, args.rank, args.base_dtype, args.reps)
  full = next(r for r in rows if r['method'] == 'full')
  print(f'{jax.default_backend()}, U-Net {args.unet}, latents {args.batch} x {args.size}^2, LoRA rank {args.rank} '
        f'(base {args.base_dtype}), Adam; median of {args.reps} steps; memory from XLA (MiB)')
  print('| method | trained parameters | share | step s | full / this | arguments | temporaries | outputs | '
        'optimizer state | compile + first s |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['method']} | {r['trained']:,} | {100 * r['fraction']:.2f}% | {r['step_s']:.3f} | "
          f"{full['step_s'] / r['step_s']:.2f}x | {r['arguments_mb']:.1f} | {r['temp_mb']:.1f} | "
          f"{r['outputs_mb']:.1f} | {r['optimizer_mb']:.1f} | {r['compile_and_first_s']:.1f} |")


if __name__ == '__main__':
  main()
