"""Shared library of the duel pipeline: typed params, data, prompts, models, training, telemetry, evaluation, report."""
