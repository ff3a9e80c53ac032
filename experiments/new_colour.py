"""A folder of shapes in a colour the shapes captions never name, captioned with a new token, for textual inversion.

    python -m experiments.new_colour --out=/tmp/orange --token="<orange>" --rgb=255,140,0 --num=16
    python -m diffjax.main --config=configs/finetune.py --workdir=/tmp/ti_orange \
        --config.base=/tmp/shapes_ldm --config.vae_workdir=/tmp/shapes_vae --config.method=textual_inversion \
        --config.textual_inversion.token="<orange>" --config.textual_inversion.initializer=red \
        --config.instance.folder=/tmp/orange --config.prior.weight=0 --config.eval.token_colour=255,140,0

(The colour must be one the shapes VAE can draw: it reconstructs orange, and turns purple, grey or white green;
README, Fine-tuning.) Writes ``NNNN.png`` (32 x 32 RGB, the shapes data's renderer) and ``metadata.jsonl`` lines
``{"file_name": "0000.png", "text": "two <orange> circles at the top"}``: random shape, count
and position per image (seeded), every caption in the data's grammar with the token for the
colour. With ``eval.token_colour`` the fine-tuning job judges its samples' colour against the
data's four colours and this one (nearest mean colour of the shapes' pixels).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from PIL import Image

from diffjax.data import shapes


def write_folder(out: str, token: str, rgb: tuple[int, int, int], num: int, seed: int = 0) -> list[str]:
  """Renders ``num`` images into ``out`` with their ``metadata.jsonl``; returns the captions."""
  if token in shapes.COLOURS or len(token) < 2:
    raise ValueError(f"the token {token!r} must be a new word of at least two characters")
  os.makedirs(out, exist_ok=True)
  rng = np.random.default_rng(seed)
  colours = {token: tuple(rgb)}
  captions = []
  with open(os.path.join(out, "metadata.jsonl"), "w") as meta:
    for i in range(num):
      shape = shapes.SHAPES[rng.integers(len(shapes.SHAPES))]
      count = int(rng.integers(1, 4))
      position = shapes.POSITIONS[rng.integers(len(shapes.POSITIONS))]
      name = f"{i:04d}.png"
      Image.fromarray(shapes.render(token, shape, count, position, rng, colours)).save(os.path.join(out, name))
      captions.append(shapes.caption(token, shape, count, position))
      meta.write(json.dumps({"file_name": name, "text": captions[-1]}) + "\n")
  return captions


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True)
  parser.add_argument("--token", default="<purple>")
  parser.add_argument("--rgb", default="170,40,210", help="R,G,B of the new colour")
  parser.add_argument("--num", type=int, default=16)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  rgb = tuple(int(v) for v in args.rgb.split(","))
  captions = write_folder(args.out, args.token, rgb, args.num, args.seed)
  print(f"{len(captions)} images in {args.out}, e.g. {captions[0]!r}")


if __name__ == "__main__":
  main()
