"""benchmarks/sampler_throughput.py: rows from simulated CPU meshes and from two jax.distributed processes.

Only that the benchmark runs and reports sane numbers is checked here (speed targets live in
benchmarks/, never in tests); the compile count over the sweep of guidance scales and seeds
must be exactly one program per point.
"""

import json
import math
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "sampler_throughput.py")
# The smallest useful run: the digits model, one solver at 2 evaluations, 1 image per device, a 2 x 2 sweep.
TINY = ["--models", "digits", "--solvers", "euler", "--nfe", "2", "--batch", "1", "--reps", "1",
        "--scales", "1,4", "--seeds", "0,1", "--platforms", "cpu"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _check_rows(rows, devices: int, processes: int):
  assert rows, "no rows"
  for r in rows:
    assert r["model"] == "digits" and r["solver"] == "euler" and r["nfe_used"] == 2
    assert r["devices"] == devices and r["processes"] == processes
    assert r["global_batch"] % devices == 0
    assert r["compilations"] == 1 and r["traces"] == 1 and r["jit_cache_size"] == 1, r
    assert r["finite"]
    for k in ("images_per_s", "nfe_per_s_per_device", "median_s", "cold_compile_s"):
      assert math.isfinite(r[k]) and r[k] > 0, (k, r[k])
    assert r["nfe_per_s_per_device"] == pytest.approx(r["images_per_s"] * 2 / devices)


def test_two_simulated_devices_rows_are_positive_and_compile_once(tmp_path):
  out_json = tmp_path / "rows.json"
  out = subprocess.run([sys.executable, SCRIPT, *TINY, "--devices", "2", "--no_warm", "--json", str(out_json)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  rows = json.loads(out_json.read_text())["rows"]
  _check_rows(rows, devices=2, processes=1)
  # one device count: it is its own baseline for both kinds of scaling
  assert [r["global_batch"] for r in rows] == [2]
  assert rows[0]["strong_efficiency"] == pytest.approx(1.0) and rows[0]["weak_efficiency"] == pytest.approx(1.0)
  assert "| cpu | digits | euler | 2 | 2 | 2 |" in out.stdout


@pytest.mark.slow
def test_one_and_two_devices_cold_and_warm_cache(tmp_path):
  out_json = tmp_path / "rows.json"
  out = subprocess.run([sys.executable, SCRIPT, *TINY, "--devices", "1,2", "--json", str(out_json)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  rows = json.loads(out_json.read_text())["rows"]
  assert sorted((r["devices"], r["global_batch"]) for r in rows) == [(1, 1), (1, 2), (2, 2)]
  for r in rows:
    assert r["compilations"] == 1 and r["warm_compile_s"] is not None
  strong = {r["devices"]: r["strong_efficiency"] for r in rows if r["global_batch"] == 2}
  weak = {r["devices"]: r["weak_efficiency"] for r in rows if r["global_batch"] == r["devices"]}
  assert strong[1] == pytest.approx(1.0) and weak[1] == pytest.approx(1.0)
  assert strong[2] > 0 and weak[2] > 0


@pytest.mark.slow  # ~30 s on 2 idle cores: the two processes share them
def test_two_processes_with_jax_distributed(tmp_path):
  port = _free_port()
  cmd = [sys.executable, SCRIPT, *TINY, "--devices", "1", "--no_warm", "--num_processes", "2",
         "--coordinator_address", f"127.0.0.1:{port}", "--cache_dir", str(tmp_path / "cache")]
  procs = [subprocess.Popen([*cmd, "--process_id", str(i)] + (["--json", str(tmp_path / "rows.json")] if i == 0
                                                              else []),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT) for i in range(2)]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=300))
    except subprocess.TimeoutExpired:  # a missing peer stalls the other: never leave it running
      for q in procs:
        q.kill()
      raise
  for p, (stdout, stderr) in zip(procs, outs, strict=True):
    assert p.returncode == 0, stdout[-2000:] + stderr[-3000:]
  assert "| cpu | digits | euler | 2 | 2 | 2 |" in outs[0][0]  # process 0 prints the row: 2 devices over 2 processes
  assert "|" not in outs[1][0]  # the other prints nothing
  _check_rows(json.loads((tmp_path / "rows.json").read_text())["rows"], devices=2, processes=2)
