"""diffjax: diffusion models in JAX/Flax (see README.md for a tour)."""

from diffjax import losses, parameterization, processes, samplers
from diffjax.analytic import GaussianMixture
from diffjax.convert import load_pretrained, save_pretrained
from diffjax.processes import make_process
from diffjax.samplers import grids, guidance, make_solver, sample

__all__ = ["GaussianMixture", "grids", "guidance", "load_pretrained", "losses", "make_process", "make_solver",
           "parameterization", "processes", "sample", "samplers", "save_pretrained"]
