"""Commands that make and read stores: ``synth``, ``tile``, ``info``, ``embed``."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from hiresctl.cli.common import Codec, Verbose, app, err, expand_sources
from storage.errors import UsageError

# ------------------------------------------------------------------------------------- synth


@app.command()
def synth(
    kind: Annotated[
        str,
        typer.Argument(
            help="What to synthesize: ultramnist, megapixel-mnist, fine-detail, sparse-slide "
            "(classification); "
            "seg-vessels, seg-aerial (segmentation: also masks/ and classes.csv); "
            "det-mosaic (detection: also annotations.json, COCO)."
        ),
    ],
    out: Annotated[Path, typer.Argument(help="Output folder (images/ and labels.csv).")],
    count: Annotated[int, typer.Option(help="Number of images.")] = 16,
    size: Annotated[
        int | None, typer.Option(help="Canvas side in pixels (default per kind).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same images.")] = 0,
    task: Annotated[
        str, typer.Option(help="megapixel-mnist label: majority, max, top, multi-label.")
    ] = "majority",
    classes: Annotated[int, typer.Option(help="ultramnist classes: 28 (sums 0-27) or 10.")] = 28,
    objects: Annotated[
        int | None,
        typer.Option(help="det-mosaic objects per image (default 150 per 4096², by area)."),
    ] = None,
    mnist: Annotated[
        Path | None,
        typer.Option(
            help="Folder of MNIST's four IDX files (gzip or raw): ultramnist, megapixel-mnist "
            "and det-mosaic then draw real 28×28 digits (MNIST-train for training images, "
            "t10k for the rest) instead of scikit-learn's 8×8 ones. Nothing is downloaded."
        ),
    ] = None,
) -> None:
    """Write synthetic benchmark images and a labels CSV ready for `hiresctl tile`."""
    from storage.synth import synthesize

    options: dict[str, Any] = {}
    if mnist is not None:
        if kind not in ("ultramnist", "megapixel-mnist", "det-mosaic"):
            raise UsageError("--mnist is an ultramnist, megapixel-mnist and det-mosaic option")
        options["mnist"] = mnist
    if kind == "megapixel-mnist":
        options["task"] = task
    if kind == "ultramnist":
        options["classes"] = classes
    if objects is not None:
        if kind != "det-mosaic":
            raise UsageError("--objects is a det-mosaic option")
        if objects < 1:
            raise UsageError(f"--objects must be ≥ 1, got {objects}")
        options["objects"] = objects
    with err.status(f"synthesizing {count} {kind} images"):
        labels = synthesize(kind, out, count=count, size=size, seed=seed, **options)
    err.print(f"wrote {count} images to {out / 'images'} and labels to {labels}")
    if (out / "annotations.json").is_file():
        err.print(f"object boxes in {out / 'annotations.json'} (COCO; tile with --coco)")
    if (out / "masks").is_dir():
        err.print(f"masks in {out / 'masks'}, class names in {out / 'classes.csv'}")


# -------------------------------------------------------------------------------------- tile


@app.command()
def tile(
    sources: Annotated[
        list[str], typer.Argument(help="Image files or folders; '-' reads paths from stdin.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Dataset store to create or extend.")],
    labels: Annotated[
        Path | None, typer.Option(help="CSV with columns source,label[,split].")
    ] = None,
    masks: Annotated[
        Path | None,
        typer.Option(
            help="Segmentation masks: a folder, matched to sources by file name, or a CSV with "
            "columns source,mask naming each source's mask file."
        ),
    ] = None,
    mask_classes: Annotated[
        Path | None,
        typer.Option(
            help="CSV with columns value,name naming the mask values, or colours (#3C1098,"
            "building) for colour-coded masks; a value or colour named 'ignore' is left out of "
            "training and evaluation, and '*,ignore' leaves out every colour no row names."
        ),
    ] = None,
    roi: Annotated[
        Path | None,
        typer.Option(
            help="Region-of-interest masks (nonzero inside; e.g. a retina's field of view): a "
            "folder matched by file name, or a CSV source,roi. Pixels outside are left out of "
            "training and evaluation."
        ),
    ] = None,
    coco: Annotated[
        Path | None,
        typer.Option(help="COCO JSON of object boxes, matched to sources by file_name."),
    ] = None,
    annotations: Annotated[
        Path | None,
        typer.Option(
            help="QuPath/GeoJSON annotations: a folder of <image>.geojson, or one file; "
            "coordinates in a CRS go through the mosaic's geotransform."
        ),
    ] = None,
    mosaic: Annotated[
        str | None, typer.Option(help="Tile all SOURCES as one GeoTIFF mosaic with this name.")
    ] = None,
    chunk: Annotated[int, typer.Option(help="Chunk side (the patch grid), a power of two.")] = 256,
    block_size: Annotated[
        int, typer.Option(help="Pixels per task side (memory per worker thread ∝ its square).")
    ] = 4096,
    codec: Annotated[
        Codec,
        typer.Option(
            help="auto: a source's JPEG tiles copied undecoded where they fit the chunks, else "
            "zstd; passthrough: the same, saying why where they do not; zstd (lossless); jpeg "
            "(8-bit, re-encoded)."
        ),
    ] = Codec.auto,
    jpeg_quality: Annotated[
        int, typer.Option(help="JPEG quality for --codec jpeg and for levels a copy computes.")
    ] = 90,
    thumbnail_size: Annotated[
        int, typer.Option(help="Longest side of the global thumbnail.")
    ] = 1024,
    mpp: Annotated[float | None, typer.Option(help="Resample to this pixel size (µm).")] = None,
    mag: Annotated[float | None, typer.Option(help="Resample to this magnification.")] = None,
    source_mpp: Annotated[
        float | None, typer.Option(help="Pixel size of the sources (overrides the files).")
    ] = None,
    max_pixels: Annotated[
        int, typer.Option(help="Refuse sources with more level-0 pixels (decompression bombs).")
    ] = 2**37,
    split_seed: Annotated[int, typer.Option(help="Seed of the train/val/test split.")] = 0,
    overwrite: Annotated[
        bool, typer.Option(help="Re-tile images that are already complete.")
    ] = False,
    workers: Annotated[
        int | None, typer.Option(help="Threads for the local dask scheduler.")
    ] = None,
    scheduler: Annotated[
        str | None, typer.Option(help="dask.distributed scheduler address, e.g. tcp://host:8786.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON line per image on stdout.")
    ] = False,
    verbose: Verbose = False,
) -> None:
    """Tile sources into a chunked OME-Zarr dataset store (resumable; bad inputs fail alone).

    On a terminal a live line counts images by status with the time left; a log gets a line
    per image. The end is one summary: totals and failures by reason, every failure in
    ``OUT.tile-failures.csv`` beside the store."""
    from hiresctl.cli.progress import ImagesDisplay, failures_path
    from storage.annotations import Annotations
    from storage.inputs import expand_scenes
    from storage.tiler import LabelTable, MaskSet, SourceSpec, TileOptions
    from storage.tiler import tile as run_tile

    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be ≥ 1, got {workers}")
    paths = expand_sources(sources)
    if not paths:
        raise UsageError("no sources given")
    specs = (
        [SourceSpec(tuple(paths), mosaic=mosaic)]
        if mosaic
        else expand_scenes(SourceSpec((p,)) for p in paths)  # a CZI's scenes: one image each
    )
    options = TileOptions(
        chunk=chunk,
        block_size=block_size,
        codec=codec.value,
        jpeg_quality=jpeg_quality,
        thumbnail_size=thumbnail_size,
        mpp=mpp,
        mag=mag,
        source_mpp=source_mpp,
        max_pixels=max_pixels,
        split_seed=split_seed,
        overwrite=overwrite,
        workers=workers,
        scheduler=scheduler,
    )
    options.validate()
    table = LabelTable(labels) if labels else None
    if mask_classes and not masks:
        raise UsageError("--mask-classes needs --masks")
    mask_set = MaskSet(masks, mask_classes) if masks else None
    if roi and not masks:
        raise UsageError("--roi needs --masks (it restricts a segmentation mask)")
    roi_set = MaskSet(roi, option="--roi") if roi else None
    if coco and annotations:
        raise UsageError("give --coco or --annotations, not both")
    boxes = (
        Annotations.coco(coco)
        if coco
        else Annotations.geojson(annotations)
        if annotations
        else None
    )
    out = Path(out)
    with ImagesDisplay("tiled", len(specs), err, verbose=verbose) as display:

        def on_result(result: Any) -> None:
            if as_json:
                typer.echo(json.dumps(result.to_json()))
            if result.status == "failed":
                line = f"[red]failed[/] {result.source}: {result.error}"
            else:
                line = (
                    f"[green]{result.status}[/] {result.source} → {result.id} "
                    f"{result.shape} {result.levels} levels ({result.seconds:.1f} s)"
                )
                if result.note:  # still one line per image in a log
                    line += f" · [yellow]note[/] {result.note}"
            display.image(result.status, str(result.source), line, result.error, result.note)

        run_tile(
            specs,
            out,
            options,
            table,
            on_result=on_result,
            on_block=display.work,
            masks=mask_set,
            annotations=boxes,
            rois=roi_set,
        )
    listed = display.write_failures(failures_path(out, "tile"))
    display.summary(f"into {out}", listed)
    if display.failures:
        raise typer.Exit(1)


# -------------------------------------------------------------------------------------- info


LISTED_IMAGES = 20  # `info` lists a store's images itself up to this many


def _counted(counter: Any, most: int = 12) -> str:
    """``train 1400 · val 300 · test 300`` (the ``most`` commonest, then how many more)."""
    shown = " · ".join(f"{key} {n}" for key, n in counter.most_common(most))
    rest = len(counter) - most
    return shown + (f" · and {rest} more" if rest > 0 else "")


def store_overview(path: Path, version: str, rows: list[dict[str, Any]]) -> list[str]:
    """A store on a few lines whatever its size: images by status, split and label, levels and
    the range of shapes."""
    from collections import Counter

    status = Counter(r["status"] for r in rows)
    lines = [f"{path} (format {version}): {len(rows)} images, {_counted(status)}"]
    if not rows:
        return lines
    lines.append(f"  splits: {_counted(Counter(r['split'] for r in rows))}")
    labels = Counter(str(r["label"]) for r in rows if r["label"] is not None)
    if labels:
        lines.append(f"  labels: {_counted(labels)}")
    levels = [r["levels"] for r in rows]
    pixels = sorted(rows, key=lambda r: r["shape"][1] * r["shape"][2])
    smallest, largest = ("×".join(map(str, r["shape"])) for r in (pixels[0], pixels[-1]))
    sizes = smallest if smallest == largest else f"{smallest} to {largest}"
    lines.append(f"  levels: {min(levels)}–{max(levels)}; shapes (c×y×x): {sizes}")
    return lines


@app.command()
def info(
    dataset: Annotated[Path, typer.Argument(help="Dataset store.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object on stdout.")
    ] = False,
    upgrade: Annotated[
        bool,
        typer.Option(
            "--upgrade", help="Rewrite a store of an older layout as this version's, in place."
        ),
    ] = False,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Also check every image's stored shards: none missing, every index intact.",
        ),
    ] = False,
    images: Annotated[
        bool,
        typer.Option(
            "--images", help=f"List every image (done anyway up to {LISTED_IMAGES} images)."
        ),
    ] = False,
) -> None:
    """Describe a dataset store: counts by split, label and status; with --images (or a small
    store) every image's shape, levels, µm/px, label, split and status."""
    from storage.store import Dataset, upgrade_store

    if upgrade:
        for line in upgrade_store(dataset):
            err.print(f"upgraded {line}", highlight=False, soft_wrap=True)
    ds = Dataset(dataset)
    if ds.outdated:
        err.print(f"[yellow]outdated[/] {dataset}: {ds.outdated}", highlight=False, soft_wrap=True)
    summary = ds.summary()
    if check:
        for image_id in ds.image_ids():
            ds.problems += ds.check(image_id)
    summary["damaged"] = ds.problems
    for problem in ds.problems:
        err.print(f"[bold red]damaged[/] {problem}", highlight=False, soft_wrap=True)
    if as_json:
        typer.echo(json.dumps(summary))
        if ds.problems:
            raise typer.Exit(1)
        return
    out = Console()
    rows = summary["images"]
    for line in store_overview(dataset, ds.format_version, rows):
        out.print(line, highlight=False, soft_wrap=True)
    if images or len(rows) <= LISTED_IMAGES:
        table = Table()
        for col in ("id", "shape (c,y,x)", "levels", "mpp", "label", "split", "status"):
            table.add_column(col)
        for row in rows:
            table.add_row(
                row["id"],
                "×".join(str(v) for v in row["shape"]),
                str(row["levels"]),
                f"{row['mpp']:.3g}" if row["mpp"] else "-",
                str(row["label"] or "-"),
                row["split"],
                row["status"] if row["status"] == "complete" else f"[yellow]{row['status']}[/]",
            )
        out.print(table)
    else:
        out.print(f"(--images lists all {len(rows)}; --json prints them as JSON)")
    if ds.problems:
        raise typer.Exit(1)


