"""Typer application: ``hiresctl synth | tile | info | embed | train | eval | predict``."""

from __future__ import annotations

import json
import sys
import warnings
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from hiresctl import __version__
from storage.errors import HiresError, UsageError

app = typer.Typer(
    name="hiresctl",
    help="Tile gigapixel images into OME-Zarr stores and train memory-bounded patch models on them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)


class Codec(StrEnum):
    zstd = "zstd"
    jpeg = "jpeg"


def fail(message: str, code: int = 1) -> NoReturn:
    """One line on stderr, then exit."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"hiresctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """hiresctl: synth → tile → train → eval, memory-bounded at every step."""


# ------------------------------------------------------------------------------------- synth


@app.command()
def synth(
    kind: Annotated[
        str,
        typer.Argument(
            help="What to synthesize: ultramnist, megapixel-mnist, fine-detail (classification); "
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
) -> None:
    """Write synthetic benchmark images and a labels CSV ready for `hiresctl tile`."""
    from storage.synth import synthesize

    options: dict[str, Any] = {}
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


def _expand_sources(sources: list[str]) -> list[str]:
    """Files, folders (searched for every source format's suffixes) and ``-`` (stdin)."""
    from storage.readers import source_suffixes

    suffixes = source_suffixes()
    paths: list[str] = []
    for src in sources:
        if src == "-":
            paths += [line.strip() for line in sys.stdin if line.strip()]
            continue
        p = Path(src)
        if p.is_dir():
            found = sorted(
                str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in suffixes
            )
            if not found:
                paths.append(src)  # reported as a failed input, not silently ignored
            paths += found
        else:
            paths.append(src)
    return paths


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
        typer.Option(help="Folder of segmentation masks, matched to sources by file name."),
    ] = None,
    mask_classes: Annotated[
        Path | None, typer.Option(help="CSV with columns value,name naming the mask values.")
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
        Codec, typer.Option(help="zstd (lossless) or jpeg (8-bit, lossy).")
    ] = Codec.zstd,
    jpeg_quality: Annotated[int, typer.Option(help="JPEG quality for --codec jpeg.")] = 90,
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
) -> None:
    """Tile sources into a chunked OME-Zarr dataset store (resumable; bad inputs fail alone)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from storage.annotations import Annotations
    from storage.tiler import LabelTable, MaskSet, SourceSpec, TileOptions
    from storage.tiler import tile as run_tile

    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be ≥ 1, got {workers}")
    paths = _expand_sources(sources)
    if not paths:
        raise UsageError("no sources given")
    specs = (
        [SourceSpec(tuple(paths), mosaic=mosaic)] if mosaic else [SourceSpec((p,)) for p in paths]
    )
    options = TileOptions(
        chunk=chunk, block_size=block_size, codec=codec.value, jpeg_quality=jpeg_quality, thumbnail_size=thumbnail_size,
        mpp=mpp, mag=mag, source_mpp=source_mpp, max_pixels=max_pixels, split_seed=split_seed,
        overwrite=overwrite, workers=workers, scheduler=scheduler,
    )  # fmt: skip
    options.validate()
    table = LabelTable(labels) if labels else None
    if mask_classes and not masks:
        raise UsageError("--mask-classes needs --masks")
    mask_set = MaskSet(masks, mask_classes) if masks else None
    if coco and annotations:
        raise UsageError("give --coco or --annotations, not both")
    boxes = (
        Annotations.coco(coco)
        if coco
        else Annotations.geojson(annotations)
        if annotations
        else None
    )
    failed = []

    with Progress(
        TextColumn("tiling"), BarColumn(), TextColumn("{task.completed}/{task.total} blocks"),
        TimeRemainingColumn(), console=err, transient=True,
    ) as progress:  # fmt: skip
        bar = progress.add_task("tile", total=None)

        def on_block(done: int, total: int) -> None:
            progress.update(bar, completed=done, total=total)

        def on_result(result: Any) -> None:
            if as_json:
                typer.echo(json.dumps(result.to_json()))
            if result.status == "failed":
                failed.append(result)
                progress.console.print(
                    f"[red]failed[/] {result.source}: {result.error}",
                    highlight=False,
                    soft_wrap=True,
                )
            elif not as_json:
                progress.console.print(
                    f"[green]{result.status}[/] {result.source} → {result.id} "
                    f"{result.shape} {result.levels} levels ({result.seconds:.1f} s)",
                    highlight=False,
                )

        results = run_tile(
            specs, out, options, table, on_result=on_result, on_block=on_block, masks=mask_set,
            annotations=boxes,
        )  # fmt: skip
    ok = len(results) - len(failed)
    err.print(
        f"{ok} of {len(results)} images in {out}" + (f"; {len(failed)} failed" if failed else "")
    )
    if failed:
        raise typer.Exit(1)


# -------------------------------------------------------------------------------------- info


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
) -> None:
    """Describe a dataset store: images, shapes, levels, labels, splits, status."""
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
    table = Table(title=f"{dataset} (format {ds.format_version})")
    for col in ("id", "shape (c,y,x)", "levels", "mpp", "label", "split", "status"):
        table.add_column(col)
    for row in summary["images"]:
        table.add_row(
            row["id"], "×".join(str(v) for v in row["shape"]), str(row["levels"]),
            f"{row['mpp']:.3g}" if row["mpp"] else "-", str(row["label"] or "-"), row["split"],
            row["status"] if row["status"] == "complete" else f"[yellow]{row['status']}[/]",
        )  # fmt: skip
    Console().print(table)
    if ds.problems:
        raise typer.Exit(1)


# ------------------------------------------------------------------------------------- embed


@app.command()
def embed(
    dataset: Annotated[Path, typer.Argument(help="Dataset store (from `hiresctl tile`).")],
    backbone: Annotated[
        str, typer.Option(help="Registered backbone (tiny, resnet18, ...).")
    ] = "resnet18",
    pretrained: Annotated[
        Path | None,
        typer.Option(
            help="Local state dict (torchvision/timm, or a hiresctl checkpoint); "
            "nothing is downloaded. Default: random weights from --seed."
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
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON line per image on stdout.")
    ] = False,
) -> None:
    """Encode every kept patch of every image once; store features and coords beside it."""
    import time

    from hiresctl.features import EmbedOptions, embed_store
    from hiresctl.features import export_h5 as write_h5
    from hiresctl.train import resolve_device

    options = EmbedOptions(
        backbone=backbone, pretrained=str(pretrained) if pretrained else None,
        patch_size=patch_size, level=level, mpp=mpp, foreground_threshold=foreground_threshold,
        dtype=dtype, name=name, batch_size=batch_size, seed=seed,
    )  # fmt: skip
    if patch_size < 1 or batch_size < 1:
        raise UsageError("--patch-size and --batch-size must be at least 1")
    failed = []

    def on_result(result: Any) -> None:
        if as_json:
            typer.echo(json.dumps(result.__dict__))
        if result.status == "failed":
            failed.append(result)
            err.print(f"[bold red]error:[/] {result.error}", highlight=False, soft_wrap=True)
        elif result.status == "written":
            rate = result.patches / result.seconds if result.seconds else 0.0
            share = result.read_seconds / result.seconds if result.seconds else 0.0
            err.print(f"{result.image_id}: {result.patches} patches, {rate:.0f} patches/s, "
                      f"{share:.0%} waiting for reads", highlight=False)  # fmt: skip

    started = time.perf_counter()
    results = embed_store(dataset, options, resolve_device(device), on_result=on_result)
    seconds = time.perf_counter() - started
    written = [r for r in results if r.status == "written"]
    skipped = sum(r.status == "skipped" for r in results)
    reads = sum(r.read_seconds for r in written)
    busy = sum(r.seconds for r in written)
    err.print(
        f"{len(written)} embedded, {skipped} already done, {len(failed)} failed in {seconds:.1f} s"
        + (f"; {len(written) / seconds:.2f} images/s, {reads / busy:.0%} of it waiting for reads"
           if written and busy else ""), soft_wrap=True,
    )  # fmt: skip
    if export_h5 is not None:
        paths = write_h5(dataset, options.set_name, export_h5)
        err.print(f"{len(paths)} h5 files in {export_h5}")
    if failed:
        raise typer.Exit(1)


# ------------------------------------------------------------------------------------- train


class Task(StrEnum):
    cls = "cls"
    det = "det"
    seg = "seg"


class DeviceChoice(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


@app.command()
def train(
    data: Annotated[Path, typer.Option("--data", help="Dataset store (from `hiresctl tile`).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder to create (or resume).")],
    task: Annotated[
        Task,
        typer.Option(help="cls (classification), det (detection, FCOS) or seg (segmentation)."),
    ] = Task.cls,
    recipe: Annotated[
        Path | None, typer.Option(help="YAML recipe; optional, each task × method has defaults.")
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(
            help="patchgd-global (default); `hiresctl methods` lists every task's methods."
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a recipe key: --set lr=1e-4 (repeatable)."),
    ] = None,
    memory_budget: Annotated[
        str | None,
        typer.Option(help="e.g. 4GiB: choose patches per step, batch and accumulation to fit."),
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in --out from its last checkpoint.")
    ] = False,
    device: Annotated[
        DeviceChoice, typer.Option(help="auto picks CUDA when present.")
    ] = DeviceChoice.auto,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the run summary as JSON on stdout.")
    ] = False,
) -> None:
    """Train a memory-bounded model on a dataset store (torchrun-ready)."""
    from hiresctl.train import Trainer, load_recipe, parse_set

    overrides = parse_set(set_ or [])
    if memory_budget is not None:
        overrides["memory_budget"] = memory_budget
    resolved = load_recipe(recipe, task=task.value, method=method, overrides=overrides)

    def log(message: str) -> None:
        err.print(message, highlight=False, soft_wrap=True)

    trainer = Trainer(data, out, resolved, resume=resume, device=device.value, log=log)
    for problem in trainer.problems:
        err.print(f"[yellow]skipped[/] {problem}", highlight=False, soft_wrap=True)
    if trainer.world.main:
        r = trainer.recipe
        log(
            f"training {r.method} ({r.backbone}, patch {r.patch_size}) on {len(trainer.train_images)} "
            f"images, validating on {len(trainer.val_images)}, {r.epochs} epochs, device {trainer.device}"
        )
    result = trainer.fit()
    if trainer.world.main:
        s = result.summary
        log(
            f"done: {s['steps']} steps, peak memory {s['peak_memory_gb']:.2f} GB ({s['peak_memory_kind']}), "
            f"{s['images_per_second'] or 0:.2f} images/s → {out}"
        )
        if as_json:
            typer.echo(json.dumps(s))
    if result.problems:
        raise typer.Exit(1)


# -------------------------------------------------------------------------------------- eval


@app.command()
def methods(
    task: Annotated[
        str | None, typer.Option(help="Only this task's methods (cls, det, seg).")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the methods and their defaults as JSON.")
    ] = False,
) -> None:
    """List the training methods of each task, with what they are and the recipe defaults
    they change."""
    from hiresctl.train import method_class, method_names, task_names
    from hiresctl.train.registry import method_defaults, task_class

    tasks = [task] if task else list(task_names())
    rows: list[dict[str, Any]] = []
    for name in tasks:
        task_class(name)  # an unknown task is named with the valid ones
        for method in method_names(name):
            doc = " ".join((method_class(name, method).__doc__ or "").split())
            about = doc.split(". ")[0].rstrip(".") + "." if doc else ""
            rows.append({"task": name, "method": method, "about": about,
                         "defaults": method_defaults(name, method)})  # fmt: skip
    if as_json:
        typer.echo(json.dumps(rows, default=str))
        return
    for row in rows:
        changed = ", ".join(f"{k}={v}" for k, v in row["defaults"].items())
        typer.echo(f"{row['task']:4} {row['method']:15} {row['about']}"
                   + (f" [defaults: {changed}]" if changed else ""))  # fmt: skip


@app.command("eval")
def eval_(
    runs: Annotated[
        list[Path], typer.Argument(help="Run folders written by `hiresctl train` (one or more).")
    ],
    data: Annotated[Path, typer.Option("--data", help="Dataset store to evaluate on.")],
    split: Annotated[str, typer.Option(help="Which split of the store.")] = "test",
    checkpoint: Annotated[str, typer.Option(help="best or last.")] = "best",
    report: Annotated[
        bool, typer.Option("--report", help="Write report.html, report.md and metrics.json.")
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Report folder (default: FIRST_RUN/report-SPLIT)."),
    ] = None,
    device: Annotated[
        DeviceChoice, typer.Option(help="auto picks CUDA when present.")
    ] = DeviceChoice.auto,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object on stdout.")
    ] = False,
) -> None:
    """Measure trained runs: quality metrics, peak memory and throughput; several runs side by
    side, and with --report a self-contained HTML report (plus Markdown and metrics.json)."""
    from hiresctl.eval import evaluate

    if checkpoint not in ("best", "last"):
        raise UsageError(f"--checkpoint {checkpoint!r}: choose best or last")
    if out is not None and not report:
        raise UsageError("--out names the report folder; add --report")
    if report or len(runs) > 1:
        _eval_side_by_side(runs, data, split, checkpoint, device.value, report, out, as_json)
        return
    result = evaluate(runs[0], data, split, device.value, checkpoint)
    for problem in result["skipped"]:
        err.print(f"[yellow]skipped[/] {problem}", highlight=False, soft_wrap=True)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        _print_result(runs[0], data, split, result)
    if result["skipped"]:
        raise typer.Exit(1)


def _print_result(run: Path, data: Path, split: str, result: dict[str, Any]) -> None:
    table = Table(title=f"{run} on {data} [{split}] ({result['count']} images, {result['method']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result["metrics"].items():
        table.add_row(key, "-" if value is None else f"{value:.4f}")
    for name, values in (result.get("per_class") or {}).items():
        for key in ("iou", "ap"):
            if key in values:
                value = values.get(key)
                table.add_row(f"{key.upper() if key == 'ap' else 'IoU'} {name}",
                              "—" if value is None else f"{value:.4f}")  # fmt: skip
    table.add_row(
        "peak memory (GB)", f"{result['peak_memory_gb']:.3f} ({result['peak_memory_kind']})"
    )
    table.add_row("images/s", f"{result['images_per_second']:.2f}")
    Console().print(table)
    matrix = result.get("confusion_matrix")
    if matrix and len(matrix) <= 30:
        cm = Table(title="confusion matrix (rows: true, columns: predicted)")
        cm.add_column("")
        for name in result["classes"]:
            cm.add_column(str(name), justify="right")
        for name, row in zip(result["classes"], matrix, strict=True):
            cm.add_row(str(name), *(str(v) for v in row))
        Console().print(cm)


def _eval_side_by_side(
    runs: list[Path], data: Path, split: str, checkpoint: str, device: str, report: bool,
    out: Path | None, as_json: bool,
) -> None:  # fmt: skip
    """Several runs (or a report): one table, the best of each column marked."""
    from hiresctl.report.build import METRIC_NAMES, build_report

    with err.status("evaluating…") as status:

        def log(message: str) -> None:
            status.update(message)
            err.print(f"[dim]{message}[/]", highlight=False)

        metrics = build_report(runs, data, split, out, device, checkpoint, log, write=report)
    skipped = [p for r in metrics["runs"] for p in r["evaluation"]["skipped"]]
    for problem in dict.fromkeys(skipped):
        err.print(f"[yellow]skipped[/] {problem}", highlight=False, soft_wrap=True)
    if as_json:
        typer.echo(json.dumps(metrics, default=str))
    else:
        table = Table(title=f"{len(runs)} run(s) on {data} [{split}] (★ best)")
        names = [entry["name"] for entry in metrics["runs"]]
        table.add_column("")
        for entry in metrics["runs"]:
            table.add_column(f"{entry['name']}\n{entry['method']}", justify="right")
        rows = metrics["table"]
        for column in next(iter(rows.values())):
            values = [rows[name].get(column) for name in names]
            if all(v is None for v in values):
                continue
            digits = 2 if column.startswith(("train_", "eval_")) else 4
            cells = []
            for name, value in zip(names, values, strict=True):
                text = "—" if value is None else f"{value:.{digits}f}"
                won = name in metrics["best"].get(column, [])
                cells.append(f"[bold green]{text} ★[/]" if won else text)
            table.add_row(METRIC_NAMES.get(column, column), *cells)
        Console().print(table)
        err.print(metrics["verdict"], highlight=False, soft_wrap=True)
        if report:
            err.print(f"[green]report[/] {metrics['report']}", highlight=False)
    if skipped:
        raise typer.Exit(1)


# ------------------------------------------------------------------------------------ predict


@app.command()
def predict(
    run: Annotated[Path, typer.Argument(help="Run folder written by `hiresctl train`.")],
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="A dataset store, or source files/folders (`-`: paths on stdin) tiled on the fly."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the predictions.")],
    split: Annotated[
        str | None, typer.Option(help="Only this split of the store (default: every image).")
    ] = None,
    formats: Annotated[
        list[str] | None,
        typer.Option(
            "--format",
            "-f",
            help="ngff (cls, seg), geojson (seg, det), coco (det), csv, json, png; repeat or "
            "comma-separate (default: all the task writes).",
        ),
    ] = None,
    probabilities: Annotated[
        bool, typer.Option(help="Segmentation: also write class probabilities (float16).")
    ] = False,
    mpp: Annotated[
        float | None, typer.Option(help="Sources: resample to this µm/pixel while tiling.")
    ] = None,
    source_mpp: Annotated[
        float | None, typer.Option(help="Sources: their pixel size, where files lack it.")
    ] = None,
    checkpoint: Annotated[str, typer.Option(help="best or last.")] = "best",
    score_threshold: Annotated[
        float | None,
        typer.Option(
            help="Detection: drop boxes scoring below this (default 0.2; 0.05 to "
            "score detections.json with COCOeval as `hiresctl eval` does)."
        ),
    ] = None,
    device: Annotated[
        DeviceChoice, typer.Option(help="auto picks CUDA when present.")
    ] = DeviceChoice.auto,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON line per image on stdout.")
    ] = False,
) -> None:
    """Apply a trained run: class predictions and heatmaps, or segmentation masks (NGFF) and
    polygons (QuPath GeoJSON), with PNG overlays and a CSV/JSON row per image."""
    from hiresctl.eval.predict import STORE
    from hiresctl.eval.predict import predict as run_predict
    from storage.tiler import TileOptions

    if checkpoint not in ("best", "last"):
        raise UsageError(f"--checkpoint {checkpoint!r}: choose best or last")
    chosen = [f.strip() for value in formats or [] for f in value.split(",") if f.strip()]
    is_store = len(inputs) == 1 and (Path(inputs[0]) / "zarr.json").is_file()
    paths = inputs if is_store else _expand_sources(inputs)

    def on_image(row: dict[str, Any]) -> None:
        if as_json:
            typer.echo(json.dumps(row))
            return
        if "predicted" in row:
            what = f"{row['predicted']} ({row['confidence']:.2f})"
        elif "detections" in row:
            what = f"{row['detections']} boxes"
        else:
            what = f"{row['shape']}" + (f" F1 {row['f1']:.3f}" if row.get("f1") is not None else "")
            if "polygons" in row:
                what += f", {row['polygons']} polygons"
        err.print(
            f"[green]predicted[/] {row['id']} {what} ({row['seconds']:.1f} s)", highlight=False
        )

    result = run_predict(
        run, paths, out, split, device.value, checkpoint, chosen or None, probabilities,
        TileOptions(mpp=mpp, source_mpp=source_mpp), on_image, score_threshold,
    )  # fmt: skip
    for problem in result.problems:
        err.print(f"[bold red]failed[/] {problem}", highlight=False, soft_wrap=True)
    written = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    err.print(f"{len(result.rows)} images predicted into {out} ({', '.join(written)})"
              + (f"; NGFF in {out / STORE}" if STORE in written else ""), highlight=False)  # fmt: skip
    if result.problems:
        raise typer.Exit(1)


def main() -> None:
    """Console entry point: typed errors become one line and an exit code (usage: 2, input: 1)."""
    # a warning (e.g. a plugin that failed to load) is one line too, not its source line
    warnings.formatwarning = lambda message, category, *_, **__: f"warning: {message}\n"
    try:
        app()  # standalone: click reports its own usage errors and exits with 2
    except UsageError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except HiresError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
