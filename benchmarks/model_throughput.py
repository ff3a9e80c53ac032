"""diffjax vs diffusers (PyTorch) throughput of the U-Net and the VAE, same architecture, same machine, one run.

For each model: one training step (forward + backward + Adam) and one inference forward
pass, timed as the median of ``--reps`` runs after warm-up (device-synchronised: jax
``block_until_ready``, ``torch.cuda.synchronize()`` on GPU). On CPU the two frameworks alternate
call by call (``--interleave``), so that the machine's load drifting between them does not skew
the ratio; the load average is printed with the table. FLOPs per call come from
XLA's cost analysis of the diffjax step (the lowered HLO of a float32 twin, whose attention
takes the XLA path: cuDNN attention custom calls are opaque to the analysis);
achieved FLOP/s is reported as a fraction of this device's matmul throughput in the
benchmark dtype (an n x n @ n x n XLA matmul), measured in the same run.

  python benchmarks/model_throughput.py --reps 5               # CPU defaults (small configs, float32)
  python benchmarks/model_throughput.py --device gpu --dtype bfloat16 --unet sd15 --vae sd --reps 20
  python benchmarks/model_throughput.py --models unet --no-torch --profile    # where the diffjax step's time goes

Configs (``--unet``, ``--vae``):
  bench: U-Net with SD's block structure, channels (64, 128, 128), 1 ResNet per level,
    attention on levels 2-3 (4 heads), 1x1-conv projections, context 16 x 128 tokens,
    latents (batch, size, size, 4). VAE channels (32, 64, 64), 1 ResNet per level, mid
    attention, images (batch, 2*size, 2*size, 3).
  sd15 / sd: the Stable Diffusion 1.5 U-Net (860M parameters, context 77 x 768) and SD's
    autoencoder (84M parameters); GPU defaults: latents 8 x 64 x 64 x 4, VAE images 4 x 512 x 512 x 3.
VAE train = L1 + KL on a posterior sample; VAE inference = decoding latents.

Precision (``--dtype``): float32, or bfloat16 mixed precision with the same recipe on both
sides: float32 parameters, gradients and Adam state; diffjax modules with
``dtype=bfloat16, param_dtype=float32`` (norm statistics in float32), PyTorch under
``torch.autocast(dtype=torch.bfloat16)``. float32 on GPU: XLA's default precision uses
TF32 for matmuls and convolutions, so PyTorch's TF32 switches are turned on to match.
PyTorch runs eagerly (no ``torch.compile``); attention is PyTorch SDPA (diffusers' default)
against ``jax.nn.dot_product_attention`` (cuDNN for 16-bit inputs on GPU where it takes
the shape, else XLA); the number of cuDNN attention calls in the diffjax step is printed.
"""

from __future__ import annotations

import argparse
import collections
import functools
import gc
import glob
import os
import re
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')  # share the GPU with PyTorch in one process
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from diffjax.convert.configs import unet_config_to_diffusers, vae_config_to_diffusers  # noqa: E402
from diffjax.models.unet import UNET_CONFIGS, UNet, UNetConfig, init_unet  # noqa: E402
from diffjax.models.vae import VAE_CONFIGS, AutoencoderKL, VAEConfig, init_vae, reconstruction_loss  # noqa: E402

BENCH_UNET = UNetConfig(block_out_channels=(64, 128, 128), layers_per_block=1, attention_levels=(False, True, True),
                        num_heads=4, cross_attention_dim=128)
BENCH_VAE = VAEConfig(block_out_channels=(32, 64, 64), layers_per_block=1)
UNETS = {'bench': BENCH_UNET, 'sd15': UNET_CONFIGS['sd15']}
VAES = {'bench': BENCH_VAE, 'sd': VAE_CONFIGS['sd']}
# (batch, latent size, context length, VAE batch, VAE image size) per device when not given.
DEFAULTS = {'cpu': (4, 32, 16, 4, 64), 'gpu': (8, 64, 77, 4, 512)}


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


def matmul_peak(n: int, dtype, reps: int = 10) -> float:
  """Measured matmul FLOP/s of the default jax device through XLA (n x n @ n x n, random inputs)."""
  a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.float32).astype(dtype) for i in (0, 1))
  f = jax.jit(lambda a, b: a @ b)
  return 2 * n**3 / timeit(lambda: f(a, b).block_until_ready(), reps, warmup=2)


