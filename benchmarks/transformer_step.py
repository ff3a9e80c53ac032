"""diffjax's transformer backbones against diffusers' PyTorch models: forward and training step, same weights.

For each backbone (``--models``: dit, mmdit, pixart, flux) and size (``--sizes``, the ``SIZES`` table below) the
script builds the diffusers model with random weights (PyTorch's initialisation, then seeded Gaussian noise of
std ``JIGGLE`` on every parameter so that zero-initialised gates and outputs take part), writes it with diffusers'
``save_pretrained`` to a temporary folder and reads that folder with ``diffjax.convert.load_pretrained``: both
sides run the same float32 weights on the same batch (``--batch``) of random inputs. Then, on the same machine
and in one process, it times

* **forward**: diffjax's ``jax.jit(module.apply)`` (compiled ahead: ``lower().compile()``, whose wall time is
  reported as diffjax's compile time, then one warm-up call) against diffusers' eager forward under
  ``torch.inference_mode()`` (one warm-up call);
* **train**: one optimisation step on the MSE to a fixed random target: diffjax's jitted loss + gradient + optax
  ``adamw`` update (parameters and optimiser state donated) against diffusers' forward + ``backward()`` +
  ``torch.optim.AdamW.step()`` (PyTorch's default CPU implementation), with the same hyperparameters (lr 1e-4,
  betas 0.9 / 0.999, eps 1e-8, weight decay 0.01). Both sides train the same parameters: those the diffusers
  model registers as parameters. diffjax also holds SD3's position table (``pos_embed.pos_embed``, a buffer in
  diffusers) as a parameter; the diffjax step keeps it frozen (it enters the step as an input), and the table
  reports its size as "frozen".

Each timing is the median of ``--reps`` calls after the warm-up; calls alternate between the two frameworks rep by
rep (diffusers, then diffjax), so that a host whose load drifts slows both sides alike, and each rep gives a
ratio of its own: the table shows torch / diffjax of the medians (> 1: diffjax is faster) and the min-max of the
per-rep ratios. PyTorch runs with ``torch.set_num_threads(os.cpu_count())`` (``--torch_threads``), XLA on JAX's
default backend with its own thread pool; both see the same cores. The load average at the start and end is
printed: on a host whose other jobs keep the cores busy, PyTorch's OpenMP threads wait for each other at every
operator (a descheduled partner costs a scheduler slice), which slows it by up to 100x (2-core CPU at load 7-8:
tiny DiT forward 0.2-0.5 s with 2 threads, 2-11 ms with 1; DiT-S/2 forward 3.2 s against 0.44 s), so the ratios
of such a run mostly measure the host; ``--torch_threads 1`` shows whether that is happening.

Before any timing the warm-up calls are checked against each other (parity): the forward outputs, the first
training step's loss, and its gradients, read from both optimisers' first moments (after one AdamW step from zero
both hold exactly 0.1 x gradient). Each is reported as max |diffjax - torch| / max |torch|; ``PARITY_BOUND`` is a
loose sanity bound (float32 rounding gave 1e-7 to 2e-5 at both sizes; a wrong weight or wiring gives O(1)), marked
in the table.

``--torch_compile`` adds ``torch.compile(model)`` (inductor; needs a C++ compiler) to the forward: its first call
is reported as its compile time, then it alternates with the other two. Off by default (it worked here: 37 s to
compile the tiny DiT's forward on a loaded 2-core CPU, minutes for the small sizes).

  python benchmarks/transformer_step.py                                  # all four, tiny and small, 5 reps
  python benchmarks/transformer_step.py --sizes small --reps 3 --json /tmp/transformer_step.json
  python benchmarks/transformer_step.py --sizes small --reps 3 --torch_threads 1  # a host with other jobs
  python benchmarks/transformer_step.py --models dit,flux --sizes tiny --reps 1 --torch_compile

Sizes (``SIZES``; latents are (H, W, C), tokens = image tokens + text tokens per example):

* tiny: the widths of the parity tests (16 = 2 heads of 8) with the fewest blocks that use every kind (DiT and
  PixArt 1 block, MMDiT 2 (the last one reads the text stream only), Flux 1 double + 1 single), 8 x 8 latents
  (16 image tokens), 8 text tokens. For checking the benchmark itself: the run is mostly diffjax's compilation.
* small: width 384 (6 heads of 64, DiT-S's), 32 x 32 latents (256 image tokens after 2 x 2 patches or packing)
  and 32 text tokens of width 512 (pooled 256) where the model reads text: DiT-S/2 (12 blocks, 1000 classes),
  SD3-style MMDiT (6 joint blocks, 16 latent channels, position table 32 x 32), PixArt-Sigma-style (12 blocks,
  caption mask with the last 8 tokens padded), Flux-dev-style (2 double + 6 single blocks, guidance embedding,
  16 latent channels packed to 64, rotary axes (8, 28, 28)). At batch 2 on a loaded 2-core CPU: 0.3-0.5 s per
  forward and 1.5-2.6 s per training step (diffjax), 20-30 s to compile each training step; the whole size
  takes 5-8 minutes at ``--reps 3``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import traverse_util  # noqa: E402

from benchmarks.results import output_path  # noqa: E402
from diffjax.adapters import num_params  # noqa: E402
from diffjax.convert import load_pretrained  # noqa: E402
from diffjax.convert.files import write_json  # noqa: E402
from diffjax.convert.keys import to_torch_array, torch_key  # noqa: E402
from diffjax.models.flux import image_ids, pack_latents, rotary_for  # noqa: E402

MODELS = ('dit', 'mmdit', 'pixart', 'flux')
DIFFUSERS_CLASSES = {'dit': 'DiTTransformer2DModel', 'mmdit': 'SD3Transformer2DModel',
                     'pixart': 'PixArtTransformer2DModel', 'flux': 'FluxTransformer2DModel'}
# size -> model -> (diffusers constructor arguments, latent (H, W, C), text tokens)
SIZES = {
    'tiny': {
        'dit': (dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
                     sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=4), (8, 8, 4), 0),
        'mmdit': (dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                       num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                       pooled_projection_dim=12, pos_embed_max_size=16), (8, 8, 4), 8),
        'pixart': (dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
                        cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=12, norm_num_groups=4,
                        use_additional_conditions=False), (8, 8, 4), 8),
        'flux': (dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                      num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10, axes_dims_rope=(2, 2, 4),
                      guidance_embeds=True), (8, 8, 4), 8),
    },
    'small': {
        'dit': (dict(num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=12,
                     sample_size=32, patch_size=2, num_embeds_ada_norm=1000), (32, 32, 4), 0),
        'mmdit': (dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=6,
                       attention_head_dim=64, num_attention_heads=6, joint_attention_dim=512,
                       caption_projection_dim=384, pooled_projection_dim=256, pos_embed_max_size=32), (32, 32, 16), 32),
        'pixart': (dict(num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=12,
                        cross_attention_dim=384, sample_size=32, patch_size=2, caption_channels=512,
                        use_additional_conditions=False), (32, 32, 4), 32),
        'flux': (dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=6, attention_head_dim=64,
                      num_attention_heads=6, joint_attention_dim=512, pooled_projection_dim=256,
                      axes_dims_rope=(8, 28, 28), guidance_embeds=True), (32, 32, 16), 32),
    },
}
JIGGLE = 0.02  # std of the seeded noise added to every diffusers parameter
PARITY_BOUND = 1e-3  # max |diffjax - torch| / max |torch| of outputs, loss and gradients (a loose sanity bound)
ADAMW = dict(lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)


def relative_diff(got: np.ndarray, want: np.ndarray) -> float:
  """max |got - want| / max |want|."""
  return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def make_inputs(model: str, kwargs: dict, latent: tuple[int, int, int], text: int, batch: int, config=None,
                seed: int = 0):
  """(diffusers keyword arguments, diffjax positional arguments, target in PyTorch's layout, layout function) for a
  batch of random inputs; ``layout`` turns a PyTorch-layout output (NCHW, or Flux's tokens) into diffjax's (NHWC).
  ``config``: the diffjax module's config (Flux: its rotary table is computed once here, on the host)."""
  import torch

  rng = np.random.default_rng(seed)
  h, w, c = latent
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  x = normal(batch, c, h, w)  # PyTorch layout; diffjax's is NHWC
  nhwc = lambda a: a.transpose(0, 2, 3, 1)
  t = torch.from_numpy
  if model == 'dit':
    steps = rng.integers(0, 1000, batch)
    labels = rng.integers(0, kwargs['num_embeds_ada_norm'], batch)
    ref = dict(hidden_states=t(x), timestep=t(steps), class_labels=t(labels))
    ours = (nhwc(x), steps, labels)
    out_channels = kwargs['out_channels']
  elif model == 'mmdit':
    steps = rng.uniform(0, 1000, batch).astype(np.float32)
    context, pooled = normal(batch, text, kwargs['joint_attention_dim']), normal(batch, kwargs['pooled_projection_dim'])
    ref = dict(hidden_states=t(x), encoder_hidden_states=t(context), pooled_projections=t(pooled), timestep=t(steps))
    ours = (nhwc(x), steps, context, pooled)
    out_channels = kwargs['out_channels']
  elif model == 'pixart':
    steps = rng.integers(0, 1000, batch)
    caption = normal(batch, text, kwargs['caption_channels'])
    mask = np.ones((batch, text), np.int64)
    mask[:, text - text // 4:] = 0  # the last quarter of the caption is padding
    ref = dict(hidden_states=t(x), encoder_hidden_states=t(caption), timestep=t(steps),
               encoder_attention_mask=t(mask), added_cond_kwargs=None)
    ours = (nhwc(x), steps, caption, mask)
    out_channels = kwargs['out_channels']
  elif model == 'flux':
    tokens = np.array(pack_latents(jnp.asarray(nhwc(x))))  # a writable copy, for torch.from_numpy
    img_ids, txt_ids = image_ids(h // 2, w // 2), np.zeros((text, 3), np.float32)
    steps, guidance = rng.uniform(0, 1, batch).astype(np.float32), np.full(batch, 3.5, np.float32)
    context, pooled = normal(batch, text, kwargs['joint_attention_dim']), normal(batch, kwargs['pooled_projection_dim'])
    ref = dict(hidden_states=t(tokens), encoder_hidden_states=t(context), pooled_projections=t(pooled),
               timestep=t(steps), img_ids=t(img_ids), txt_ids=t(txt_ids), guidance=t(guidance))
    rotary = tuple(np.asarray(a) for a in rotary_for(config, img_ids, txt_ids))
    ours = (tokens, steps, context, pooled, rotary, guidance)
    target = normal(*tokens.shape)
    return ref, ours, target, lambda a: a
  else:
    raise ValueError(f'unknown model {model!r}: one of {MODELS}')
  target = normal(batch, out_channels, h, w)
  return ref, ours, target, nhwc


def build_diffusers(model: str, kwargs: dict, seed: int = 0):
  """The diffusers model of ``model`` with PyTorch's initialisation plus seeded noise of std ``JIGGLE``."""
  import diffusers
  import torch

  torch.manual_seed(seed)
  ref = getattr(diffusers, DIFFUSERS_CLASSES[model])(**kwargs)
  with torch.no_grad():
    for p in ref.parameters():
      p.add_(JIGGLE * torch.randn_like(p))
  return ref.eval()


def split_trained(params: dict, trained_names: set[str]) -> tuple[dict, dict]:
  """(trained, frozen): flat {path: array} dicts of the diffjax leaves that are / are not in ``trained_names``
  (PyTorch parameter names)."""
  flat = traverse_util.flatten_dict(params)
  trained = {k: v for k, v in flat.items() if torch_key(k) in trained_names}
  return trained, {k: v for k, v in flat.items() if k not in trained}


def _timed(call) -> float:
  start = time.perf_counter()
  call()
  return time.perf_counter() - start


def paired(calls: dict, reps: int) -> dict[str, list[float]]:
  """Seconds of ``reps`` calls of each of ``calls`` ({name: callable}), alternating rep by rep in dict order."""
  times = {name: [] for name in calls}
  for _ in range(reps):
    for name, call in calls.items():
      times[name].append(_timed(call))
  return times


def summary(torch_times: list[float], jax_times: list[float]) -> dict:
  t_torch, t_jax = statistics.median(torch_times), statistics.median(jax_times)
  ratios = [a / b for a, b in zip(torch_times, jax_times, strict=True)]
  return dict(torch_s=t_torch, diffjax_s=t_jax, ratio=t_torch / t_jax, ratio_range=[min(ratios), max(ratios)])


def bench(model: str, size: str, batch: int, reps: int, torch_compile: bool = False) -> dict:
  """One row: parity, parameter counts, forward and train timings of ``model`` at ``size`` (module docstring)."""
  import torch

  kwargs, latent, text = SIZES[size][model]
  ref = build_diffusers(model, kwargs)
  with tempfile.TemporaryDirectory() as folder:
    ref.save_pretrained(folder)
    module, params = load_pretrained(folder)
  ref_kw, args, target, layout = make_inputs(model, kwargs, latent, text, batch, module.config)
  args = jax.tree.map(jnp.asarray, args)
  trained_names = {name for name, _ in ref.named_parameters()}
  trained, frozen = split_trained(params, trained_names)
  row = dict(model=model, size=size, diffusers_class=DIFFUSERS_CLASSES[model], config=kwargs, latent=list(latent),
             text_tokens=text, image_tokens=(latent[0] // 2) * (latent[1] // 2), batch=batch,
             diffjax_module=type(module).__name__, params_torch=sum(p.numel() for p in ref.parameters()),
             params_diffjax=num_params(trained), params_frozen=num_params(frozen))
  if {torch_key(k) for k in trained} != trained_names:
    raise RuntimeError(f'{model}: diffjax has no parameter for {sorted(trained_names - set(map(torch_key, trained)))}')

  # -- forward -------------------------------------------------------------------------------------------------------
  start = time.perf_counter()
  forward = jax.jit(lambda p, a: module.apply({'params': p}, *a)).lower(params, args).compile()
  forward_compile = time.perf_counter() - start
  got = np.asarray(forward(params, args))

  def torch_forward(m=ref):
    with torch.inference_mode():
      return m(**ref_kw).sample

  want = torch_forward().numpy()
  parity = dict(forward=relative_diff(got, layout(want)), forward_max_abs=float(np.abs(got - layout(want)).max()))
  calls = {'torch': torch_forward, 'diffjax': lambda p=params: forward(p, args).block_until_ready()}
  compiled_s = None
  if torch_compile:
    try:
      compiled_model = torch.compile(ref)
      compiled_s = _timed(lambda: torch_forward(compiled_model))
      parity['torch_compile_forward'] = relative_diff(torch_forward(compiled_model).numpy(), want)
      calls['torch_compile'] = lambda: torch_forward(compiled_model)
    except Exception as e:  # inductor fails in many ways: reported in the table, not fatal
      row['torch_compile_error'] = f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'
  times = paired(calls, reps)
  row['forward'] = dict(summary(times['torch'], times['diffjax']), diffjax_compile_s=forward_compile, times=times)
  if 'torch_compile' in times:
    row['forward']['torch_compile'] = dict(summary(times['torch_compile'], times['diffjax']),
                                           compile_s=compiled_s)

  # -- train step ----------------------------------------------------------------------------------------------------
  tx = optax.adamw(ADAMW['lr'], b1=ADAMW['b1'], b2=ADAMW['b2'], eps=ADAMW['eps'], weight_decay=ADAMW['weight_decay'])

  def loss_fn(trained, frozen, args, target):
    out = module.apply({'params': traverse_util.unflatten_dict({**trained, **frozen})}, *args)
    return jnp.mean((out - target) ** 2)

  def step(trained, opt_state, frozen, args, target):
    loss, grads = jax.value_and_grad(loss_fn)(trained, frozen, args, target)
    updates, opt_state = tx.update(grads, opt_state, trained)
    return optax.apply_updates(trained, updates), opt_state, loss

  jax_target = jnp.asarray(layout(target))
  opt_state = tx.init(trained)
  start = time.perf_counter()
  train = jax.jit(step, donate_argnums=(0, 1)).lower(trained, opt_state, frozen, args, jax_target).compile()
  train_compile = time.perf_counter() - start
  state = {'trained': trained, 'opt': opt_state}
  del params, trained, opt_state  # donated by the first step

  def jax_train():
    state['trained'], state['opt'], loss = train(state['trained'], state['opt'], frozen, args, jax_target)
    jax.block_until_ready((state['trained'], state['opt']))
    return loss

  # The diffusers model stays in eval mode: its dropouts are 0 and the one thing train mode adds in these models
  # is DiT's 10% class-label dropout (classifier-free guidance), which diffjax leaves to the training loop.
  torch_target = torch.from_numpy(target)
  opt = torch.optim.AdamW(ref.parameters(), lr=ADAMW['lr'], betas=(ADAMW['b1'], ADAMW['b2']), eps=ADAMW['eps'],
                          weight_decay=ADAMW['weight_decay'])

  def torch_train():
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(ref(**ref_kw).sample, torch_target)
    loss.backward()
    opt.step()
    return loss.detach()

  # The warm-up steps start from the same weights: compare their losses and gradients (first moments = 0.1 g).
  loss_torch, loss_jax = float(torch_train()), float(jax_train())
  moments = optax.tree_utils.tree_get(state['opt'], 'mu')
  named = dict(ref.named_parameters())
  diffs = [(np.abs(to_torch_array(k, np.asarray(v)) - opt.state[named[torch_key(k)]]['exp_avg'].numpy()).max(),
            opt.state[named[torch_key(k)]]['exp_avg'].abs().max().item()) for k, v in moments.items()]
  parity.update(loss=abs(loss_jax - loss_torch) / abs(loss_torch), loss_torch=loss_torch, loss_diffjax=loss_jax,
                grads=float(max(d for d, _ in diffs) / max(m for _, m in diffs)))
  times = paired({'torch': torch_train, 'diffjax': jax_train}, reps)
  row['train'] = dict(summary(times['torch'], times['diffjax']), diffjax_compile_s=train_compile, times=times)
  parity['ok'] = all(parity[k] <= PARITY_BOUND for k in ('forward', 'loss', 'grads'))
  row['parity'] = parity
  return row


def _count(n: int) -> str:
  return f'{n / 1e6:.2f}M' if n >= 1e6 else f'{n / 1e3:.1f}k'




def print_tables(result: dict) -> None:
  rows = result['rows']
  print(f"\n{result['jax_backend']} ({result['jax_device']}), torch {result['torch_version']} with "
        f"{result['torch_threads']} threads, batch {result['batch']}, float32, median of {result['reps']} "
        f"alternating calls after one warm-up; load average {result['load_start']} -> {result['load_end']}\n")
  print('| model | size | params | tokens | step | diffusers s | diffjax s | torch / diffjax | per-rep range '
        '| diffjax compile s |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    params = _count(r['params_torch']) + (f" (+{_count(r['params_frozen'])} frozen)" if r['params_frozen'] else '')
    tokens = f"{r['image_tokens']}" + (f" + {r['text_tokens']}" if r['text_tokens'] else '')
    for step in ('forward', 'train'):
      s = r[step]
      lo, hi = s['ratio_range']
      print(f"| {r['model']} | {r['size']} | {params} | {tokens} | {step} | {s['torch_s']:.3g} | "
            f"{s['diffjax_s']:.3g} | {s['ratio']:.2f}x | {lo:.2f}-{hi:.2f} | {s['diffjax_compile_s']:.1f} |")
      if step == 'forward' and 'torch_compile' in s:
        c = s['torch_compile']
        print(f"| {r['model']} | {r['size']} | | | forward, torch.compile | {c['torch_s']:.3g} | "
              f"{c['diffjax_s']:.3g} | {c['ratio']:.2f}x | {c['ratio_range'][0]:.2f}-{c['ratio_range'][1]:.2f} | "
              f"(torch.compile: {c['compile_s']:.1f}) |")
  if max(result['load_start'][0], result['load_end'][0]) > result['cpu_count'] and result['torch_threads'] > 1:
    print(f"\nThe host was loaded (1-minute load average above its {result['cpu_count']} cores): PyTorch's "
          f"{result['torch_threads']} OpenMP threads may have waited for each other; compare --torch_threads 1.")
  print(f'\nParity of the warm-up calls (max |diffjax - torch| / max |torch|; sanity bound {PARITY_BOUND:g}):\n')
  compiled = any('torch_compile_forward' in r['parity'] for r in rows)
  print('| model | size | forward | forward max abs diff | train loss | gradients | within bound |'
        + (' torch.compile forward vs eager |' if compiled else ''))
  print('|---|---|---|---|---|---|---|' + ('---|' if compiled else ''))
  for r in rows:
    p = r['parity']
    extra = f" {p.get('torch_compile_forward', float('nan')):.1e} |" if compiled else ''
    print(f"| {r['model']} | {r['size']} | {p['forward']:.1e} | {p['forward_max_abs']:.1e} | {p['loss']:.1e} | "
          f"{p['grads']:.1e} | {'yes' if p['ok'] else 'NO'} |{extra}")
  for r in rows:
    if 'torch_compile_error' in r:
      print(f"torch.compile failed for {r['model']} {r['size']}: {r['torch_compile_error']}")


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--models', default=','.join(MODELS), help=f'comma-separated subset of {",".join(MODELS)}')
  parser.add_argument('--sizes', default='tiny,small', help=f'comma-separated subset of {",".join(SIZES)}')
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--reps', type=int, default=5)
  parser.add_argument('--torch_threads', type=int, default=os.cpu_count() or 1,
                      help='torch.set_num_threads (default: os.cpu_count())')
  parser.add_argument('--torch_compile', action='store_true', help='also time torch.compile(model) forward')
  parser.add_argument('--json', type=output_path, help='write the results (with every timing) to this file')
  args = parser.parse_args(argv)
  models, sizes = args.models.split(','), args.sizes.split(',')
  for name, chosen, known in (('model', models, MODELS), ('size', sizes, SIZES)):
    unknown = [c for c in chosen if c not in known]
    if unknown:
      parser.error(f'unknown {name} {unknown}: choose from {list(known)}')
  if args.reps < 1 or args.batch < 1:
    parser.error('--reps and --batch must be >= 1')
  import torch

  torch.set_num_threads(args.torch_threads)
  result = dict(jax_backend=jax.default_backend(), jax_device=jax.devices()[0].device_kind,
                torch_version=torch.__version__, torch_threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
                batch=args.batch,
                reps=args.reps, parity_bound=PARITY_BOUND, load_start=[round(v, 2) for v in os.getloadavg()], rows=[])
  for size in sizes:
    for model in models:
      row = bench(model, size, args.batch, args.reps, args.torch_compile)
      print(f"{model} {size}: forward {row['forward']['ratio']:.2f}x, train {row['train']['ratio']:.2f}x, "
            f"parity {'ok' if row['parity']['ok'] else 'FAILED'}", flush=True)
      result['rows'].append(row)
  result['load_end'] = [round(v, 2) for v in os.getloadavg()]
  print_tables(result)
  if args.json:
    write_json(args.json, result, indent=1)
  if not all(r['parity']['ok'] for r in result['rows']):
    print(f'WARNING: parity beyond {PARITY_BOUND:g}: the two sides do not compute the same function', file=sys.stderr)
  return result


if __name__ == '__main__':
  main()
