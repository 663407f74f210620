"""The store's format: the layout's names and version, what the tiler can have written (the
checks untrusted metadata meets before anything is sized from it), and the steps that upgrade an
older layout in place (``hiresctl info --upgrade``). The written specification is
``storage/FORMAT.md``; ``storage.store`` reads stores, ``storage.tiler`` writes them."""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from storage.pyramid import level_shapes
from storage.record import record_objects

#: Version of the layout in FORMAT.md; readers refuse a newer major version.
FORMAT_VERSION = "1.1"  # 1.1: the foreground mask left labels/ (an array beside the thumbnail)
NGFF_VERSION = "0.5"
IMAGES = "images"
THUMBNAIL = "thumbnail"
# The foreground (tissue) mask: an array beside the thumbnail, at its resolution. It is not an
# NGFF label image: a label image must carry every level of its image, and this mask is a
# thumbnail-sized estimate. Stores written by earlier versions kept it as the one-level label image
# labels/foreground, which OME-NGFF 0.5 validators refuse; it is still read from there.
FOREGROUND = "foreground"
OLD_FOREGROUND = "labels/foreground/0"
FEATURES = "features"  # images/<id>/features/<name>/: a feature set written by `hiresctl embed`
MASK = "mask"  # the segmentation mask: NGFF label image labels/mask, levels like the image
ROI = "roi"  # a region-of-interest mask (nonzero inside): labels/roi, levels like the image
EXTRA_KEYS = ("geo", "format", "vendor", "boxes", "crs", "geotransform")
ANNOTATIONS = "annotations"  # detection: boxes (n, 4) x0, y0, x1, y1 level-0 px; labels (n,)


def version_tuple(text: str) -> tuple[int, ...]:
    """``"1.1"`` → (1, 1); an unreadable version is (0,), older than every real one."""
    try:
        return tuple(int(part) for part in text.split("."))
    except ValueError:
        return (0,)


def write_foreground(group: Any, mask: np.ndarray, scale: Any) -> None:
    """(Re)write an image's ``foreground`` array: ``mask`` (1, th, tw) uint8, one chunk, with
    the thumbnail's ``scale`` (level-0 pixels per mask pixel) when given."""
    if FOREGROUND in group:
        del group[FOREGROUND]
    array = group.create_array(
        FOREGROUND,
        shape=mask.shape,
        dtype="uint8",
        chunks=mask.shape,
        dimension_names=("c", "y", "x"),
        compressors=[ZstdCodec(level=3)],
    )
    array[...] = mask.astype(np.uint8)
    if scale is not None:
        array.attrs["scale"] = list(scale)


def image_arrays(group: Any) -> list[tuple[str, Any]]:
    """(path, array) of every array of an image group: its own (levels, thumbnail,
    foreground) and its mask levels."""
    arrays = list(group.arrays())
    for label in (MASK, ROI):
        found: Any = group.get(f"labels/{label}")
        if found is not None:
            arrays += [(f"labels/{label}/{name}", a) for name, a in found.arrays()]
    return arrays


def record_arrays(group: zarr.Group, only_missing: bool = False) -> None:
    """Write the record of stored objects of every array of an image group (its levels,
    thumbnail, foreground and mask levels); ``only_missing``: of arrays without one (an
    upgrade records what is there now: it cannot know what an older version wrote)."""
    for _, array in image_arrays(group):
        if not (only_missing and "stored_objects" in hires_attrs(array)):
            record_objects(array)


def upgrade_layout(root: zarr.Group) -> list[str]:
    """``storage.store.upgrade_store`` for a root group the caller holds the writer lock of. Only
    metadata and the small foreground masks move: 1.0 → 1.1 copies ``labels/foreground/0`` to
    ``foreground`` and drops that label image (and ``labels/`` when nothing else is in it), and
    records the stored objects of every array as they are now."""
    changed = []
    images: Any = root.get(IMAGES)
    for image_id in list(images.group_keys()) if images is not None else []:
        try:
            group: Any = images[image_id]
            labels: Any = group.get("labels")
            if labels is None or "foreground" not in labels:
                continue
            mask = np.asarray(labels["foreground"]["0"][...])
        except Exception:
            continue  # damaged: `hiresctl info` names it
        thumb = group.get(THUMBNAIL)
        write_foreground(group, mask, thumb.attrs.get("scale") if thumb is not None else None)
        del labels["foreground"]
        names = [n for n in labels.attrs.get("ome", {}).get("labels", []) if n != "foreground"]
        if names:
            labels.attrs["ome"] = {**labels.attrs["ome"], "labels": names}
        else:
            del group["labels"]
        changed.append(f"{image_id}: foreground mask moved out of labels/")
    for image_id in list(images.group_keys()) if images is not None else []:
        try:
            record_arrays(images[image_id], only_missing=True)
        except Exception:
            continue  # damaged: `hiresctl info` names it
    root.attrs["hiresctl"] = {**hires_attrs(root), "format_version": FORMAT_VERSION}
    return changed


