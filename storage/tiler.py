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

import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from storage.annotations import (
    Annotations,
)
from storage.blocks import BlockJob, forget_cached, run_block
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
    expand_scenes,
)
from storage.lock import WriterLock
from storage.ngff import label_image_attrs
from storage.pyramid import foreground_mask, resize_thumbnail
from storage.store import image_multiscales
from storage.tileplan import Plan, pass_blocks, prepare
from storage.tileplan import jobs as pass_jobs

__all__ = [
    "ImageResult",
    "LabelTable",
    "MaskSet",
    "SourceSpec",
    "TileOptions",
    "tile",
]

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
    from dask.callbacks import Callback
    from dask.threaded import get

    # the threaded scheduler itself: dask.compute would first import dask.distributed (a
    # sixth of a second) to see whether a client is running
    graph = {f"block-{i}": (run_block, j) for i, j in enumerate(jobs)}
    by_key = {f"block-{i}": j for i, j in enumerate(jobs)}

    class _Progress(Callback):
        def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
            if key in by_key:
                on_done(by_key[key], result)

    with _Progress():
        get(graph, list(graph), num_workers=options.workers or os.cpu_count())


# ---------------------------------------------------------------------------------- finishing


def _space_needed(store: str, done: int, left: int) -> int | None:
    """Bytes the blocks ``left`` will take, at the size of the ``done`` ones so far (a local
    store only)."""
    folder = Path(store)
    if done <= 0 or left <= 0 or not folder.is_dir():
        return None
    written = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return int(written / done * left)


def _finalize(root: zarr.Group, plan: Plan, options: TileOptions) -> None:
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
    group.attrs["ome"] = image_multiscales(
        plan.result.id or "",
        level_scales,
        attrs.get("mpp"),
        attrs.get("channel_names"),
        attrs.get("dtype", "|u1"),
    )
    record_arrays(group)  # which shards exist: a deleted one is then told from an all-fill one
    attrs["status"] = "complete"
    attrs["foreground_fraction"] = float(mask.mean())
    group.attrs["hiresctl"] = attrs  # completion is the last write


def _finalize_mask(
    group: Any,
    plan: Plan,
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
    sources = expand_scenes(sources)  # a multi-scene CZI: one image per scene
    with WriterLock(store):
        return _tile_locked(
            sources, store, options, labels, on_result, on_block, masks, annotations, rois
        )


def _failed(spec: SourceSpec, exc: Exception) -> Plan:
    """The plan of a source that could not be prepared: its result says why."""
    # an unexpected problem with one file must not stop the others either
    error = exc.problem if isinstance(exc, SourceError) else f"{type(exc).__name__}: {exc}"
    return Plan(spec=spec, result=ImageResult(source=spec.name, error=error), failed=True)


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
    plans: list[Plan] = []
    taken: set[str] = set()
    emit = on_result or (lambda r: None)
    for spec in sources:
        try:
            plan = prepare(root, store, spec, options, labels, taken, masks, annotations, rois)
        except Exception as exc:
            full = no_space(exc)
            if full is None:
                plan = _failed(spec, exc)
            else:  # every later source would fail the same way: stop, keeping what is done
                raise NoSpaceError(full.filename or spec.name, full) from None
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
    total = sum(pass_blocks(p, i) for p in active for i in range(len(p.passes)))
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
            for job in pass_jobs(store, p, pass_index, options, root)
        ]
        # blocks finished by an earlier, interrupted run count as done
        done[0] += sum(
            pass_blocks(p, pass_index)
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
    forget_cached(store)
    _write_manifest(root)
    return [p.result for p in plans]
