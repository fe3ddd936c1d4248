"""`dali` backend: NVIDIA DALI decodes and augments, on the GPU (`mixed` decode) or on the CPU.

One pipeline definition for both devices; only `device_id` and the decoder's device differ.
Samples are read through the shards' DALI index files (reader.py) and fed with
`feed_input`, batch by batch in the shared plan's order, with the per-sample augmentation
parameters as a second input. Why not `fn.readers.webdataset`: it reads each tar
sequentially, so it can neither start at sample k of a (seed, epoch) global order nor
re-deal an epoch at another world size on resume; everything after reading stays in DALI.
Up to `PREFETCH` batches are scheduled ahead, so DALI works while the trainer computes.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

from data_pipeline.augment import dali_images
from data_pipeline.loaders.base import Loader
from data_pipeline.reader import DataError, batch_error

PREFETCH = 2
# DALI 2.4's CPU decoder can crash the process (segfault) on bytes that are no image at all
# when it decodes with several threads; such samples are caught by their magic bytes first.
MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")


class DaliLoader(Loader):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.cfg.device == "gpu" and not torch.cuda.is_available():
            from base.errors import UserError
            raise UserError("data.loader.device=gpu but no CUDA device is visible; use data.loader.device=cpu")
        self._pipe, self._pipe_size = None, None

    def _build(self):
        from nvidia.dali import Pipeline, fn, types

        gpu = self.cfg.device == "gpu"
        cfg = self.sized_cfg()
        self._pipe_size = cfg.image_size
        # Default: one thread more than cores. DALI's CPU executor leaves cores idle between
        # operators and while this thread feeds it; cores + 1 threads measured +25-35 % img/s
        # with 2 cores (cores + 2 gave nothing more). An explicit `workers` is taken as is.
        threads = self.workers if self.cfg.workers is not None else self.workers + 1
        pipe = Pipeline(batch_size=self.batch_size, num_threads=max(1, threads),
                        device_id=torch.cuda.current_device() if gpu else None, seed=self.cfg.seed,
                        prefetch_queue_depth=1, exec_async=True, exec_pipelined=True)
        with pipe:
            jpegs = fn.external_source(name="jpegs", dtype=types.UINT8, batch=True)
            params = fn.external_source(name="params", dtype=types.FLOAT, batch=True) if self.train else None
            outputs = [dali_images(jpegs, params, cfg, self.train, self.cfg.device)]
            if self.with_body:  # the body crop through the same graph, with the face's parameters
                bodies = fn.external_source(name="bodies", dtype=types.UINT8, batch=True)
                outputs.append(dali_images(bodies, params, cfg, self.train, self.cfg.device))
            pipe.set_outputs(*outputs)
        pipe.build()
        return pipe

    def _feed(self, idx: np.ndarray, replace: dict[int, int]) -> dict[int, int]:
        """Feed one batch; `replace` maps batch positions to stand-ins for undecodable samples.
        Returns `replace` grown by the samples whose bytes are not an image."""
        data = [self.index.image_bytes(i) for i in idx]
        # a sample without a body crop decodes its face as the body (masked to zeros later)
        bodies = [self.index.image_bytes(i, body=True) or d for i, d in zip(idx, data)] if self.with_body else data
        bad = {pos: f"{self.index.where(i)}: not a JPEG or PNG (bad magic bytes)"
               for pos, (i, d, b) in enumerate(zip(idx, data, bodies))
               if not (d.startswith(MAGIC) and b.startswith(MAGIC)) and pos not in replace}
        if bad:
            replace = {**replace, **self._stand_ins(idx, bad, replace)}
        src = [replace.get(pos, pos) for pos in range(len(idx))]
        self._pipe.feed_input("jpegs", [np.frombuffer(data[p], dtype=np.uint8) for p in src])
        if self.with_body:
            self._pipe.feed_input("bodies", [np.frombuffer(bodies[p], dtype=np.uint8) for p in src])
        if self.train:
            self._pipe.feed_input("params", np.ascontiguousarray(self._params(idx[src])))  # one dense batch
        self._pipe.schedule_run()
        return replace

    def _stand_ins(self, idx: np.ndarray, bad: dict[int, str], replace: dict[int, int]) -> dict[int, int]:
        """Error mode: raise naming the sample. Skip mode: a good sample of the batch stands in."""
        if self.cfg.on_bad_sample == "error":
            raise batch_error(list(bad.values())) from None
        good = [pos for pos in range(len(idx)) if pos not in bad and pos not in replace]
        if not good:
            raise DataError(f"every sample of a batch is undecodable, e.g. {next(iter(bad.values()))}") from None
        return {pos: good[0] for pos in bad}

    def _to_torch(self, out) -> torch.Tensor:
        tensor = out.as_tensor()
        if self.cfg.device == "gpu":
            from nvidia.dali.plugin.pytorch import feed_ndarray
            dst = torch.empty(tensor.shape(), dtype=torch.float32, device=torch.cuda.current_device())
            feed_ndarray(tensor, dst, cuda_stream=torch.cuda.current_stream())
            return dst
        return torch.from_numpy(np.array(tensor))  # copy: DALI reuses its buffers

    def _find_bad(self, idx: np.ndarray) -> dict[int, str]:
        """Which samples of a failed batch are undecodable (only on the error path)."""
        bad = {}
        for pos, i in enumerate(idx):
            try:
                self.index.decode(i)
                if self.with_body:
                    self.index.decode(i, body=True)
            except DataError as e:
                bad[pos] = str(e)
        return bad

    def _images(self, plan):
        if self._pipe is None or self._pipe_size != self.image_size:  # a new progressive-resize size
            self._pipe = self._build()
        pending = deque()  # (batch index, replacements) fed and scheduled, not yet collected
        nxt = 0
        while nxt < len(plan.batches) and len(pending) < PREFETCH:
            pending.append((nxt, self._feed(plan.batches[nxt], {})))
            nxt += 1
        while pending:
            b, replace = pending[0]
            try:
                outs = self._pipe.outputs()
            except RuntimeError as err:
                self._recover(plan, pending, err)
                continue
            pending.popleft()
            if nxt < len(plan.batches):
                pending.append((nxt, self._feed(plan.batches[nxt], {})))
                nxt += 1
            self.skipped += len(replace)
            images = tuple(self._to_torch(o) for o in outs)
            yield (images if self.with_body else images[0]), set(replace)

    def _recover(self, plan, pending: deque, err: RuntimeError) -> None:
        """A batch failed in DALI: name the bad sample, or (skip mode) rebuild and re-feed."""
        b, replace = pending[0]
        bad = {pos: why for pos, why in self._find_bad(plan.batches[b]).items() if pos not in replace}
        if not bad:
            raise err
        replace = {**replace, **self._stand_ins(plan.batches[b], bad, replace)}
        self._pipe = self._build()  # a pipeline that raised is not reused
        refeed = [(b, replace)] + list(pending)[1:]
        pending.clear()
        for x, rep in refeed:
            pending.append((x, self._feed(plan.batches[x], rep)))