def hires_attrs(node: zarr.Group | zarr.Array) -> dict[str, Any]:
    """A copy of the ``hiresctl`` attributes of a group or array (empty when absent)."""
    value: Any = node.attrs.get("hiresctl")
    return dict(value) if isinstance(value, dict) else {}


# What the tiler can have written: a source over MAX_PIXELS is refused before tiling (the
# default limit is 2**37), so a larger declared shape is damage or an attack, never data.
MAX_PIXELS = 2**40
MAX_CHANNELS = 1024
DTYPES = {"|u1", "<u2", ">u2", "<u4", ">u4", "<f4", ">f4", "|i1", "<i2", "<i4"}


def implausible(attrs: dict[str, Any], recorded: list[int] | None) -> str | None:
    """What is wrong with an image's own attributes before anything is sized from them: the
    shape against sane bounds and against the root's manifest, the levels against the shape."""
    shape = attrs.get("shape")
    if not (
        isinstance(shape, list)
        and len(shape) == 3
        and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
    ):
        return f"shape {shape!r} is not three positive integers"
    channels, height, width = shape
    if channels > MAX_CHANNELS or height * width > MAX_PIXELS:
        return f"shape {shape} is beyond what the tiler writes ({MAX_PIXELS} pixels)"
    if recorded is not None and list(recorded) != shape:
        return f"shape {shape} differs from the store's manifest ({recorded})"
    if str(attrs.get("dtype", "|u1")) not in DTYPES:
        return f"dtype {attrs.get('dtype')!r} is not one the tiler writes"
    tiling = attrs.get("tiling") or {}
    thumbnail = tiling.get("thumbnail_size", 1024)
    chunk = tiling.get("chunk", 256)
    if not (
        isinstance(thumbnail, int) and thumbnail >= 16 and isinstance(chunk, int) and chunk >= 16
    ):
        return f"tiling {tiling!r} names no valid chunk and thumbnail sizes"
    expected = len(level_shapes(height, width, thumbnail))
    if attrs.get("levels") not in (None, expected):
        return f"levels {attrs.get('levels')!r} where a {height}×{width} image has {expected}"
    return None


def array_mismatch(array: zarr.Array, path: str, attrs: dict[str, Any]) -> str | None:
    """How ``array`` (``path`` in its image group) disagrees with the image's attributes: its
    shape, data type and chunks, for the pyramid levels and label levels; the thumbnail and
    foreground must stay thumbnail-sized. None when it agrees (or the image's attributes are
    themselves unusable: :func:`implausible` names that)."""
    shape = attrs.get("shape")
    if implausible(attrs, None) or not isinstance(shape, list):
        return None
    channels, height, width = shape
    tiling = attrs.get("tiling") or {}
    thumbnail, chunk = tiling.get("thumbnail_size", 1024), tiling.get("chunk", 256)
    levels = level_shapes(height, width, thumbnail)
    declared = tuple(array.shape)
    parts = path.split("/")
    labels = len(parts) == 3 and parts[0] == "labels" and parts[1] in (MASK, ROI)
    if parts[-1].isdigit() and (len(parts) == 1 or labels):
        level = int(parts[-1])
        if level >= len(levels):
            return f"level {level} does not exist for a {height}×{width} image"
        bands = channels if len(parts) == 1 else 1
        wanted = (bands, *levels[level])
        if declared != wanted:
            return f"shape {list(declared)} where the tiler recorded {list(wanted)}"
        if len(parts) == 1 and array.dtype != np.dtype(attrs.get("dtype", "|u1")):
            return f"data type {array.dtype} where the tiler recorded {attrs.get('dtype')}"
        if tuple(array.chunks) != (bands, chunk, chunk):
            return f"chunks {list(array.chunks)} where the tiler wrote {[bands, chunk, chunk]}"
        return None
    small = len(declared) == 3 and max(declared[1:]) <= thumbnail and declared[0] <= channels
    if parts[-1] in (THUMBNAIL, FOREGROUND) and len(parts) == 1 and not small:
        return f"shape {list(declared)} is larger than a {thumbnail}-pixel thumbnail"
    return None


__all__ = [
    "ANNOTATIONS",
    "FORMAT_VERSION",
    "hires_attrs",
    "image_arrays",
    "record_arrays",
    "upgrade_layout",
    "version_tuple",
    "write_foreground",
]
