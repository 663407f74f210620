"""Commands that train and measure: ``methods``, ``train``, ``eval``, ``predict``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from hiresctl.cli.common import DeviceChoice, Task, Verbose, app, err, expand_sources
from storage.errors import UsageError

# ------------------------------------------------------------------------------------- train


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
    from hiresctl.train.distributed import shutdown

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
        sees = f"{r.backbone}, patch {r.patch_size}"
        if not trainer.run.method.encodes_pixels:
            sees = f"stored features {trainer.run.method.feature_set()}"  # type: ignore[attr-defined]
        log(
            f"training {r.method} ({sees}) on {len(trainer.train_images)} "
            f"images, validating on {len(trainer.val_images)}, {r.epochs} epochs, device {trainer.device}"
        )
    result = trainer.fit()
    shutdown(trainer.world)  # every rank leaves the process group before exiting (gloo's threads)
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
    they change (the task's and the method's own)."""
    from hiresctl.train import method_class, method_names, task_names
    from hiresctl.train.registry import method_defaults, task_class

    tasks = [task] if task else list(task_names())
    rows: list[dict[str, Any]] = []
    for name in tasks:
        common = task_class(name).defaults  # an unknown task is named with the valid ones
        for method in method_names(name):
            doc = " ".join((method_class(name, method).__doc__ or "").split())
            about = doc.split(". ")[0].rstrip(".") + "." if doc else ""
            rows.append(
                {
                    "task": name,
                    "method": method,
                    "about": about,
                    "defaults": {**common, **method_defaults(name, method)},
                }
            )
    if as_json:
        typer.echo(json.dumps(rows, default=str))
        return
    for row in rows:
        changed = ", ".join(f"{k}={v}" for k, v in row["defaults"].items())
        typer.echo(
            f"{row['task']:4} {row['method']:15} {row['about']}"
            + (f" [defaults: {changed}]" if changed else "")
        )