def xla_flops(jitted, *args) -> float:
  """FLOPs of one call from XLA's cost analysis of the lowered (unoptimised, backend-independent) HLO."""
  lowered = jitted.lower(*args)
  cost = lowered.cost_analysis()
  if cost is None:  # the GPU client does not analyse unoptimised HLO: run the same analysis on the CPU client
    from jax._src import xla_bridge
    from jax._src.lib import _jax
    cost = _jax.hlo_module_cost_analysis(xla_bridge.get_backend('cpu'), lowered._lowering.hlo().as_hlo_module())
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  return float(cost.get('flops', float('nan')))


def cudnn_attention_calls(compiled) -> int:
  text = compiled.as_text()
  return text.count('custom_call_target="__cudnn$fmha')


def _random_params(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.05 * rng.standard_normal(s.shape), jnp.float32), shapes)


def _jax_side(train_step, fwd, flops_train_fn, flops_fwd_fn, params, args) -> dict:
  """Compiles the (donated) train step and the forward once; returns callables that block until done, FLOPs (from
  float32 twins, whose attention is on the XLA path), parameter count and the cuDNN attention calls compiled in."""
  opt_state = optax.adam(1e-4).init(params)
  flops_train = xla_flops(jax.jit(flops_train_fn), params, opt_state, *args)
  flops_fwd = xla_flops(jax.jit(flops_fwd_fn), params)
  step = jax.jit(train_step, donate_argnums=(0, 1)).lower(params, opt_state, *args).compile()
  fwd = jax.jit(fwd).lower(params).compile()
  state = {'p': params, 's': opt_state}

  def run_train():
    state['p'], state['s'], loss = step(state['p'], state['s'], *args)
    loss.block_until_ready()

  return dict(train=run_train, fwd=lambda: fwd(state['p']).block_until_ready(), step=step, flops_train=flops_train,
              flops_fwd=flops_fwd, params=sum(v.size for v in jax.tree.leaves(params)),
              cudnn_attn=(cudnn_attention_calls(step), cudnn_attention_calls(fwd)))


def jax_peak_mem() -> float:
  return (jax.devices()[0].memory_stats() or {}).get('peak_bytes_in_use', float('nan'))


def measure(sides: dict, reps: int, interleave: bool) -> dict:
  """Median seconds of each side's ``train`` and ``fwd`` callables after one warm-up each. ``interleave``: the sides
  alternate call by call, so that a change of machine load between them does not skew their ratio."""
  out = {name: {} for name in sides}
  for mode in ('train', 'fwd'):
    if interleave:
      times = {name: [] for name in sides}
      for side in sides.values():
        side[mode]()
      for _ in range(reps):
        for name, side in sides.items():
          t0 = time.perf_counter()
          side[mode]()
          times[name].append(time.perf_counter() - t0)
      for name in sides:
        out[name][mode] = statistics.median(times[name])
    else:
      for name, side in sides.items():
        out[name][mode] = timeit(side[mode], reps)
  return out


def _adam_step(loss_fn):
  opt = optax.adam(1e-4)

  def train_step(p, s, *args):
    loss, g = jax.value_and_grad(loss_fn)(p, *args)
    upd, s = opt.update(g, s, p)
    return optax.apply_updates(p, upd), s, loss
  return train_step


# -- where the time goes ----------------------------------------------------------------------------------------------
def _op_category(name: str, op_name: str, shape: str) -> str:
  """A coarse class of one optimised-HLO instruction, from its jax source path (metadata op_name) and shape."""
  dims = [int(d) for d in re.findall(r'\d+', shape.split('{')[0])]
  kernel_shaped = any(dims[i] == dims[i + 1] and dims[i] in (1, 3) for i in range(len(dims) - 1))
  if not op_name:
    if 'ynn_fusion' in name or 'convolution' in name:
      return 'conv weight grad' if kernel_shaped else 'conv (no metadata)'
    layout = re.search(r'transpose|copy|bitcast', name)
    return 'layout copies / transposes' if layout else f'other ({name.split(".")[0]})'
  if 'UNet' not in op_name and 'AutoencoderKL' not in op_name:
    return 'optimizer (Adam) + loss'
  bwd = 'transpose(' in op_name
  d = ' (bwd)' if bwd else ' (fwd)'
  if op_name.endswith('conv_general_dilated'):
    return 'conv ' + ('weight grad' if bwd and kernel_shaped else 'input grad' if bwd else 'forward')
  if re.search(r'/transformer_blocks_\d+/norm\d/', op_name):
    return 'layer norm' + d
  if re.search(r'/(norm\d?|group_norm|conv_norm_out)/', op_name):
    return 'group norm' + d
  if op_name.endswith('dot_general') and re.search(r'/(to_\w+|proj\w*|net_\d|linear_\d|time_emb_proj)/', op_name):
    return 'dense layers (matmul)' + d
  if re.search(r'/attn\d/|/mid_block/attentions_0/(?!transformer)', op_name):
    return 'attention core (QK, softmax, PV)' + d
  return 'elementwise / other' + d


