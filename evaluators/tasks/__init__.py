"""Bundled offline lm-eval tasks (YAML + data) and their generator, ``build_tasks``."""
