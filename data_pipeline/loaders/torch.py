"""`torch` backend: PIL decode + torchvision.transforms.v2 in a DataLoader, one worker per core.

The standard recipe a user would write, kept as the baseline and the fallback. The main
process deals the shared plan's batches (sample indices + augmentation parameters) to the
workers, so order, labels and augmentation are exactly those of the DALI backend. Workers
are persistent and started by a forkserver: forking a process in which DALI's threads run
crashes the child, and a fresh worker per epoch would pay for importing torch each time.
"""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data_pipeline.augment import torch_image
from data_pipeline.loaders.base import Loader
from data_pipeline.reader import DataError, batch_error


class _DecodeBatch(Dataset):
    """Turns one dealt batch (indices, parameters or None, image size) into (images, bad positions, errors)."""

    def __init__(self, index, cfg, train: bool):
        self.index, self.cfg, self.train = index, cfg, train

    def __getitem__(self, item: tuple[np.ndarray, np.ndarray | None, int]):
        idx, params, size = item
        cfg = self.cfg if size == self.cfg.image_size else self.cfg.model_copy(update={"image_size": size})
        images, bodies, bad, errors = {}, {}, [], []
        for pos, i in enumerate(idx):
            try:
                pil = self.index.decode(i)
                body = self.index.decode(i, body=True) if self.index.has_body else None
            except DataError as e:
                bad.append(pos)
                errors.append(str(e))
                continue
            p = None if params is None else params[pos]
            images[pos] = torch_image(pil, p, cfg, self.train)
            if self.index.has_body:  # the same drawn parameters as the face (one flip for both)
                bodies[pos] = images[pos] if body is None else torch_image(body, p, cfg, self.train)
        if not images:
            return None, bad, errors
        stand_in = next(iter(images.values()))  # keeps shapes fixed; the position is marked invalid
        faces = torch.stack([images.get(pos, stand_in) for pos in range(len(idx))])
        if not self.index.has_body:
            return faces, bad, errors
        return (faces, torch.stack([bodies.get(pos, stand_in) for pos in range(len(idx))])), bad, errors


def _as_is(item):
    return item


class _Dealer(torch.utils.data.Sampler):
    """The batches of the current epoch, set by the loader before each pass."""

    def __init__(self):
        self.items: list = []

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class TorchLoader(Loader):
    _dl: DataLoader | None = None

    def _loader(self) -> DataLoader:
        if self._dl is None:
            self._dealer = _Dealer()
            extra = {}
            if self.workers:
                ctx = mp.get_context("forkserver")
                ctx.set_forkserver_preload(["torch", "torchvision", "data_pipeline.loaders.torch"])
                extra = dict(multiprocessing_context=ctx, persistent_workers=True, prefetch_factor=2)
            self._dl = DataLoader(_DecodeBatch(self.index, self.cfg, self.train), batch_size=None,
                                  sampler=self._dealer, num_workers=self.workers, collate_fn=_as_is, **extra)
        return self._dl

    def _images(self, plan):
        if len(plan.batches) == 0:
            return
        dl = self._loader()
        self._dealer.items = [(b, self._params(b), self.image_size) for b in plan.batches]
        for images, bad, errors in dl:
            if errors and (self.cfg.on_bad_sample == "error" or images is None):
                raise batch_error(errors)
            self.skipped += len(bad)
            yield images, set(bad)
