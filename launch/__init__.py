"""Entry points: the `agescale` CLI, config loading and benchmarks' drivers."""
__version__ = "0.1.0"
