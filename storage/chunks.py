"""Direct chunk reads and whole-shard writes, bypassing zarr's pipeline.

Reading a 256² patch through zarr's generic pipeline costs about 2 ms of Python and event-loop
overhead for a 0.3 ms JPEG decode, and zarr runs every codec of every write on its single
event-loop thread, so tiling tasks on several threads do not encode in parallel. For the
layouts the tiler writes (Zarr v3, optionally sharded with the index at the end, inner codecs
``bytes``, ``bytes`` + ``zstd`` or ``hiresctl.jpeg``, on a local disk) this module goes straight
to the bytes:

* reads: each shard's index is read once and cached, then a chunk is one positional read and
  one decode (the trainers read chunk-aligned patches by design);
* writes: a region covering whole shards is encoded on the calling thread and each shard file
  is written whole (chunks, then the index and its CRC32C), exactly as zarr would lay it out.

Anything else returns ``None`` from :meth:`DirectChunks.open` and callers use zarr.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import google_crc32c  # a requirement of zarr (its sharding index checksum)
import numcodecs
import numpy as np
import zarr
from zarr.codecs import BytesCodec, ShardingCodec, ZstdCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.storage import LocalStore

from storage.codecs import JpegCodec, decode_jpeg_chunk, encode_jpeg_chunk
from storage.errors import StoreError

__all__ = ["DirectChunks", "remove_partial_writes"]

_MISSING = 2**64 - 1
# What every reader of the process may hold together, however many images a run opens
# (a training epoch touches every image; per-array caps grew with the store's size):
_MAX_FDS = 256  # open shard files; beyond this a read opens and closes its shard
_DECODED_CACHE_BYTES = 64 * 2**20  # decoded chunks kept for sub-chunk reads, all arrays


class _DecodedChunks:
    """One LRU of decoded chunks for the whole process, bounded in bytes, keyed by
    (reader token, chunk coordinates)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.nbytes = 0
        self._items: OrderedDict[tuple[int, tuple[int, ...]], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[int, tuple[int, ...]]) -> np.ndarray | None:
        with self._lock:
            chunk = self._items.get(key)
            if chunk is not None:
                self._items.move_to_end(key)
            return chunk

    def put(self, key: tuple[int, tuple[int, ...]], chunk: np.ndarray) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = chunk
            self.nbytes += chunk.nbytes
            while self.nbytes > self.capacity and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self.nbytes -= old.nbytes

    def forget(self, keep: Callable[[tuple[int, tuple[int, ...]]], bool]) -> None:
        """Drop every entry for which ``keep`` is False."""
        with self._lock:
            for key in [k for k in self._items if not keep(k)]:
                self.nbytes -= self._items.pop(key).nbytes


_DECODED = _DecodedChunks(_DECODED_CACHE_BYTES)
_TOKENS = itertools.count()
_OPEN = threading.Semaphore(_MAX_FDS)  # shard files held open by all readers together


def _stored_dtype(raw: BytesCodec, dtype: np.dtype) -> np.dtype:
    little = getattr(raw.endian, "value", "little") == "little"
    return dtype.newbyteorder("<" if little else ">")


Decode = Callable[[bytes], np.ndarray]
Encode = Callable[[np.ndarray], bytes]


def _chunk_codec(
    codecs: tuple[Any, ...], dtype: np.dtype, shape: tuple[int, ...]
) -> tuple[Decode, Encode] | None:
    """Decoder and encoder of one chunk for the codec chains this module knows, else None."""
    match codecs:
        case (JpegCodec() as jpeg,):
            return (
                lambda data: decode_jpeg_chunk(data, shape, jpeg.colorspace),
                lambda chunk: encode_jpeg_chunk(chunk, jpeg.quality, jpeg.colorspace),
            )
        case (BytesCodec() as raw,):
            stored = _stored_dtype(raw, dtype)
            return (
                lambda data: np.frombuffer(data, stored).reshape(shape),
                lambda chunk: np.ascontiguousarray(chunk, stored).tobytes(),
            )
        case (BytesCodec() as raw, ZstdCodec() as zstd) if not zstd.checksum:
            stored = _stored_dtype(raw, dtype)
            codec = numcodecs.Zstd(level=zstd.level)
            return (
                lambda data: np.frombuffer(codec.decode(data), stored).reshape(shape),
                lambda chunk: bytes(codec.encode(np.ascontiguousarray(chunk, stored))),
            )
    return None


