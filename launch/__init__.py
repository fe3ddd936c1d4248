"""The top layer: the `agescale` CLI. It imports the stages; nothing imports it (tests/test_layers.py)."""
__version__ = "0.1.0"
