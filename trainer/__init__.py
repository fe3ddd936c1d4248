"""Models, age methods, losses, metrics, the DeepSpeed training loop, evaluation and export; the
run's whole config (`run_config.py`)."""
