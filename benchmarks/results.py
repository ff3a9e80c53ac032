"""Where a benchmark writes its results (``--json``): the folder made and checked when the run starts, not after
an hour of measuring, and the file written whole or not at all."""

import argparse
import json
import os

from diffjax.convert.files import write_atomically


def output_path(path: str | None) -> str | None:
  """``path`` as given ('' or None: no file), its folder made now; argparse's ``type=`` for ``--json``
  (an ``ArgumentTypeError`` naming the folder when it cannot be made or written)."""
  if path:
    folder = os.path.dirname(os.path.abspath(path))
    try:
      os.makedirs(folder, exist_ok=True)
    except OSError as e:
      raise argparse.ArgumentTypeError(f"{path}: cannot make its folder ({e.strerror})") from None
    if not os.access(folder, os.W_OK):
      raise argparse.ArgumentTypeError(f"{path}: cannot write into {folder}")
  return path


def write_json(path: str, obj, **dump_options) -> None:
  """``obj`` as JSON in ``path`` (``json.dump``'s options, e.g. ``indent``), replacing it whole."""
  def write(tmp):
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(obj, f, **dump_options)
      f.write("\n")
  write_atomically(path, write)
