"""The metric sanity suite (``diffjax.evaluate.sanity``) on the embedded digits, per feature space.

Reference: the digits test split (300 images); floor: 300 training images; degradations start
from those 300 and the diversity ones draw from the other 1,197 training images. Prints, per feature
space, what each metric got wrong and (``--tables``) the full markdown tables.

  python benchmarks/metric_sanity.py                      # classifier and contrastive features, raw pixels
  python benchmarks/metric_sanity.py --spaces classifier --tables
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
  from diffjax.evaluate import digits

  spaces = {}
  for name in names:
    if name == "pixels":
      spaces[name] = lambda x: np.asarray(x, np.float64).reshape(len(x), -1)
    elif name == "classifier":
      params, _ = digits.cached_digit_classifier(os.path.join(workdir, f"digit_classifier_{image_size}.npz"),
                                                 data_dir, image_size=image_size, seed=0)
      spaces[name] = lambda x, p=params: digits.features(p, x)
    elif name == "contrastive":
      from diffjax.evaluate import contrastive

      train, _ = digits.real_digits(data_dir, "train", image_size)
      params = contrastive.cached_encoder(os.path.join(workdir, f"contrastive_{image_size}.npz"), train, seed=0)
      spaces[name] = lambda x, p=params: contrastive.features(p, x)
    else:
      raise ValueError(f"unknown feature space {name!r}")
  return spaces


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--spaces", default="classifier,contrastive,pixels")
  parser.add_argument("--image-size", type=int, default=16)
  parser.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "diffjax_data"))
  parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "diffjax_metric_sanity"))
  parser.add_argument("--tables", action="store_true")
  args = parser.parse_args(argv)
  from diffjax.evaluate import digits, sanity

  os.makedirs(args.workdir, exist_ok=True)
  train, train_labels = digits.real_digits(args.data_dir, "train", args.image_size)
  test, _ = digits.real_digits(args.data_dir, "test", args.image_size)
  n = len(test)
  real, pool = (train[:n], train_labels[:n]), (train[n:], train_labels[n:])
  for name, features in feature_spaces(args.spaces.split(","), args.data_dir, args.image_size, args.workdir).items():
    start = time.time()
    table = sanity.run(features, test, real, pool)
    print(f"\n## {name} features ({time.time() - start:.0f} s)")
    for metric, bad in sanity.failures(table).items():
      print(f"  {metric:>16}: {'passes' if not bad else 'FAILS at ' + ', '.join(bad)}")
    if args.tables:
      for metric in sanity.SEES:
        print("\n" + sanity.markdown(table, metric))


if __name__ == "__main__":
  main()
