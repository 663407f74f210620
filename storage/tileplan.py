"""The tiler's plan: for each source, what ``storage.tiler`` will write (its pyramid levels,
the passes that build them from blocks read once, codecs, the label images beside it, the checks
its masks meet), and the jobs of each pass. Nothing is written here but the empty arrays."""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from storage.annotations import (
    Annotations,
)
from storage.blocks import BlockJob, borrowed_reader
from storage.boxes import annotation_file_id, boxes_for, write_boxes
from storage.chunks import remove_partial_writes
from storage.codecs import JpegCodec
from storage.composite import ColourLabelReader
from storage.errors import SourceError
from storage.format import (
    IMAGES,
    MASK,
    ROI,
    hires_attrs,
)
from storage.inputs import (
    ImageResult,
    LabelTable,
    MaskSet,
    SourceSpec,
    TileOptions,
    fingerprint,
    image_id_for,
    split_for,
)
from storage.passthrough import CopyPlan, plan_copy
from storage.pyramid import level_shapes
from storage.readers import (
    SourceReader,
)


@dataclass
class Plan:
    spec: SourceSpec
    result: ImageResult
    group: str = ""
    shapes: list[tuple[int, int]] = field(default_factory=list)
    passes: list[tuple[int, int, int]] = field(default_factory=list)  # (base, top, block)
    failed: bool = False
    started: float = 0.0
    mask: SourceSpec | None = None  # the mask image tiled beside the image
    classes: dict[int, str] = field(default_factory=dict)
    ignore: list[int] = field(default_factory=list)  # mask values left out of training and metrics
    colours: tuple[tuple[int, int], ...] = ()  # colour masks: (0xRRGGBB, stored value)
    roi: SourceSpec | None = None  # the region-of-interest mask tiled beside the image
    copied: int = 0  # levels 0 .. copied - 1 are the source's JPEG tiles (storage.passthrough)

    @property
    def mask_group(self) -> str:
        return f"{self.group}/labels/{MASK}"

    @property
    def roi_group(self) -> str:
        return f"{self.group}/labels/{ROI}"

    def label_layers(self) -> list[tuple[str, str, SourceSpec]]:
        """(name, group, source) of each label image tiled beside the image."""
        found = [(MASK, self.mask_group, self.mask), (ROI, self.roi_group, self.roi)]
        return [(name, group, spec) for name, group, spec in found if spec is not None]


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


def _codecs(
    options: TileOptions, channels: int, dtype: np.dtype, codec: str | None = None
) -> dict[str, Any]:
    if (codec or options.codec) == "jpeg":
        if dtype != np.uint8 or channels not in (1, 3):
            raise SourceError(
                "",
                f"--codec jpeg needs 8-bit gray or RGB; this image is {channels}-channel {dtype}",
            )
        return {
            "serializer": JpegCodec(quality=options.jpeg_quality),
            "compressors": None,
        }
    return {"compressors": [ZstdCodec(level=options.zstd_level)]}


def _copy_plan(
    reader: SourceReader, shapes: list[tuple[int, int]], options: TileOptions, store: str
) -> CopyPlan:
    if options.codec not in ("auto", "passthrough"):
        return CopyPlan(0)
    if "://" in store:  # copied chunks are written straight into shard files on a local disk
        return CopyPlan(0, reason="the store is not on a local disk")
    resampled = options.mpp is not None or options.mag is not None
    return plan_copy(reader, shapes, options.chunk, resampled)


def _auto_accepts(attrs: dict[str, Any], identity: dict[str, Any]) -> bool:
    """``--codec auto`` takes an image tiled before with either codec it chooses between (a
    store tiled losslessly before pass-through existed is not tiled again)."""
    tiling = attrs.get("tiling")
    if not isinstance(tiling, dict) or tiling.get("codec") not in ("zstd", "passthrough"):
        return False
    ignored = {"codec": None, "jpeg_quality": None}
    wanted = {**identity, "tiling": {**identity["tiling"], **ignored}}
    found = {**attrs, "tiling": {**tiling, **ignored}}
    return all(found.get(k) == v for k, v in wanted.items())


def prepare(
    root: zarr.Group,
    store: str,
    spec: SourceSpec,
    options: TileOptions,
    labels: LabelTable | None,
    taken: set[str],
    masks: MaskSet | None = None,
    annotations: Annotations | None = None,
    rois: MaskSet | None = None,
) -> Plan:
    plan = Plan(spec=spec, result=ImageResult(source=spec.name), started=time.perf_counter())
    with borrowed_reader(spec, options) as reader:  # left open for the blocks' tasks, a while
        _prepare(plan, reader, root, store, options, labels, taken, masks, annotations, rois)
    return plan


