"""Training: state, step functions, the trainer, sharding, checkpoints."""
