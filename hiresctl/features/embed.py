"""``hiresctl embed``: every kept patch of every image encoded once, stored beside the image.

For each image of a dataset store, the patches of a grid at one pyramid level (or the level
nearest a target µm/px), kept by the foreground threshold as training keeps them, go through a
registered backbone (random weights, or a local state dict) without gradient, ``batch_size`` at
a time, read ahead by the patch stream. The result is the feature set
``images/<id>/features/<name>/`` (storage/FORMAT.md): ``features (N, D)``, ``coords (N, 2)``
level-0 (x, y) top-left corners, and attributes downstream whole-slide tools need. An image is
marked complete last, so a killed run redoes only the image it was in; finished images whose
settings match are skipped.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hiresctl.data import PatchReader, PatchStream, ReadRequest, ReadTag, kept_patches
from hiresctl.data.reader import IMAGENET_MEAN, IMAGENET_STD
from hiresctl.models import create_backbone
from hiresctl.models.weights import weights_sha256
from storage import Dataset, StoreError, UsageError
from storage.errors import NoSpaceError, no_space
from storage.lock import WriterLock
from storage.store import FEATURES, hires_attrs

DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class EmbedOptions:
    """What a feature set is computed with; everything but ``batch_size`` and ``device`` is
    part of its identity (an image embedded with other settings is not skipped)."""

    backbone: str = "resnet18"
    pretrained: str | None = None  # local state dict (torchvision/timm, or a hiresctl checkpoint)
    patch_size: int = 256
    level: int | None = None  # pyramid level; None: from ``mpp``, else 0
    mpp: float | None = None  # target µm per pixel: the level nearest it
    foreground_threshold: float = 0.0
    dtype: str = "float16"
    name: str | None = None  # the feature set's name; default: the backbone's
    batch_size: int = 64
    seed: int = 0  # random weights (no ``pretrained``) are drawn from this seed

    @property
    def set_name(self) -> str:
        return self.name or self.backbone


@dataclass
class EmbedResult:
    image_id: str
    status: str  # "written" | "skipped" | "failed"
    patches: int = 0
    seconds: float = 0.0
    read_seconds: float = 0.0
    error: str | None = None


def weights_checksum(options: EmbedOptions) -> str:
    """sha256 of the weights file, or what determines random weights."""
    if options.pretrained is None:
        return f"random:{options.backbone}:seed{options.seed}"
    return f"sha256:{weights_sha256(Path(options.pretrained))}"


def choose_level(dataset: Dataset, image_id: str, options: EmbedOptions) -> int:
    """The level to read: ``level``, else the one whose pixel size is nearest ``mpp`` (on a
    log scale), else 0. Refuses ``mpp`` for an image without a stated pixel size."""
    entry = dataset.entry(image_id)
    if options.level is not None:
        if not 0 <= options.level < entry.levels:
            raise UsageError(f"{image_id}: --level {options.level}: the image has {entry.levels}")
        return options.level
    if options.mpp is None:
        return 0
    if not entry.mpp:
        raise StoreError(
            f"{dataset.path}/images/{image_id}", "states no pixel size; give --level, not --mpp"
        )
    height = entry.shape[1]
    sizes = [entry.mpp * height / dataset.level(image_id, i).shape[1] for i in range(entry.levels)]
    return int(np.argmin([abs(math.log(s / options.mpp)) for s in sizes]))


def embed_store(
    data: str | Path,
    options: EmbedOptions,
    device: torch.device,
    image_ids: list[str] | None = None,
    overwrite: bool = False,
    on_result: Callable[[EmbedResult], None] | None = None,
    shard: tuple[int, int] = (0, 1),
) -> list[EmbedResult]:
    """Embed every complete image of ``data`` (or ``image_ids``), holding the store's writer
    lock; a failing image is reported and the others go on.

    ``shard`` = (rank, ranks) under torchrun: rank r embeds every ranks-th image from the r-th,
    so each image is written by one rank (and resumes as alone). Rank 0 holds the writer lock
    for the whole job: the others start once it has it and it lets go once all are done."""
    if options.dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {options.dtype!r}")
    if options.pretrained is not None and not Path(options.pretrained).exists():
        raise UsageError(f"{options.pretrained}: pretrained weights not found")
    rank, ranks = shard
    with WriterLock(data) if rank == 0 else contextlib.nullcontext():
        _barrier(ranks)  # no rank writes before rank 0 holds the lock
        dataset = Dataset(data, mode="r+")
        ids = (image_ids or [e.id for e in dataset.entries(complete_only=True)])[rank::ranks]
        torch.manual_seed(options.seed)
        backbone = create_backbone(options.backbone, options.pretrained).to(device).eval()
        record = encoder_record(backbone, options)
        results = []
        for image_id in ids:
            try:
                result = _embed_image(
                    dataset, image_id, backbone, options, record, device, overwrite
                )
            except (StoreError, UsageError) as exc:
                result = EmbedResult(image_id, "failed", error=str(exc))
            except Exception as exc:  # a full or read-only store stops the run: resumable
                full = no_space(exc)
                if full is None:
                    raise
                raise NoSpaceError(
                    f"{data}/images/{image_id}/features/{options.name}",
                    full,
                    then="the images embedded before it are complete: free space and run the "
                    "same command again (they are skipped)",
                ) from None
            results.append(result)
            if on_result is not None:
                on_result(result)
        if rank == 0:
            for problem in dataset.problems:
                results.append(EmbedResult(problem.split(":")[0], "failed", error=problem))
        _barrier(ranks)  # every rank done before rank 0 lets the lock go
        return results


def _barrier(ranks: int) -> None:
    if ranks > 1:
        import torch.distributed as dist

        dist.barrier()


def encoder_record(backbone: torch.nn.Module, options: EmbedOptions) -> dict[str, Any]:
    """What the feature set records of its encoder: an encoder's own provenance (timm, Hub
    and short names), else the backbone's name, weights and the ImageNet transform every
    registered backbone reads with."""
    record = getattr(backbone, "provenance", None)
    if record:
        if record["weights"] == "random":
            return {**record, "weights": f"random:{options.backbone}:seed{options.seed}"}
        return dict(record)
    return {
        "encoder": options.backbone,
        "weights": weights_checksum(options),
        "transform": {
            "size": None,
            "interpolation": "bilinear",
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
        },
        "pooling": getattr(backbone, "pooling", "avg"),
        "width": int(getattr(backbone, "num_features")),  # noqa: B009
        "torch": torch.__version__.split("+")[0],
    }


def _identity(options: EmbedOptions, record: dict[str, Any], level: int) -> dict[str, Any]:
    settings = asdict(options)
    for key in ("batch_size", "name", "level", "mpp"):
        settings.pop(key)
    identity = {**settings, "level": level, "weights": record["weights"]}
    if "architecture" in record:  # an encoder by timm, Hub or short name: how it reads
        identity.update(transform=record["transform"], pooling=record["pooling"])
    return identity


def _embed_image(
    dataset: Dataset,
    image_id: str,
    backbone: torch.nn.Module,
    options: EmbedOptions,
    record: dict[str, Any],
    device: torch.device,
    overwrite: bool,
) -> EmbedResult:
    started = time.perf_counter()
    level = choose_level(dataset, image_id, options)
    identity = _identity(options, record, level)
    group = dataset.image_group(image_id)
    where = f"{dataset.path}/images/{image_id}/{FEATURES}/{options.set_name}"
    sets: Any = group.require_group(FEATURES)
    if options.set_name in sets:
        old = hires_attrs(sets[options.set_name])
        if old.get("status") == "complete" and old.get("settings") == identity:
            return EmbedResult(image_id, "skipped", int(old.get("count", 0)))
        if old.get("status") == "complete" and not overwrite:
            raise UsageError(
                f"{where}: already embedded with other settings; give --overwrite, or --name "
                "for a second feature set"
            )
        del sets[options.set_name]  # an interrupted or replaced set is redone whole
    reader = PatchReader(dataset, level=level)
    grid = reader.grid(image_id, options.patch_size)
    kept = kept_patches(dataset, image_id, grid, options.foreground_threshold)
    entry = dataset.entry(image_id)
    scale = entry.shape[2] / reader.shape(image_id)[2]  # level-0 pixels per read pixel
    target: Any = sets.create_group(options.set_name)
    target.attrs["hiresctl"] = {"status": "incomplete", "settings": identity}
    width = int(getattr(backbone, "num_features"))  # noqa: B009
    rows = max(1, min(len(kept), 2**20 // max(1, width)))
    features = target.create_array(
        "features",
        shape=(len(kept), width),
        chunks=(rows, width),
        dtype=options.dtype,
        dimension_names=("patch", "feature"),
    )
    coords = target.create_array(
        "coords",
        shape=(len(kept), 2),
        chunks=(max(1, len(kept)), 2),
        dtype="int64",
        dimension_names=("patch", "xy"),
    )
    r, c = grid.position(kept)
    coords[...] = np.stack([c * grid.stride * scale, r * grid.stride * scale], 1).round()
    chunks = [kept[i : i + options.batch_size] for i in range(0, len(kept), options.batch_size)]
    plan = [
        ReadRequest(image_id, "patches", grid, chunk, ReadTag("chunk", number=start))
        for chunk, start in zip(chunks, range(0, len(kept), options.batch_size), strict=True)
    ]
    stream = PatchStream(reader)
    read_seconds = 0.0
    items = iter(stream(plan))
    for _ in plan:
        waited = time.perf_counter()
        request, pixels = next(items)
        read_seconds += time.perf_counter() - waited
        with torch.no_grad(), _autocast(device):
            encoded = backbone.forward_features(pixels.to(device, non_blocking=True))  # type: ignore[operator]
        start = request.tag.number
        features[start : start + len(request.indices)] = encoded.float().cpu().numpy()
    mpp = entry.mpp * scale if entry.mpp else None
    seconds = time.perf_counter() - started
    target.attrs["hiresctl"] = {
        "status": "complete",  # the last write
        "settings": identity,
        "count": len(kept),
        "dim": width,
        "encoder": options.backbone,
        "transform": record["transform"],  # what each patch went through before the encoder
        "pooling": record["pooling"],
        "provenance": record,
        "patch_size": options.patch_size,
        "level": level,
        "patch_size_level0": round(options.patch_size * scale),
        "mpp": mpp,
        "coords": "level-0 (x, y) of each patch's top-left corner",
        "seconds": seconds,  # reads and encoding: what the set cost, for comparisons
    }
    reader.close()
    return EmbedResult(image_id, "written", len(kept), seconds, read_seconds)


def _autocast(device: torch.device) -> Any:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast("cpu", enabled=False)


def export_h5(data: str | Path, name: str, out: str | Path) -> list[Path]:
    """Write each complete feature set ``name`` as ``out/<id>.h5`` in the layout TRIDENT and
    CLAM read: datasets ``features`` (N, D) float32 and ``coords`` (N, 2) int64 level-0 (x, y),
    with ``coords`` attributes ``patch_size``, ``patch_level`` and ``patch_size_level0``."""

    def write(handle: Any, entry: Any, features: Any, coords: Any, attrs: dict) -> None:
        handle.create_dataset("features", data=np.asarray(features[...], dtype=np.float32))
        xy = handle.create_dataset("coords", data=np.asarray(coords[...], dtype=np.int64))
        xy.attrs["patch_size"] = attrs["patch_size"]
        xy.attrs["patch_level"] = attrs["level"]
        xy.attrs["patch_size_level0"] = attrs["patch_size_level0"]
        handle.attrs["encoder"] = attrs["encoder"]
        handle.attrs["weights"] = attrs["settings"]["weights"]
        if attrs.get("mpp"):
            handle.attrs["mpp"] = attrs["mpp"]

    return _export(data, name, out, write, needs_mpp=False)[0]


def export_stamp(data: str | Path, name: str, out: str | Path) -> tuple[list[Path], list[str]]:
    """Write each complete feature set ``name`` as ``out/<id>.h5`` in the layout STAMP reads
    (and Patho-Bench and TITAN after it): ``feats`` (N, D) float16, ``coords`` (N, 2) float32
    (x, y) of each tile's top-left corner in micrometres, attributes ``unit`` ("um"),
    ``tile_size_um``, ``tile_size_px``, ``extractor`` and ``feat_type`` ("tile"); hiresctl's
    record of the encoder in ``hiresctl``. Images without a pixel size cannot be placed in
    micrometres: each is a failure line, the others are written."""

    def write(handle: Any, entry: Any, features: Any, coords: Any, attrs: dict) -> None:
        handle.create_dataset("feats", data=np.asarray(features[...], dtype=np.float16))
        level0 = np.asarray(coords[...], dtype=np.float64)
        handle.create_dataset("coords", data=(level0 * entry.mpp).astype(np.float32))
        handle.attrs["unit"] = "um"
        handle.attrs["tile_size_um"] = float(attrs["patch_size_level0"] * entry.mpp)
        handle.attrs["tile_size_px"] = int(attrs["patch_size"])
        handle.attrs["extractor"] = str(attrs["encoder"])
        handle.attrs["feat_type"] = "tile"
        record = attrs.get("provenance") or {"weights": attrs["settings"]["weights"]}
        handle.attrs["hiresctl"] = json.dumps(record)

    return _export(data, name, out, write, needs_mpp=True)


def _export(
    data: str | Path,
    name: str,
    out: str | Path,
    write: Callable[[Any, Any, Any, Any, dict], None],
    needs_mpp: bool,
) -> tuple[list[Path], list[str]]:
    """``write`` each complete image's feature set ``name`` to ``out/<id>.h5`` (through a
    temporary name, so a file that exists is whole); the files written and failure lines."""
    import h5py

    dataset = Dataset(data)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    written, failed = [], []
    for entry in dataset.entries(complete_only=True):
        found = dataset.feature_set(entry.id, name)
        if found is None:
            continue
        if needs_mpp and not entry.mpp:
            failed.append(
                f"{dataset.path}/images/{entry.id}: states no pixel size, so its tiles cannot "
                "be placed in micrometres (tile it again with --mpp)"
            )
            continue
        features, coords, attrs = found
        path = folder / f"{entry.id}.h5"
        tmp = path.with_name(f".{path.name}.tmp")
        with h5py.File(tmp, "w") as handle:
            write(handle, entry, features, coords, attrs)
        tmp.replace(path)
        written.append(path)
    return written, failed
