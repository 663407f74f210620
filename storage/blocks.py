"""The block engine of ``tile``: one dask task reads one level-0 block from its source, writes
it and halves it through the levels of its pass; every array it writes is opened once per
process and cached (docs/design.md, the store)."""

from __future__ import annotations

import resource
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from storage.chunks import DirectChunks
from storage.errors import FILES, NoSpaceError, SourceError, StoreError, no_space
from storage.inputs import SourceSpec, TileOptions
from storage.passthrough import source_tile
from storage.pyramid import halve, halve_mode
from storage.readers import (
    SourceReader,
)


@dataclass(frozen=True, slots=True)
class BlockJob:
    """One task: one block footprint through the levels of one pass. Picklable for dask."""

    store: str
    group: str
    spec: SourceSpec
    options: TileOptions
    pass_index: int
    base_level: int  # level read (0: the source; else a level in the store)
    top_level: int  # last level written by this pass
    block: int  # block side in base-level pixels
    row: int
    col: int
    labels: bool = False  # a label image: levels by 2x2 mode, not mean
    copied: int = 0  # pass 0: levels 0 .. copied - 1 are the source's JPEG tiles, copied


_cache_lock = threading.Lock()
_readers: OrderedDict[tuple[SourceSpec, TileOptions], SourceReader] = OrderedDict()
_users: dict[tuple[SourceSpec, TileOptions], int] = {}  # tasks holding each reader now
IDLE_READERS = 32
_arrays: dict[tuple[str, str], zarr.Array] = {}
_directs: dict[tuple[str, str], DirectChunks | None] = {}


def _cached(cache: dict[Any, Any], key: Any, make: Callable[[], Any]) -> Any:
    """``cache[key]``, made once per process (tasks on several threads share it)."""
    with _cache_lock:
        if key not in cache:
            cache[key] = make()
        return cache[key]


@contextmanager
def borrowed_reader(spec: SourceSpec, options: TileOptions) -> Iterator[SourceReader]:
    """The source's reader, opened once per process and shared by the tasks on its threads.

    Readers nobody holds stay open for the next task, up to :data:`IDLE_READERS` of them; the
    least recently used beyond that are closed, so a run over ten thousand files keeps a few
    dozen open, never one (or four descriptors) per file."""
    key = (spec, options)
    with _cache_lock:
        reader = _readers.get(key)
        if reader is None:
            reader = _readers[key] = _open(spec, options)
        _readers.move_to_end(key)
        _users[key] = _users.get(key, 0) + 1
    try:
        yield reader
    finally:
        with _cache_lock:
            _users[key] -= 1
            if not _users[key]:
                del _users[key]
            idle = _idle()
            for old in idle[: max(0, len(idle) - _idle_readers())]:  # oldest first
                _readers.pop(old).close()


def _idle() -> list[tuple[SourceSpec, TileOptions]]:
    """The open readers no task holds, least recently used first (under the cache's lock)."""
    return [k for k in _readers if k not in _users]


