"""Metrics that judge samples."""