def profile_breakdown(compiled, call, steps: int = 3, top: int = 12) -> str:
  """Runs ``call()`` ``steps`` times under ``jax.profiler`` and sums the time of each HLO instruction of ``compiled``
  per step. GPU: kernel time. CPU: thunk time summed over the threads (CPU time), except for XLA's Eigen
  convolutions, whose traced thunk only launches tasks on the Eigen pool (an ``end: <name>`` event marks their
  completion): they count the wall time from launch to completion (both threads work on them). Returns a report:
  time per category (``_op_category``) and the top instructions, per step."""
  info, convolutions = {}, set()
  for line in compiled.as_text().splitlines():
    m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w-]+)\(', line)
    if m:
      op = re.search(r'op_name="([^"]*)"', line)
      info[m.group(1)] = (op.group(1) if op else '', m.group(2))
      if m.group(3) == 'convolution':
        convolutions.add(m.group(1))
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d)
    t0 = time.perf_counter()
    for _ in range(steps):
      call()
    wall = (time.perf_counter() - t0) / steps
    jax.profiler.stop_trace()
    data = jax.profiler.ProfileData.from_file(glob.glob(f'{d}/**/*.xplane.pb', recursive=True)[0])
  by_line = {}  # (plane, line) -> instruction -> ms per step; GPU kernels name their instruction in the stat hlo_op
  starts, ends = collections.defaultdict(list), collections.defaultdict(list)  # Eigen convolution launches / ends
  warnings.filterwarnings('ignore', 'builtin type event_stats', DeprecationWarning)
  for plane in data.planes:
    if not (plane.name.startswith('/device:GPU') or plane.name == '/host:CPU'):
      continue
    for line in plane.lines:
      c = by_line.setdefault((plane.name, line.name), collections.Counter())
      for e in line.events:
        if e.name.startswith('end: ') and e.name[5:] in convolutions:
          ends[e.name[5:]].append(e.start_ns + e.duration_ns)
          continue
        key = e.name if e.name in info else dict(e.stats).get('hlo_op')
        if key in info:
          c[key] += e.duration_ns / steps / 1e6
          if key in convolutions:
            starts[key].append(e.start_ns)
  conv_ms = collections.Counter()  # Eigen convolutions: launch-to-completion spans replace the launch time
  for name, done in ends.items():
    conv_ms[name] = sum(b - a for a, b in zip(sorted(starts[name]), sorted(done), strict=False)) / steps / 1e6
    for c in by_line.values():
      c.pop(name, None)
  streams = [c for (_, line), c in by_line.items() if line.startswith('Stream') and c]
  per_op = sum(streams or [*by_line.values(), conv_ms], collections.Counter())
  total = sum(per_op.values())
  cats = collections.Counter()
  for name, ms in per_op.items():
    cats[_op_category(name, *info[name])] += ms
  unit = (f'CPU time over all threads; {sum(conv_ms.values()):.1f} ms of it Eigen convolutions, counted launch to '
          'completion'
          if jax.default_backend() == 'cpu' else 'GPU kernel time')
  out = [f'wall {wall * 1e3:.1f} ms/step; summed op time {total:.1f} ms/step ({unit})',
         '| category | ms/step | share |', '|---|---|---|']
  out += [f'| {c} | {ms:.1f} | {100 * ms / total:.1f}% |' for c, ms in cats.most_common()]
  out += ['', f'top {top} instructions:', '| instruction | ms/step | share | category | jax op |',
          '|---|---|---|---|---|']
  for name, ms in per_op.most_common(top):
    op, shape = info[name]
    out.append(f'| {name} {shape} | {ms:.1f} | {100 * ms / total:.1f}% | {_op_category(name, op, shape)} '
               f'| {op.removeprefix("jit(train_step)/")} |')
  return '\n'.join(out)


