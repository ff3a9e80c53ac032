"""The metric sanity suite (``diffjax.evaluate.sanity``) on the embedded data sets, per feature space.

Digits: reference = the test split (300 images); floor = 300 training images, drawn anew in each
of ``--repeats`` draws, and the diversity degradations draw from the other 1,197. Shapes:
reference = the validation split (1,000); floor = 288 of the first 4,000 training images (the
classes are colour/shape pairs). Prints, per feature space, what each metric got wrong, a summary
table and (``--tables``) the full markdown tables; writes ``degradations_<data>.png`` (a row per
degradation: the floor image, then every level) to ``--workdir``.

  python benchmarks/metric_sanity.py                 # digits: the joined space (evaluate.features), its towers, pixels
  python benchmarks/metric_sanity.py --spaces joined --tables --seed 1
  python benchmarks/metric_sanity.py --data shapes --tables
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def feature_spaces(names, data_dir: str, image_size: int, workdir: str) -> dict:
  """name -> images -> features: the joined digits space of ``evaluate.features``, each of its towers, pixels."""
  from diffjax.evaluate import digits, features

  networks = features.digit_networks(os.path.join(workdir, f"{image_size}px"), data_dir, image_size=image_size,
                                     seed=0)
  joined = features.digit_feature_space(*networks, digits.real_digits(data_dir, "train", image_size)[0])
  choices = {"joined": joined, "classifier": joined.towers[0], "contrastive": joined.towers[1],
             "pixels": lambda x: np.asarray(x, np.float64).reshape(len(x), -1)}
  unknown = sorted(set(names) - set(choices))
  if unknown:
    raise ValueError(f"unknown feature spaces {unknown}: use some of {sorted(choices)}")
  return {name: choices[name] for name in names}


def draw_degradations(images, labels, pool, path: str) -> None:
  """A PNG: one row per degradation, the first image at the floor and at every level."""
  from diffjax import images as image_io
  from diffjax.evaluate import sanity

  rng = np.random.default_rng(0)
  rows, names = [], []
  for kind in sanity.FIDELITY + sanity.DIVERSITY:
    cells = [images[:1]] + [sanity.degrade(kind, level, images, labels, pool, rng)[:1] for level in sanity.LEVELS[kind]]
    rows.append(np.concatenate(cells))
    names.append(kind)
  image_io.save_labeled_grid(image_io.to_uint8(np.concatenate(rows)), names, path, min_width=320)


def setup(data: str, data_dir: str, image_size: int, workdir: str, names):
  """(reference images, (real images, labels), n, {name: feature space}) of a data set's suite."""
  from diffjax.evaluate import digits, features, shapes

  if data == "digits":
    train, train_labels = digits.real_digits(data_dir, "train", image_size)
    test, _ = digits.real_digits(data_dir, "test", image_size)
    return test, (train, train_labels), len(test), feature_spaces(names, data_dir, image_size, workdir)
  # The shapes: the trainer's comparison (36 captions x 8 samples against 1,000 validation images); only the
  # shipped space (the Frechet distance of 3,072-d raw pixels takes minutes per cell).
  train = features.shapes_real(data_dir)
  space = features.shapes_feature_space(features.shapes_network(workdir, data_dir, seed=0), train[0])
  return shapes.real_shapes(data_dir, "validation")[0], train, 36 * 8, {"contrastive": space}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data", default="digits", choices=("digits", "shapes"))
  parser.add_argument("--spaces", default="joined,classifier,contrastive,pixels", help="digits only")
  parser.add_argument("--image-size", type=int, default=8, help="digits only")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--seed", type=int, default=0, help="of the draws (the networks always train with seed 0)")
  parser.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "diffjax_data"))
  parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "diffjax_metric_sanity"))
  parser.add_argument("--tables", action="store_true")
  args = parser.parse_args(argv)
  from diffjax.evaluate import sanity

  os.makedirs(args.workdir, exist_ok=True)
  reference, (images, labels), n, spaces = setup(args.data, args.data_dir, args.image_size, args.workdir,
                                                 args.spaces.split(","))
  draw_degradations(images[:n], labels[:n], (images[n:], labels[n:]),
                    os.path.join(args.workdir, f"degradations_{args.data}.png"))
  tables = {}
  for name, features in spaces.items():
    start = time.time()
    tables[name] = table = sanity.run(features, reference, (images, labels), n, repeats=args.repeats, seed=args.seed)
    print(f"\n## {name} features ({time.time() - start:.0f} s, {args.repeats} draws)")
    for metric, bad in sanity.failures(table).items():
      print(f"  {metric:>16}: {'passes' if not bad else 'FAILS at ' + ', '.join(bad)}")
    if args.tables:
      for metric in sanity.SEES:
        print("\n" + sanity.markdown(table, metric))
  print("\n" + sanity.summary(tables))


if __name__ == "__main__":
  main()