# ------------------------------------------------------------------------------------- embed


@app.command()
def embed(
    dataset: Annotated[Path, typer.Argument(help="Dataset store (from `hiresctl tile`).")],
    backbone: Annotated[
        str,
        typer.Option(
            "--backbone",
            "--encoder",
            help="Encoder: a registered backbone (tiny, resnet18, ...), a short name (uni, "
            "uni2-h, virchow2, h-optimus-0, dinov2-s/b/l, resnet50-trunc), timm:NAME or "
            "hf-hub:ORG/REPO[@REVISION].",
        ),
    ] = "resnet18",
    pretrained: Annotated[
        Path | None,
        typer.Option(
            help="Local weights: a state dict (.safetensors, .bin, .pth) or a Hub-format "
            "folder; else the name's entry in HIRESCTL_WEIGHTS / ~/.config/hiresctl/"
            "weights.yaml, else the Hugging Face cache. Nothing is downloaded. Without any: "
            "random weights from --seed (short names refuse)."
        ),
    ] = None,
    patch_size: Annotated[int, typer.Option(help="Patch side in pixels of the level read.")] = 256,
    level: Annotated[int | None, typer.Option(help="Pyramid level to read (default 0).")] = None,
    mpp: Annotated[
        float | None, typer.Option(help="Target µm/px: read the level nearest it.")
    ] = None,
    foreground_threshold: Annotated[
        float, typer.Option(help="Skip patches with less foreground than this (as training).")
    ] = 0.0,
    dtype: Annotated[str, typer.Option(help="float16 or float32.")] = "float16",
    name: Annotated[
        str | None, typer.Option(help="Feature set name (default: the backbone's).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Patches per forward pass.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of random weights.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace sets embedded with other settings.")
    ] = False,
    export_h5: Annotated[
        Path | None,
        typer.Option("--export-h5", help="Also write TRIDENT/CLAM-style <id>.h5 files here."),
    ] = None,
    export_stamp: Annotated[
        Path | None,
        typer.Option(
            "--export-stamp",
            help="Also write STAMP-style <id>.h5 files here (feats, coords in µm), which "
            "STAMP, Patho-Bench and TITAN read.",
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON line per image on stdout.")
    ] = False,
    verbose: Verbose = False,
) -> None:
    """Encode every kept patch of every image once; store features and coords beside it.

    On a terminal a live line counts images; a log gets a line per image; failures end grouped
    by reason, every one in ``DATASET.embed-failures.csv``."""
    import time

    from hiresctl.features import EmbedOptions, embed_store
    from hiresctl.features import export_h5 as write_h5
    from hiresctl.train import resolve_device

    options = EmbedOptions(
        backbone=backbone,
        pretrained=str(pretrained) if pretrained else None,
        patch_size=patch_size,
        level=level,
        mpp=mpp,
        foreground_threshold=foreground_threshold,
        dtype=dtype,
        name=name,
        batch_size=batch_size,
        seed=seed,
    )
    if patch_size < 1 or batch_size < 1:
        raise UsageError("--patch-size and --batch-size must be at least 1")
    from hiresctl.cli.progress import ImagesDisplay, failures_path
    from hiresctl.train.distributed import gather_objects, init_world, shutdown
    from storage import Dataset

    # under torchrun each rank embeds its share of the images; rank 0 reports them all
    world = init_world(resolve_device(device).type)
    total = len(Dataset(dataset).image_ids())
    console = err if world.main else Console(file=io.StringIO())

    def on_result(result: Any) -> None:
        if as_json and world.main:
            typer.echo(json.dumps(result.__dict__))
        if result.status == "failed":
            line = f"[bold red]error:[/] {result.error}"
        else:
            rate = result.patches / result.seconds if result.seconds else 0.0
            share = result.read_seconds / result.seconds if result.seconds else 0.0
            line = (
                f"{result.image_id}: {result.patches} patches, {rate:.0f} patches/s, "
                f"{share:.0%} waiting for reads"
                if result.status == "written"
                else f"{result.image_id}: {result.status}"
            )
        display.image(result.status, result.image_id, line, result.error)

    started = time.perf_counter()
    with ImagesDisplay("embedded", total, console, verbose=verbose, unit="patches") as display:
        results = embed_store(
            dataset,
            options,
            resolve_device(device),
            overwrite=overwrite,
            on_result=on_result,
            shard=(world.rank, world.size),
        )
        if world.active:  # the other ranks' images, as if embedded here
            shares = gather_objects(results, world)
            for other in (r for share in shares[1:] for r in share):  # type: ignore[attr-defined]
                on_result(other)
                results.append(other)
            shutdown(world)  # every rank leaves the group before exiting (gloo's threads)
    if not world.main:
        return
    seconds = time.perf_counter() - started
    written = [r for r in results if r.status == "written"]
    skipped = sum(r.status == "skipped" for r in results)
    reads = sum(r.read_seconds for r in written)
    busy = sum(r.seconds for r in written)
    err.print(
        f"{len(written)} embedded, {skipped} already done, {len(display.failures)} failed in "
        f"{seconds:.1f} s"
        + (
            f"; {len(written) / seconds:.2f} images/s, {reads / busy:.0%} of it waiting for reads"
            if written and busy
            else ""
        ),
        soft_wrap=True,
    )
    store = Path(dataset)
    display.summary("", display.write_failures(failures_path(store, "embed")), totals=False)
    if export_h5 is not None:
        paths = write_h5(dataset, options.set_name, export_h5)
        err.print(f"{len(paths)} h5 files in {export_h5}")
    failed = False
    if export_stamp is not None:
        from hiresctl.features import export_stamp as write_stamp

        paths, problems = write_stamp(dataset, options.set_name, export_stamp)
        for problem in problems:
            err.print(f"[bold red]error:[/] {problem}", soft_wrap=True)
        err.print(f"{len(paths)} STAMP h5 files in {export_stamp}")
        failed = bool(problems)
    if display.failures or failed:
        raise typer.Exit(1)
