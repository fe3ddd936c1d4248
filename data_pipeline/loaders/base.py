"""What every backend shares: the epoch plan, the position, labels, keys and the batch dict."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch

from base.errors import UserError
from data_pipeline.augment import draw_params
from data_pipeline.config import LoaderConfig
from data_pipeline.plan import RankPlan, epoch_order, rank_plan
from data_pipeline.reader import ShardIndex


class Loader:
    """Iterates one epoch of batches per `iter()`, then moves to the next epoch.

    The position is (epoch, offset): `offset` counts the samples of the epoch's global order
    that all ranks together have consumed. `state_dict()` after batch k, loaded into a new
    loader (at any world size), continues with batch k+1 of the same order and augmentation.
    """

    def __init__(self, index: ShardIndex | None, cfg: LoaderConfig, split: str, rank: int, world: int,
                 epoch: int, train: bool):
        self.index, self.cfg, self.split = index, cfg, split
        self.rank, self.world, self.train = rank, world, train
        self.batch_size = cfg.batch_size if train else (cfg.eval_batch_size or cfg.batch_size)
        self.epoch, self.offset = epoch, 0
        self.workers = cfg.workers if cfg.workers is not None else (len(os.sched_getaffinity(0)) or 1)
        self.skipped = 0  # samples replaced because they could not be decoded (on_bad_sample: skip)

    # ------------------------------------------------------------ position
    @property
    def num_samples(self) -> int:
        return len(self.index)

    @property
    def image_size(self) -> int:
        """The size this epoch's batches have: the progressive schedule's when training."""
        if not self.train:
            return self.cfg.image_size
        return self.cfg.progressive.size_at(self.epoch, self.cfg.image_size)

    def sized_cfg(self) -> LoaderConfig:
        """The loader config at this epoch's image size (what the backends build from)."""
        size = self.image_size
        return self.cfg if size == self.cfg.image_size else self.cfg.model_copy(update={"image_size": size})

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.offset = epoch, 0

    def plan(self) -> RankPlan:
        order = epoch_order(self.num_samples, self.cfg.seed, self.epoch, shuffle=self.train)
        return rank_plan(order, self.offset, self.rank, self.world, self.batch_size, self.train)

    def __len__(self) -> int:
        return len(self.plan().batches)

    def state_dict(self) -> dict:
        return {"split": self.split, "epoch": self.epoch, "offset": self.offset, "seed": self.cfg.seed,
                "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for k in ("split", "seed", "num_samples"):
            if state[k] != mine[k]:
                raise UserError(f"loader state is for {k}={state[k]!r}, this loader has {mine[k]!r}: not the same data")
        self.epoch, self.offset = state["epoch"], state["offset"]

    # ------------------------------------------------------------ batches
    def __iter__(self) -> Iterator[dict]:
        plan = self.plan()
        for idx, valid, (images, bad) in zip(plan.batches, plan.valid, self._images(plan)):
            self.offset += len(idx) * self.world
            yield self._batch(idx, valid, images, bad)
        self.epoch, self.offset = self.epoch + 1, 0

    def _params(self, idx: np.ndarray) -> np.ndarray | None:
        """Augmentation parameters of these samples in the current epoch (None: evaluation)."""
        if not self.train:
            return None
        if getattr(self, "_params_epoch", None) != self.epoch:
            self._epoch_params = draw_params(self.cfg.augment, self.cfg.seed, self.epoch, self.num_samples)
            self._params_epoch = self.epoch
        return self._epoch_params[idx]

    @property
    def with_body(self) -> bool:
        """The shards carry a second crop (`<key>.body.jpg`) for some samples: batches get "body"."""
        return bool(getattr(self.index, "has_body", False))

    def _batch(self, idx: np.ndarray, valid: np.ndarray, images, bad: set[int]) -> dict:
        """`images`: the face tensor, or (face, body) when the shards carry body crops; a sample
        without a body crop gets a zero (normalised) image, which is what MiVOLO reads as "none"."""
        labels = self.labels(idx)
        valid = valid.copy()
        valid[list(bad)] = False
        extra = {}
        if isinstance(images, tuple):
            images, body = images
            mask = torch.from_numpy(self.index.body_mask[idx]).to(body.device, body.dtype)
            extra["body"] = body * mask[:, None, None, None]
        return {"image": images, **extra, "age": torch.from_numpy(labels[:, 0].copy()),
                "gender": torch.from_numpy(labels[:, 1].astype(np.int64)),
                "race": torch.from_numpy(labels[:, 2].astype(np.int64)),
                "key": self.keys(idx), "valid": torch.from_numpy(valid)}

    def labels(self, idx: np.ndarray) -> np.ndarray:
        return self.index.labels(idx)

    def keys(self, idx: np.ndarray) -> list[str]:
        return [self.index.samples[i].key for i in idx]

    def _images(self, plan: RankPlan) -> Iterator[tuple[torch.Tensor | tuple[torch.Tensor, torch.Tensor], set[int]]]:
        """Per batch of the plan: (images, positions in the batch that could not be decoded);
        images are (face, body) when `with_body` (a missing body crop may hold anything: masked)."""
        raise NotImplementedError
