"""diffjax vs diffusers (PyTorch) throughput of the U-Net and the VAE, same architecture, same machine, one run.

For each model: one training step (forward + backward + Adam) and one inference forward
pass, timed as the median of ``--reps`` runs after warm-up. FLOPs per call come from
XLA's cost analysis of the compiled diffjax step; achieved FLOP/s is reported as a
fraction of this machine's float32 matmul throughput, measured in the same run.

  python benchmarks/model_throughput.py                      # defaults documented below
  python benchmarks/model_throughput.py --batch 8 --size 64  # bigger inputs

U-Net (``BENCH_UNET``): SD block structure, channels (64, 128, 128), 1 ResNet per level,
attention on levels 2-3 (4 heads), 1x1-conv projections, context 16 x 128 tokens,
latents (batch, size, size, 4). VAE (``BENCH_VAE``): channels (32, 64, 64), 1 ResNet
per level, mid attention, images (batch, 2*size, 2*size, 3); train = L1 + KL on a
posterior sample, inference = decoding latents.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffjax.convert.configs import unet_config_to_diffusers, vae_config_to_diffusers
from diffjax.models.unet import UNet, UNetConfig, init_unet
from diffjax.models.vae import AutoencoderKL, VAEConfig, init_vae, reconstruction_loss

BENCH_UNET = UNetConfig(block_out_channels=(64, 128, 128), layers_per_block=1, attention_levels=(False, True, True),
                        num_heads=4, cross_attention_dim=128)
BENCH_VAE = VAEConfig(block_out_channels=(32, 64, 64), layers_per_block=1)


def timeit(fn, reps: int, warmup: int = 1) -> float:
  """Median seconds of ``fn()`` (which must block until its result is ready)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
  """Measured float32 matmul FLOP/s of this machine through XLA (n x n @ n x n)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  return 2 * n**3 / timeit(lambda: f(a).block_until_ready(), reps)


def xla_flops(jitted, *args) -> float:
  cost = jitted.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  return float(cost.get('flops', float('nan')))


def _random_params(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.05 * rng.standard_normal(s.shape), jnp.float32), shapes)


# -- diffjax -------------------------------------------------------------------------------------------------------
def jax_unet(cfg: UNetConfig, batch: int, size: int, ctx_len: int, reps: int) -> dict:
  net = UNet(cfg)
  params = _random_params(nn.meta.unbox(jax.eval_shape(lambda: init_unet(net, jax.random.key(0)))))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, size, size, cfg.in_channels)), jnp.float32)
  t = jnp.asarray(rng.uniform(0, 999, batch), jnp.float32)
  ctx = jnp.asarray(rng.standard_normal((batch, ctx_len, cfg.cross_attention_dim)), jnp.float32)
  target = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  opt = optax.adam(1e-4)

  def loss_fn(p):
    return jnp.mean((net.apply({'params': p}, x, t, ctx) - target) ** 2)

  def train_step(p, s):
    loss, g = jax.value_and_grad(loss_fn)(p)
    upd, s = opt.update(g, s, p)
    return optax.apply_updates(p, upd), s, loss

  step = jax.jit(train_step, donate_argnums=(0, 1))
  fwd = jax.jit(lambda p: net.apply({'params': p}, x, t, ctx))
  state = {'p': params, 's': opt.init(params)}
  flops_train = xla_flops(jax.jit(train_step), params, state['s'])
  flops_fwd = xla_flops(fwd, params)

  def run_train():
    state['p'], state['s'], loss = step(state['p'], state['s'])
    loss.block_until_ready()

  t_train = timeit(run_train, reps)
  t_fwd = timeit(lambda: fwd(state['p']).block_until_ready(), reps)
  nparams = sum(v.size for v in jax.tree.leaves(params))
  return dict(train=t_train, fwd=t_fwd, flops_train=flops_train, flops_fwd=flops_fwd, params=nparams)


def jax_vae(cfg: VAEConfig, batch: int, size: int, reps: int) -> dict:
  vae = AutoencoderKL(cfg)
  params = _random_params(nn.meta.unbox(jax.eval_shape(lambda: init_vae(vae, jax.random.key(0)))))
  rng = np.random.default_rng(0)
  img = jnp.asarray(rng.uniform(-1, 1, (batch, size, size, cfg.in_channels)), jnp.float32)
  f = cfg.downsample_factor
  z = jnp.asarray(rng.standard_normal((batch, size // f, size // f, cfg.latent_channels)), jnp.float32)
  opt = optax.adam(1e-4)

  def loss_fn(p, key):
    rec, post = vae.apply({'params': p}, img, key)
    return jnp.mean(reconstruction_loss(img, rec, 'l1') + 1e-6 * post.kl())

  def train_step(p, s, key):
    loss, g = jax.value_and_grad(loss_fn)(p, key)
    upd, s = opt.update(g, s, p)
    return optax.apply_updates(p, upd), s, loss

  key = jax.random.key(1)
  step = jax.jit(train_step, donate_argnums=(0, 1))
  dec = jax.jit(lambda p: vae.apply({'params': p}, z, method=vae.decode))
  state = {'p': params, 's': opt.init(params)}
  flops_train = xla_flops(jax.jit(train_step), params, state['s'], key)
  flops_fwd = xla_flops(dec, params)

  def run_train():
    state['p'], state['s'], loss = step(state['p'], state['s'], key)
    loss.block_until_ready()

  t_train = timeit(run_train, reps)
  t_fwd = timeit(lambda: dec(state['p']).block_until_ready(), reps)
  nparams = sum(v.size for v in jax.tree.leaves(params))
  return dict(train=t_train, fwd=t_fwd, flops_train=flops_train, flops_fwd=flops_fwd, params=nparams)


# -- PyTorch (diffusers) ----------------------------------------------------------------------------------------------
def torch_unet(cfg: UNetConfig, batch: int, size: int, ctx_len: int, reps: int) -> dict:
  import torch
  from diffusers import UNet2DConditionModel
  torch.manual_seed(0)
  m = UNet2DConditionModel(**{k: v for k, v in unet_config_to_diffusers(cfg).items() if not k.startswith('_')})
  x = torch.randn(batch, cfg.in_channels, size, size)
  t = torch.rand(batch) * 999
  ctx = torch.randn(batch, ctx_len, cfg.cross_attention_dim)
  target = torch.randn_like(x)
  opt = torch.optim.Adam(m.parameters(), 1e-4)

  def run_train():
    opt.zero_grad(set_to_none=True)
    loss = ((m(x, t, ctx).sample - target) ** 2).mean()
    loss.backward()
    opt.step()

  def run_fwd():
    with torch.no_grad():
      m(x, t, ctx)

  return dict(train=timeit(run_train, reps), fwd=timeit(run_fwd, reps),
              params=sum(p.numel() for p in m.parameters()))


def torch_vae(cfg: VAEConfig, batch: int, size: int, reps: int) -> dict:
  import torch
  from diffusers import AutoencoderKL as TorchVAE
  torch.manual_seed(0)
  m = TorchVAE(**{k: v for k, v in vae_config_to_diffusers(cfg).items() if not k.startswith('_')})
  img = torch.rand(batch, cfg.in_channels, size, size) * 2 - 1
  f = cfg.downsample_factor
  z = torch.randn(batch, cfg.latent_channels, size // f, size // f)
  opt = torch.optim.Adam(m.parameters(), 1e-4)

  def run_train():
    opt.zero_grad(set_to_none=True)
    post = m.encode(img).latent_dist
    rec = m.decode(post.sample()).sample
    loss = (rec - img).abs().mean() + 1e-6 * post.kl().mean()
    loss.backward()
    opt.step()

  def run_fwd():
    with torch.no_grad():
      m.decode(z)

  return dict(train=timeit(run_train, reps), fwd=timeit(run_fwd, reps),
              params=sum(p.numel() for p in m.parameters()))


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--batch', type=int, default=4)
  ap.add_argument('--size', type=int, default=32, help='latent size (VAE images are 2x this, see module doc)')
  ap.add_argument('--ctx-len', type=int, default=16)
  ap.add_argument('--reps', type=int, default=5)
  ap.add_argument('--torch-threads', type=int, default=os.cpu_count() or 1)
  ap.add_argument('--no-torch', action='store_true')
  args = ap.parse_args()

  import torch
  torch.set_num_threads(args.torch_threads)
  peak = matmul_peak()
  print(f'device: {jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} cores; '
        f'torch {torch.__version__} threads {torch.get_num_threads()}')
  print(f'measured f32 matmul peak (XLA, 2048^2): {peak / 1e9:.1f} GFLOP/s')
  rows = []
  results = {
      'unet': (jax_unet(BENCH_UNET, args.batch, args.size, args.ctx_len, args.reps),
               None if args.no_torch else torch_unet(BENCH_UNET, args.batch, args.size, args.ctx_len, args.reps)),
      'vae': (jax_vae(BENCH_VAE, args.batch, 2 * args.size, args.reps),
              None if args.no_torch else torch_vae(BENCH_VAE, args.batch, 2 * args.size, args.reps)),
  }
  for name, (j, t) in results.items():
    if t is not None and t['params'] != j['params']:
      raise RuntimeError(f'{name}: parameter counts differ: diffjax {j["params"]}, torch {t["params"]}')
    for mode, fl in (('train', 'flops_train'), ('fwd', 'flops_fwd')):
      achieved = j[fl] / j[mode]
      rows.append((name, mode, j['params'], j[mode] * 1e3, t[mode] * 1e3 if t else float('nan'),
                   (t[mode] / j[mode]) if t else float('nan'), j[fl] / 1e9, achieved / 1e9, achieved / peak))
  hdr = ('model', 'step', 'params', 'diffjax ms', 'torch ms', 'torch/diffjax', 'GFLOP (XLA)', 'diffjax GFLOP/s',
         'of peak')
  print('| ' + ' | '.join(hdr) + ' |')
  print('|' + '---|' * len(hdr))
  for r in rows:
    print(f'| {r[0]} | {r[1]} | {r[2] / 1e6:.2f}M | {r[3]:.1f} | {r[4]:.1f} | {r[5]:.2f}x | {r[6]:.2f} | {r[7]:.1f} '
          f'| {100 * r[8]:.0f}% |')


if __name__ == '__main__':
  main()