RESCALE_HELP = (
    "Take images of another bit depth than the run's training images (16-bit into an 8-bit "
    "run), each read as a fraction of its type's range."
)
DROP_CHANNELS_HELP = (
    "Take images with more channels than the run saw, using the first ones (an RGBA image's "
    "alpha, or extra fluorescence bands, dropped)."
)


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
    rescale: Annotated[bool, typer.Option(help=RESCALE_HELP)] = False,
    drop_channels: Annotated[bool, typer.Option(help=DROP_CHANNELS_HELP)] = False,
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
        _eval_side_by_side(
            runs,
            data,
            split,
            checkpoint,
            device.value,
            report,
            out,
            as_json,
            rescale,
            drop_channels,
        )
        return
    result = evaluate(
        runs[0], data, split, device.value, checkpoint, rescale=rescale, drop_channels=drop_channels
    )
    for note in result.get("input_conversions", []):
        err.print(f"[yellow]converted[/] {note}", highlight=False, soft_wrap=True)
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
                table.add_row(
                    f"{key.upper() if key == 'ap' else 'IoU'} {name}",
                    "—" if value is None else f"{value:.4f}",
                )
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
    runs: list[Path],
    data: Path,
    split: str,
    checkpoint: str,
    device: str,
    report: bool,
    out: Path | None,
    as_json: bool,
    rescale: bool = False,
    drop_channels: bool = False,
) -> None:
    """Several runs (or a report): one table, the best of each column marked."""
    from hiresctl.report.build import METRIC_NAMES, build_report

    with err.status("evaluating…") as status:

        def log(message: str) -> None:
            status.update(message)
            err.print(f"[dim]{message}[/]", highlight=False)

        metrics = build_report(
            runs,
            data,
            split,
            out,
            device,
            checkpoint,
            log,
            write=report,
            rescale=rescale,
            drop_channels=drop_channels,
        )
    notes = [n for r in metrics["runs"] for n in r["evaluation"].get("input_conversions", [])]
    for note in dict.fromkeys(notes):
        err.print(f"[yellow]converted[/] {note}", highlight=False, soft_wrap=True)
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
    rescale: Annotated[bool, typer.Option(help=RESCALE_HELP)] = False,
    drop_channels: Annotated[bool, typer.Option(help=DROP_CHANNELS_HELP)] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON line per image on stdout.")
    ] = False,
    verbose: Verbose = False,
) -> None:
    """Apply a trained run: class predictions and heatmaps, or segmentation masks (NGFF) and
    polygons (QuPath GeoJSON), with PNG overlays and a CSV/JSON row per image.

    On a terminal a live line counts images; a log gets a line per image; failures end grouped
    by reason, every one in ``OUT/predict-failures.csv``."""
    import io

    from rich.console import Console

    from hiresctl.cli.progress import ImagesDisplay
    from hiresctl.eval.predict import STORE, write_rows
    from hiresctl.eval.predict import predict as run_predict
    from hiresctl.train import resolve_device
    from hiresctl.train.distributed import gather_objects, init_world, shutdown
    from storage import Dataset
    from storage.tiler import TileOptions

    if checkpoint not in ("best", "last"):
        raise UsageError(f"--checkpoint {checkpoint!r}: choose best or last")
    chosen = [f.strip() for value in formats or [] for f in value.split(",") if f.strip()]
    is_store = len(inputs) == 1 and (Path(inputs[0]) / "zarr.json").is_file()
    paths = inputs if is_store else expand_sources(inputs)

    if is_store:
        images = Dataset(inputs[0]).entries(split) if split else Dataset(inputs[0]).entries()
        total = len(images)
    else:
        total = len(paths)

    # under torchrun each rank predicts its share of the images; rank 0 reports them all
    world = init_world(resolve_device(device.value).type)
    console = err if world.main else Console(file=io.StringIO())

    def on_image(row: dict[str, Any]) -> None:
        if as_json and world.main:
            typer.echo(json.dumps(row))
        if "predicted" in row:
            what = f"{row['predicted']} ({row['confidence']:.2f})"
        elif "detections" in row:
            what = f"{row['detections']} boxes"
        else:
            what = f"{row['shape']}" + (f" F1 {row['f1']:.3f}" if row.get("f1") is not None else "")
            if "polygons" in row:
                what += f", {row['polygons']} polygons"
        line = f"[green]predicted[/] {row['id']} {what} ({row['seconds']:.1f} s)"
        display.image("predicted", str(row["id"]), line)

    with ImagesDisplay("predicted", total, console, verbose=verbose, unit="images") as display:
        result = run_predict(
            run,
            paths,
            out,
            split,
            device.value,
            checkpoint,
            chosen or None,
            probabilities,
            TileOptions(mpp=mpp, source_mpp=source_mpp),
            on_image,
            score_threshold,
            rescale,
            drop_channels,
            shard=(world.rank, world.size),
        )
        if world.active:  # every rank's rows, problems and notes, as if predicted here
            shares: list[Any] = gather_objects(result, world)
            for other in shares[1:]:
                for row in other.rows:
                    on_image(row)
                result.rows += other.rows
                result.problems += other.problems
                result.notes += [n for n in other.notes if n not in result.notes]
            result.rows.sort(key=lambda row: str(row.get("id")))
            if world.main:
                write_rows(result.rows, out, result.formats)
            shutdown(world)  # every rank leaves the group before exiting (gloo's threads)
    if not world.main:
        return
    for note in result.notes:
        err.print(f"[yellow]converted[/] {note}", highlight=False, soft_wrap=True)
    for problem in result.problems:
        source, _, reason = problem.partition(": ")
        display.image("failed", source, f"[bold red]failed[/] {problem}", reason or problem)
    written = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    err.print(
        f"{len(result.rows)} images predicted into {out} ({', '.join(written)})"
        + (f"; NGFF in {out / STORE}" if STORE in written else ""),
        highlight=False,
    )
    failures = display.write_failures(out / "predict-failures.csv") if out.is_dir() else None
    display.summary("", failures, totals=False)
    if result.problems:
        raise typer.Exit(1)
