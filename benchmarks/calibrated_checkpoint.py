"""A calibrated (fitted) sampler against the classic ones on a trained checkpoint, on held-out noise and prompts.

For a workdir trained by the main job and its calibration file (``--mode=calibrate``), this
draws noise with seeds the calibration never used and prompts from sets it may not have seen,
solves the guided probability-flow ODE from that noise tightly (dopri5 at the calibration's
tolerance, error measured against tol / 10 on the first ``--check`` samples) and reports, per
(prompt set, guidance scale, NFE): the RMSE (and PSNR, images in [-1, 1]: peak-to-peak 2) of the
fitted sampler's output to that reference, of the best classic sampler at the same NFE (DPM-Solver++
2M/3M, UniPC, iPNDM and Euler, each on Karras, log-SNR and uniform-t grids) and of the best classic
sampler at twice the NFE, with the ratios. The fitted sampler runs with the coefficients fitted at
the calibration's guidance scale also at other scales ("transfer").

Several calibration files of the same weights (``--calibration=A,B,...``: e.g. without and with
``calibration.refine``, or made at another guidance scale) are scored on the same held-out noise,
references and classic runs: the table is the first file's, and a second table gives each file's
RMSE and ratio to the best classic sampler, marking where a file is used at another guidance scale
than its own.

  python benchmarks/calibrated_checkpoint.py --config=configs/default.py --workdir=/tmp/digits \\
      --calibration=/tmp/digits/calibration.json --json=/tmp/digits/held_out.json

``--sets``: ``seen`` = the calibration's prompts (``calibration.prompts`` or ``config.prompts``);
``unseen`` = the data set's other caption phrasings for the digits model (``digits.CAPTION_TEMPLATES``
after the first, which ``config.prompts`` uses), or ``--unseen_prompts`` (a file, one per line).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks.results import output_path  # noqa: E402
from diffjax.convert.files import write_json  # noqa: E402
from diffjax.data import digits  # noqa: E402
from diffjax.pipelines import calibrate  # noqa: E402
from diffjax.samplers import calibration, grids, make_solver, points_for_budget, sample  # noqa: E402
from diffjax.samplers import optimized_grids as og  # noqa: E402
from diffjax.train import trainer  # noqa: E402

CLASSIC_SOLVERS = ("dpmpp_2m", "dpmpp_3m", "unipc", "ipndm", "euler")
CLASSIC_GRIDS = {"karras": grids.karras, "log_snr": grids.log_snr_uniform, "uniform_t": grids.uniform_t}
HELD_OUT_SEED = 104729  # noise seed; the calibration's default is 7919 (config.calibration.seed)

_CONFIG = config_flags.DEFINE_config_file("config", None, "the training config of the workdir", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "trained workdir (newest checkpoint's EMA weights)")
_CALIBRATION = flags.DEFINE_list("calibration", None, "calibration files (--mode=calibrate) of the workdir's "
                                  "weights; the first is the table's, each other one a column of a second table")
_BATCH = flags.DEFINE_integer("batch", 256, "held-out noises per (prompt set, guidance scale)")
_NFE = flags.DEFINE_list("nfe", ["4", "5", "6", "8", "10"], "evaluation budgets")
_GUIDANCE = flags.DEFINE_list("guidance", [], "guidance scales (default: the calibration's, then 1.5x it)")
_SOLVERS = flags.DEFINE_list("solvers", list(CLASSIC_SOLVERS), "classic solvers compared (each on every grid)")
_SETS = flags.DEFINE_list("sets", ["unseen", "seen"], "prompt sets: unseen, seen")
_UNSEEN = flags.DEFINE_string("unseen_prompts", None, "file of unseen prompts, one per line")
_SEED = flags.DEFINE_integer("seed", HELD_OUT_SEED, "held-out noise and prompt seed")
_CHECK = flags.DEFINE_integer("check", 64, "samples whose reference is solved again at tol / 10")
_JSON = flags.DEFINE_string("json", None, "write the rows here")


def psnr(rmse: float) -> float:
  """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
  return float(20 * np.log10(2.0 / rmse))


def unseen_prompts(config) -> list[str]:
  """``--unseen_prompts``, else the digits captions in the phrasings ``config.prompts`` does not use."""
  if _UNSEEN.value:
    with open(_UNSEEN.value, encoding="utf-8") as f:
      return [line.strip() for line in f if line.strip()]
  seen = set(config.prompts)
  out = [digits.caption_for(d, k) for k in range(1, len(digits.CAPTION_TEMPLATES)) for d in range(10)]
  return [p for p in out if p not in seen]


def classic_rmses(process, denoise, x, context, target, nfe: int) -> dict[str, float]:
  """RMSE to ``target`` of every classic solver x grid at ``nfe`` evaluations (the largest grid that fits);
  ``denoise(x, t, context)``."""
  out = {}
  for name in _SOLVERS.value:
    solver = make_solver(name, process)
    points = points_for_budget(solver, nfe)
    if points < 2:
      continue
    run = jax.jit(lambda x, ts, c, solver=solver: sample(solver, functools.partial(denoise, context=c), x, ts))
    for grid, make in CLASSIC_GRIDS.items():
      y = run(x, jnp.asarray(make(process, points), jnp.float32), context)
      out[f"{name}/{grid}"] = rmse(y, target)
  return out


