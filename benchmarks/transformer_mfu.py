"""Model FLOP utilisation of diffjax's transformer training steps: DiT-XL/2 at 256 px, SD3-medium at 512 px.

For each model (``PRESETS``) the script builds the diffjax module with random weights and times one bf16 mixed
precision training step (``dtype=bfloat16``, ``param_dtype=float32``): forward, MSE to a fixed random target,
gradients, optax ``adamw``, parameters and optimiser state donated. Attention goes through ``models.attention``
with ``--attention`` (default ``cudnn`` on a GPU, ``auto`` elsewhere; the compiled step is searched for cuDNN's
fused attention calls, which the table reports).

MFU = (FLOPs of one step) / (median step time) / (the device's peak dense bf16 FLOP/s). The FLOPs come from XLA's
cost analysis of the same step lowered in float32 with the ``einsum`` attention (a cuDNN call is an opaque custom
call to the analysis; the float32 twin has the same matrix products), not from 6 x parameters x tokens: the adaLN
modulation weights of these models act once per sample, not once per token (``flops_6nt`` beside it shows the
difference). The peak is the vendor's dense bf16 figure for the device kind (``PEAK_BF16``; ``--peak`` overrides
it, e.g. on an unlisted device); the matmul rate XLA itself reaches on an 8192^2 bf16 product is measured and
shown beside it, so a reader can tell a slow step from a slow device.

  python benchmarks/transformer_mfu.py                          # both models at their GPU batch sizes
  python benchmarks/transformer_mfu.py --models dit --batch 64 --reps 10 --json /tmp/mfu.json
  python benchmarks/transformer_mfu.py --preset tiny --reps 1    # a check of the script on a CPU (seconds)

Targets (issue 15): >= 40% MFU for DiT-XL/2 and >= 35% for SD3-medium on an H100.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks.model_throughput import cudnn_attention_calls, matmul_peak, xla_flops  # noqa: E402
from benchmarks.results import output_path  # noqa: E402
from diffjax.adapters import num_params  # noqa: E402
from diffjax.convert.files import write_json  # noqa: E402
from diffjax.models.dit import DIT_CONFIGS, DiT, DiTConfig  # noqa: E402
from diffjax.models.mmdit import MMDIT_CONFIGS, MMDiT, MMDiTConfig  # noqa: E402

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) from the vendors' data sheets, by jax's device_kind.
PEAK_BF16 = {
    'NVIDIA H100 80GB HBM3': 989.4e12,  # H100 SXM5
    'NVIDIA H100 PCIe': 756.5e12,
    'NVIDIA H100 NVL': 835.5e12,
    'NVIDIA H200': 989.4e12,
    'NVIDIA A100-SXM4-80GB': 312e12,
    'NVIDIA A100-SXM4-40GB': 312e12,
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,
    'TPU v5p': 459e12,
}
TARGETS = {'dit': 0.40, 'mmdit': 0.35}
SD3_TEXT_TOKENS = 77 + 256  # CLIP-L/G's 77 beside T5's 256, SD3's joint context


@dataclasses.dataclass(frozen=True)
class Preset:
  """A model with the latents (H, W, C) and batch it is measured at; ``text`` tokens for an MMDiT."""

  config: DiTConfig | MMDiTConfig
  latent: tuple[int, int, int]
  batch: int
  text: int = 0


PRESETS = {
    'full': {'dit': Preset(DIT_CONFIGS['dit_xl_2_256'], (32, 32, 4), 32),  # 256 px: 256 tokens
             'mmdit': Preset(MMDIT_CONFIGS['sd3_medium'], (64, 64, 16), 8, SD3_TEXT_TOKENS)},  # 512 px: 1024 tokens
    'tiny': {'dit': Preset(DIT_CONFIGS['tiny'], (8, 8, 4), 2),
             'mmdit': Preset(MMDIT_CONFIGS['tiny'], (8, 8, 4), 2, 8)},
}


def make_model(name: str, preset: Preset, dtype, attention: str | None, remat: bool):
  """(module, inputs (a tuple of arrays), target) for one training step at ``preset``'s sizes."""
  c, b, (h, w, ch) = preset.config, preset.batch, preset.latent
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((b, h, w, ch)), jnp.float32)
  t = jnp.asarray(rng.uniform(0, 1000, b), jnp.float32)
  if name == 'dit':
    module = DiT(c, remat=remat, attention_impl=attention, dtype=dtype)
    inputs = (x, t, jnp.asarray(rng.integers(0, c.num_classes, b), jnp.int32))
  else:
    module = MMDiT(c, remat=remat, attention_impl=attention, dtype=dtype)
    context = jnp.asarray(rng.standard_normal((b, preset.text, c.joint_attention_dim)), jnp.float32)
    pooled = jnp.asarray(rng.standard_normal((b, c.pooled_projection_dim)), jnp.float32)
    inputs = (x, t, context, pooled)
  target = jnp.asarray(rng.standard_normal((b, h, w, c.outputs)), jnp.float32)
  return module, inputs, target


