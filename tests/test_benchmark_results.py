"""Where benchmarks write their ``--json`` results: the folder made and checked at start, the file written whole."""

import argparse
import json

import pytest

from benchmarks import sampler_accuracy
from benchmarks.results import output_path
from diffjax.convert.files import write_json


def test_the_json_folder_is_made_when_the_arguments_are_read(tmp_path):
  path = tmp_path / "new" / "folder" / "out.json"
  args = sampler_accuracy.parse_args(["--json", str(path)])
  assert args.json == str(path) and path.parent.is_dir() and not path.exists()
  assert output_path("") == "" and output_path(None) is None


def test_a_json_path_that_cannot_be_written_is_refused_before_the_run(tmp_path, capsys):
  (tmp_path / "a_file").write_text("")
  bad = str(tmp_path / "a_file" / "out.json")
  with pytest.raises(argparse.ArgumentTypeError, match="out.json: cannot make its folder"):
    output_path(bad)
  with pytest.raises(SystemExit):  # argparse's usage error, before any measuring
    sampler_accuracy.parse_args(["--json", bad])
  assert "argument --json" in capsys.readouterr().err


def test_the_results_are_written_whole(tmp_path):
  path = tmp_path / "out.json"
  path.write_text("old")
  write_json(str(path), {"rmse": 0.5, "rows": [1, 2]}, indent=1)
  assert json.loads(path.read_text()) == {"rmse": 0.5, "rows": [1, 2]}
  assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary file left beside it
  with pytest.raises(TypeError):
    write_json(str(path), {"x": object()})
  assert json.loads(path.read_text()) == {"rmse": 0.5, "rows": [1, 2]}  # a failed write leaves the old file
