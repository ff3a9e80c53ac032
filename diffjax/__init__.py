"""diffjax: diffusion models in JAX/Flax."""
