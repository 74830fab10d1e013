"""Evaluation of dynamic pipelines."""
