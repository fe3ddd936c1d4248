"""Cluster launch helpers: the torchrun/SLURM environment, SLURM job scripts, the local SLURM and the
Ray cluster file."""
