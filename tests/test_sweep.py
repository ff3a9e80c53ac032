"""experiments/sweep.py: grid expansion, commands, resume, failures and the results table."""

import csv
import json
import os
import sys

import pytest

from experiments import sweep


def test_split_values_keeps_brackets_and_quotes():
  assert sweep.split_values("euler,heun") == ["euler", "heun"]
  assert sweep.split_values('(32,64),(64,128),"a,b"') == ["(32,64)", "(64,128)", '"a,b"']
  with pytest.raises(ValueError, match="unbalanced"):
    sweep.split_values("(1,2")


def test_grid_points_are_the_product_first_flag_outermost():
  points = sweep.grid_points(["sampler.name=euler,heun", "sampler.nfe=5,10,20"])
  assert len(points) == 6
  assert points[0] == {"sampler.name": "euler", "sampler.nfe": "5"}
  assert points[1] == {"sampler.name": "euler", "sampler.nfe": "10"}
  assert points[-1] == {"sampler.name": "heun", "sampler.nfe": "20"}
  assert len({sweep.point_name(p) for p in points}) == 6
  with pytest.raises(ValueError, match="two --grid"):
    sweep.grid_points(["a=1,2", "a=3"])
  with pytest.raises(ValueError, match="FIELD=VALUE"):
    sweep.grid_points(["sampler.nfe"])


def test_commands_train_or_evaluate():
  point = {"sampler.nfe": "10"}
  train = sweep.command("configs/default.py", point, {"train.num_steps": "5"}, "/r/p", None)
  assert train[:3] == [sys.executable, "-m", "diffjax.main"]
  assert train[3:] == ["--config=configs/default.py", "--workdir=/r/p", "--config.train.num_steps=5",
                       "--config.sampler.nfe=10"]
  ev = sweep.command("configs/default.py", point, {}, "/r/p", "/trained")
  assert ev[3:] == ["--config=configs/default.py", "--mode=evaluate", "--workdir=/trained", "--output=/r/p",
                    "--config.sampler.nfe=10"]


def test_run_sweep_resumes_reports_failures_and_writes_csv(tmp_path):
  calls = []

  def fake_runner(argv, log_path):  # 'evaluates': accuracy = nfe / 100, fails for heun
    calls.append(argv)
    out = next(a.split("=", 1)[1] for a in argv if a.startswith("--output="))
    assert os.path.dirname(log_path) == out
    overrides = dict(a[len("--config."):].split("=", 1) for a in argv if a.startswith("--config."))
    if overrides["sampler.name"] == "heun":
      return 3
    with open(os.path.join(out, "eval.json"), "w") as f:
      json.dump({"prompt_accuracy": int(overrides["sampler.nfe"]) / 100, "held_out": {"colour": 0.5},
                 "prompts": ["x"]}, f)
    return 0

  grid = ["sampler.name=euler,heun", "sampler.nfe=5,10"]
  rows = sweep.run_sweep("configs/default.py", str(tmp_path), grid, trained="/trained", runner=fake_runner)
  assert len(calls) == 4
  assert [r["status"] for r in rows] == ["ok", "ok", "failed (exit 3; see log.txt)", "failed (exit 3; see log.txt)"]
  assert rows[1]["prompt_accuracy"] == 0.10 and rows[1]["held_out/colour"] == 0.5 and "prompts" not in rows[1]
  with open(tmp_path / "results.csv") as f:
    table = list(csv.DictReader(f))
  assert [t["sampler.nfe"] for t in table] == ["5", "10", "5", "10"] and float(table[0]["prompt_accuracy"]) == 0.05
  assert "euler" in sweep.format_table(rows)

  # a second call runs only the points without eval.json (the failed ones)
  calls.clear()
  rows = sweep.run_sweep("configs/default.py", str(tmp_path), grid, trained="/trained", runner=fake_runner)
  assert len(calls) == 2 and all("--config.sampler.name=heun" in c for c in calls)
  assert rows[0]["status"] == "done before" and rows[0]["prompt_accuracy"] == 0.05
