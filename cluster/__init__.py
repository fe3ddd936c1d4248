"""Cluster launch helpers: SLURM templates, torchrun/SLURM environment (later issues)."""