def _idle_readers() -> int:
    """How many readers nobody holds may stay open: :data:`IDLE_READERS`, fewer under a low
    open-file limit (a reader holds a descriptor or two; the store's writes need theirs)."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return IDLE_READERS if limit == resource.RLIM_INFINITY else min(IDLE_READERS, limit // 32)


def _open(spec: SourceSpec, options: TileOptions) -> SourceReader:
    """Open a source; out of file descriptors, close the idle readers and try once more."""
    try:
        return spec.open(options)
    except Exception as exc:
        full = no_space(exc)
        idle = _idle()
        if full is None or full.errno not in FILES or not idle:
            raise
    for key in idle:
        _readers.pop(key).close()
    return spec.open(options)


def _array(store: str, path: str) -> zarr.Array:
    array: zarr.Array = _cached(
        _arrays, (store, path), lambda: zarr.open_array(store, path=path, mode="r+")
    )
    return array


def _direct(store: str, path: str) -> DirectChunks | None:
    array = _array(store, path)  # outside the cache's lock, which is not reentrant
    direct: DirectChunks | None = _cached(_directs, (store, path), lambda: DirectChunks.open(array))
    return direct


def forget_cached(store: str | None = None) -> None:
    """Close cached readers and arrays (between runs in one process, e.g. tests)."""
    with _cache_lock:
        for reader in _readers.values():
            reader.close()
        _readers.clear()
        for key in [k for k in _arrays if store is None or k[0] == store]:
            del _arrays[key]
        for key in [k for k in _directs if store is None or k[0] == store]:
            direct = _directs.pop(key)
            if direct is not None:
                direct.close()


def run_block(job: BlockJob) -> str | None:
    """Do one block; return None, or the error message (tasks never raise: one bad image must
    not cancel the others' tasks)."""
    try:
        _run_block(job)
        return None
    except Exception as exc:
        full = no_space(exc)
        if full is not None:  # every other task would fail the same way: stop the run
            raise NoSpaceError(f"{job.store}/{job.group}", full) from None
        if isinstance(exc, SourceError):
            return exc.problem
        return f"{type(exc).__name__}: {exc}"


def _run_block(job: BlockJob) -> None:
    if job.pass_index == 0:  # reads the source
        with borrowed_reader(job.spec, job.options) as reader:
            _BlockPyramid(job, reader).run()
    else:  # reads the store
        _BlockPyramid(job, None).run()
    progress = _array(job.store, f"{job.group}/_progress_{job.pass_index}")
    progress[job.row, job.col] = 1


class _BlockPyramid:
    """One task's pyramid, built depth first, chunk by chunk: each chunk of a level is the 2×2
    mean (or mode) of four chunks of the level below, so the pixels being combined stay in the
    CPU cache instead of streaming whole levels through memory, and every chunk is encoded as
    soon as it exists. Each level's chunks then replace that level's storage object whole.
    (A class, not a recursive closure: a closure referring to itself is a reference cycle that
    would keep every task's encoded chunks alive until the garbage collector runs.)"""

    def __init__(self, job: BlockJob, reader: SourceReader | None) -> None:
        self.job = job
        self.reader = reader
        base_path = f"{job.group}/{job.base_level}"
        base = _array(job.store, base_path)
        self.chunk = int(base.chunks[1])
        self.channels, self.dtype = int(base.shape[0]), base.dtype
        self.top = job.top_level - job.base_level
        self.sinks: list[_LevelSink | None] = [
            _LevelSink(job.store, base_path, job.row, job.col, job.block)
            if job.pass_index == 0
            else None
        ]
        for r in range(1, self.top + 1):
            path = f"{job.group}/{job.base_level + r}"
            self.sinks.append(_LevelSink(job.store, path, job.row, job.col, job.block >> r))
        self.shapes = [(int(base.shape[1]), int(base.shape[2]))] + [
            (sink.height, sink.width) for sink in self.sinks[1:] if sink is not None
        ]
        # copied levels are written as the source stores them; computing starts above the last
        self.copied = min(job.copied, self.top + 1)
        self.leaf_level = max(0, self.copied - 1)
        self.leaf = _leaves(job, base, self.chunk, self.leaf_level, reader)
        self.shrink = halve_mode if job.labels else halve

    def run(self) -> None:
        for r in range(self.copied):
            self.copy(r)
        if self.top >= self.copied:
            per_side = (self.job.block >> self.top) // self.chunk  # top-level chunks per side
            for i in range(per_side):
                for j in range(per_side):
                    self.build(self.top, self.job.row * per_side + i, self.job.col * per_side + j)
        for sink in self.sinks:
            if sink is not None:
                sink.close()

    def copy(self, r: int) -> None:
        """Relative level ``r``'s chunks of this footprint: the source's tiles, undecoded."""
        job, chunk, reader = self.job, self.chunk, self.reader
        assert reader is not None
        height, width = self.shapes[r]
        per_side = (job.block >> r) // chunk
        sink = self.sinks[r]
        assert sink is not None
        for i in range(per_side):
            for j in range(per_side):
                row, col = job.row * per_side + i, job.col * per_side + j
                if row * chunk >= height or col * chunk >= width:
                    continue
                data = source_tile(reader, r, row, col, (self.channels, chunk, chunk))
                if data is not None:
                    sink.put_encoded(row, col, data)

    def build(self, r: int, row: int, col: int) -> np.ndarray | None:
        """Chunk (row, col) of relative level ``r``, encoded; None past the image's edge."""
        chunk = self.chunk
        height, width = self.shapes[r]
        if row * chunk >= height or col * chunk >= width:
            return None
        if r == self.leaf_level:
            pixels = self.leaf(row, col)
        else:
            below_h, below_w = self.shapes[r - 1]
            quad = np.empty((2 * chunk, 2 * chunk, self.channels), self.dtype)
            for dy in (0, 1):
                for dx in (0, 1):
                    part = self.build(r - 1, 2 * row + dy, 2 * col + dx)
                    if part is not None:
                        quad[dy * chunk : (dy + 1) * chunk, dx * chunk : (dx + 1) * chunk] = (
                            part.transpose(1, 2, 0)
                        )
            # the edge's last row/column repeats outwards (an odd size's last pair)
            inside_h, inside_w = below_h - 2 * row * chunk, below_w - 2 * col * chunk
            if inside_h < 2 * chunk:
                quad[inside_h:] = quad[inside_h - 1]
            if inside_w < 2 * chunk:
                quad[:, inside_w:] = quad[:, inside_w - 1 : inside_w]
            pixels = self.shrink(quad.transpose(2, 0, 1))
        sink = self.sinks[r]
        if sink is not None and r >= self.copied:
            sink.put(row, col, pixels)
        return pixels


class _LevelSink:
    """One level's chunks from one task. The task's footprint in a level is one storage object
    (a shard, or a chunk); with a layout :class:`DirectChunks` knows, chunks are encoded on the
    task's thread (tasks on several threads encode in parallel) and the object is written whole
    at the end, else each chunk goes through zarr as it comes."""

    def __init__(self, store: str, path: str, row: int, col: int, side: int) -> None:
        self.array = _array(store, path)
        _, self.height, self.width = self.array.shape
        self.chunk = int(self.array.chunks[1])
        direct = _direct(store, path)
        fits = direct is not None and tuple(direct.object_shape[1:]) == (side, side)
        self.direct = direct if fits else None
        self.coords = (row, col)
        self.encoded: dict[tuple[int, int], bytes] = {}

    def put(self, row: int, col: int, pixels: np.ndarray) -> None:
        c = self.chunk
        height, width = min(c, self.height - row * c), min(c, self.width - col * c)
        if self.direct is None:
            self.array[:, row * c : row * c + height, col * c : col * c + width] = pixels[
                :, :height, :width
            ]
            return
        encoded = self.direct.encode_chunk(pixels, height, width)
        if encoded is not None:
            self.encoded[(row, col)] = encoded

    def put_encoded(self, row: int, col: int, data: bytes) -> None:
        """A chunk's stored bytes as they are (a copied JPEG tile)."""
        if self.direct is None:
            raise StoreError(
                f"{self.array.store}/{self.array.path}",
                "copied JPEG tiles need a local store with the tiler's shard layout",
            )
        self.encoded[(row, col)] = data

    def close(self) -> None:
        if self.direct is not None:
            self.direct.write_object(self.coords, self.encoded)


def _leaves(
    job: BlockJob, base: zarr.Array, chunk: int, level: int, reader: SourceReader | None
) -> Callable[[int, int], np.ndarray]:
    """The base level's chunks (pass 0: the source's ``level``, the last copied one), full size
    (c, chunk, chunk) with the fill value past the edge, read in leaves: the smallest
    power-of-two multiple of the chunk that holds whole source tiles (a tile decoded once, not
    once per chunk), else the whole block."""
    if job.pass_index == 0:
        assert reader is not None
        unit = reader.read_unit if level == 0 else (chunk, chunk)
        side = _leaf_side(unit, chunk, job.block >> level)

        def read(y: int, x: int) -> np.ndarray:
            return reader.read_region(level, y, x, side, side)

    else:
        side = chunk
        direct = _direct(job.store, f"{job.group}/{job.base_level}")

        def read(y: int, x: int) -> np.ndarray:
            if direct is not None:
                return direct.read_chunk((0, y // chunk, x // chunk))
            out = np.full((base.shape[0], chunk, chunk), base.fill_value, base.dtype)
            found = np.asarray(base[:, y : y + chunk, x : x + chunk])
            out[:, : found.shape[1], : found.shape[2]] = found
            return out

    held: dict[tuple[int, int], np.ndarray] = {}  # the current leaf (visits are depth first)

    def leaf(row: int, col: int) -> np.ndarray:
        y, x = row * chunk, col * chunk
        at = (y - y % side, x - x % side)
        if at not in held:
            held.clear()
            held[at] = read(*at)
        return held[at][:, y - at[0] : y - at[0] + chunk, x - at[1] : x - at[1] + chunk]

    return leaf


def _leaf_side(unit: tuple[int, int] | None, chunk: int, block: int) -> int:
    side = chunk
    if unit is not None and max(unit) <= block:
        while side < block and (side % unit[0] or side % unit[1]):
            side *= 2
        if side % unit[0] == 0 and side % unit[1] == 0:
            return side
    return block
