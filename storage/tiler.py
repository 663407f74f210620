"""Tiling: sources → dataset store, streamed block by block, in parallel with dask.

How it works (memory is bounded by blocks, never by image size):

* Level 0 is cut into square **blocks** of ``block = chunk * 2**m`` pixels (4096 by default).
  One dask task reads one block from the source, writes it, then halves it ``m`` times and
  writes each result: one task produces the same block footprint in every level it covers.
* Each level's shards are exactly the footprint a task writes, so no two tasks ever touch the
  same storage object (no read-modify-write races), on threads or on a dask.distributed cluster.
* Levels beyond ``m`` are built by a further pass that reads level ``m`` back from the store
  with the same block scheme; passes repeat until the longest side is ≤ the thumbnail size.
* Every finished block sets one cell of a small progress array; a killed run resumes by
  redoing only unfinished blocks. The image is marked ``complete`` (and given its NGFF
  metadata) only after every array, the thumbnail and the foreground mask are written.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from storage.annotations import (
    Annotations,
    ImageBoxes,
    geo_to_pixels,
    image_stem,
    outside_problem,
)
from storage.chunks import DirectChunks, remove_partial_writes
from storage.codecs import JpegCodec
from storage.errors import SourceError, StoreError, UsageError
from storage.lock import WriterLock
from storage.readers import (
    DEFAULT_MAX_PIXELS,
    MosaicReader,
    ResampledReader,
    SourceReader,
    open_source,
)
from storage.store import (
    ANNOTATIONS,
    FORMAT_VERSION,
    IMAGES,
    MASK,
    THUMBNAIL,
    hires_attrs,
    image_multiscales,
    record_arrays,
    upgrade_layout,
    write_foreground,
)

__all__ = [
    "ImageResult",
    "LabelTable",
    "MaskSet",
    "SourceSpec",
    "TileOptions",
    "tile",
]

BLOCK_TARGET = 4096  # level-0 pixels per block side (rounded to chunk * 2**m)
SPLITS = ("train", "val", "test")


@dataclass(frozen=True, slots=True)
class TileOptions:
    """Tiling parameters. Everything here is recorded in the store as provenance."""

    chunk: int = 256
    block_size: int = BLOCK_TARGET
    codec: str = "zstd"
    jpeg_quality: int = 90
    zstd_level: int = 3
    thumbnail_size: int = 1024
    mpp: float | None = None
    mag: float | None = None
    source_mpp: float | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    split_seed: int = 0
    overwrite: bool = False
    workers: int | None = None
    scheduler: str | None = None

    def validate(self) -> None:
        if self.chunk < 16 or self.chunk & (self.chunk - 1):
            raise UsageError(f"--chunk must be a power of two ≥ 16, got {self.chunk}")
        if self.block_size < self.chunk or self.block_size & (self.block_size - 1):
            raise UsageError(
                f"--block-size must be a power of two ≥ --chunk ({self.chunk}), got {self.block_size}"
            )
        if self.codec not in ("zstd", "jpeg"):
            raise UsageError(f"--codec must be zstd or jpeg, got {self.codec!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise UsageError(f"--jpeg-quality must be 1..100, got {self.jpeg_quality}")
        if self.thumbnail_size < 16:
            raise UsageError(f"--thumbnail-size must be ≥ 16, got {self.thumbnail_size}")
        for name, value in (
            ("--mpp", self.mpp),
            ("--mag", self.mag),
            ("--source-mpp", self.source_mpp),
        ):
            if value is not None and not value > 0:
                raise UsageError(f"{name} must be positive, got {value}")
        if self.mpp is not None and self.mag is not None:
            raise UsageError("give --mpp or --mag, not both")
        if abs(sum(self.split_fractions) - 1) > 1e-6 or min(self.split_fractions) < 0:
            raise UsageError(
                f"split fractions must be ≥ 0 and sum to 1, got {self.split_fractions}"
            )

    def tiling_key(self) -> dict[str, Any]:
        """The parameters that change the pixels written (a change means re-tiling)."""
        return {
            "chunk": self.chunk,
            "block_size": self.block_size,
            "codec": self.codec,
            "jpeg_quality": self.jpeg_quality if self.codec == "jpeg" else None,
            "thumbnail_size": self.thumbnail_size,
            "mpp": self.mpp,
            "mag": self.mag,
            "source_mpp": self.source_mpp,
            "format_version": FORMAT_VERSION,
        }


@dataclass(frozen=True, slots=True)
class SourceSpec:
    """One source to tile: a file, or a mosaic of GeoTIFF tiles under one name."""

    paths: tuple[str, ...]
    mosaic: str | None = None
    labels: bool = False  # a label image (mask): palette indices kept, resampled by nearest
    reference_mpp: float | None = None  # a mask's pixel size is its image's

    @property
    def name(self) -> str:
        return self.mosaic or self.paths[0]

    def open(self, options: TileOptions) -> SourceReader:
        if self.mosaic:
            reader: SourceReader = MosaicReader(self.mosaic, self.paths, options.max_pixels)
        else:
            reader = open_source(self.paths[0], options.max_pixels, labels=self.labels)
        if self.labels and self.reference_mpp is not None and options.source_mpp is None:
            reader.info = replace(reader.info, mpp=self.reference_mpp)
        return _resample(reader, options, nearest=self.labels)


@dataclass
class ImageResult:
    """What happened to one source (one JSON line of ``hiresctl tile --json``)."""

    source: str
    id: str | None = None
    status: str = "failed"  # written | resumed | skipped | failed
    error: str | None = None
    shape: list[int] | None = None
    levels: int | None = None
    blocks: int | None = None  # blocks computed in this run (fewer than all when resuming)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


class LabelTable:
    """``source,label[,split]`` rows; ``source`` matches a file name or a path.

    Read as spreadsheets write it: a UTF-8 byte-order mark and CRLF line endings are fine, and
    so are spaces around names and values. The same source listed twice with the same label
    and split is one row; listed with different ones it is an error naming both lines.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self.rows: dict[str, dict[str, str]] = {}
        first_line: dict[str, int] = {}
        try:
            with open(path, newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh)
                reader.fieldnames = [f.strip() for f in reader.fieldnames or []]
                fields = reader.fieldnames
                if "source" not in fields or "label" not in fields:
                    raise UsageError(
                        f"{path}: labels CSV needs columns 'source' and 'label' (found {fields})"
                    )
                for line, row in enumerate(reader, start=2):
                    source = (row.get("source") or "").strip()
                    if not source:
                        raise UsageError(f"{path}:{line}: empty 'source'")
                    split = (row.get("split") or "").strip()
                    if split and split not in SPLITS:
                        raise UsageError(f"{path}:{line}: split {split!r} is not one of {SPLITS}")
                    entry = {"label": (row.get("label") or "").strip(), "split": split}
                    if source in self.rows and self.rows[source] != entry:
                        before = self.rows[source]
                        raise UsageError(
                            f"{path}:{line}: {source!r} is listed twice with different values "
                            f"(line {first_line[source]}: label {before['label']!r}, split "
                            f"{before['split'] or '-'}; line {line}: label {entry['label']!r}, "
                            f"split {entry['split'] or '-'}); keep one"
                        )
                    first_line.setdefault(source, line)
                    self.rows[source] = entry
        except UnicodeDecodeError as exc:
            raise UsageError(
                f"{path}: labels CSV is not UTF-8 text (byte {exc.start}); save it as UTF-8 CSV"
            ) from None
        except csv.Error as exc:
            raise UsageError(f"{path}: not a readable CSV ({exc})") from None
        except OSError as exc:
            raise UsageError(f"{path}: cannot read labels CSV: {exc.strerror}") from exc

    def lookup(self, spec: SourceSpec) -> dict[str, str] | None:
        candidates = [spec.name, Path(spec.name).name, str(Path(spec.name).resolve())]
        for key in candidates:
            if key in self.rows:
                return self.rows[key]
        return None


