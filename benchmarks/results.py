"""Where a benchmark writes its results (``--json``): the folder made and checked when the run starts, not after
an hour of measuring (the file is then written whole or not at all by ``diffjax.convert.files.write_json``)."""

import argparse
import os


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
