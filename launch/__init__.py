"""Launching a run: config tree, model resolution, process spawning, evaluation, plots."""