MASK_SUFFIXES = ("", "_mask", "-mask", "_masks", "_label", "_labels", "_gt", "_annotation")


class MaskSet:
    """Mask images in a folder, matched to sources by file name: the same name, or the same stem
    with any image suffix, optionally followed by ``_mask``, ``_label(s)``, ``_gt``...

    Values are class labels (0 = background by convention) and are stored unchanged. An
    optional ``value,name`` CSV names the classes.
    """

    def __init__(
        self, folder: str | os.PathLike[str], classes: str | os.PathLike[str] | None = None
    ) -> None:
        self.folder = str(folder)
        if not Path(folder).is_dir():
            raise UsageError(f"--masks {folder}: not a folder")
        self.files: dict[str, str] = {}
        for path in sorted(Path(folder).iterdir()):
            if path.is_file() and not path.name.startswith("."):
                self.files.setdefault(path.name.lower(), str(path))
                self.files.setdefault(image_stem(path.name).lower(), str(path))
        self.classes: dict[int, str] = {}
        if classes is not None:
            self.classes = _read_classes(classes)

    def lookup(self, spec: SourceSpec) -> str | None:
        name = Path(spec.name).name
        if name.lower() in self.files:
            return self.files[name.lower()]
        stem = image_stem(name).lower()
        for suffix in MASK_SUFFIXES:
            if stem + suffix in self.files:
                return self.files[stem + suffix]
        return None


def _read_classes(path: str | os.PathLike[str]) -> dict[int, str]:
    classes: dict[int, str] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            reader.fieldnames = [f.strip() for f in reader.fieldnames or []]
            fields = reader.fieldnames
            if "value" not in fields or "name" not in fields:
                raise UsageError(
                    f"{path}: mask classes CSV needs columns 'value' and 'name' (found {fields})"
                )
            for line, row in enumerate(reader, start=2):
                try:
                    value = int((row.get("value") or "").strip())
                except ValueError:
                    raise UsageError(
                        f"{path}:{line}: value {row.get('value')!r} is not an integer"
                    ) from None
                if value < 0 or value in classes:
                    raise UsageError(f"{path}:{line}: value {value} is negative or repeated")
                classes[value] = (row.get("name") or "").strip() or str(value)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read mask classes CSV: {exc.strerror}") from exc
    return classes


# ----------------------------------------------------------------------------------- helpers


def _resample(reader: SourceReader, options: TileOptions, nearest: bool = False) -> SourceReader:
    if options.mpp is None and options.mag is None:
        if options.source_mpp is not None:
            reader.info = replace(reader.info, mpp=options.source_mpp)
        return reader
    base_mpp = options.source_mpp or reader.info.mpp
    if base_mpp is None:
        raise SourceError(
            reader.info.path, "the file states no pixel size; give --source-mpp to use --mpp/--mag"
        )
    if options.mpp is not None:
        target = options.mpp
    else:
        assert options.mag is not None
        power = reader.info.extra.get("objective_power")
        try:
            target = base_mpp * float(power or "") / options.mag
        except (TypeError, ValueError):
            target = 10.0 / options.mag  # the usual convention: 40x ≈ 0.25 µm/px
    return ResampledReader(reader, target, base_mpp, nearest=nearest)


def fingerprint(spec: SourceSpec) -> str:
    """Content fingerprint: size plus the first and last MiB of every file (fast on huge files)."""
    h = hashlib.sha256()
    for path in spec.paths:
        size = os.path.getsize(path)
        h.update(str(size).encode())
        with open(path, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read())
    return h.hexdigest()[:32]


