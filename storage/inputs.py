"""What to tile and how: the options, the source specs, label tables (image labels and splits), mask
folders matched to sources, the ids and splits of images."""

from __future__ import annotations

import csv
import hashlib
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from storage.annotations import (
    image_stem,
)
from storage.composite import ColourLabelReader, MosaicReader, ResampledReader
from storage.errors import SourceError, UsageError
from storage.readers import (
    DEFAULT_MAX_PIXELS,
    SourceReader,
    open_source,
)
from storage.store import (
    FORMAT_VERSION,
)

BLOCK_TARGET = 4096  # level-0 pixels per block side (rounded to chunk * 2**m)
SPLITS = ("train", "val", "test")


def csv_rows(
    path: str | os.PathLike[str], what: str, columns: tuple[str, ...]
) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row with stripped names) of a CSV a user wrote, read as spreadsheets write
    it (a UTF-8 byte-order mark, CRLF); one ``UsageError`` naming the file for a missing column,
    text that is not UTF-8, a broken CSV or a file that cannot be read (``what`` names it)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            reader.fieldnames = [f.strip() for f in reader.fieldnames or []]
            missing = [c for c in columns if c not in reader.fieldnames]
            if missing:
                wanted = " and ".join(repr(c) for c in columns)
                raise UsageError(
                    f"{path}: {what} needs columns {wanted} (found {reader.fieldnames})"
                )
            yield from enumerate(reader, start=2)
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"{path}: {what} is not UTF-8 text (byte {exc.start}); save it as UTF-8 CSV"
        ) from None
    except csv.Error as exc:
        raise UsageError(f"{path}: not a readable CSV ({exc})") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read {what}: {exc.strerror}") from exc


#: ``auto``: the source's JPEG tiles copied where they can be (storage.passthrough), else zstd;
#: ``passthrough``: the same, saying why where they cannot; ``zstd``: lossless; ``jpeg``: re-encoded
CODECS = ("auto", "passthrough", "zstd", "jpeg")


@dataclass(frozen=True, slots=True)
class TileOptions:
    """Tiling parameters. Everything here is recorded in the store as provenance."""

    chunk: int = 256
    block_size: int = BLOCK_TARGET
    codec: str = "auto"
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
        if self.codec not in CODECS:
            raise UsageError(f"--codec must be one of {', '.join(CODECS)}, got {self.codec!r}")
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
            "jpeg_quality": self.jpeg_quality if self.codec != "zstd" else None,
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
    # colour masks: (0xRRGGBB, stored value) pairs and the value of unnamed colours (None: error)
    colours: tuple[tuple[int, int], ...] = ()
    other_colour: int | None = None
    scene: int | None = None  # one scene of a multi-scene file (CZI)

    @property
    def name(self) -> str:
        if self.scene is not None:
            return f"{self.paths[0]} (scene {self.scene})"
        return self.mosaic or self.paths[0]

    def open(self, options: TileOptions) -> SourceReader:
        if self.mosaic:
            reader: SourceReader = MosaicReader(self.mosaic, self.paths, options.max_pixels)
        else:  # a colour-coded mask is read as colours (a palette one through its palette)
            labels = self.labels and not self.colours
            reader = open_source(self.paths[0], options.max_pixels, labels=labels, scene=self.scene)
        if self.labels and self.reference_mpp is not None and options.source_mpp is None:
            reader.info = replace(reader.info, mpp=self.reference_mpp)
        reader = _resample(reader, options, nearest=self.labels)
        if self.colours:
            reader = ColourLabelReader(reader, dict(self.colours), self.other_colour)
        return reader


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
    note: str | None = None  # what the user should know though nothing failed (one line)

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
        for line, row in csv_rows(path, "labels CSV", ("source", "label")):
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

    def lookup(self, spec: SourceSpec) -> dict[str, str] | None:
        candidates = [spec.name, Path(spec.name).name, str(Path(spec.name).resolve())]
        for key in candidates:
            if key in self.rows:
                return self.rows[key]
        return None


MASK_SUFFIXES = (
    "",
    "_mask",
    "-mask",
    "_masks",
    "_label",
    "_labels",
    "_gt",
    "_annotation",
)


