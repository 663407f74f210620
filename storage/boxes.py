"""An image's object boxes: found for its source in the annotations (COCO, GeoJSON, CSV),
checked against the source, scaled to level-0 pixels of the store, and written beside it."""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from storage.annotations import (
    Annotations,
    ImageBoxes,
    geo_to_pixels,
    outside_problem,
)
from storage.composite import ResampledReader
from storage.errors import SourceError
from storage.inputs import SourceSpec
from storage.readers import (
    SourceReader,
)
from storage.store import (
    ANNOTATIONS,
)


def boxes_for(
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


def annotation_file_id(annotations: Annotations, spec: SourceSpec) -> Any:
    found = annotations.lookup(spec.name)
    return found.file_id if found is not None else None


def write_boxes(
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
    box_array = sub.create_array(
        "boxes", shape=(count, 4), dtype="float32", chunks=(max(1, count), 4), compressors=zstd
    )
    label_array = sub.create_array(
        "labels", shape=(count,), dtype="int32", chunks=(max(1, count),), compressors=zstd
    )
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