# -- diffjax -------------------------------------------------------------------------------------------------------
def jax_unet(cfg: UNetConfig, batch: int, size: int, ctx_len: int, dtype) -> dict:
  nets = {'run': UNet(cfg, dtype=dtype), 'count': UNet(cfg)}  # 'count': float32 twin for the FLOP count
  params = _random_params(nn.meta.unbox(jax.eval_shape(lambda: init_unet(nets['run'], jax.random.key(0)))))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, size, size, cfg.in_channels)), jnp.float32)
  t = jnp.asarray(rng.uniform(0, 999, batch), jnp.float32)
  ctx = jnp.asarray(rng.standard_normal((batch, ctx_len, cfg.cross_attention_dim)), jnp.float32)
  target = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

  def loss_fn(net):
    return lambda p: jnp.mean((nets[net].apply({'params': p}, x, t, ctx).astype(jnp.float32) - target) ** 2)

  def fwd(net):
    return lambda p: nets[net].apply({'params': p}, x, t, ctx)

  return _jax_side(_adam_step(loss_fn('run')), fwd('run'), _adam_step(loss_fn('count')), fwd('count'), params, ())


def jax_vae(cfg: VAEConfig, batch: int, size: int, dtype) -> dict:
  vaes = {'run': AutoencoderKL(cfg, dtype=dtype), 'count': AutoencoderKL(cfg)}  # 'count': float32 twin for FLOPs
  params = _random_params(nn.meta.unbox(jax.eval_shape(lambda: init_vae(vaes['run'], jax.random.key(0)))))
  rng = np.random.default_rng(0)
  img = jnp.asarray(rng.uniform(-1, 1, (batch, size, size, cfg.in_channels)), jnp.float32)
  f = cfg.downsample_factor
  z = jnp.asarray(rng.standard_normal((batch, size // f, size // f, cfg.latent_channels)), jnp.float32)

  def loss_fn(vae):
    def loss(p, key):
      rec, post = vaes[vae].apply({'params': p}, img, key)
      return jnp.mean(reconstruction_loss(img, rec, 'l1') + 1e-6 * post.kl())
    return loss

  def dec(vae):
    return lambda p: vaes[vae].apply({'params': p}, z, method=vaes[vae].decode)

  return _jax_side(_adam_step(loss_fn('run')), dec('run'), _adam_step(loss_fn('count')), dec('count'), params,
                   (jax.random.key(1),))


# -- PyTorch (diffusers) ----------------------------------------------------------------------------------------------
class _Torch:
  """Device placement, mixed precision and synchronised timing for the PyTorch side."""

  def __init__(self, device: str, dtype: str):
    import torch
    self.torch, self.device = torch, torch.device('cuda' if device == 'gpu' else 'cpu')
    self.autocast_dtype = torch.bfloat16 if dtype == 'bfloat16' else None
    if device == 'gpu':
      torch.backends.cuda.matmul.allow_tf32 = True  # XLA's default float32 precision on GPU (see module doc)
      torch.backends.cudnn.allow_tf32 = True

  def autocast(self):
    return self.torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

  def peak_mem(self) -> float:
    return self.torch.cuda.max_memory_allocated() if self.device.type == 'cuda' else float('nan')

  def synced(self, fn):
    """``fn`` followed by a device synchronisation (so that a host clock times it)."""
    def run():
      fn()
      if self.device.type == 'cuda':
        self.torch.cuda.synchronize()
    return run

  def release(self):
    """Returns PyTorch's cached GPU memory (call after a model's function has returned)."""
    gc.collect()
    if self.device.type == 'cuda':
      self.torch.cuda.reset_peak_memory_stats()
      self.torch.cuda.empty_cache()


def torch_unet(tc: _Torch, cfg: UNetConfig, batch: int, size: int, ctx_len: int) -> dict:
  from diffusers import UNet2DConditionModel
  torch, dev = tc.torch, tc.device
  torch.manual_seed(0)
  m = UNet2DConditionModel(**{k: v for k, v in unet_config_to_diffusers(cfg).items() if not k.startswith('_')}).to(dev)
  x = torch.randn(batch, cfg.in_channels, size, size, device=dev)
  t = torch.rand(batch, device=dev) * 999
  ctx = torch.randn(batch, ctx_len, cfg.cross_attention_dim, device=dev)
  target = torch.randn_like(x)
  opt = torch.optim.Adam(m.parameters(), 1e-4)

  def run_train():
    opt.zero_grad(set_to_none=True)
    with tc.autocast():
      loss = ((m(x, t, ctx).sample.float() - target) ** 2).mean()
    loss.backward()
    opt.step()

  def run_fwd():
    with torch.no_grad(), tc.autocast():
      m(x, t, ctx)

  return dict(train=tc.synced(run_train), fwd=tc.synced(run_fwd), params=sum(p.numel() for p in m.parameters()))


def torch_vae(tc: _Torch, cfg: VAEConfig, batch: int, size: int) -> dict:
  from diffusers import AutoencoderKL as TorchVAE
  torch, dev = tc.torch, tc.device
  torch.manual_seed(0)
  m = TorchVAE(**{k: v for k, v in vae_config_to_diffusers(cfg).items() if not k.startswith('_')}).to(dev)
  img = torch.rand(batch, cfg.in_channels, size, size, device=dev) * 2 - 1
  f = cfg.downsample_factor
  z = torch.randn(batch, cfg.latent_channels, size // f, size // f, device=dev)
  opt = torch.optim.Adam(m.parameters(), 1e-4)

  def run_train():
    opt.zero_grad(set_to_none=True)
    with tc.autocast():
      post = m.encode(img).latent_dist
      rec = m.decode(post.sample()).sample
      loss = (rec.float() - img).abs().mean() + 1e-6 * post.kl().float().mean()
    loss.backward()
    opt.step()

  def run_fwd():
    with torch.no_grad(), tc.autocast():
      m.decode(z)

  return dict(train=tc.synced(run_train), fwd=tc.synced(run_fwd), params=sum(p.numel() for p in m.parameters()))


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--device', choices=('auto', 'cpu', 'gpu'), default='auto',
                  help='where both frameworks run (auto: gpu if jax has one)')
  ap.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32')
  ap.add_argument('--unet', choices=tuple(UNETS), default='bench')
  ap.add_argument('--vae', choices=tuple(VAES), default='bench')
  ap.add_argument('--batch', type=int, help='U-Net batch (default: cpu 4, gpu 8)')
  ap.add_argument('--size', type=int, help='U-Net latent size (default: cpu 32, gpu 64)')
  ap.add_argument('--ctx-len', type=int, help='context tokens (default: cpu 16, gpu 77)')
  ap.add_argument('--vae-batch', type=int, help='VAE batch (default 4)')
  ap.add_argument('--vae-size', type=int, help='VAE image size (default: cpu 64, gpu 512)')
  ap.add_argument('--models', default='unet,vae', help='comma-separated subset of unet,vae')
  ap.add_argument('--reps', type=int, default=5)
  ap.add_argument('--torch-threads', type=int, default=os.cpu_count() or 1)
  ap.add_argument('--no-torch', action='store_true')
  ap.add_argument('--interleave', action=argparse.BooleanOptionalAction, default=None,
                  help='alternate diffjax and PyTorch call by call (default: on for cpu, off for gpu)')
  ap.add_argument('--profile', action='store_true',
                  help='also print where the diffjax training step spends its time (jax.profiler, per HLO op)')
  args = ap.parse_args()

  device = args.device
  if device == 'auto':
    device = 'gpu' if jax.default_backend() == 'gpu' else 'cpu'
  if device == 'cpu':
    jax.config.update('jax_platforms', 'cpu')
  elif jax.default_backend() != 'gpu':
    raise SystemExit(f'--device gpu: jax has no GPU (backend {jax.default_backend()!r})')
  batch, size, ctx_len, vae_batch, vae_size = (a if a is not None else d for a, d in zip(
      (args.batch, args.size, args.ctx_len, args.vae_batch, args.vae_size), DEFAULTS[device], strict=True))
  dtype = jnp.bfloat16 if args.dtype == 'bfloat16' else jnp.float32
  models = args.models.split(',')

  import torch
  torch.set_num_threads(args.torch_threads)
  tc = None if args.no_torch else _Torch(device, args.dtype)
  if tc is not None and device == 'gpu' and not torch.cuda.is_available():
    raise SystemExit('--device gpu: torch sees no CUDA device')
  load0 = os.getloadavg()
  n_peak = 8192 if device == 'gpu' else 2048
  peak = matmul_peak(n_peak, dtype)
  dev = jax.devices()[0]
  print(f'device: {dev.device_kind} ({jax.default_backend()}), {os.cpu_count()} host cores; jax {jax.__version__}; '
        f'torch {torch.__version__} on {"cuda" if device == "gpu" else f"cpu, {torch.get_num_threads()} threads"}')
  print(f'dtype {args.dtype}; U-Net {args.unet}: batch {batch}, latents {size}x{size}, context {ctx_len}; '
        f'VAE {args.vae}: batch {vae_batch}, images {vae_size}x{vae_size}')
  print(f'measured {args.dtype} matmul peak (XLA, {n_peak}^2): {peak / 1e9:.1f} GFLOP/s')
  if tc is not None and device == 'gpu':
    a = torch.randn(n_peak, n_peak, device=tc.device, dtype=getattr(torch, args.dtype))
    print(f'(same matmul through torch: {2 * n_peak**3 / timeit(tc.synced(lambda: a @ a), 10) / 1e9:.1f} GFLOP/s)')
  hdr = ('model', 'step', 'params', 'diffjax ms', 'torch ms', 'torch/diffjax', 'GFLOP (XLA)', 'diffjax GFLOP/s',
         'of peak')
  table = ['| ' + ' | '.join(hdr) + ' |', '|' + '---|' * len(hdr)]
  interleave = device == 'cpu' if args.interleave is None else args.interleave
  for name in models:
    if name == 'unet':
      make_torch = functools.partial(torch_unet, tc, UNETS[args.unet], batch, size, ctx_len)
      make_jax = functools.partial(jax_unet, UNETS[args.unet], batch, size, ctx_len, dtype)
    else:
      make_torch = functools.partial(torch_vae, tc, VAES[args.vae], vae_batch, vae_size)
      make_jax = functools.partial(jax_vae, VAES[args.vae], vae_batch, vae_size, dtype)
    if tc is None:
      j = make_jax()
      tj, t = measure({'jax': j}, args.reps, False)['jax'], None
    elif interleave:
      j, t = make_jax(), make_torch()
      times = measure({'jax': j, 'torch': t}, args.reps, True)
      tj, t['peak_mem'] = times['jax'], tc.peak_mem()
      t.update(times['torch'])
    else:  # one side at a time, PyTorch first: its cached GPU memory can be handed back, XLA's pool stays
      t = make_torch()
      t.update(measure({'torch': t}, args.reps, False)['torch'], peak_mem=tc.peak_mem())  # drops the callables
      tc.release()
      j = make_jax()
      tj = measure({'jax': j}, args.reps, False)['jax']
    if args.profile:
      print(profile_breakdown(j['step'], j['train']), flush=True)
    j = dict(j, **tj, peak_mem=jax_peak_mem())
    if t is not None and t['params'] != j['params']:
      raise RuntimeError(f'{name}: parameter counts differ: diffjax {j["params"]}, torch {t["params"]}')
    if device == 'gpu':
      print(f'{name}: params diffjax {j["params"]} = torch {t["params"] if t else "-"}; cuDNN attention calls in the '
            f'diffjax train step / forward: {j["cudnn_attn"]}; peak GPU memory diffjax (process so far) '
            f'{j["peak_mem"] / 2**30:.1f} GiB, torch {t["peak_mem"] / 2**30 if t else float("nan"):.1f} GiB')
    for mode, fl in (('train', 'flops_train'), ('fwd', 'flops_fwd')):
      achieved = j[fl] / j[mode]
      row = (name, mode, j['params'], j[mode] * 1e3, t[mode] * 1e3 if t else float('nan'),
             (t[mode] / j[mode]) if t else float('nan'), j[fl] / 1e9, achieved / 1e9, achieved / peak)
      table.append(f'| {row[0]} | {row[1]} | {row[2] / 1e6:.2f}M | {row[3]:.1f} | {row[4]:.1f} | {row[5]:.2f}x '
                   f'| {row[6]:.2f} | {row[7]:.1f} | {100 * row[8]:.0f}% |')
      print(table[-1], flush=True)
  if device == 'cpu':
    print(f'load average (1, 5, 15 min) at the start: {load0}, at the end: {os.getloadavg()}')
  print('\n'.join(table))


if __name__ == '__main__':
  main()