def train_step_fn(module, tx):
  """(params, opt_state, inputs, target) -> (params, opt_state, loss): forward, MSE, gradients, the update."""

  def loss_fn(params, inputs, target):
    out = module.apply({'params': params}, *inputs)
    return jnp.mean((out.astype(jnp.float32) - target) ** 2)

  def step(params, opt_state, inputs, target):
    loss, grads = jax.value_and_grad(loss_fn)(params, inputs, target)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def tokens_per_sample(name: str, preset: Preset) -> int:
  """Tokens the transformer's blocks carry per sample (image patches, plus the text for an MMDiT)."""
  h, w, _ = preset.latent
  return (h // preset.config.patch_size) * (w // preset.config.patch_size) + (preset.text if name == 'mmdit' else 0)


def make_optimizer():
  return optax.adamw(1e-4, weight_decay=0.01)


def step_flops(name: str, preset: Preset) -> tuple[float, float]:
  """(forward, training step) FLOPs at ``preset``: XLA's analysis of the unoptimised HLO of the float32 twin with
  the einsum attention, lowered from shapes only (no memory is allocated for it)."""
  twin, inputs, target = make_model(name, preset, jnp.float32, 'einsum', False)
  shapes = jax.eval_shape(lambda: twin.init(jax.random.key(0), *inputs)['params'])
  tx = make_optimizer()
  forward = xla_flops(jax.jit(lambda p: twin.apply({'params': p}, *inputs)), shapes)
  train = xla_flops(jax.jit(train_step_fn(twin, tx)), shapes, jax.eval_shape(tx.init, shapes), inputs, target)
  return forward, train


def bench(name: str, preset: Preset, attention: str | None, remat: bool, reps: int, peak: float | None) -> dict:
  """One model's row: FLOPs, step time, MFU (None without a known peak), parameters, compile time."""
  tx = make_optimizer()
  forward_flops, flops = step_flops(name, preset)
  module, inputs, target = make_model(name, preset, jnp.bfloat16, attention, remat)
  params = jax.jit(lambda: module.init(jax.random.key(0), *inputs)['params'])()
  n_params = num_params(params)
  opt_state = tx.init(params)
  start = time.perf_counter()
  compiled = jax.jit(train_step_fn(module, tx), donate_argnums=(0, 1)).lower(params, opt_state, inputs,
                                                                              target).compile()
  compile_s = time.perf_counter() - start
  cudnn_calls = cudnn_attention_calls(compiled)
  state = {'p': params, 's': opt_state}
  del params, opt_state  # donated by the first step
  times, losses = [], []
  for i in range(reps + 1):  # the first call is a warm-up
    start = time.perf_counter()
    state['p'], state['s'], loss = compiled(state['p'], state['s'], inputs, target)
    jax.block_until_ready((state['p'], state['s'], loss))
    if i:
      times.append(time.perf_counter() - start)
    losses.append(float(loss))
  if not np.all(np.isfinite(losses)):
    raise FloatingPointError(f'{name}: non-finite training loss {losses}')
  step_s = statistics.median(times)
  tokens = tokens_per_sample(name, preset) * preset.batch
  return {'model': name, 'batch': preset.batch, 'latent': list(preset.latent), 'tokens': tokens,
          'params': n_params, 'flops': flops, 'forward_flops': forward_flops, 'flops_6nt': 6 * n_params * tokens,
          'step_s': step_s, 'times': times, 'compile_s': compile_s, 'cudnn_attention_calls': cudnn_calls,
          'achieved': flops / step_s, 'mfu': None if peak is None else flops / step_s / peak,
          'target': TARGETS[name], 'losses': losses, 'attention': attention or 'auto', 'remat': remat}


def print_table(rows: list[dict], device: str, peak: float | None, measured: float, n: int) -> None:
  peak_s = 'unknown (pass --peak)' if peak is None else f'{peak / 1e12:.1f} TFLOP/s'
  print(f'device: {device}; peak dense bf16 {peak_s}; XLA bf16 matmul ({n}^2) {measured / 1e12:.1f} TFLOP/s')
  print('| model | batch x tokens | params | TFLOP / step (6NT) | step ms | TFLOP/s | MFU | of matmul rate '
        '| target | cuDNN attention calls | compile s |')
  print('|---|---|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    mfu = '-' if r['mfu'] is None else f"{100 * r['mfu']:.1f}%"
    print(f"| {r['model']} | {r['batch']} x {r['tokens'] // r['batch']} | {r['params'] / 1e6:.1f} M | "
          f"{r['flops'] / 1e12:.2f} ({r['flops_6nt'] / 1e12:.2f}) | {1e3 * r['step_s']:.1f} | "
          f"{r['achieved'] / 1e12:.2f} | {mfu} | {100 * r['achieved'] / measured:.1f}% | {100 * r['target']:.0f}% | "
          f"{r['cudnn_attention_calls']} | {r['compile_s']:.0f} |")


def main(argv: list[str] | None = None) -> list[dict]:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--models', default='dit,mmdit', help='comma-separated subset of dit,mmdit')
  ap.add_argument('--preset', choices=tuple(PRESETS), default='full')
  ap.add_argument('--batch', type=int, default=None, help="override the preset's batch")
  ap.add_argument('--attention', default=None, help="models.attention implementation (default: cudnn on a GPU)")
  ap.add_argument('--remat', action='store_true', help='gradient checkpointing of every block')
  ap.add_argument('--reps', type=int, default=5)
  ap.add_argument('--peak', type=float, default=None, help='peak dense bf16 FLOP/s of the device (overrides the table)')
  ap.add_argument('--json', default=None, type=output_path)
  args = ap.parse_args(argv)
  models = args.models.split(',')
  unknown = set(models) - set(TARGETS)
  if unknown:
    ap.error(f'unknown models {sorted(unknown)}: choose from dit, mmdit')
  device = jax.devices()[0]
  attention = args.attention or ('cudnn' if device.platform == 'gpu' else None)
  peak = args.peak or PEAK_BF16.get(device.device_kind)
  n = 8192 if device.platform != 'cpu' else 1024
  measured = matmul_peak(n, jnp.bfloat16)
  rows = []
  for name in models:
    preset = PRESETS[args.preset][name]
    if args.batch:
      preset = dataclasses.replace(preset, batch=args.batch)
    rows.append(bench(name, preset, attention, args.remat, args.reps, peak))
    print(f"{name}: {1e3 * rows[-1]['step_s']:.1f} ms / step", flush=True)
  print_table(rows, device.device_kind, peak, measured, n)
  if args.json:
    write_json(args.json, {'device': device.device_kind, 'peak': peak, 'matmul': measured, 'rows': rows},
               indent=1)
  return rows


if __name__ == '__main__':
  main()
