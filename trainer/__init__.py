"""Models, age methods, metrics and the DeepSpeed training loop (later issues)."""
