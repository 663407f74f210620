"""The dataset store: one Zarr v3 group per dataset, one OME-NGFF 0.5 image group per source.

See ``storage/FORMAT.md`` for the written, versioned specification. This module owns the layout
(paths, attribute names, NGFF metadata) and reading; ``storage.tiler`` writes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr
import zarr.abc.store

import storage.codecs  # noqa: F401  (registers the JPEG chunk codec for reading)
from storage.errors import StoreError
from storage.format import (
    ANNOTATIONS,
    EXTRA_KEYS,
    FEATURES,
    FOREGROUND,
    FORMAT_VERSION,
    IMAGES,
    MASK,
    NGFF_VERSION,
    OLD_FOREGROUND,
    ROI,
    THUMBNAIL,
    array_mismatch,
    hires_attrs,
    image_arrays,
    implausible,
    upgrade_layout,
    version_tuple,
)
from storage.record import check_objects, missing_problem

__all__ = [
    "ANNOTATIONS",
    "FORMAT_VERSION",
    "Dataset",
    "ImageEntry",
    "hires_attrs",
    "image_multiscales",
    "upgrade_store",
]


def _axes(unit: str | None) -> list[dict[str, str]]:
    space: dict[str, str] = {"type": "space"}
    if unit:
        space["unit"] = unit
    return [{"name": "c", "type": "channel"}, {"name": "y", **space}, {"name": "x", **space}]


def image_multiscales(
    name: str,
    level_scales: list[tuple[float, float]],
    mpp: float | None,
    channels: list[dict[str, str]] | None = None,
    dtype: str = "|u1",
) -> dict[str, Any]:
    """NGFF 0.5 ``ome`` attribute of an image group: one scale transform per level.

    ``level_scales`` holds (y, x) pixel sizes of each level relative to level 0; they are
    multiplied by ``mpp`` (µm) when the source states a pixel size, else kept in pixels.
    ``channels`` (``label`` and ``color`` as RRGGBB, from the source: an OME-TIFF's or a
    QPTIFF's channel names) become the ``omero`` block viewers show channel names from, each
    window the full range of ``dtype``.
    """
    unit = "micrometer" if mpp else None
    base = mpp or 1.0
    datasets = [
        {
            "path": str(i),
            "coordinateTransformations": [{"type": "scale", "scale": [1.0, sy * base, sx * base]}],
        }
        for i, (sy, sx) in enumerate(level_scales)
    ]
    ome: dict[str, Any] = {
        "version": NGFF_VERSION,
        "multiscales": [{"name": name, "axes": _axes(unit), "datasets": datasets}],
    }
    if channels:
        top = float(np.iinfo(np.dtype(dtype)).max)
        window = {"min": 0.0, "max": top, "start": 0.0, "end": top}
        ome["omero"] = {
            "channels": [
                {"label": c["label"], "color": c["color"], "window": window, "active": True}
                for c in channels
            ]
        }
    return ome


@dataclass(frozen=True, slots=True)
class ImageEntry:
    """One manifest row: an image of the dataset and what the store knows of it."""

    id: str
    group: str  # group path relative to the dataset root
    source: str
    fingerprint: str
    shape: tuple[int, int, int]  # (c, y, x) of level 0
    levels: int
    mpp: float | None
    label: str | None
    split: str
    status: str  # "complete" only when every array of the image is written
    dtype: str = "|u1"
    fill_value: int = 0
    chunk: int = 256
    codec: str = "zstd"
    mask: dict[str, Any] | None = None  # {"source", "values", "pixels"} when a mask was tiled
    roi: dict[str, Any] | None = None  # the same for a region-of-interest mask
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    def to_json(self) -> dict[str, Any]:
        row = asdict(self)
        row["shape"] = list(self.shape)
        return row


class Dataset:
    """Read access to a dataset store (a local folder or any fsspec URL zarr accepts)."""

    def __init__(
        self, path: str | Path | zarr.abc.store.Store, mode: Literal["r", "r+", "a"] = "r"
    ) -> None:
        self.path = str(path)
        try:
            # A Store object (e.g. a wrapper that counts reads) is used as given.
            target = path if isinstance(path, zarr.abc.store.Store) else self.path
            self.root = zarr.open_group(target, mode=mode)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
            raise StoreError(
                self.path, "no dataset store here (run `hiresctl tile` first)"
            ) from exc
        except Exception as exc:
            raise StoreError(self.path, f"not a readable Zarr store: {exc}") from exc
        meta = hires_attrs(self.root)
        if meta.get("kind") != "dataset":
            raise StoreError(self.path, "is a Zarr group but not a hiresctl dataset")
        version = str(meta.get("format_version", "0"))
        if version.split(".")[0] != FORMAT_VERSION.split(".")[0]:
            raise StoreError(
                self.path,
                f"store format {version} is not readable by this hiresctl (format {FORMAT_VERSION})",
            )
        self.format_version = version
        self.meta = meta
        # What an older layout lacks, one line; empty for a store of this version.
        self.outdated = (
            f"format {version}: its foreground masks are one-level NGFF label images, which "
            f"OME-NGFF 0.5 validators refuse; `hiresctl info {self.path} --upgrade` moves them "
            "in place (seconds; pixels untouched)"
            if version_tuple(version) < version_tuple(FORMAT_VERSION)
            else ""
        )
        # Images whose metadata could not be read, one line each; entries() leaves them out.
        self.problems: list[str] = []
        self._shapes: dict[str, list[int]] | None = None
        self._verified: set[tuple[str, str]] = set()  # arrays whose stored objects were checked
        # Read-only: each image group and checked array opened once (each open reads its
        # zarr.json through zarr's event loop, about a millisecond: seconds over 10,000 images,
        # which a run would otherwise pay several times over as it lists, checks and reads them).
        self._read_only = mode == "r"
        self._groups: dict[str, zarr.Group] = {}
        self._nodes: dict[tuple[str, str], Any] = {}

    def image_ids(self) -> list[str]:
        if IMAGES not in self.root:
            return []
        try:
            return sorted(self.root[IMAGES].group_keys())  # type: ignore[union-attr]
        except Exception:
            # One image's zarr.json is damaged: list the image folders (each then fails alone
            # in entry()); only a local store can be listed without its metadata.
            folder = Path(self.path) / IMAGES
            if not folder.is_dir():
                raise StoreError(f"{self.path}/{IMAGES}", "cannot list the images") from None
            return sorted(p.name for p in folder.iterdir() if (p / "zarr.json").is_file())

    def entry(self, image_id: str) -> ImageEntry:
        group = self.image_group(image_id)
        attrs = hires_attrs(group)
        if not attrs:
            raise StoreError(f"{self.path}/{IMAGES}/{image_id}", "image group without metadata")
        problem = implausible(attrs, self._manifest_shapes().get(image_id))
        if problem:
            raise StoreError(
                f"{self.path}/{IMAGES}/{image_id}/zarr.json",
                f"unreadable metadata: {problem}; retile the image (--overwrite)",
            )
        return ImageEntry(
            id=image_id,
            group=f"{IMAGES}/{image_id}",
            source=attrs.get("source", ""),
            fingerprint=attrs.get("fingerprint", ""),
            shape=tuple(attrs.get("shape", (0, 0, 0))),
            levels=int(attrs.get("levels", 0)),
            mpp=attrs.get("mpp"),
            label=attrs.get("label"),
            split=attrs.get("split", "train"),
            status=attrs.get("status", "incomplete"),
            dtype=attrs.get("dtype", "|u1"),
            fill_value=int(attrs.get("fill_value", 0)),
            chunk=int(attrs.get("tiling", {}).get("chunk", 256)),
            codec=attrs.get("tiling", {}).get("codec", "zstd"),
            mask=attrs.get("mask"),
            roi=attrs.get("roi"),
            extra={k: attrs[k] for k in EXTRA_KEYS if k in attrs},
        )

    def entries(self, split: str | None = None, complete_only: bool = False) -> list[ImageEntry]:
        """Every image's entry. A damaged image (unreadable or missing metadata) is left out and
        named in :attr:`problems`, so the others can still be used."""
        rows = []
        for image_id in self.image_ids():
            try:
                rows.append(self.entry(image_id))
            except StoreError as exc:
                if str(exc) not in self.problems:
                    self.problems.append(str(exc))
        if complete_only:
            rows = [r for r in rows if r.complete]
        if split is not None:
            rows = [r for r in rows if r.split == split]
        return rows

    def image_group(self, image_id: str) -> zarr.Group:
        group = self._groups.get(image_id)
        if group is None:
            group = self._open_group(image_id)
            if self._read_only:
                self._groups[image_id] = group
        return group

    def _open_group(self, image_id: str) -> zarr.Group:
        try:
            return self.root[f"{IMAGES}/{image_id}"]  # type: ignore[return-value]
        except KeyError as exc:
            raise StoreError(self.path, f"no image {image_id!r} in this dataset") from exc
        except Exception as exc:  # a corrupt zarr.json: JSON or metadata errors
            raise StoreError(
                f"{self.path}/{IMAGES}/{image_id}/zarr.json",
                f"damaged image metadata ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                "retile the image (--overwrite)",
            ) from None

    def _manifest_shapes(self) -> dict[str, list[int]]:
        """{image id: level-0 shape} as the root's manifest records them (cached)."""
        if self._shapes is None:
            rows = self.meta.get("manifest") or []
            self._shapes = {
                str(r["id"]): list(r["shape"])
                for r in rows
                if isinstance(r, dict) and "id" in r and isinstance(r.get("shape"), list)
            }
        return self._shapes

    def _member(self, image_id: str, path: str) -> Any:
        """An array of an image group, or :class:`StoreError` naming it when it is missing or its
        metadata is damaged or disagrees with what the tiler recorded (the image's attributes:
        shape, dtype, levels, chunking), checked before anything is sized from it."""
        known = self._nodes.get((image_id, path))
        if known is not None:
            return known
        group = self.image_group(image_id)
        where = f"{self.path}/{IMAGES}/{image_id}/{path}"
        try:
            node = group[path]
            if (image_id, path) not in self._verified and isinstance(node, zarr.Array):
                mismatch = array_mismatch(node, path, hires_attrs(group))
                if mismatch:
                    raise StoreError(
                        f"{where}/zarr.json",
                        f"unreadable metadata: {mismatch}; retile the image (--overwrite)",
                    )
                problem = missing_problem(node)  # a deleted shard would read as fill
                if problem:
                    raise StoreError(where, problem)
                self._verified.add((image_id, path))
                if self._read_only:
                    self._nodes[(image_id, path)] = node
            return node
        except StoreError:
            raise
        except KeyError:
            raise StoreError(
                where, "missing from the store; retile the image (--overwrite)"
            ) from None
        except Exception as exc:
            raise StoreError(
                where, f"damaged metadata ({type(exc).__name__}); retile the image (--overwrite)"
            ) from None

    def verify(self, image_id: str) -> None:
        """Open what sizes an image's grids and reads (its level 0, and its mask's and region's
        level 0 where it has them) and check their metadata against the tiler's record:
        :class:`StoreError` naming the array and the field when they disagree. A run calls it
        for every image it opens, so a damaged image is left out, not met mid-run; the other
        levels are checked when first read."""
        self.level(image_id, 0)
        labels = hires_attrs(self.image_group(image_id))
        for name in (MASK, ROI):
            if labels.get(name):
                self._member(image_id, f"labels/{name}/0")

    def level(self, image_id: str, level: int = 0) -> zarr.Array:
        """The (c, y, x) array of one pyramid level."""
        return self._member(image_id, str(level))

    def thumbnail(self, image_id: str) -> np.ndarray:
        return np.asarray(self._member(image_id, THUMBNAIL)[...])

    def foreground(self, image_id: str) -> np.ndarray:
        """Foreground mask (1, th, tw) at thumbnail resolution; 1 = tissue/object."""
        if FOREGROUND not in self.image_group(image_id) and self._has(image_id, OLD_FOREGROUND):
            return np.asarray(self._member(image_id, OLD_FOREGROUND)[...])
        return np.asarray(self._member(image_id, FOREGROUND)[...])

    def check(self, image_id: str) -> list[str]:
        """Every problem of one image's arrays that reading would meet only where it reads:
        stored shards that are gone (against the record the tiler wrote) and damaged shard
        indexes; one line each (``hiresctl info --check``)."""
        try:
            group = self.image_group(image_id)
            arrays = image_arrays(group)
        except StoreError as exc:
            return [str(exc)]
        problems = []
        attrs = hires_attrs(group)
        where = f"{self.path}/{IMAGES}/{image_id}"
        odd = implausible(attrs, self._manifest_shapes().get(image_id))
        if odd:  # nothing may be sized from it: no array is checked
            return [f"{where}/zarr.json: unreadable metadata: {odd}"]
        for name, array in arrays:
            mismatch = array_mismatch(array, name, attrs)
            if mismatch:  # its declared grid may be anything: its objects are not walked
                problems.append(f"{where}/{name}/zarr.json: unreadable metadata: {mismatch}")
                continue
            problems += check_objects(array, f"{where}/{name}")
        return problems

    def feature_sets(self, image_id: str) -> list[str]:
        """Names of the complete feature sets of one image."""
        sets: Any = self.image_group(image_id).get(FEATURES)
        if sets is None:
            return []
        return sorted(n for n, g in sets.groups() if hires_attrs(g).get("status") == "complete")

    def feature_set(self, image_id: str, name: str) -> tuple[Any, Any, dict[str, Any]] | None:
        """(features (N, D), coords (N, 2) level-0 x, y, attributes) of a complete feature set,
        or None when the image has none of that name (or it is unfinished)."""
        if name not in self.feature_sets(image_id):
            return None
        path = f"{FEATURES}/{name}"
        group: Any = self.image_group(image_id)[path]
        features = self._member(image_id, f"{path}/features")
        coords = self._member(image_id, f"{path}/coords")
        return features, coords, hires_attrs(group)

    def _has(self, image_id: str, path: str) -> bool:
        try:
            self.image_group(image_id)[path]
        except Exception:
            return False
        return True

    def mask(self, image_id: str, level: int = 0) -> zarr.Array:
        """The (1, y, x) segmentation mask of one pyramid level (labels by 2x2 mode)."""
        try:
            return self.image_group(image_id)[f"labels/{MASK}/{level}"]  # type: ignore[return-value]
        except KeyError as exc:
            raise StoreError(
                f"{self.path}/{IMAGES}/{image_id}",
                "has no segmentation mask (tile with --masks DIR)",
            ) from exc

    def roi(self, image_id: str, level: int = 0) -> zarr.Array | None:
        """The (1, y, x) region-of-interest mask of one level (nonzero inside), or None when
        the image has none."""
        try:
            return self.image_group(image_id)[f"labels/{ROI}/{level}"]  # type: ignore[return-value]
        except KeyError:
            return None

    def mask_classes(self) -> dict[int, str]:
        """Class names of mask values: every value seen in a complete image's mask, named by the
        ``--mask-classes`` CSV where it gave a name (else the value itself); values the CSV
        marked ``ignore`` are no class."""
        names: dict[int, str] = {}
        ignored: set[int] = set()
        for entry in self.entries(complete_only=True):
            if not entry.mask:
                continue
            attrs = hires_attrs(self.image_group(entry.id)[f"labels/{MASK}"])
            ignored.update(int(v) for v in attrs.get("ignore", []))
            for value in entry.mask.get("values", []):
                names.setdefault(int(value), str(value))
            for value, name in attrs.get("classes", {}).items():
                names[int(value)] = name
        return {v: n for v, n in sorted(names.items()) if v not in ignored}

    def has_boxes(self, image_id: str) -> bool:
        return ANNOTATIONS in self.image_group(image_id)

    def boxes(self, image_id: str) -> tuple[np.ndarray, list[str]]:
        """(n, 4) float32 boxes x0, y0, x1, y1 in level-0 pixels and each box's category name."""
        try:
            sub: Any = self.image_group(image_id)[ANNOTATIONS]
        except KeyError as exc:
            raise StoreError(
                f"{self.path}/{IMAGES}/{image_id}",
                "has no object annotations (tile with --coco FILE or --annotations PATH)",
            ) from exc
        categories = hires_attrs(sub).get("categories", [])
        xyxy = np.asarray(sub["boxes"][...], dtype=np.float32).reshape(-1, 4)
        labels = np.asarray(sub["labels"][...]).reshape(-1)
        return xyxy, [categories[int(i)] for i in labels]

    def coco_ids(self, image_id: str) -> tuple[Any, dict[str, int]]:
        """The image's id in the COCO file it was tiled from and that file's category id of each
        category name, so results can be written in the user's id space; (None, {}) for boxes
        that came from elsewhere (GeoJSON, synthesized)."""
        try:
            sub: Any = self.image_group(image_id)[ANNOTATIONS]
        except KeyError:
            return None, {}
        meta = hires_attrs(sub)
        ids = meta.get("category_ids")
        names = meta.get("categories", [])
        by_name = dict(zip(names, ids, strict=True)) if isinstance(ids, list) else {}
        return meta.get("file_image_id"), by_name

    def box_classes(self) -> list[str]:
        """Category names of the complete images' annotations, in the files' order."""
        names: list[str] = []
        for entry in self.entries(complete_only=True):
            for name in entry.extra.get("boxes", {}).get("categories", []):
                if name not in names:
                    names.append(name)
        return names

    def manifest(self) -> list[dict[str, Any]]:
        return [e.to_json() for e in self.entries()]

    def summary(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format_version": self.format_version,
            "provenance": self.meta.get("provenance", {}),
            "images": self.manifest(),
        }

    def __repr__(self) -> str:
        return f"Dataset({self.path!r}, images={len(self.image_ids())})"


def upgrade_store(path: str | Path) -> list[str]:
    """Rewrite a store of an older 1.x layout as this version's, in place, under the writer
    lock; returns one line per image changed."""
    from storage.lock import WriterLock

    with WriterLock(path):
        return upgrade_layout(Dataset(path, mode="r+").root)


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=False, default=str)
