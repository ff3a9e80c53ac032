"""Sweeps: one ``diffjax.main`` run per point of a grid of config overrides, then one table of the scores.

Training sweep (each point trains in its own workdir):

  python -m experiments.sweep --config=configs/default.py --root=/tmp/lr_sweep \\
      --grid=optim.learning_rate=1e-3,2e-3,4e-3 --set=train.num_steps=500

Sampler ablation of one trained model (no retraining: ``--mode=evaluate`` on its checkpoint):

  python -m experiments.sweep --config=configs/default.py --root=/tmp/samplers --trained=/tmp/digits \\
      --grid=sampler.name=euler,heun,dpmpp_2m,unipc_bh2 --grid=sampler.nfe=5,10,20

``--grid=FIELD=V1,V2,...`` (repeatable) spans the cartesian product, the first flag outermost;
commas inside brackets or quotes do not split (``--grid=model.channels=(32,64),(64,128)``).
``--set=FIELD=V`` (repeatable) applies to every point. Each point runs in ``ROOT/<name>``
(its workdir when training, its ``--output`` when evaluating) with its log in ``log.txt``; a
point whose ``eval.json`` exists is skipped, so a sweep that stopped resumes where it was. A
failed point is reported in the table and the sweep goes on. Writes ``ROOT/results.csv``
(one row per point: the overrides, the status, every number of its eval.json, nested keys
joined by "/", each sample metric with its 95% interval) and prints it.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence


def split_values(text: str) -> list[str]:
  """'a,(1,2),"x,y"' -> ['a', '(1,2)', '"x,y"']: commas split only outside brackets and quotes."""
  values, depth, quote, current = [], 0, None, ""
  for ch in text:
    if quote:
      quote = None if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 0:
      values.append(current)
      current = ""
      continue
    current += ch
  if depth or quote:
    raise ValueError(f"unbalanced brackets or quotes in {text!r}")
  return values + [current]


def parse_override(text: str) -> tuple[str, str]:
  """'sampler.nfe=10' -> ('sampler.nfe', '10')."""
  field, sep, value = text.partition("=")
  if not sep or not field:
    raise ValueError(f"expected FIELD=VALUE, got {text!r}")
  return field.strip(), value


def grid_points(grid: Sequence[str]) -> list[dict[str, str]]:
  """The cartesian product of ``--grid`` flags as override dicts, the first flag outermost."""
  axes = []
  for flag in grid:
    field, values = parse_override(flag)
    axes.append([(field, v) for v in split_values(values)])
  fields = [a[0][0] for a in axes]
  if len(set(fields)) != len(fields):
    raise ValueError(f"a field appears in two --grid flags: {fields}")
  return [dict(p) for p in itertools.product(*axes)]


def point_name(point: dict[str, str]) -> str:
  """A folder name for a point: 'name=euler,nfe=10' (last field component; odd characters -> '-')."""
  if not point:
    return "base"
  text = ",".join(f"{field.rsplit('.', 1)[-1]}={value}" for field, value in point.items())
  return re.sub(r"[^A-Za-z0-9._=,+-]", "-", text)


def command(config: str, point: dict[str, str], fixed: dict[str, str], out_dir: str,
            trained: str | None) -> list[str]:
  """The ``python -m diffjax.main`` argv of one point."""
  argv = [sys.executable, "-m", "diffjax.main", f"--config={config}"]
  if trained:
    argv += ["--mode=evaluate", f"--workdir={trained}", f"--output={out_dir}"]
  else:
    argv += [f"--workdir={out_dir}"]
  return argv + [f"--config.{field}={value}" for field, value in {**fixed, **point}.items()]


def flatten(scores: dict, prefix: str = "") -> dict[str, float | str]:
  """The numbers of a nested eval.json, keys joined by '/'; a metric with an interval (an
  ``intervals.Estimate`` record) gives its value and a "<name> 95%" column "low..high"."""
  flat = {}
  for key, value in scores.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict) and "value" in value and "ci95" in value:
      low, high = value["ci95"]
      flat[name] = float(value["value"])
      flat[f"{name} 95%"] = f"{low:.4g}..{high:.4g}"
    elif isinstance(value, dict):
      flat |= flatten(value, name + "/")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      flat[name] = float(value)
  return flat


def _run_logged(argv: list[str], log_path: str) -> int:
  with open(log_path, "w") as log:
    log.write(f"$ {shlex.join(argv)}\n")  # the point's exact command, to rerun it alone
    log.flush()
    return subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, check=False).returncode


def run_sweep(config: str, root: str, grid: Sequence[str], fixed: Sequence[str] = (), trained: str | None = None,
              runner: Callable[[list[str], str], int] = _run_logged) -> list[dict]:
  """Runs every point not already done; returns the rows of ``ROOT/results.csv`` (also written).

  ``runner(argv, log_path)`` runs one command and returns its exit code (a subprocess by
  default; tests pass a stand-in).
  """
  fixed_overrides = dict(parse_override(f) for f in fixed)
  points = grid_points(grid)
  os.makedirs(root, exist_ok=True)
  rows, start = [], time.time()
  for i, point in enumerate(points, 1):
    name = point_name(point)
    out_dir = os.path.join(root, name)
    scores_path = os.path.join(out_dir, "eval.json")
    if os.path.exists(scores_path):
      status = "done before"
    else:
      os.makedirs(out_dir, exist_ok=True)
      print(f"[{i}/{len(points)}] {name} (sweep time {time.time() - start:.0f} s)", flush=True)
      code = runner(command(config, point, fixed_overrides, out_dir, trained), os.path.join(out_dir, "log.txt"))
      status = "ok" if code == 0 and os.path.exists(scores_path) else f"failed (exit {code}; see log.txt)"
    scores = flatten(json.loads(open(scores_path).read())) if os.path.exists(scores_path) else {}
    rows.append({**point, "status": status, **scores})
  _write_csv(rows, os.path.join(root, "results.csv"))
  return rows


def _columns(rows: list[dict]) -> list[str]:
  """Every key of the rows, in first-seen order (a failed point lacks the score columns)."""
  return list(dict.fromkeys(k for row in rows for k in row))


def _write_csv(rows: list[dict], path: str) -> None:
  columns = _columns(rows)
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)


def format_table(rows: list[dict]) -> str:
  """Rows as an aligned text table (numbers with 4 significant digits)."""
  columns = _columns(rows)
  cells = [[f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
           for row in rows]
  widths = [max(len(c), *(len(r[j]) for r in cells)) for j, c in enumerate(columns)]
  lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
  lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--config", required=True, help="config file, as for diffjax.main (FILE[:variant])")
  parser.add_argument("--root", required=True, help="folder of the sweep: one subfolder per point, results.csv")
  parser.add_argument("--grid", action="append", default=[], help="FIELD=V1,V2,... (repeatable)")
  parser.add_argument("--set", action="append", default=[], dest="fixed", help="FIELD=V for every point")
  parser.add_argument("--trained", default=None, help="workdir of a trained model: evaluate it, do not train")
  args = parser.parse_args(argv)
  rows = run_sweep(args.config, args.root, args.grid, args.fixed, args.trained)
  print(format_table(rows))
  print(f"written: {os.path.join(args.root, 'results.csv')}")
  return 1 if any(r["status"].startswith("failed") for r in rows) else 0


if __name__ == "__main__":
  sys.exit(main())