class MaskSet:
    """Label images (segmentation masks, or region-of-interest masks with ``--roi``) matched to
    sources: a folder, by file name (the same name, or the same stem with any image suffix,
    optionally followed by ``_mask``, ``_label(s)``, ``_gt``...), or a CSV table with columns
    ``source`` and ``mask`` (or ``roi``) naming each source's file, for datasets whose names do
    not match (DRIVE's ``21_training.tif`` ↔ ``21_manual1.gif``); relative paths in the table
    are relative to the table's folder.

    Values are class labels (0 = background by convention) and are stored unchanged. An
    optional ``value,name`` CSV names the classes; a value named ``ignore`` is left out of
    training and evaluation (the ignore index of segmentation libraries).
    """

    def __init__(
        self,
        where: str | os.PathLike[str],
        classes: str | os.PathLike[str] | None = None,
        option: str = "--masks",
    ) -> None:
        self.folder = str(where)  # what the errors name: the folder or the table
        self.option = option
        self.files: dict[str, str] = {}
        self.table: dict[str, str] | None = None
        path = Path(where)
        if path.is_file():
            self.table = _read_file_table(path, option)
        elif path.is_dir():
            for entry in sorted(path.iterdir()):
                if entry.is_file() and not entry.name.startswith("."):
                    self.files.setdefault(entry.name.lower(), str(entry))
                    self.files.setdefault(image_stem(entry.name).lower(), str(entry))
        else:
            raise UsageError(f"{option} {where}: not a folder or a CSV table")
        self.classes: dict[int, str] = {}
        self.ignore: list[int] = []
        self.colours: tuple[tuple[int, int], ...] = ()  # colour masks: (0xRRGGBB, value)
        self.other: int | None = None
        self.classes_file = str(classes) if classes is not None else None
        if classes is not None:
            table = _read_classes(classes)
            self.ignore = list(table.ignore)
            self.classes = {v: n for v, n in table.names.items() if v not in self.ignore}
            self.colours, self.other = table.colours, table.other

    def lookup(self, spec: SourceSpec) -> str | None:
        name = Path(spec.name).name
        if self.table is not None:
            for key in (spec.name, name, str(Path(spec.name).resolve())):
                if key in self.table:
                    return self.table[key]
            return None
        if name.lower() in self.files:
            return self.files[name.lower()]
        stem = image_stem(name).lower()
        for suffix in MASK_SUFFIXES:
            if stem + suffix in self.files:
                return self.files[stem + suffix]
        return None


def _read_file_table(path: Path, option: str) -> dict[str, str]:
    """``source,<file column>`` rows of a ``--masks``/``--roi`` table: source → file path."""
    column = option.lstrip("-").removesuffix("s")  # --masks: mask, --roi: roi
    table: dict[str, str] = {}
    for line, row in csv_rows(path, f"{option} table", ("source", column)):
        source, file = (row.get("source") or "").strip(), (row.get(column) or "").strip()
        if not source or not file:
            raise UsageError(f"{path}:{line}: empty 'source' or '{column}'")
        target = Path(file) if Path(file).is_absolute() else path.parent / file
        if not target.is_file():
            raise UsageError(f"{path}:{line}: {column} file {file} not found")
        if table.get(source, str(target)) != str(target):
            raise UsageError(f"{path}:{line}: {source!r} is listed twice with other files")
        table[source] = str(target)
    return table


IGNORE_VALUE = 255  # the stored value of colours a --mask-classes table marks "ignore"


@dataclass(frozen=True)
class MaskClasses:
    """What a ``--mask-classes`` table says. Rows name integer mask values (``3,road``), or
    colours (``#3C1098,building``: the masks are then RGB, each row's colour is stored as the
    row's rank, 0, 1, …, and its colour kept for the NGFF label's palette). A row named
    ``ignore`` marks a value or colour that is no class; in a colour table ``*,ignore`` marks
    every colour no row names (else such a colour fails its image)."""

    names: dict[int, str]  # stored value → class name (ignored values included)
    ignore: tuple[int, ...] = ()
    colours: tuple[tuple[int, int], ...] = ()  # (0xRRGGBB, stored value), colour tables only
    other: int | None = None  # stored value of unnamed colours ("*,ignore"), else None


