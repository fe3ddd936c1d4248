"""`create_loader`: one factory and one batch contract over every backend.

Batch contract (a dict), the same from every backend:
  image  float32 (N, 3, S, S), normalised     age    float32 (N,) years
  gender int64 (N,), -1 unknown               race   int64 (N,), -1 unknown
  key    list[str]                            valid  bool (N,): False marks evaluation padding
Backends: `dali` (device cpu or gpu: one pipeline definition), `torch` (PIL +
torchvision.transforms.v2 in a DataLoader; the baseline and fallback), `synthetic` (random
tensors of the right shape, for measuring compute alone).
"""

from __future__ import annotations

from base.errors import UserError
from data_pipeline.config import DataConfig
from data_pipeline.loaders.base import Loader
from data_pipeline.reader import ShardIndex


def create_loader(cfg: DataConfig, split: str, rank: int = 0, world_size: int = 1, epoch: int = 0,
                  train: bool | None = None) -> Loader:
    """Batches of `split` for this rank. `train` (default: split == 'train') shuffles per
    (seed, epoch), augments and drops the uneven tail; otherwise the stored order, the eval
    transform and padding marked invalid."""
    lc = cfg.loader
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} outside world size {world_size}")
    train = split == "train" if train is None else train
    if lc.backend == "synthetic":
        from data_pipeline.loaders.synthetic import SyntheticLoader
        return SyntheticLoader(None, lc, split, rank, world_size, epoch, train)
    index = ShardIndex(lc.shards, split)
    if len(index) == 0:
        raise UserError(f"{lc.shards}: split {split!r} has no samples")
    if lc.backend == "dali":
        from data_pipeline.loaders.dali import DaliLoader
        return DaliLoader(index, lc, split, rank, world_size, epoch, train)
    from data_pipeline.loaders.torch import TorchLoader
    return TorchLoader(index, lc, split, rank, world_size, epoch, train)


__all__ = ["Loader", "create_loader"]