def image_id_for(spec: SourceSpec) -> str:
    name = spec.mosaic or Path(spec.paths[0]).name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.btf"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    else:
        name = Path(name).stem if not spec.mosaic else name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "image"


def split_for(image_id: str, seed: int, fractions: Sequence[float]) -> str:
    """A split that depends only on the image id and the seed: adding images never moves others."""
    digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    edge = 0.0
    for name, frac in zip(SPLITS, fractions, strict=True):
        edge += frac
        if u < edge:
            return name
    return SPLITS[-1]


def level_shapes(height: int, width: int, thumbnail: int) -> list[tuple[int, int]]:
    """Halve until the longest side is ≤ the thumbnail size."""
    shapes = [(height, width)]
    while max(shapes[-1]) > thumbnail:
        h, w = shapes[-1]
        shapes.append((math.ceil(h / 2), math.ceil(w / 2)))
    return shapes


def halve(block: np.ndarray) -> np.ndarray:
    """2x2 mean (rounded), replicating the last row/column of odd sizes.

    Works in the block's memory order: a channel-last block (as readers return them) is halved
    channel-last and the result is again a channel-first view of channel-last memory."""
    _c, h, w = block.shape
    if h % 2:
        block = np.concatenate([block, block[:, -1:]], axis=1)
    if w % 2:
        block = np.concatenate([block, block[:, :, -1:]], axis=2)
    wide = np.uint16 if block.dtype == np.uint8 else np.uint32  # 4 × max + 2 must fit
    channel_last = block.transpose(1, 2, 0)
    if channel_last.flags.c_contiguous:
        # rows pairwise, then columns one channel at a time (long strided loops: numpy is slow
        # on an innermost axis of 3)
        rows = np.add(channel_last[0::2], channel_last[1::2], dtype=wide)
        ph, pw, c = rows.shape
        out = np.empty((ph, pw // 2, c), block.dtype)
        acc = np.empty((ph, pw // 2), wide)
        for k in range(c):
            np.add(rows[:, 0::2, k], rows[:, 1::2, k], out=acc)
            acc += 2
            acc >>= 2
            out[..., k] = acc
        return out.transpose(2, 0, 1)
    planes = np.ascontiguousarray(block)
    rows = np.add(planes[:, 0::2], planes[:, 1::2], dtype=wide)
    c, ph, pw = rows.shape
    pairs = rows.reshape(c, ph, pw // 2, 2)
    total = pairs[..., 0] + pairs[..., 1]
    total += 2
    total >>= 2
    return total.astype(block.dtype)


def halve_mode(block: np.ndarray) -> np.ndarray:
    """2x2 mode for label images (values never mix; a tie goes to the earliest of top-left,
    top-right, bottom-left, bottom-right), replicating the last row/column of odd sizes."""
    _c, h, w = block.shape
    if h % 2:
        block = np.concatenate([block, block[:, -1:]], axis=1)
    if w % 2:
        block = np.concatenate([block, block[:, :, -1:]], axis=2)
    quad = [block[:, 0::2, 0::2], block[:, 0::2, 1::2], block[:, 1::2, 0::2], block[:, 1::2, 1::2]]
    votes = [sum((q == other).astype(np.uint8) for other in quad) for q in quad]
    out = quad[0].copy()
    best = votes[0]
    for q, v in zip(quad[1:], votes[1:], strict=True):
        better = v > best
        out[better] = q[better]
        best = np.maximum(best, v)
    return out


# ------------------------------------------------------------------------------- block tasks


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


_cache_lock = threading.Lock()
_readers: dict[tuple[SourceSpec, TileOptions], SourceReader] = {}
_arrays: dict[tuple[str, str], zarr.Array] = {}
_directs: dict[tuple[str, str], DirectChunks | None] = {}


def _cached(cache: dict[Any, Any], key: Any, make: Callable[[], Any]) -> Any:
    """``cache[key]``, made once per process (tasks on several threads share it)."""
    with _cache_lock:
        if key not in cache:
            cache[key] = make()
        return cache[key]


def _reader(spec: SourceSpec, options: TileOptions) -> SourceReader:
    reader: SourceReader = _cached(_readers, (spec, options), lambda: spec.open(options))
    return reader


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
    except SourceError as exc:
        return exc.problem
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def _run_block(job: BlockJob) -> None:
    _BlockPyramid(job).run()
    progress = _array(job.store, f"{job.group}/_progress_{job.pass_index}")
    progress[job.row, job.col] = 1


class _BlockPyramid:
    """One task's pyramid, built depth first, chunk by chunk: each chunk of a level is the 2×2
    mean (or mode) of four chunks of the level below, so the pixels being combined stay in the
    CPU cache instead of streaming whole levels through memory, and every chunk is encoded as
    soon as it exists. Each level's chunks then replace that level's storage object whole.
    (A class, not a recursive closure: a closure referring to itself is a reference cycle that
    would keep every task's encoded chunks alive until the garbage collector runs.)"""

    def __init__(self, job: BlockJob) -> None:
        self.job = job
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
        self.leaf = _leaves(job, base, self.chunk)
        self.shrink = halve_mode if job.labels else halve

    def run(self) -> None:
        per_side = (self.job.block >> self.top) // self.chunk  # top-level chunks per side
        for i in range(per_side):
            for j in range(per_side):
                self.build(self.top, self.job.row * per_side + i, self.job.col * per_side + j)
        for sink in self.sinks:
            if sink is not None:
                sink.close()

    def build(self, r: int, row: int, col: int) -> np.ndarray | None:
        """Chunk (row, col) of relative level ``r``, encoded; None past the image's edge."""
        chunk = self.chunk
        height, width = self.shapes[r]
        if row * chunk >= height or col * chunk >= width:
            return None
        if r == 0:
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
        if sink is not None:
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

    def close(self) -> None:
        if self.direct is not None:
            self.direct.write_object(self.coords, self.encoded)


def _leaves(job: BlockJob, base: zarr.Array, chunk: int) -> Callable[[int, int], np.ndarray]:
    """The base level's chunks, full size (c, chunk, chunk) with the fill value past the edge,
    read in leaves: the smallest power-of-two multiple of the chunk that holds whole source
    tiles (a tile decoded once, not once per chunk), else the whole block."""
    if job.pass_index == 0:
        reader = _reader(job.spec, job.options)
        side = _leaf_side(reader.read_unit, chunk, job.block)

        def read(y: int, x: int) -> np.ndarray:
            return reader.read_region(0, y, x, side, side)

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


# ----------------------------------------------------------------------------------- planning


@dataclass
class _Plan:
    spec: SourceSpec
    result: ImageResult
    group: str = ""
    shapes: list[tuple[int, int]] = field(default_factory=list)
    passes: list[tuple[int, int, int]] = field(default_factory=list)  # (base, top, block)
    reader: SourceReader | None = None
    failed: bool = False
    started: float = 0.0
    mask: SourceSpec | None = None  # the mask image tiled beside the image
    classes: dict[int, str] = field(default_factory=dict)

    @property
    def mask_group(self) -> str:
        return f"{self.group}/labels/{MASK}"


def _passes(n_levels: int, chunk: int, block_size: int) -> tuple[int, list[tuple[int, int, int]]]:
    m = max(0, int(math.log2(max(1, block_size // chunk))))
    block = chunk << m
    passes = []
    base = 0
    while True:
        top = min(base + m, n_levels - 1)
        passes.append((base, top, block))
        if top >= n_levels - 1:
            break
        base = top
    return block, passes


def _codecs(options: TileOptions, channels: int, dtype: np.dtype) -> dict[str, Any]:
    if options.codec == "jpeg":
        if dtype != np.uint8 or channels not in (1, 3):
            raise SourceError(
                "",
                f"--codec jpeg needs 8-bit gray or RGB; this image is {channels}-channel {dtype}",
            )
        return {"serializer": JpegCodec(quality=options.jpeg_quality), "compressors": None}
    return {"compressors": [ZstdCodec(level=options.zstd_level)]}


def _prepare(
    root: zarr.Group,
    store: str,
    spec: SourceSpec,
    options: TileOptions,
    labels: LabelTable | None,
    taken: set[str],
    masks: MaskSet | None = None,
    annotations: Annotations | None = None,
) -> _Plan:
    plan = _Plan(spec=spec, result=ImageResult(source=spec.name), started=time.perf_counter())
    reader = spec.open(options)
    plan.reader = reader
    info = reader.info
    boxes = _boxes_for(spec, reader, annotations) if annotations is not None else None
    label_row = labels.lookup(spec) if labels else None
    if labels is not None and (label_row is None or not label_row["label"]):
        raise SourceError(spec.name, f"no label for this image in {labels.path}")
    mask_path = masks.lookup(spec) if masks is not None else None
    if masks is not None and mask_path is None:
        raise SourceError(spec.name, f"no mask for this image in {masks.folder}")
    image_id = image_id_for(spec)
    if image_id in taken:
        image_id = f"{image_id}-{hashlib.sha256(spec.name.encode()).hexdigest()[:6]}"
    taken.add(image_id)
    plan.result.id = image_id
    plan.group = f"{IMAGES}/{image_id}"
    height, width = info.level_shapes[0]
    plan.shapes = level_shapes(height, width, options.thumbnail_size)
    _, plan.passes = _passes(len(plan.shapes), options.chunk, options.block_size)
    plan.result.shape = [info.channels, height, width]
    plan.result.levels = len(plan.shapes)
    fp = fingerprint(spec)
    split = (label_row or {}).get("split") or split_for(
        image_id, options.split_seed, options.split_fractions
    )
    identity: dict[str, Any] = {
        "source": spec.name,
        "fingerprint": fp,
        "tiling": options.tiling_key(),
    }
    if mask_path is not None:
        assert masks is not None
        plan.mask = _check_mask(mask_path, info, options)
        plan.classes = masks.classes
        identity["mask_source"] = mask_path
        identity["mask_fingerprint"] = fingerprint(plan.mask)
    existing = root.get(plan.group)
    if existing is not None and not options.overwrite:
        attrs = hires_attrs(existing)
        same = all(attrs.get(k) == v for k, v in identity.items())
        if same:
            # label and split may change without re-tiling
            attrs.update(
                {"label": (label_row or {}).get("label", attrs.get("label")), "split": split}
            )
            if boxes is not None:
                assert annotations is not None
                assert isinstance(existing, zarr.Group)
                attrs["boxes"] = _write_boxes(
                    existing, boxes, annotations, _file_id(annotations, spec)
                )
            existing.attrs["hiresctl"] = attrs
            if mask_path is not None and masks is not None and masks.classes:
                _name_classes(existing, masks.classes)  # names may change without re-tiling
            if attrs.get("status") == "complete":
                plan.result.status = "skipped"
                return plan
            plan.result.status = "resumed"
            remove_partial_writes(Path(store) / plan.group)  # a killed run's half-written files
            return plan
    if existing is not None:
        del root[plan.group]
    plan.result.status = "written"
    dtype = np.dtype(info.dtype)
    codecs = _codecs(options, info.channels, dtype)
    group = root.require_group(plan.group)
    meta: dict[str, Any] = {
        **identity,
        "status": "incomplete",
        "shape": [info.channels, height, width],
        "levels": len(plan.shapes),
        "dtype": dtype.str,
        "mpp": info.mpp,
        "fill_value": int(info.fill_value),
        "label": (label_row or {}).get("label"),
        "split": split,
        **{k: v for k, v in info.extra.items() if k not in ("tiles",)},
    }
    if boxes is not None:
        assert annotations is not None
        meta["boxes"] = _write_boxes(group, boxes, annotations, _file_id(annotations, spec))
    group.attrs["hiresctl"] = meta
    _create_levels(group, plan, options, info.channels, dtype, info.fill_value, codecs)
    if plan.mask is not None:
        mask_group = group.require_group("labels").require_group(MASK)
        mask_dtype = np.dtype(_reader(plan.mask, options).info.dtype)
        zstd = {"compressors": [ZstdCodec(level=options.zstd_level)]}
        _create_levels(mask_group, plan, options, 1, mask_dtype, 0, zstd)
    return plan


def _boxes_for(
    spec: SourceSpec, reader: SourceReader, annotations: Annotations
) -> tuple[np.ndarray, np.ndarray]:
    """The source's boxes in level-0 pixels of the store (after any resampling), checked
    against the source's size, with their category indices."""
    found = annotations.lookup(spec.name)
    if found is None:
        raise SourceError(spec.name, f"no entry for this image in {annotations.path}")
    if found.problem:
        raise SourceError(spec.name, found.problem)
    base = reader.base if isinstance(reader, ResampledReader) else reader
    source_h, source_w = base.info.level_shapes[0]
    pixels = geo_to_pixels(found, base.info.extra, spec.name, annotations.path)
    checked = ImageBoxes(pixels, found.labels, found.entries)
    problem = outside_problem(checked, source_w, source_h, annotations.path)
    if problem:
        raise SourceError(spec.name, problem)
    height, width = reader.info.level_shapes[0]
    scale = np.array([width / source_w, height / source_h] * 2)
    level0 = np.clip(pixels, 0, [source_w, source_h] * 2) * scale
    return level0.astype(np.float32), found.labels.astype(np.int32)


def _file_id(annotations: Annotations, spec: SourceSpec) -> Any:
    found = annotations.lookup(spec.name)
    return found.file_id if found is not None else None


def _write_boxes(
    group: zarr.Group,
    boxes: tuple[np.ndarray, np.ndarray],
    annotations: Annotations,
    file_id: Any = None,
) -> dict[str, Any]:
    """Write ``annotations/boxes`` (n, 4: x0, y0, x1, y1 in level-0 pixels) and
    ``annotations/labels`` (n: index into the categories) into an image group."""
    xyxy, labels = boxes
    if ANNOTATIONS in group:
        del group[ANNOTATIONS]
    sub = group.create_group(ANNOTATIONS)
    zstd = [ZstdCodec(level=3)]
    count = len(xyxy)
    box_array = sub.create_array("boxes", shape=(count, 4), dtype="float32",
                                 chunks=(max(1, count), 4), compressors=zstd)  # fmt: skip
    label_array = sub.create_array("labels", shape=(count,), dtype="int32",
                                   chunks=(max(1, count),), compressors=zstd)  # fmt: skip
    if count:
        box_array[...] = xyxy
        label_array[...] = labels
    summary: dict[str, Any] = {
        "source": annotations.path,
        "format": annotations.kind,
        "count": count,
        "categories": annotations.categories,
    }
    if annotations.category_ids is not None:  # the COCO file's own ids, for results in them
        summary["category_ids"] = annotations.category_ids
    if file_id is not None:
        summary["file_image_id"] = file_id
    sub.attrs["hiresctl"] = {**summary, "boxes": "x0, y0, x1, y1 in level-0 pixels"}
    return summary


def _create_levels(
    group: zarr.Group,
    plan: _Plan,
    options: TileOptions,
    channels: int,
    dtype: np.dtype,
    fill_value: int,
    codecs: dict[str, Any],
) -> None:
    """The pyramid's arrays (chunked and sharded as the tasks write them) and progress cells."""
    for level, (lh, lw) in enumerate(plan.shapes):
        shard = _shard_side(level, plan.passes, options.chunk)
        group.create_array(
            str(level),
            shape=(channels, lh, lw),
            dtype=dtype,
            chunks=(channels, options.chunk, options.chunk),
            shards=(channels, shard, shard) if shard > options.chunk else None,
            fill_value=fill_value,
            dimension_names=("c", "y", "x"),
            **codecs,
        )
    for index, (base, _top, block) in enumerate(plan.passes):
        bh, bw = plan.shapes[base]
        group.create_array(
            f"_progress_{index}",
            shape=(math.ceil(bh / block), math.ceil(bw / block)),
            dtype="uint8",
            chunks=(1, 1),
            fill_value=0,
        )


def _check_mask(path: str, info: Any, options: TileOptions) -> SourceSpec:
    """The mask's source spec, after checking it can label this image (one integer channel,
    the image's size once resampled like it)."""
    base_mpp = info.extra.get("resampled_from_mpp", info.mpp)
    spec = SourceSpec((path,), labels=True, reference_mpp=base_mpp)
    try:
        reader = spec.open(options)
    except SourceError as exc:
        raise SourceError(info.path, f"mask {path}: {exc.problem}") from None
    try:
        mask = reader.info
        if mask.channels != 1 or np.dtype(mask.dtype).kind not in "ui":
            raise SourceError(
                info.path,
                f"mask {path}: must be one channel of integer labels (gray or palette), "
                f"found {mask.channels} channel(s) of {np.dtype(mask.dtype)}",
            )
        (mh, mw), (h, w) = mask.level_shapes[0], info.level_shapes[0]
        if abs(mh - h) > 1 or abs(mw - w) > 1:  # one pixel: rounding when both are resampled
            raise SourceError(
                info.path, f"mask {path} is {mh}×{mw} pixels but the image is {h}×{w}"
            )
    finally:
        reader.close()
    return spec


def _name_classes(group: Any, classes: dict[int, str]) -> None:
    labels = group.get("labels")
    if labels is None or MASK not in labels:
        return
    mask = labels[MASK]
    attrs = hires_attrs(mask)
    attrs["classes"] = {str(k): v for k, v in classes.items()}
    mask.attrs["hiresctl"] = attrs


def _shard_side(level: int, passes: list[tuple[int, int, int]], chunk: int) -> int:
    """A level's shard is the footprint one task writes in it."""
    for base, top, block in passes:
        if base < level <= top or (level == 0 and base == 0):
            return block >> (level - base)
    return chunk


def _pass_blocks(plan: _Plan, pass_index: int) -> int:
    base, _top, block = plan.passes[pass_index]
    height, width = plan.shapes[base]
    layers = 2 if plan.mask is not None else 1
    return layers * math.ceil(height / block) * math.ceil(width / block)


def _jobs(
    store: str, plan: _Plan, pass_index: int, options: TileOptions, root: zarr.Group
) -> list[BlockJob]:
    """The unfinished blocks of one pass: the image's, then its mask's."""
    base, top, block = plan.passes[pass_index]
    layers = [(plan.group, plan.spec, False)]
    if plan.mask is not None:
        layers.append((plan.mask_group, plan.mask, True))
    jobs = []
    for group, spec, labels in layers:
        progress: Any = root[f"{group}/_progress_{pass_index}"]
        done = np.asarray(progress[...])
        jobs += [
            BlockJob(store, group, spec, options, pass_index, base, top, block, r, c, labels)
            for r, c in zip(*np.nonzero(done == 0), strict=True)
        ]
    return jobs


# --------------------------------------------------------------------------------- execution


def _execute(
    jobs: list[BlockJob], options: TileOptions, on_done: Callable[[BlockJob, str | None], None]
) -> None:
    if not jobs:
        return
    if options.scheduler:
        from distributed import Client, as_completed

        try:
            client = Client(options.scheduler, timeout="20s")
        except Exception as exc:
            raise UsageError(f"cannot reach dask scheduler {options.scheduler}: {exc}") from exc
        with client:
            futures = client.map(run_block, jobs, pure=False)
            index = {f.key: j for f, j in zip(futures, jobs, strict=True)}
            for future, result in as_completed(futures, with_results=True):
                on_done(index[future.key], result)
        return
    import dask
    from dask.callbacks import Callback

    tasks = [
        dask.delayed(run_block, pure=False)(j, dask_key_name=f"block-{i}")
        for i, j in enumerate(jobs)
    ]
    by_key = {f"block-{i}": j for i, j in enumerate(jobs)}

    class _Progress(Callback):
        def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
            if key in by_key:
                on_done(by_key[key], result)

    with _Progress():
        dask.compute(*tasks, scheduler="threads", num_workers=options.workers or os.cpu_count())


# ---------------------------------------------------------------------------------- finishing


def _finalize(root: zarr.Group, plan: _Plan, options: TileOptions) -> None:
    group = root[plan.group]
    assert isinstance(group, zarr.Group)
    attrs = hires_attrs(group)
    _channels, height, width = attrs["shape"]
    # Thumbnail: from the smallest level whose longest side is ≥ the thumbnail size.
    t = options.thumbnail_size
    src_level = (
        max(i for i, s in enumerate(plan.shapes) if max(s) >= t) if max(plan.shapes[0]) >= t else 0
    )
    level_array: Any = group[str(src_level)]
    src = np.asarray(level_array[...])
    scale = min(1.0, t / max(height, width))
    th, tw = max(1, round(height * scale)), max(1, round(width * scale))
    thumb = _resize(src, th, tw)
    dtype = np.dtype(attrs["dtype"])
    if THUMBNAIL in group:
        del group[THUMBNAIL]
    arr = group.create_array(
        THUMBNAIL,
        shape=thumb.shape,
        dtype=dtype,
        chunks=thumb.shape,
        dimension_names=("c", "y", "x"),
        compressors=[ZstdCodec(level=3)],
    )
    arr[...] = thumb
    arr.attrs["scale"] = [1.0, height / th, width / tw]
    mask = foreground_mask(thumb, attrs["fill_value"])
    write_foreground(group, mask, [1.0, height / th, width / tw])
    level_scales = [(height / lh, width / lw) for lh, lw in plan.shapes]
    labels: Any = group.get("labels")
    if labels is not None and "foreground" in labels:
        del labels["foreground"]  # an earlier version's one-level label image
    if plan.mask is not None:
        mask_group: Any = labels[MASK]
        attrs["mask"] = _finalize_mask(mask_group, plan, level_scales, attrs.get("mpp"))
        for index in range(len(plan.passes)):
            if f"_progress_{index}" in mask_group:
                del mask_group[f"_progress_{index}"]
        labels.attrs["ome"] = {"version": "0.5", "labels": [MASK]}
    elif labels is not None:
        del group["labels"]
    for index in range(len(plan.passes)):
        name = f"_progress_{index}"
        if name in group:
            del group[name]
    group.attrs["ome"] = image_multiscales(plan.result.id or "", level_scales, attrs.get("mpp"))
    record_arrays(group)  # which shards exist: a deleted one is then told from an all-fill one
    attrs["status"] = "complete"
    attrs["foreground_fraction"] = float(mask.mean())
    group.attrs["hiresctl"] = attrs  # completion is the last write


_PALETTE = [
    [0, 0, 0, 0],
    [255, 64, 64, 160],
    [64, 160, 255, 160],
    [255, 200, 0, 160],
    [160, 64, 255, 160],
    [0, 200, 120, 160],
    [255, 120, 200, 160],
    [120, 120, 120, 160],
]


def label_image_attrs(
    name: str,
    level_scales: list[tuple[float, float]],
    mpp: float | None,
    values: Sequence[int],
    classes: dict[int, str],
    source: str = "../../",
) -> dict[str, Any]:
    """NGFF 0.5 ``ome`` attribute of a multiscale label image: scales, colours, class names."""
    meta = image_multiscales(name, level_scales, mpp)
    meta["image-label"] = {
        "version": "0.5",
        "colors": [
            {"label-value": int(v), "rgba": _PALETTE[i % len(_PALETTE)]}
            for i, v in enumerate(values)
        ],
        "properties": [
            {"label-value": int(v), "class": classes.get(int(v), str(v))} for v in values
        ],
        "source": {"image": source},
    }
    return meta


def label_pyramid(
    group: zarr.Group, thumbnail: int = 1024, block: int = 2048
) -> list[tuple[int, int]]:
    """Add levels 1, 2, … to the label image whose level ``0`` is in ``group``: each the 2×2
    mode of the one before, streamed ``block`` pixels at a time, until the longest side is
    ≤ ``thumbnail``. Returns the (height, width) of every level."""
    base: Any = group["0"]
    channels, height, width = base.shape
    shapes = level_shapes(height, width, thumbnail)
    for level in range(1, len(shapes)):
        source: Any = group[str(level - 1)]
        lh, lw = shapes[level]
        chunk = min(base.chunks[1], max(lh, lw))
        target = group.create_array(
            str(level), shape=(channels, lh, lw), dtype=base.dtype, chunks=(channels, chunk, chunk),
            fill_value=0, dimension_names=("c", "y", "x"), compressors=[ZstdCodec(level=3)],
            overwrite=True,
        )  # fmt: skip
        sh, sw = shapes[level - 1]
        for y in range(0, sh, block):
            for x in range(0, sw, block):
                halved = halve_mode(np.asarray(source[:, y : y + block, x : x + block]))
                target[:, y // 2 : y // 2 + halved.shape[1], x // 2 : x // 2 + halved.shape[2]] = (
                    halved
                )
    return shapes


def _finalize_mask(
    group: Any, plan: _Plan, level_scales: list[tuple[float, float]], mpp: float | None
) -> dict[str, Any]:
    """NGFF label metadata of the mask; returns its summary (values and their pixel counts,
    counted over level 0 block by block: coarse levels lose thin structures)."""
    level0 = group["0"]
    _, height, width = level0.shape
    step = max(level0.chunks[1], 2048)
    counts: dict[int, int] = {}
    for y in range(0, height, step):
        for x in range(0, width, step):
            block = np.asarray(level0[0, y : y + step, x : x + step])
            found, n = np.unique(block, return_counts=True)
            for v, c in zip(found.tolist(), n.tolist(), strict=True):
                counts[v] = counts.get(v, 0) + c
    values = sorted(counts)
    group.attrs["ome"] = label_image_attrs(MASK, level_scales, mpp, values, plan.classes)
    summary = {
        "source": plan.mask.name if plan.mask else None,
        "values": values,
        "pixels": [counts[v] for v in values],
    }
    group.attrs["hiresctl"] = {
        **summary,
        "classes": {str(k): v for k, v in plan.classes.items()},
    }
    return summary


def _resize(src: np.ndarray, height: int, width: int) -> np.ndarray:
    if src.shape[1:] == (height, width):
        return src
    from skimage.transform import resize

    # float32: half the memory of skimage's default float64 (the source level is up to 2× the
    # thumbnail's side, so this is the largest allocation of a run)
    out = resize(
        src.transpose(1, 2, 0).astype(np.float32),
        (height, width),
        order=1,
        anti_aliasing=True,
        preserve_range=True,
    )
    return np.rint(out).astype(src.dtype).transpose(2, 0, 1)


def foreground_mask(thumb: np.ndarray, fill_value: int) -> np.ndarray:
    """Otsu on the thumbnail's intensity (and saturation for colour); the side that differs from
    the image border is foreground. Returns (1, h, w) uint8 in {0, 1}."""
    from skimage.filters import threshold_otsu

    img = thumb.astype(np.float32)
    gray = img.mean(axis=0)
    signal = gray
    if thumb.shape[0] >= 3:
        sat = img[:3].max(axis=0) - img[:3].min(axis=0)
        # tissue is coloured; a white or black background is not
        if sat.std() > gray.std() * 0.5:
            signal = sat
    if float(signal.max() - signal.min()) < 1e-6:
        return np.ones((1, *gray.shape), dtype=np.uint8)
    threshold = threshold_otsu(signal)
    above = signal > threshold
    border = np.concatenate([above[0], above[-1], above[:, 0], above[:, -1]])
    fg = ~above if border.mean() > 0.5 else above
    return fg[None].astype(np.uint8)


def _write_manifest(root: zarr.Group) -> None:
    rows = []
    if IMAGES in root:
        images = root[IMAGES]
        assert isinstance(images, zarr.Group)
        for key in sorted(images.group_keys()):
            a = hires_attrs(images[key])
            rows.append(
                {
                    "id": key,
                    "source": a.get("source"),
                    "fingerprint": a.get("fingerprint"),
                    "shape": a.get("shape"),
                    "mpp": a.get("mpp"),
                    "label": a.get("label"),
                    "split": a.get("split"),
                    "status": a.get("status"),
                }
            )
    meta = hires_attrs(root)
    meta["manifest"] = rows
    root.attrs["hiresctl"] = meta


def _open_root(store: str, options: TileOptions) -> zarr.Group:
    path = Path(store)
    if "://" not in store and path.exists() and not path.is_dir():
        raise UsageError(f"{store}: --out exists and is not a folder")
    try:
        root = zarr.open_group(store, mode="a")
    except Exception as exc:
        raise StoreError(store, f"cannot open or create a Zarr store: {exc}") from exc
    meta = hires_attrs(root)
    if not meta:
        if len(list(root.keys())) > 0:
            raise StoreError(store, "is a Zarr group with other content, not a hiresctl dataset")
        root.attrs["hiresctl"] = {
            "kind": "dataset",
            "format_version": FORMAT_VERSION,
            "provenance": _provenance(options),
        }
    elif meta.get("kind") != "dataset":
        raise StoreError(store, "is a Zarr group but not a hiresctl dataset")
    elif str(meta.get("format_version")) != FORMAT_VERSION:
        version = str(meta.get("format_version"))
        if version.split(".")[0] != FORMAT_VERSION.split(".")[0]:
            raise StoreError(
                store, f"store format {version} is not writable by this hiresctl ({FORMAT_VERSION})"
            )
        upgrade_layout(root)  # resuming into an older 1.x store: one layout throughout
    return root


def _provenance(options: TileOptions) -> dict[str, Any]:
    import importlib.metadata as md

    versions: dict[str, str | None] = {}
    for pkg in ("hiresctl", "zarr", "tifffile", "imagecodecs", "openslide-python", "dask", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions,
        "tiling": options.tiling_key(),
        "split_seed": options.split_seed,
        "split_fractions": list(options.split_fractions),
    }


# --------------------------------------------------------------------------------------- API


def tile(
    sources: Iterable[SourceSpec],
    out: str | os.PathLike[str],
    options: TileOptions | None = None,
    labels: LabelTable | None = None,
    on_result: Callable[[ImageResult], None] | None = None,
    on_block: Callable[[int, int], None] | None = None,
    masks: MaskSet | None = None,
    annotations: Annotations | None = None,
) -> list[ImageResult]:
    """Tile every source into the dataset at ``out``; bad sources fail alone.

    Args:
        sources: files or mosaics to tile.
        out: the dataset store (created if missing).
        options: tiling parameters.
        labels: class labels; with a table, an image without a row fails.
        masks: segmentation masks, tiled beside each image as the NGFF label image
            ``labels/mask``; with a folder, an image without a mask fails.
        annotations: object boxes (COCO or GeoJSON), stored per image in level-0 pixels
            (scaled with any resampling); an image without an entry, or whose entries are
            bad, fails naming the entry.
        on_result: called once per source as it finishes (for ``--json`` lines).
        on_block: called as (done, total) blocks progress.

    Returns:
        One result per source, in order.
    """
    options = options or TileOptions()
    options.validate()
    store = str(out)
    with WriterLock(store):
        return _tile_locked(
            sources, store, options, labels, on_result, on_block, masks, annotations
        )


def _tile_locked(
    sources: Iterable[SourceSpec],
    store: str,
    options: TileOptions,
    labels: LabelTable | None,
    on_result: Callable[[ImageResult], None] | None,
    on_block: Callable[[int, int], None] | None,
    masks: MaskSet | None,
    annotations: Annotations | None,
) -> list[ImageResult]:
    root = _open_root(store, options)
    plans: list[_Plan] = []
    taken: set[str] = set()
    emit = on_result or (lambda r: None)
    for spec in sources:
        try:
            plan = _prepare(root, store, spec, options, labels, taken, masks, annotations)
        except SourceError as exc:
            plan = _Plan(
                spec=spec, result=ImageResult(source=spec.name, error=exc.problem), failed=True
            )
        except Exception as exc:  # an unexpected problem with one file must not stop the others
            plan = _Plan(
                spec=spec,
                result=ImageResult(source=spec.name, error=f"{type(exc).__name__}: {exc}"),
                failed=True,
            )
        plans.append(plan)
        if plan.failed or plan.result.status == "skipped":
            plan.result.seconds = (
                round(time.perf_counter() - plan.started, 3) if plan.started else 0.0
            )
            emit(plan.result)
    active = [p for p in plans if not p.failed and p.result.status != "skipped"]
    by_group = {p.group: p for p in active} | {p.mask_group: p for p in active if p.mask}
    max_passes = max((len(p.passes) for p in active), default=0)
    total = sum(_pass_blocks(p, i) for p in active for i in range(len(p.passes)))
    done = [0]
    lock = threading.Lock()

    def on_done(job: BlockJob, error: str | None) -> None:
        with lock:
            done[0] += 1
            plan = by_group[job.group]
            plan.result.blocks = (plan.result.blocks or 0) + 1
            if error and not plan.failed:
                plan.failed = True
                plan.result.status = "failed"
                plan.result.error = error
            if on_block:
                on_block(done[0], total)

    for pass_index in range(max_passes):
        jobs = [
            job
            for p in active
            if not p.failed and pass_index < len(p.passes)
            for job in _jobs(store, p, pass_index, options, root)
        ]
        # blocks finished by an earlier, interrupted run count as done
        done[0] += sum(
            _pass_blocks(p, pass_index)
            for p in active
            if not p.failed and pass_index < len(p.passes)
        ) - len(jobs)
        _execute(jobs, options, on_done)
    for plan in active:
        if not plan.failed:
            try:
                _finalize(root, plan, options)
            except Exception as exc:
                plan.failed = True
                plan.result.status = "failed"
                plan.result.error = f"finishing the image failed: {type(exc).__name__}: {exc}"
        plan.result.seconds = round(time.perf_counter() - plan.started, 3)
        if plan.failed:
            plan.result.status = "failed"
        emit(plan.result)
    for plan in plans:
        if plan.reader is not None:
            plan.reader.close()
    forget_cached(store)
    _write_manifest(root)
    return [p.result for p in plans]
