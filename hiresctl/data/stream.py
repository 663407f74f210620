"""Streams planned patch reads through DataLoader workers so reading overlaps compute.

A trainer plans the reads of an epoch up front (which patches of which image, in which order:
the no-grad latent fill, the global patch, then each inner iteration's sampled group). The plan
is the DataLoader's sampler; workers turn each request into a tensor and the trainer consumes
them in the same order while the next requests are already being read.
"""

from __future__ import annotations

import ctypes
import functools
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hiresctl.data.grid import NO_FLIP, PatchGrid
from hiresctl.data.reader import PatchReader, normalize


@dataclass(frozen=True)
class ReadTag:
    """What a planned read is for, as the method that planned it consumes it: its ``role`` in
    the step ("fill", "global", "group", "select", "image", "target", ...), the ``image`` it
    belongs to (its index in the batch), whether it is the ``last`` read of its group (an inner
    step, a selection, an image's chunks), and a ``number`` the role gives meaning to (the
    inner step of a group; a feature bag's seed; the position of a chunk's first patch)."""

    role: str
    image: int = 0
    last: bool = False
    number: int = 0


NO_TAG = ReadTag("read")


@dataclass(frozen=True)
class ReadRequest:
    """One read: ``indices`` of ``grid`` of ``image_id`` (kind "patches"), or its global patch."""

    image_id: str
    # "patches" | "global" | "mask" (labels under patches) | "mask_global" | "features" (the
    # image's stored feature set ``feature_set``: (N, D) float32; the grid is then unused)
    kind: str
    grid: PatchGrid
    indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    tag: ReadTag = NO_TAG  # the method's own bookkeeping
    feature_set: str = ""


class _RequestDataset(Dataset[tuple[ReadRequest, torch.Tensor]]):
    def __init__(self, reader: PatchReader, augment: Any = None) -> None:
        self.reader = reader
        self.augment = augment

    def __getitem__(self, request: ReadRequest) -> tuple[ReadRequest, torch.Tensor]:
        image_id, grid = request.image_id, request.grid
        # One mirror per image and epoch for pixels and labels alike; photometric changes
        # touch pixels only.
        flip = self.augment.flip(image_id) if self.augment is not None else NO_FLIP
        if request.kind == "mask":
            return request, self.reader.read_mask_patches(image_id, grid, request.indices, flip)
        if request.kind == "mask_global":
            return request, self.reader.read_mask_global(image_id, grid.patch_size, flip)
        if request.kind == "features":
            return request, self.reader.read_features(image_id, request.feature_set)
        if request.kind == "global":
            pixels = self.reader.read_global_unit(image_id, grid.patch_size, flip)
        else:
            pixels = self.reader.read_patches_unit(image_id, grid, request.indices, flip)
        if self.augment is not None:
            pixels = self.augment(pixels, image_id)
        return request, normalize(pixels)

    def __len__(self) -> int:  # a plan has no fixed length; the sampler decides
        return 0


def _request_bytes(request: ReadRequest) -> int:
    """Float32 bytes of a request's pixels (what it holds while it waits to be consumed)."""
    count = 1 if request.kind in ("global", "mask_global") else max(1, len(request.indices))
    channels = 2 if request.kind.startswith("mask") else 3  # int64 labels: 8 bytes a pixel
    return count * channels * request.grid.patch_size**2 * 4