def _prepare(
    plan: Plan,
    reader: SourceReader,
    root: zarr.Group,
    store: str,
    options: TileOptions,
    labels: LabelTable | None,
    taken: set[str],
    masks: MaskSet | None,
    annotations: Annotations | None,
    rois: MaskSet | None,
) -> None:
    spec = plan.spec
    info = reader.info
    boxes = boxes_for(spec, reader, annotations) if annotations is not None else None
    label_row = labels.lookup(spec) if labels else None
    if labels is not None and (label_row is None or not label_row["label"]):
        raise SourceError(spec.name, f"no label for this image in {labels.path}")
    mask_path = masks.lookup(spec) if masks is not None else None
    if masks is not None and mask_path is None:
        raise SourceError(spec.name, f"no mask for this image in {masks.folder}")
    roi_path = rois.lookup(spec) if rois is not None else None
    if rois is not None and roi_path is None:
        raise SourceError(spec.name, f"no region-of-interest mask for this image in {rois.folder}")
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
    # copied levels are written by the first pass (the levels above it read the store back)
    copy = _copy_plan(reader, plan.shapes[: plan.passes[0][1] + 1], options, store)
    if copy.reason is not None and (options.codec == "passthrough" or copy.jpeg):
        fallback = "zstd" if options.codec in ("auto", "passthrough") else options.codec
        plan.result.note = f"JPEG tiles not copied: {copy.reason}; stored with {fallback}"
    tiling = options.tiling_key()
    if options.codec in ("auto", "passthrough"):  # what was done, so either asks the same
        tiling["codec"] = "passthrough" if copy.levels else "zstd"
        tiling["jpeg_quality"] = options.jpeg_quality if copy.levels else None
    split = (label_row or {}).get("split") or split_for(
        image_id, options.split_seed, options.split_fractions
    )
    identity: dict[str, Any] = {
        "source": spec.name,
        "fingerprint": fp,
        "tiling": tiling,
    }
    if mask_path is not None:
        assert masks is not None
        plan.mask = _check_mask(mask_path, info, options, colours=masks)
        plan.classes = masks.classes
        plan.ignore = masks.ignore
        plan.colours = masks.colours
        identity["mask_source"] = mask_path
        identity["mask_fingerprint"] = fingerprint(plan.mask)
        if masks.colours:  # another colour table stores other values: re-tile
            identity["mask_colours"] = [[f"#{c:06X}", v] for c, v in masks.colours]
    if roi_path is not None:
        plan.roi = _check_mask(roi_path, info, options, "region-of-interest mask")
        identity["roi_source"] = roi_path
        identity["roi_fingerprint"] = fingerprint(plan.roi)
    existing = root.get(plan.group)
    if existing is not None and not options.overwrite:
        attrs = hires_attrs(existing)
        same = all(attrs.get(k) == v for k, v in identity.items())
        if not same and options.codec == "auto":
            same = _auto_accepts(attrs, identity)
        if same:
            # label and split may change without re-tiling
            attrs.update(
                {
                    "label": (label_row or {}).get("label", attrs.get("label")),
                    "split": split,
                }
            )
            if boxes is not None:
                assert annotations is not None
                assert isinstance(existing, zarr.Group)
                attrs["boxes"] = write_boxes(
                    existing, boxes, annotations, annotation_file_id(annotations, spec)
                )
            existing.attrs["hiresctl"] = attrs
            if mask_path is not None and masks is not None and (masks.classes or masks.ignore):
                # names and the ignored values may change without re-tiling
                _name_classes(existing, masks.classes, masks.ignore)
            if attrs.get("status") == "complete":
                plan.result.status = "skipped"
                plan.result.note = None  # said when it was tiled
                return
            plan.result.status = "resumed"
            remove_partial_writes(Path(store) / plan.group)  # a killed run's half-written files
            plan.copied = int(attrs.get("copied_levels", 0))
            return
    if existing is not None:
        del root[plan.group]
    plan.result.status = "written"
    dtype = np.dtype(info.dtype)
    plan.copied = copy.levels
    codecs = [
        {"serializer": JpegCodec(options.jpeg_quality, copy.colorspace), "compressors": None}
        if level < copy.levels
        else _codecs(options, info.channels, dtype, tiling["codec"].replace("passthrough", "jpeg"))
        for level in range(len(plan.shapes))
    ]
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
    if copy.levels:
        meta["copied_levels"] = copy.levels
    if boxes is not None:
        assert annotations is not None
        meta["boxes"] = write_boxes(
            group, boxes, annotations, annotation_file_id(annotations, spec)
        )
    group.attrs["hiresctl"] = meta
    _create_levels(group, plan, options, info.channels, dtype, info.fill_value, codecs)
    for name, _, label_spec in plan.label_layers():
        label_group = group.require_group("labels").require_group(name)
        with borrowed_reader(label_spec, options) as label_reader:
            label_dtype = np.dtype(label_reader.info.dtype)
        zstd = {"compressors": [ZstdCodec(level=options.zstd_level)]}
        _create_levels(label_group, plan, options, 1, label_dtype, 0, [zstd] * len(plan.shapes))


