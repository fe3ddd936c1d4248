"""Hyperparameter search: Ray Tune sweeps whose trials are real training runs."""
