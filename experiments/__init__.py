"""Experiment launchers: sweeps over config overrides (see README.md)."""
