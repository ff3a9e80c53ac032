"""FLOPs of one training step of a text-to-image config's network, from XLA's cost analysis (no compilation).

python -m benchmarks.backbone_flops configs/shapes_ldm.py configs/shapes_mmdit.py --latent_shape 8,8,4
python -m benchmarks.backbone_flops configs/shapes_mmdit.py --latent_shape 8,8,4 --set model.depth=6

For each config (``path[:arg]``): parameters, and the FLOPs of the network's forward and of its loss + gradient
on one batch of ``data.batch_size`` (the text encoder trained with it included; the optimizer's elementwise update,
~10 FLOPs per parameter, and the frozen VAE are not). ``--latent_shape`` (h,w,c): the frozen VAE's latent for a
latent-diffusion config (32 px shapes: 8,8,4); without it, the config's images. Counts come from the lowered,
unoptimised HLO, so they are the same on every backend; the FLOPs of an adaLN-modulated transformer depend on the
batch (its modulation weights act per sample), which is why this counts rather than using 6 x parameters x tokens.
Used to size configs/shapes_mmdit.py against configs/shapes_ldm.py (README: U-Net vs transformer).
"""

from __future__ import annotations

import argparse
import ast

import jax
import jax.numpy as jnp

from benchmarks.model_throughput import xla_flops
from diffjax import schema
from diffjax.train import trainer


def _load(spec: str, overrides: list[str]):
  """The config of ``path[:arg]`` (its ``get_config``) with ``field=value`` overrides (Python literals)."""
  config = schema.load_config_file(spec)
  for item in overrides:
    field, value = item.split("=", 1)
    *path, leaf = field.split(".")
    node = config
    for name in path:
      node = node[name]
    node[leaf] = ast.literal_eval(value)
  return config


def step_flops(config, latent_shape: tuple[int, int, int] | None = None) -> dict:
  """{'params', 'forward', 'train'}: parameter count and FLOPs of the forward and of loss + gradient on one batch."""
  if latent_shape is not None:  # the network as build_model makes it on the VAE's latents
    config.data.image_size, config.data.channels = latent_shape[0], latent_shape[2]
  model = trainer.build_model(config)
  b, length, side, ch = (config.data.batch_size, config.data.max_caption_length, config.data.image_size,
                         config.data.channels)
  x, t = jnp.zeros((b, side, side, ch)), jnp.full((b,), 0.5 * config.diffusion.get("time_scale", 1000.0))
  tokens = jnp.zeros((b, length), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), x[:1], t[:1], tokens[:1], tokens[:1]))["params"]
  loss = lambda p: jnp.mean(model.apply({"params": p}, x, t, tokens, tokens) ** 2)
  return dict(params=sum(v.size for v in jax.tree.leaves(params)), forward=xla_flops(jax.jit(loss), params),
              train=xla_flops(jax.jit(jax.grad(loss)), params))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("configs", nargs="+", help="config files, path[:arg]")
  parser.add_argument("--latent_shape", default="", help="h,w,c of the VAE's latent (latent-diffusion configs)")
  parser.add_argument("--set", action="append", default=[], help="field=value overrides for every config")
  args = parser.parse_args()
  latent = tuple(int(v) for v in args.latent_shape.split(",")) if args.latent_shape else None
  rows = []
  for spec in args.configs:
    config = _load(spec, args.set)
    rows.append((spec, config.data.batch_size, step_flops(config, latent)))
  base = rows[0][2]["train"]
  print("| config | batch | parameters | forward GFLOP | train step GFLOP | vs first |")
  print("|---|---|---|---|---|---|")
  for spec, batch, r in rows:
    print(f"| {spec} | {batch} | {r['params']:,} | {r['forward'] / 1e9:.2f} | {r['train'] / 1e9:.2f} | "
          f"{r['train'] / base:.2f}x |")


if __name__ == "__main__":
  main()