def _colour(text: str) -> int | None:
    """0xRRGGBB of ``#RRGGBB`` (or ``#RGB``), None for anything else."""
    text = text.strip()
    if not text.startswith("#"):
        return None
    digits = text[1:]
    if len(digits) == 3:
        digits = "".join(c * 2 for c in digits)
    if len(digits) != 6:
        return None
    try:
        return int(digits, 16)
    except ValueError:
        return None


def _read_classes(path: str | os.PathLike[str]) -> MaskClasses:
    names: dict[int, str] = {}
    colours: dict[int, int] = {}
    other: int | None = None
    kinds: set[str] = set()
    for line, row in csv_rows(path, "mask classes CSV", ("value", "name")):
        text = (row.get("value") or "").strip()
        name = (row.get("name") or "").strip()
        if text == "*":
            if name.lower() != "ignore":
                raise UsageError(f"{path}:{line}: '*' (every other colour) can only be 'ignore'")
            other = IGNORE_VALUE
            kinds.add("colour")
            continue
        colour = _colour(text)
        if colour is not None:
            kinds.add("colour")
            if colour in colours:
                raise UsageError(f"{path}:{line}: colour {text} is repeated")
            value = (
                IGNORE_VALUE
                if name.lower() == "ignore"
                else len([v for v in colours.values() if v != IGNORE_VALUE])
            )
            colours[colour] = value
            names.setdefault(value, name or text)
            continue
        try:
            value = int(text)
        except ValueError:
            raise UsageError(
                f"{path}:{line}: value {row.get('value')!r} is neither an integer nor a "
                "colour (#RRGGBB)"
            ) from None
        kinds.add("value")
        if value < 0 or value in names:
            raise UsageError(f"{path}:{line}: value {value} is negative or repeated")
        names[value] = name or str(value)
    if len(kinds) > 1:
        raise UsageError(f"{path}: rows name both integer values and colours; use one kind")
    if colours and len([v for v in colours.values() if v != IGNORE_VALUE]) >= IGNORE_VALUE:
        raise UsageError(f"{path}: at most {IGNORE_VALUE} colour classes")
    ignore = sorted(
        {v for v, n in names.items() if n.lower() == "ignore"}
        | ({IGNORE_VALUE} if other is not None else set())
    )
    return MaskClasses(names, tuple(ignore), tuple(sorted(colours.items())), other)


def fingerprint(spec: SourceSpec) -> str:
    """Content fingerprint: size plus the first and last MiB of every file (fast on huge files)."""
    from storage.dicom import source_files

    h = hashlib.sha256()
    if spec.scene is not None:
        h.update(f"scene {spec.scene}".encode())
    for path in (f for p in spec.paths for f in source_files(p)):  # a DICOM folder: its files
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
    if spec.scene is not None:
        name = f"{name}_s{spec.scene}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "image"


def expand_scenes(specs: Iterable[SourceSpec]) -> list[SourceSpec]:
    """Each multi-scene file (CZI) as one spec per scene; every other spec as it is (a file
    that cannot be opened stays one spec, and fails alone with its own error)."""
    from storage import czi

    out: list[SourceSpec] = []
    for spec in specs:
        path = Path(spec.paths[0])
        if spec.mosaic or spec.scene is not None or path.suffix.lower() not in czi.SUFFIXES:
            out.append(spec)
            continue
        try:
            found = czi.scenes(path)
        except SourceError:
            found = []
        if len(found) > 1:
            out.extend(replace(spec, scene=k) for k in found)
        else:
            out.append(spec)
    return out


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


def _resample(reader: SourceReader, options: TileOptions, nearest: bool = False) -> SourceReader:
    if options.mpp is None and options.mag is None:
        if options.source_mpp is not None:
            reader.info = replace(reader.info, mpp=options.source_mpp)
        return reader
    base_mpp = options.source_mpp or reader.info.mpp
    if base_mpp is None:
        raise SourceError(
            reader.info.path,
            "the file states no pixel size; give --source-mpp to use --mpp/--mag",
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
