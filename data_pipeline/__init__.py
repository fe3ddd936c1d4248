"""Data path: dataset adapters → deterministic splits → WebDataset shards (+ DALI index, manifest)."""