@functools.cache
def _omp_set_num_threads() -> Any:
    """``omp_set_num_threads`` of the OpenMP runtime torch uses (Linux), or None: the one in
    torch's own folder, else the only one loaded (other packages bring their own copies, and
    setting another copy's count changes nothing for torch)."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    runtimes = {
        path
        for line in maps
        if Path(path := line.split()[-1]).name.startswith(("libgomp", "libomp", "libiomp5"))
    }
    home = Path(torch.__file__).parent
    torch_own = [path for path in runtimes if Path(path).is_relative_to(home)]
    chosen = torch_own or (sorted(runtimes) if len(runtimes) == 1 else [])
    if len(chosen) != 1:
        return None
    try:
        return ctypes.CDLL(chosen[0]).omp_set_num_threads
    except (OSError, AttributeError):
        return None


def one_compute_thread() -> None:
    """Run the calling thread's tensor work on one OpenMP thread, leaving every other thread's
    count as it is.

    The read-ahead thread converts and normalises pixels with torch while the step computes on
    all cores. With torch's own count (every core) it starts a second team of OpenMP threads
    that competes with the step's: on 2 cores a ResNet-18 step on a 256² image took 0.165 s
    beside it and 0.133 s with it on one thread (BENCHMARKS.md, E1). DataLoader workers run
    one thread each for the same reason. ``torch.set_num_threads`` cannot be used: it also
    sets the count that threads started later take. The OpenMP setting is per thread; torch's
    first parallel call in a thread resets it, so that call is made here first."""
    set_threads = _omp_set_num_threads()
    if set_threads is None:
        return
    torch.get_num_threads()  # torch sets this thread's OpenMP count on its first call
    set_threads(1)


def _threaded_reads(
    dataset: _RequestDataset, plan: Iterable[ReadRequest], ahead_bytes: int
) -> Iterator[tuple[ReadRequest, torch.Tensor]]:
    """Read ahead in a background thread while the caller computes (the decoders release the
    GIL), yielding in plan order. At most ``ahead_bytes`` of pixels wait (and always one
    request), so reading ahead never costs more memory than that, however large the requests."""
    requests = iter(plan)
    with ThreadPoolExecutor(
        1, thread_name_prefix="hiresctl-read", initializer=one_compute_thread
    ) as pool:
        pending: deque[tuple[int, Future[tuple[ReadRequest, torch.Tensor]]]] = deque()
        waiting = 0

        def submit() -> bool:
            nonlocal waiting
            request = next(requests, None)
            if request is None:
                return False
            size = _request_bytes(request)
            pending.append((size, pool.submit(dataset.__getitem__, request)))
            waiting += size
            return True

        more = True
        while True:
            while more and (not pending or waiting < ahead_bytes):
                more = submit()
            if not pending:
                return
            size, future = pending.popleft()
            done = future.result()
            waiting -= size
            yield done


def _identity(item: Any) -> Any:
    return item


class PatchStream:
    """Reads a sequence of :class:`ReadRequest` in order, ahead of the consumer: in a background
    thread of this process (``num_workers=0``) or in ``num_workers`` DataLoader processes."""

    def __init__(
        self,
        reader: PatchReader,
        num_workers: int = 0,
        prefetch: int = 2,
        augment: Any = None,
        ahead_bytes: int = 32 * 2**20,
    ) -> None:
        self.reader = reader
        self.num_workers = num_workers
        self.prefetch = prefetch  # requests per DataLoader worker
        self.ahead_bytes = ahead_bytes  # pixels the background thread may hold ahead
        self.dataset = _RequestDataset(reader, augment)

    def read(self, request: ReadRequest) -> torch.Tensor:
        """One request, read now in this thread (augmented as the stream's reads are)."""
        return self.dataset[request][1]

    def _threaded(self, plan: Iterable[ReadRequest]) -> Iterator[tuple[ReadRequest, torch.Tensor]]:
        return _threaded_reads(self.dataset, plan, self.ahead_bytes)

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


class PlannedReads:
    """One stream of reads for a sequence of image batches (each batch's plan, in order); hands
    each batch its own reads and counts the seconds spent waiting for them."""

    def __init__(self, stream: PatchStream, plans: Iterator[list[ReadRequest]]) -> None:
        self.lengths: deque[int] = deque()

        def flat() -> Iterator[ReadRequest]:
            for plan in plans:
                self.lengths.append(len(plan))
                yield from plan

        self._items = stream(flat())
        self.wait_seconds = 0.0

    def _next(self) -> tuple[ReadRequest, torch.Tensor]:
        start = time.perf_counter()
        item = next(self._items)
        self.wait_seconds += time.perf_counter() - start
        return item

    def batch(self) -> Iterator[tuple[ReadRequest, torch.Tensor]]:
        first = self._next()  # pulling the first read makes the plan's length known
        count = self.lengths.popleft()
        yield first
        for _ in range(count - 1):
            yield self._next()
