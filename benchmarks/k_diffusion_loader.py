"""k-diffusion's samplers without its package ``__init__`` (shared by the sampler benchmark and parity tests).

``pip install --no-deps k-diffusion`` (its dependencies would pull a CUDA torch and
more); the package ``__init__`` then fails on missing imports, but ``sampling.py``
needs only torch, scipy and one helper of ``k_diffusion.utils``.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import types


def load_k_diffusion_sampling():
  """k_diffusion/sampling.py without the package __init__ (which imports missing deps), or None.

  Its ``from . import utils`` gets a stub package with the one helper it uses
  (append_dims); torchdiffeq / torchsde, imported at module level but unused by the
  samplers run here, are stubbed when missing.
  """
  spec = importlib.util.find_spec("k_diffusion")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "sampling.py"
  pkg_name = "_kdiff_sampling"
  pkg = types.ModuleType(pkg_name)
  pkg.__path__ = []
  utils = types.ModuleType(pkg_name + ".utils")
  utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
  pkg.utils = utils
  stubs = {pkg_name: pkg, pkg_name + ".utils": utils}
  for dep in ("torchdiffeq", "torchsde"):
    if importlib.util.find_spec(dep) is None:
      stub = types.ModuleType(dep)
      stub.odeint = stub.BrownianTree = None
      stubs[dep] = stub
  saved = {k: sys.modules.get(k) for k in stubs}
  sys.modules.update(stubs)
  try:
    mod_spec = importlib.util.spec_from_file_location(pkg_name + ".sampling", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
  finally:
    for k, v in saved.items():
      if v is None:
        sys.modules.pop(k, None)
      else:
        sys.modules[k] = v
  return module
