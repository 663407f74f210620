"""Streams planned patch reads through DataLoader workers so reading overlaps compute.

A trainer plans the reads of an epoch up front (which patches of which image, in which order:
the no-grad latent fill, the global patch, then each inner iteration's sampled group). The plan
is the DataLoader's sampler; workers turn each request into a tensor and the trainer consumes
them in the same order while the next requests are already being read.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hiresctl.data.grid import PatchGrid
from hiresctl.data.reader import PatchReader, normalize


@dataclass(frozen=True)
class ReadRequest:
    """One read: ``indices`` of ``grid`` of ``image_id`` (kind "patches"), or its global patch."""

    image_id: str
    kind: str  # "patches" | "global"
    grid: PatchGrid
    indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    tag: Any = None  # the trainer's own bookkeeping (e.g. which inner iteration)


class _RequestDataset(Dataset[tuple[ReadRequest, torch.Tensor]]):
    def __init__(self, reader: PatchReader, augment: Any = None) -> None:
        self.reader = reader
        self.augment = augment

    def __getitem__(self, request: ReadRequest) -> tuple[ReadRequest, torch.Tensor]:
        if request.kind == "global":
            pixels = self.reader.read_global_unit(request.image_id, request.grid.patch_size)
        else:
            pixels = self.reader.read_patches_unit(request.image_id, request.grid, request.indices)
        if self.augment is not None:
            pixels = self.augment(pixels, request.image_id)
        return request, normalize(pixels)

    def __len__(self) -> int:  # a plan has no fixed length; the sampler decides
        return 0


def _threaded_reads(
    dataset: _RequestDataset, plan: Iterable[ReadRequest], ahead: int
) -> Iterator[tuple[ReadRequest, torch.Tensor]]:
    """Read ``ahead`` requests in a background thread while the caller computes (the decoders
    release the GIL), yielding in plan order."""
    requests = iter(plan)
    with ThreadPoolExecutor(1, thread_name_prefix="hiresctl-read") as pool:
        pending: deque[Future[tuple[ReadRequest, torch.Tensor]]] = deque()
        for request in itertools.islice(requests, ahead):
            pending.append(pool.submit(dataset.__getitem__, request))
        while pending:
            done = pending.popleft().result()
            following = next(requests, None)
            if following is not None:
                pending.append(pool.submit(dataset.__getitem__, following))
            yield done


def _identity(item: Any) -> Any:
    return item


class PatchStream:
    """Reads a sequence of :class:`ReadRequest` in order, ahead of the consumer: in a background
    thread of this process (``num_workers=0``) or in ``num_workers`` DataLoader processes."""

    def __init__(
        self, reader: PatchReader, num_workers: int = 0, prefetch: int = 4, augment: Any = None
    ) -> None:
        self.reader = reader
        self.num_workers = num_workers
        self.prefetch = prefetch
        self.dataset = _RequestDataset(reader, augment)

    def _threaded(self, plan: Iterable[ReadRequest]) -> Iterator[tuple[ReadRequest, torch.Tensor]]:
        return _threaded_reads(self.dataset, plan, self.prefetch)

    def __call__(self, plan: Iterable[ReadRequest]) -> Iterator[tuple[ReadRequest, torch.Tensor]]:
        if self.num_workers == 0:
            yield from self._threaded(plan)
            return
        loader = DataLoader(
            self.dataset,
            sampler=plan,
            batch_size=None,
            collate_fn=_identity,
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch,
        )
        yield from loader