def _create_levels(
    group: zarr.Group,
    plan: Plan,
    options: TileOptions,
    channels: int,
    dtype: np.dtype,
    fill_value: int,
    codecs: list[dict[str, Any]],
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
            **codecs[level],
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


def _check_mask(
    path: str,
    info: Any,
    options: TileOptions,
    what: str = "mask",
    colours: MaskSet | None = None,
) -> SourceSpec:
    """The mask's source spec, after checking it can label this image (one integer channel,
    or colours its classes table names; the image's size once resampled like it)."""
    base_mpp = info.extra.get("resampled_from_mpp", info.mpp)
    table = colours.colours if colours is not None else ()
    other = colours.other if colours is not None else None
    spec = SourceSpec(
        (path,), labels=True, reference_mpp=base_mpp, colours=table, other_colour=other
    )
    try:
        reader = spec.open(options)
    except SourceError as exc:
        raise SourceError(info.path, f"{what} {path}: {exc.problem}") from None
    try:
        mask = reader.info
        if mask.channels != 1 or np.dtype(mask.dtype).kind not in "ui":
            raise SourceError(
                info.path,
                f"{what} {path}: must be one channel of integer labels (gray or palette), "
                f"found {mask.channels} channel(s) of {np.dtype(mask.dtype)}",
            )
        (mh, mw), (h, w) = mask.level_shapes[0], info.level_shapes[0]
        if abs(mh - h) > 1 or abs(mw - w) > 1:  # one pixel: rounding when both are resampled
            raise SourceError(
                info.path, f"{what} {path} is {mh}×{mw} pixels but the image is {h}×{w}"
            )
        if table and other is None:
            assert isinstance(reader, ColourLabelReader) and colours is not None
            _check_colours(reader, path, info.path, colours.classes_file or "--mask-classes")
    finally:
        reader.close()
    return spec


def _check_colours(reader: ColourLabelReader, path: str, image: str, classes: str) -> None:
    """Refuse a colour mask with a colour its table does not name, before anything is written:
    the whole mask is scanned block by block, and the error names the colours and their
    pixel counts."""
    height, width = reader.info.level_shapes[0]
    found: dict[int, int] = {}
    step = 2048
    for y in range(0, height, step):
        for x in range(0, width, step):
            rgb = reader.base.read_region(0, y, x, min(step, height - y), min(step, width - x))
            for colour, count in reader.unknown(rgb).items():
                found[colour] = found.get(colour, 0) + count
    if found:
        worst = sorted(found.items(), key=lambda item: -item[1])
        listed = ", ".join(f"#{c:06X} ({n} pixels)" for c, n in worst[:3])
        more = f" and {len(worst) - 3} more" if len(worst) > 3 else ""
        raise SourceError(
            image,
            f"mask {path} has colours that {classes} does not name: {listed}{more}; name them, "
            "or add the row '*,ignore' to leave every unnamed colour out",
        )


def _name_classes(group: Any, classes: dict[int, str], ignore: list[int]) -> None:
    labels = group.get("labels")
    if labels is None or MASK not in labels:
        return
    mask = labels[MASK]
    attrs = hires_attrs(mask)
    attrs["classes"] = {str(k): v for k, v in classes.items()}
    attrs["ignore"] = list(ignore)
    mask.attrs["hiresctl"] = attrs


def _shard_side(level: int, passes: list[tuple[int, int, int]], chunk: int) -> int:
    """A level's shard is the footprint one task writes in it."""
    for base, top, block in passes:
        if base < level <= top or (level == 0 and base == 0):
            return block >> (level - base)
    return chunk


def pass_blocks(plan: Plan, pass_index: int) -> int:
    base, _top, block = plan.passes[pass_index]
    height, width = plan.shapes[base]
    layers = 1 + len(plan.label_layers())
    return layers * math.ceil(height / block) * math.ceil(width / block)


def jobs(
    store: str, plan: Plan, pass_index: int, options: TileOptions, root: zarr.Group
) -> list[BlockJob]:
    """The unfinished blocks of one pass: the image's, then its label images'."""
    base, top, block = plan.passes[pass_index]
    copied = plan.copied if pass_index == 0 else 0
    layers = [(plan.group, plan.spec, False, copied)]
    layers += [(group, spec, True, 0) for _, group, spec in plan.label_layers()]
    jobs = []
    for group, spec, labels, levels in layers:
        progress: Any = root[f"{group}/_progress_{pass_index}"]
        done = np.asarray(progress[...])
        jobs += [
            BlockJob(
                store, group, spec, options, pass_index, base, top, block, r, c, labels, levels
            )
            for r, c in zip(*np.nonzero(done == 0), strict=True)
        ]
    return jobs


__all__ = ["Plan", "jobs", "pass_blocks", "prepare"]
