"""Serving side: reads an export bundle with ONNX Runtime, NumPy and Pillow only.

Nothing here may import torch, DeepSpeed, DALI, Ray or this repo's training packages; a test
checks that `agescale predict` runs with none of them in sys.modules.
"""
