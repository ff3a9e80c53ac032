"""Datasets (TFDS builders for embedded data) and grain input pipelines."""
