"""Random tensors of the contract's shapes, for measuring compute without any input cost."""

from __future__ import annotations

import numpy as np
import torch

from data_pipeline.loaders.base import Loader

SYNTHETIC_SAMPLES = 4096


class SyntheticLoader(Loader):
    @property
    def num_samples(self) -> int:
        return SYNTHETIC_SAMPLES

    def labels(self, idx: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng(self.cfg.seed)
        table = np.stack([rng.uniform(1, 90, SYNTHETIC_SAMPLES), rng.integers(0, 2, SYNTHETIC_SAMPLES),
                          rng.integers(0, 5, SYNTHETIC_SAMPLES)], axis=1).astype("<f4")
        return table[idx]

    def keys(self, idx: np.ndarray) -> list[str]:
        return [f"synthetic-{i}" for i in idx]

    def _images(self, plan):
        s = self.image_size
        gen = torch.Generator().manual_seed(self.cfg.seed)
        images = torch.randn(plan.batches.shape[1] if len(plan.batches) else 0, 3, s, s, generator=gen)
        for _ in plan.batches:
            yield images, set()