class DirectChunks:
    """Whole-chunk reads and whole-shard writes of one local Zarr v3 array, bypassing zarr's
    pipeline."""

    def __init__(
        self,
        root: Path,
        array: zarr.Array,
        chunk: tuple[int, ...],
        per_shard: tuple[int, ...] | None,
        codec: tuple[Decode, Encode],
    ) -> None:
        self.array = array
        self.root = root
        self.chunk = chunk  # (c, cy, cx) of one inner chunk
        self.per_shard = per_shard  # inner chunks per shard along (c, y, x); None = unsharded
        self.decode, self.encode = codec
        self.fill = array.metadata.fill_value
        self._indices: OrderedDict[tuple[int, ...], np.ndarray | None] = OrderedDict()
        self._fds: dict[tuple[int, ...], int] = {}  # open shard files (a share of _MAX_FDS)
        self._token = next(_TOKENS)  # this reader's part of the shared decoded-chunk cache
        # the process-wide budgets this reader draws on, bound once: a file is given back to
        # the budget it was taken from
        self._open, self._decoded = _OPEN, _DECODED
        self._lock = threading.Lock()

    @classmethod
    def open(cls, array: zarr.Array) -> DirectChunks | None:
        """A direct reader for ``array``, or None when its layout is not one this reader knows."""
        store = array.store
        metadata = array.metadata
        if not isinstance(store, LocalStore) or metadata.zarr_format != 3 or array.ndim != 3:
            return None
        codecs = tuple(metadata.codecs)
        dtype = np.dtype(array.dtype)
        if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):
            sharding = codecs[0]
            index_ok = sharding.index_location == ShardingCodecIndexLocation.end and [
                type(c).__name__ for c in sharding.index_codecs
            ] == ["BytesCodec", "Crc32cCodec"]
            inner = tuple(sharding.chunk_shape)
            codec = _chunk_codec(tuple(sharding.codecs), dtype, inner)
            if not index_ok or codec is None:
                return None
            shard = tuple(metadata.chunk_grid.chunk_shape)  # type: ignore[attr-defined]
            per_shard = tuple(s // c for s, c in zip(shard, inner, strict=True))
            return cls(Path(store.root), array, inner, per_shard, codec)
        inner = tuple(metadata.chunk_grid.chunk_shape)  # type: ignore[attr-defined]
        codec = _chunk_codec(codecs, dtype, inner)
        if codec is None:
            return None
        return cls(Path(store.root), array, inner, None, codec)

    def _path(self, grid_coords: tuple[int, ...]) -> Path:
        key = self.array.metadata.encode_chunk_key(grid_coords)
        return self.root / self.array.path / key

    def _index(self, shard: tuple[int, ...]) -> np.ndarray | None:
        with self._lock:
            if shard in self._indices:
                self._indices.move_to_end(shard)
                return self._indices[shard]
        assert self.per_shard is not None
        count = int(np.prod(self.per_shard))
        size = count * 16 + 4
        path = self._path(shard)
        try:
            with open(path, "rb") as handle:
                total = os.fstat(handle.fileno()).st_size
                if total < size:
                    raise StoreError(
                        str(path),
                        f"damaged shard: {total} bytes, shorter than "
                        f"its {size}-byte index; retile the image (--overwrite)",
                    )
                handle.seek(-size, os.SEEK_END)
                raw = handle.read(size)
            index: np.ndarray | None = _checked_index(raw, count, total - size, path)
        except FileNotFoundError:
            index = None  # shard never written: every chunk is fill
        with self._lock:
            self._indices[shard] = index
            while len(self._indices) > 4096:
                self._indices.popitem(last=False)
        return index

    def read_chunk(self, coords: tuple[int, ...]) -> np.ndarray:
        """The decoded inner chunk at chunk-grid ``coords`` (fill when never written)."""
        if self.per_shard is None:
            try:
                data = self._path(coords).read_bytes()
            except FileNotFoundError:
                return np.full(self.chunk, self.fill, self.array.dtype)
            return self.decode(data)
        shard = tuple(c // n for c, n in zip(coords, self.per_shard, strict=True))
        local = tuple(c % n for c, n in zip(coords, self.per_shard, strict=True))
        index = self._index(shard)
        if index is None:
            return np.full(self.chunk, self.fill, self.array.dtype)
        flat = (local[0] * self.per_shard[1] + local[1]) * self.per_shard[2] + local[2]
        offset, nbytes = (int(v) for v in index[flat])
        if offset == _MISSING:
            return np.full(self.chunk, self.fill, self.array.dtype)
        fd = self._fds.get(shard)
        if fd is not None:
            return self.decode(os.pread(fd, nbytes, offset))
        fd = os.open(self._path(shard), os.O_RDONLY)
        keep = False
        with self._lock:
            if shard not in self._fds and self._open.acquire(blocking=False):
                self._fds[shard] = fd
                keep = True
        try:
            return self.decode(os.pread(fd, nbytes, offset))
        finally:
            if not keep:
                os.close(fd)

    def close(self) -> None:
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)
            self._open.release()
        token = self._token
        self._decoded.forget(lambda key: key[0] != token)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit the module may be gone
            self.close()

    def _cached_chunk(self, coords: tuple[int, ...]) -> np.ndarray:
        """A decoded chunk through a small LRU cache (patches smaller than a chunk, or not
        aligned to it, reuse the chunks their neighbours just decoded)."""
        chunk = self._decoded.get((self._token, coords))
        if chunk is None:
            chunk = self.read_chunk(coords)
            self._decoded.put((self._token, coords), chunk)
        return chunk

    def read_region(self, y: int, x: int, height: int, width: int) -> np.ndarray | None:
        """(c, height, width) at (y, x), or None when the region reaches outside the array."""
        channels, cy, cx = self.chunk
        _, full_h, full_w = self.array.shape
        if (
            channels != self.array.shape[0]
            or y < 0
            or x < 0
            or y + height > full_h
            or x + width > full_w
        ):
            return None
        if height == cy and width == cx and y % cy == 0 and x % cx == 0:
            return self.read_chunk((0, y // cy, x // cx))  # the trainers' usual read: no cache
        out = np.empty((channels, height, width), self.array.dtype)
        for row in range(y // cy, (y + height - 1) // cy + 1):
            for col in range(x // cx, (x + width - 1) // cx + 1):
                chunk = self._cached_chunk((0, row, col))
                top, left = max(y, row * cy), max(x, col * cx)
                bottom, right = min(y + height, (row + 1) * cy), min(x + width, (col + 1) * cx)
                out[:, top - y : bottom - y, left - x : right - x] = chunk[
                    :, top - row * cy : bottom - row * cy, left - col * cx : right - col * cx
                ]
        return out

    # ------------------------------------------------------------------------------- writes

    @property
    def object_shape(self) -> tuple[int, ...]:
        """The shape of one storage object: a shard, or a chunk when unsharded."""
        if self.per_shard is None:
            return self.chunk
        return tuple(c * n for c, n in zip(self.chunk, self.per_shard, strict=True))

    def encode_chunk(self, pixels: np.ndarray, height: int, width: int) -> bytes | None:
        """Encode one chunk (c, cy, cx) of which the top-left ``height`` × ``width`` lies inside
        the array; the rest is stored as the fill value, as zarr pads edge chunks. None when the
        chunk is all fill (zarr does not store those)."""
        _, cy, cx = self.chunk
        if height < cy or width < cx:
            pixels = pixels.copy()
            pixels[:, height:] = self.fill
            pixels[:, :, width:] = self.fill
        if pixels[0, 0, 0] == self.fill and (pixels == self.fill).all():
            return None
        return self.encode(pixels)

    def write_object(self, coords: tuple[int, int], chunks: dict[tuple[int, int], bytes]) -> None:
        """Replace the storage object at object-grid ``coords`` (y, x) whole: a shard from its
        encoded inner chunks (keyed by chunk-grid (y, x); absent ones are fill), laid out as zarr
        lays it out (chunks, then the index and its CRC32C), or an unsharded chunk. The file is
        written through a temporary name and a rename, so readers never see half of it; an
        object with no chunks is removed."""
        key = (0, *coords)
        path = self._path(key)
        if self.per_shard is None:
            self._forget(key)
            encoded = chunks.get(coords)
            _replace(path, None if encoded is None else [encoded])
            return
        _, ny, nx = self.per_shard
        index = np.full((ny * nx, 2), _MISSING, "<u8")
        pieces: list[bytes] = []
        offset = 0
        for (row, col), encoded in chunks.items():
            local_y, local_x = row - coords[0] * ny, col - coords[1] * nx
            if not (0 <= local_y < ny and 0 <= local_x < nx):
                raise ValueError(f"chunk {(row, col)} is not in shard {coords}")
            index[local_y * nx + local_x] = (offset, len(encoded))
            pieces.append(encoded)
            offset += len(encoded)
        self._forget(key)
        if not pieces:
            _replace(path, None)
            return
        raw_index = index.tobytes()
        checksum = np.uint32(google_crc32c.value(raw_index)).astype("<u4").tobytes()
        _replace(path, [*pieces, raw_index, checksum])

    def _forget(self, shard: tuple[int, ...]) -> None:
        """Drop what is cached of a storage object about to be rewritten."""
        with self._lock:
            self._indices.pop(shard, None)
            fd = self._fds.pop(shard, None)
        per, token = self.per_shard or (1, 1, 1), self._token
        self._decoded.forget(
            lambda key: (
                key[0] != token
                or not all(c // n == s for c, n, s in zip(key[1], per, shard, strict=True))
            )
        )
        if fd is not None:
            os.close(fd)
            self._open.release()


def _checked_index(raw: bytes, count: int, data_end: int, path: Path) -> np.ndarray:
    """A shard index read from untrusted bytes: its CRC32C must match and every chunk it lists
    must lie inside the file's data, or :class:`StoreError` names the shard. Nothing is sized
    by the index before this check."""
    body, stored = raw[:-4], raw[-4:]
    if np.uint32(google_crc32c.value(body)).astype("<u4").tobytes() != stored:
        raise StoreError(
            str(path),
            "damaged shard: its index checksum does not match (truncated or "
            "overwritten); retile the image (--overwrite)",
        )
    index = np.frombuffer(body, "<u8").reshape(count, 2)
    present = index[:, 0] != _MISSING
    ends = index[present, 0] + index[present, 1]
    if present.any() and (int(ends.max()) > data_end or int(index[present, 1].max()) == 0):
        raise StoreError(
            str(path),
            "damaged shard: its index points outside the file; retile the image (--overwrite)",
        )
    return index


def remove_partial_writes(folder: str | os.PathLike[str]) -> int:
    """Remove the temporary files that writes killed mid-way left under ``folder`` (see
    :func:`_replace`); returns how many."""
    found = list(Path(folder).rglob(".*.tmp"))
    for path in found:
        path.unlink(missing_ok=True)
    return len(found)


def _replace(path: Path, pieces: list[bytes] | None) -> None:
    """Write ``path`` whole (its pieces in order) through a temporary file and a rename, or
    remove it (None)."""
    if pieces is None:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as handle:
        handle.writelines(pieces)
    os.replace(tmp, path)
