"""diffjax: diffusion models in JAX/Flax (see README.md for a tour)."""

from diffjax import xla_cpu

xla_cpu.apply()  # before anything creates the XLA backend (see diffjax/xla_cpu.py)

from diffjax import losses, parameterization, processes, samplers  # noqa: E402
from diffjax.analytic import GaussianMixture  # noqa: E402
from diffjax.convert import load_pretrained, save_pretrained  # noqa: E402
from diffjax.processes import make_process  # noqa: E402
from diffjax.samplers import grids, guidance, make_solver, sample  # noqa: E402

__all__ = ["GaussianMixture", "grids", "guidance", "load_pretrained", "losses", "make_process", "make_solver",
           "parameterization", "processes", "sample", "samplers", "save_pretrained"]
