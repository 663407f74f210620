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

import hashlib
import math
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from storage.annotations import (
    Annotations,
)
from storage.blocks import BlockJob, cached_reader, forget_cached, run_block
from storage.boxes import annotation_file_id, boxes_for, write_boxes
from storage.chunks import remove_partial_writes
from storage.codecs import JpegCodec
from storage.composite import ColourLabelReader
from storage.errors import NoSpaceError, SourceError, StoreError, UsageError, no_space
from storage.format import (
    FORMAT_VERSION,
    IMAGES,
    MASK,
    ROI,
    THUMBNAIL,
    hires_attrs,
    record_arrays,
    upgrade_layout,
    write_foreground,
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
from storage.lock import WriterLock
from storage.ngff import label_image_attrs
from storage.pyramid import foreground_mask, level_shapes, resize_thumbnail
from storage.readers import (
    SourceReader,
)
from storage.store import image_multiscales

__all__ = [
    "ImageResult",
    "LabelTable",
    "MaskSet",
    "SourceSpec",
    "TileOptions",
    "tile",
]

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
    ignore: list[int] = field(default_factory=list)  # mask values left out of training and metrics
    colours: tuple[tuple[int, int], ...] = ()  # colour masks: (0xRRGGBB, stored value)
    roi: SourceSpec | None = None  # the region-of-interest mask tiled beside the image

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


def _codecs(options: TileOptions, channels: int, dtype: np.dtype) -> dict[str, Any]:
    if options.codec == "jpeg":
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


def _prepare(
    root: zarr.Group,
    store: str,
    spec: SourceSpec,
    options: TileOptions,
    labels: LabelTable | None,
    taken: set[str],
    masks: MaskSet | None = None,
    annotations: Annotations | None = None,
    rois: MaskSet | None = None,
) -> _Plan:
    plan = _Plan(spec=spec, result=ImageResult(source=spec.name), started=time.perf_counter())
    reader = spec.open(options)
    plan.reader = reader
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
        meta["boxes"] = write_boxes(
            group, boxes, annotations, annotation_file_id(annotations, spec)
        )
    group.attrs["hiresctl"] = meta
    _create_levels(group, plan, options, info.channels, dtype, info.fill_value, codecs)
    for name, _, label_spec in plan.label_layers():
        label_group = group.require_group("labels").require_group(name)
        label_dtype = np.dtype(cached_reader(label_spec, options).info.dtype)
        zstd = {"compressors": [ZstdCodec(level=options.zstd_level)]}
        _create_levels(label_group, plan, options, 1, label_dtype, 0, zstd)
    return plan


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


def _pass_blocks(plan: _Plan, pass_index: int) -> int:
    base, _top, block = plan.passes[pass_index]
    height, width = plan.shapes[base]
    layers = 1 + len(plan.label_layers())
    return layers * math.ceil(height / block) * math.ceil(width / block)


def _jobs(
    store: str, plan: _Plan, pass_index: int, options: TileOptions, root: zarr.Group
) -> list[BlockJob]:
    """The unfinished blocks of one pass: the image's, then its label images'."""
    base, top, block = plan.passes[pass_index]
    layers = [(plan.group, plan.spec, False)]
    layers += [(group, spec, True) for _, group, spec in plan.label_layers()]
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
    jobs: list[BlockJob],
    options: TileOptions,
    on_done: Callable[[BlockJob, str | None], None],
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


def _space_needed(store: str, done: int, left: int) -> int | None:
    """Bytes the blocks ``left`` will take, at the size of the ``done`` ones so far (a local
    store only)."""
    folder = Path(store)
    if done <= 0 or left <= 0 or not folder.is_dir():
        return None
    written = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return int(written / done * left)


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
    thumb = resize_thumbnail(src, th, tw)
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
    layers = plan.label_layers()
    for name, _, _ in layers:
        label_group: Any = labels[name]
        attrs[name] = _finalize_mask(label_group, plan, name, level_scales, attrs.get("mpp"))
        for index in range(len(plan.passes)):
            if f"_progress_{index}" in label_group:
                del label_group[f"_progress_{index}"]
    if layers:
        labels.attrs["ome"] = {"version": "0.5", "labels": [name for name, _, _ in layers]}
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


def _finalize_mask(
    group: Any,
    plan: _Plan,
    name: str,
    level_scales: list[tuple[float, float]],
    mpp: float | None,
) -> dict[str, Any]:
    """NGFF label metadata of a label image (the mask, or the region of interest); returns its
    summary (values and their pixel counts, counted over level 0 block by block: coarse levels
    lose thin structures)."""
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
    if name == ROI:
        classes = {v: "outside" if v == 0 else "inside" for v in values}
        ignore: list[int] = []
    else:
        classes = {**plan.classes, **{v: "ignore" for v in plan.ignore}}
        ignore = list(plan.ignore)
    palette = {v: c for c, v in plan.colours} if name == MASK else {}
    group.attrs["ome"] = label_image_attrs(name, level_scales, mpp, values, classes, palette)
    source = plan.roi if name == ROI else plan.mask
    summary = {
        "source": source.name if source else None,
        "values": values,
        "pixels": [counts[v] for v in values],
    }
    group.attrs["hiresctl"] = {
        **summary,
        "classes": {str(k): v for k, v in plan.classes.items()} if name == MASK else {},
        "ignore": ignore,
    }
    return summary


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
                store,
                f"store format {version} is not writable by this hiresctl ({FORMAT_VERSION})",
            )
        upgrade_layout(root)  # resuming into an older 1.x store: one layout throughout
    return root


def _provenance(options: TileOptions) -> dict[str, Any]:
    import importlib.metadata as md

    versions: dict[str, str | None] = {}
    for pkg in (
        "hiresctl",
        "zarr",
        "tifffile",
        "imagecodecs",
        "openslide-python",
        "dask",
        "numpy",
    ):
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
    rois: MaskSet | None = None,
) -> list[ImageResult]:
    """Tile every source into the dataset at ``out``; bad sources fail alone.

    Args:
        sources: files or mosaics to tile.
        out: the dataset store (created if missing).
        options: tiling parameters.
        labels: class labels; with a table, an image without a row fails.
        masks: segmentation masks, tiled beside each image as the NGFF label image
            ``labels/mask``; with a folder, an image without a mask fails.
        rois: region-of-interest masks (nonzero inside), tiled as ``labels/roi``: training
            and evaluation leave the pixels outside out; an image without one fails.
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
            sources, store, options, labels, on_result, on_block, masks, annotations, rois
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
    rois: MaskSet | None = None,
) -> list[ImageResult]:
    root = _open_root(store, options)
    plans: list[_Plan] = []
    taken: set[str] = set()
    emit = on_result or (lambda r: None)
    for spec in sources:
        try:
            plan = _prepare(root, store, spec, options, labels, taken, masks, annotations, rois)
        except SourceError as exc:
            plan = _Plan(
                spec=spec,
                result=ImageResult(source=spec.name, error=exc.problem),
                failed=True,
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
    by_group = {p.group: p for p in active} | {
        group: p for p in active for _, group, _ in p.label_layers()
    }
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
        try:
            _execute(jobs, options, on_done)
        except NoSpaceError as exc:  # blocks done are kept: the same command resumes there
            left = total - done[0]
            raise NoSpaceError(exc.path, exc.cause, _space_needed(store, done[0], left)) from None
    for plan in active:
        if not plan.failed:
            try:
                _finalize(root, plan, options)
            except Exception as exc:
                full = no_space(exc)
                if full is not None:  # the next images would fail the same way
                    raise NoSpaceError(f"{store}/{plan.group}", full) from None
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
