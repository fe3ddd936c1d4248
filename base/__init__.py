"""The bottom layer: errors, output-path checks, image-mode conversion and config I/O.

Every stage and the CLI import it; it imports no stage and not the CLI (tests/test_layers.py).
"""
