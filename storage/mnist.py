"""MNIST's IDX files, read from a folder the user gives (``hiresctl synth ... --mnist DIR``).

The four files of the MNIST distribution (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``), each gzip-compressed (``.gz``) or raw;
the dotted spelling some mirrors use (``train-images.idx3-ubyte``) is found too. Nothing is
downloaded. A file that is not IDX, has the wrong element type or rank, or is shorter than its
header says is refused with one line naming it.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from storage.errors import SourceError, UsageError

__all__ = ["MNIST_FILES", "load_mnist", "read_idx"]

#: part → (images file, labels file), without the ``.gz``
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_UBYTE = 0x08  # the IDX element type of MNIST's files: unsigned byte


def read_idx(path: str | os.PathLike[str], rank: int) -> np.ndarray:
    """The uint8 array of an IDX file of ``rank`` dimensions (gzip or raw, by its first bytes)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except OSError as exc:  # gzip.BadGzipFile and EOFError for a cut .gz
        raise SourceError(
            str(path), f"cannot read: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    except EOFError:
        raise SourceError(str(path), "the gzip stream is truncated") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise SourceError(str(path), "not an IDX file (its first bytes are not 00 00)")
    kind, dims = raw[2], raw[3]
    if kind != _UBYTE or dims != rank:
        raise SourceError(
            str(path),
            f"IDX of element type 0x{kind:02x} with {dims} dimension(s); expected unsigned "
            f"bytes (0x08) with {rank}",
        )
    header = 4 + 4 * dims
    if len(raw) < header:
        raise SourceError(str(path), "truncated inside its header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    size = int(np.prod(shape))
    if len(raw) - header < size:
        raise SourceError(
            str(path),
            f"truncated: its header declares {'×'.join(map(str, shape))} = {size} bytes of "
            f"data, the file holds {len(raw) - header}",
        )
    return np.frombuffer(raw, np.uint8, size, header).reshape(shape)


def _find(folder: Path, name: str) -> Path:
    dotted = name.replace("-idx", ".idx")
    for candidate in (name, name + ".gz", dotted, dotted + ".gz"):
        if (folder / candidate).is_file():
            return folder / candidate
    raise UsageError(f"--mnist {folder}: no {name}[.gz] (the MNIST IDX files go in one folder)")


def load_mnist(folder: str | os.PathLike[str], part: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, 28, 28) uint8, labels (n,) uint8) of MNIST's ``train`` or ``test`` part."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"--mnist {folder}: not a folder")
    image_name, label_name = MNIST_FILES[part]
    images_path, labels_path = _find(folder, image_name), _find(folder, label_name)
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if len(images) != len(labels):
        raise SourceError(
            str(labels_path),
            f"holds {len(labels)} labels but {images_path.name} holds {len(images)} images",
        )
    if labels.size and labels.max() > 9:
        raise SourceError(str(labels_path), f"label {int(labels.max())} is not a digit 0–9")
    return images, labels