def rmse(y, target) -> float:
  return float(np.sqrt(np.mean((np.asarray(y, np.float64) - np.asarray(target, np.float64)) ** 2)))


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax's and tfds' INFO lines would bury the table
  config = _CONFIG.value
  try:
    output_path(_JSON.value)  # now, not after the hour of measuring
  except argparse.ArgumentTypeError as e:
    raise SystemExit(f"--json {e}") from None
  pipe, params, step = trainer.load_pipeline(config, _WORKDIR.value)
  key = trainer.calibration_key(config, params)
  budgets = [int(k) for k in _NFE.value]
  records, fitted = {}, {}  # file -> record, file -> {k: FittedSampler}
  for path in _CALIBRATION.value:
    records[path] = calibration.read_record(path)
    if records[path]["key"]["model"] != key["model"]:
      raise SystemExit(f"{path} was calibrated for other weights than {_WORKDIR.value}'s step {step}")
    fitted[path] = {k: og.FittedSampler.from_dict(records[path]["samplers"][str(k)]) for k in budgets
                    if str(k) in records[path]["samplers"]}
  main_file, record = _CALIBRATION.value[0], records[_CALIBRATION.value[0]]
  scale_of = {path: float(r["key"]["guidance_scale"]) for path, r in records.items()}
  calibrated_scale = scale_of[main_file]
  scales = [float(g) for g in _GUIDANCE.value] or [calibrated_scale, 1.5 * calibrated_scale]
  cal = config.calibration
  prompt_sets = {"seen": list(cal.get("prompts") or config.prompts), "unseen": unseen_prompts(config)}
  process, tol, size = pipe.process, float(record["reference"]["tol"]), config.data.image_size
  lattice = np.asarray(record["lattice"], np.float64)
  rows = []
  for set_index, set_name in enumerate(_SETS.value):
    noise, context = calibrate.prompted_noise(pipe, params, prompt_sets[set_name], _SEED.value, set_index, _BATCH.value,
                                              height=size, width=size)
    x = process.prior_std * noise
    for g in scales:
      guided = calibrate.guided_denoiser(pipe, params, g)
      t0 = time.time()
      _, target, evals = calibration.reference_paths(process, guided, x, context, lattice, tol=tol, chunk=cal.chunk,
                                                     keep_states=False, progress=True)
      n = min(_CHECK.value, x.shape[0])
      first = jax.tree.map(lambda a, n=n: a[:n], context)
      _, tight, _ = calibration.reference_paths(process, guided, x[:n], first, lattice, tol=tol / 10, chunk=n,
                                                keep_states=False)
      ref_error = rmse(tight, target[:n])
      print(f"# {set_name} prompts ({len(prompt_sets[set_name])}), guidance {g}: reference {time.time() - t0:.0f} s, "
            f"{evals} chunk evaluations, error vs tol/10 {ref_error:.2e}", flush=True)
      classic = {k: classic_rmses(process, guided, x, context, target, k)
                 for k in sorted(set(budgets) | {2 * k for k in budgets})}
      for k in budgets:
        best_name, best = min(classic[k].items(), key=lambda kv: kv[1])
        best2_name, best2 = min(classic[2 * k].items(), key=lambda kv: kv[1])
        by_file = {}
        for path, samplers in fitted.items():
          if k in samplers:
            run = jax.jit(lambda x, c, f=samplers[k], g=guided: f.sample(process, functools.partial(g, context=c), x))
            by_file[path] = {"rmse": rmse(run(x, context), target), "transfer": g != scale_of[path]}
        ours = by_file.get(main_file, {}).get("rmse", float("nan"))
        rows.append(dict(set=set_name, guidance=g, transfer=g != calibrated_scale, nfe=k, fitted=ours,
                         fitted_by_file=by_file,
                         fitted_psnr=psnr(ours), best=best, best_name=best_name, best_2x=best2, best_2x_name=best2_name,
                         ratio=ours / best, ratio_2x=ours / best2, reference_error=ref_error, classic=classic[k]))
  print("\n| prompts | guidance | NFE | fitted RMSE (PSNR) | best classic | ratio | best classic at 2x NFE | ratio |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    scale = f"{r['guidance']:g}" + (" (transfer)" if r["transfer"] else "")
    print(f"| {r['set']} | {scale} | {r['nfe']} | {r['fitted']:.4f} ({r['fitted_psnr']:.1f} dB) | {r['best']:.4f} "
          f"{r['best_name']} | {r['ratio']:.2f}x | {r['best_2x']:.4f} {r['best_2x_name']} | {r['ratio_2x']:.2f}x |")
  if len(fitted) > 1:  # every calibration on the same held-out batch and reference, against the best classic
    names = list(fitted)
    print("\n| prompts | guidance | NFE | " + " | ".join(names) + " | best classic |")
    print("|---|---|---|" + "---|" * len(names) + "---|")
    for r in rows:
      cells = []
      for path in names:
        got = r["fitted_by_file"].get(path)
        cells.append("-" if got is None else f"{got['rmse']:.4f} ({got['rmse'] / r['best']:.2f}x"
                     + (", transfer)" if got["transfer"] else ")"))
      print(f"| {r['set']} | {r['guidance']:g} | {r['nfe']} | " + " | ".join(cells) + f" | {r['best']:.4f} |")
  if _JSON.value:
    write_json(_JSON.value, dict(workdir=_WORKDIR.value, step=step, calibration=_CALIBRATION.value,
               seed=_SEED.value, batch=_BATCH.value, rows=rows), indent=1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir", "calibration"])
  app.run(main)
