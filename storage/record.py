"""The record of stored objects: each array's attributes list the shard files the writer
finished, so a shard deleted or lost later reads as an error naming it, never as background."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.storage import LocalStore

from storage.chunks import DirectChunks
from storage.errors import StoreError

RECORD = "stored_objects"  # key in an array's ``hiresctl`` attributes


def _hires(array: zarr.Array) -> dict[str, Any]:
    meta: Any = array.attrs.get("hiresctl", {})
    return dict(meta) if isinstance(meta, dict) else {}


def _object_grid(array: zarr.Array) -> tuple[int, ...]:
    outer = tuple(array.metadata.chunk_grid.chunk_shape)  # type: ignore[attr-defined]
    return tuple(-(-n // s) for n, s in zip(array.shape, outer, strict=True))


def _object_paths(array: zarr.Array) -> list[Path] | None:
    """The path of every storage object (shard or chunk) of ``array``, row-major over its grid;
    None when the array is not on a local disk."""
    store = array.store
    if not isinstance(store, LocalStore):
        return None
    folder = Path(store.root) / array.path
    return [
        folder / array.metadata.encode_chunk_key(coords)
        for coords in np.ndindex(*_object_grid(array))
    ]


def object_record(array: zarr.Array) -> dict[str, Any] | None:
    """Which storage objects of ``array`` exist now, as ``{"grid", "count", "bits"}`` (a
    row-major bitmap, hex): written once the array is complete, so that a shard deleted later is
    told apart from one never written because all its pixels were fill."""
    import zlib

    paths = _object_paths(array)
    if paths is None:
        return None
    present = np.array([p.is_file() for p in paths], dtype=bool)
    return {
        "grid": list(_object_grid(array)),
        "count": int(present.sum()),
        "bits": zlib.compress(np.packbits(present).tobytes()).hex(),
    }


def missing_objects(array: zarr.Array, record: dict[str, Any]) -> list[str]:
    """Keys of the storage objects ``record`` says were written and that are gone."""
    import zlib

    paths = _object_paths(array)
    if paths is None or list(record.get("grid", [])) != list(_object_grid(array)):
        return []
    bits = np.unpackbits(np.frombuffer(zlib.decompress(bytes.fromhex(record["bits"])), np.uint8))
    folder = Path(array.store.root) / array.path  # type: ignore[attr-defined]
    return [
        str(p.relative_to(folder))
        for p, stored in zip(paths, bits[: len(paths)], strict=True)
        if stored and not p.is_file()
    ]


def record_objects(array: zarr.Array) -> None:
    """Store :func:`object_record` in ``array``'s ``hiresctl`` attributes."""
    record = object_record(array)
    if record is not None:
        array.attrs["hiresctl"] = {**_hires(array), RECORD: record}


def missing_problem(array: zarr.Array) -> str | None:
    """What is wrong when stored objects the array's record lists are gone, else None (also
    for an array without a record: one written before records existed)."""
    record: dict[str, Any] | None = _hires(array).get(RECORD)
    gone = missing_objects(array, record) if record is not None else []
    if not gone or record is None:
        return None
    shown = ", ".join(gone[:3]) + (", …" if len(gone) > 3 else "")
    return (
        f"{len(gone)} of {record['count']} stored shards are missing ({shown}); their pixels "
        "would read as fill. Retile the image (--overwrite)"
    )


def check_objects(array: zarr.Array, where: str) -> list[str]:
    """Problems of ``array`` a reader would not notice until it reads there: recorded objects
    that are gone, and shards whose index is damaged (size, CRC32C, offsets); one line each."""
    problem = missing_problem(array)
    problems = [f"{where}: {problem}"] if problem else []
    direct = DirectChunks.open(array)
    if direct is not None and direct.per_shard is not None:
        for coords in np.ndindex(*_object_grid(array)):
            try:
                direct._index(coords)
            except StoreError as exc:
                problems.append(str(exc))
        direct.close()
    return problems


__all__ = [
    "RECORD",
    "check_objects",
    "missing_objects",
    "missing_problem",
    "object_record",
    "record_objects",
]
