"""``hiresctl predict``: a trained run applied to a dataset store, or to sources tiled on the
fly, with outputs other tools open.

``OUT`` is a folder:

* ``predictions.zarr``: OME-NGFF, one group per image. Segmentation: a multiscale label image
  (levels by 2×2 mode, ``image-label`` colours and class names, mask values as in the training
  masks; with ``probabilities`` also ``<id>/probabilities``, float16). Classification: the patch
  score heatmap as a one-level float32 image whose scale maps its cells onto level 0.
  Written tile by tile, so a gigapixel prediction never exists as one in-memory array; an image
  is marked ``complete`` last and a rerun redoes incomplete images.
* ``predictions.csv`` / ``predictions.json``: one row per image (classification: predicted
  class, confidence, class probabilities; segmentation: pixels per class, metrics when the
  store has the mask).
* ``geojson/<id>.geojson``: segmentation polygons (QuPath 0.5/0.6 annotations in level-0
  pixels: ``objectType``, ``classification`` with name and colour, holes kept; valid rings
  traced between pixel centres, see storage/FORMAT.md).
* ``overlays/<id>.png``: the prediction (or heatmap) drawn over the image's thumbnail.
* Detection: ``detections.json`` (COCO results: ``image_id`` as in the rows' ``coco_image_id``,
  the user's own COCO image and category ids where the store was tiled with ``--coco``, else
  1..N and 1..C in the run's class order, with ``annotations.json`` the matching ground truth; ``bbox`` [x, y, w, h] level-0 pixels,
  ``score``), ``geojson/<id>.geojson`` (QuPath detections: one rectangle per box, class name and
  colour, score as a measurement) and, for georeferenced images, ``geojson/<id>.crs.geojson``
  (the same boxes in the image's CRS through its geotransform, with the 2008 ``crs`` member).
  Boxes scoring below 0.2 are left out (docs/methods.md §4).
"""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zarr

from hiresctl.eval import run_task
from hiresctl.eval.boxes import detect_images
from hiresctl.eval.outputs import (
    STORE,
    classify_images,
    open_out,
    predict_masks,
    segmentation_outputs,
)
from hiresctl.train import (
    Run,
    inference_device,
    load_run,
)
from hiresctl.train.inputs import screen_inputs
from storage import Dataset, StoreError, UsageError
from storage.errors import NoSpaceError, no_space
from storage.store import hires_attrs

# -------------------------------------------------------------------------------- predict


@dataclass
class PredictResult:
    rows: list[dict[str, Any]]
    problems: list[str]  # sources that could not be tiled or taken, each with its reason
    out: Path
    notes: list[str] = field(default_factory=list)  # conversions of inputs, one line per kind
    formats: set[str] = field(default_factory=set)  # what the table files are written as


def _tile_sources(sources: list[str], folder: str, options: Any, problems: list[str]) -> Path:
    from storage.tiler import SourceSpec, tile

    store = Path(folder) / "sources.zarr"
    for result in tile([SourceSpec((s,)) for s in sources], store, options):
        if result.error:
            problems.append(f"{result.source}: {result.error}")
    return store


def predict(
    run_dir: str | Path,
    inputs: list[str],
    out: str | Path,
    split: str | None = None,
    device: str = "auto",
    checkpoint: str = "best",
    formats: list[str] | None = None,
    probabilities: bool = False,
    tile_options: Any = None,
    on_image: Callable[[dict[str, Any]], None] | None = None,
    score_threshold: float | None = None,
    rescale: bool = False,
    drop_channels: bool = False,
    shard: tuple[int, int] = (0, 1),
) -> PredictResult:
    """Apply a run to one dataset store (``inputs == [store]``) or to source files, tiled into a
    temporary store first (bad sources are named in ``problems``; the others are predicted).

    ``shard`` = (rank, ranks) under torchrun: rank r predicts every ranks-th image of the store
    from the r-th (of source files: tiles and predicts every ranks-th file), writing its images'
    outputs; the table files (``predictions.csv``/``.json``) are written by the caller from
    every rank's rows (:func:`write_rows`)."""
    task = run_task(run_dir)
    if task not in _PREDICTORS:
        raise UsageError(f"{run_dir}: predict does not handle {task!r} runs yet")
    predictor = _PREDICTORS[task]
    wanted = set(formats or predictor.formats)
    unknown = wanted - set(predictor.formats)
    if unknown:
        raise UsageError(
            f"--format {', '.join(sorted(unknown))}: a {task} run writes "
            f"{', '.join(predictor.formats)}"
        )
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{out}: --out exists and is not a folder")
    if (folder / "zarr.json").exists():
        raise UsageError(
            f"{out}: --out is a Zarr store; give a folder (predictions go to OUT/{STORE})"
        )
    if not inputs:
        raise UsageError("give a dataset store or source files to predict")
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="hiresctl-predict-") as scratch:
        is_store = len(inputs) == 1 and (Path(inputs[0]) / "zarr.json").is_file()
        rank, ranks = shard
        share = inputs if is_store else inputs[rank::ranks]
        if not share:  # more ranks than source files
            return PredictResult([], problems, folder, [], wanted)
        data = (
            Path(inputs[0]) if is_store else _tile_sources(share, scratch, tile_options, problems)
        )
        if not is_store and split is not None:
            raise UsageError("--split selects images of a dataset store, not of source files")
        folder.mkdir(parents=True, exist_ok=True)
        converted: dict[str, str] = {}

        def on_row(row: dict[str, Any]) -> None:  # each row says how its input was converted
            if row.get("id") in converted:
                row["input_conversion"] = converted[row["id"]]
            if on_image is not None:
                on_image(row)

        job = PredictJob(
            Path(run_dir),
            data,
            folder,
            split,
            device,
            checkpoint,
            wanted,
            probabilities,
            on_row,
            score_threshold,
            problems,
            rescale,
            drop_channels,
            converted,
            shard=shard if is_store else (0, 1),
        )
        try:
            rows = predictor.write(job)
        except Exception as exc:
            full = no_space(exc)
            if full is None:
                raise
            raise NoSpaceError(
                full.filename or folder,
                full,
                then="the images predicted before it are written and marked complete in "
                f"{STORE}: free space and run the same command again (it predicts every image "
                "again)",
            ) from None
    for row in rows:
        if row.get("id") in converted:
            row["input_conversion"] = converted[row["id"]]
    if shard[1] == 1:
        write_rows(rows, folder, wanted)
    return PredictResult(rows, problems, folder, job.notes, wanted)


@dataclass
class PredictJob:
    """One ``predict`` call as a task's predictor sees it (``data``: the store to predict)."""

    run_dir: Path
    data: Path
    folder: Path
    split: str | None
    device: str
    checkpoint: str
    wanted: set[str]
    probabilities: bool
    on_image: Callable[[dict[str, Any]], None] | None
    score_threshold: float | None
    problems: list[str]
    rescale: bool = False
    drop_channels: bool = False
    converted: dict[str, str] = field(default_factory=dict)  # image id → conversion made
    notes: list[str] = field(default_factory=list)  # one line per kind of conversion
    shard: tuple[int, int] = (0, 1)  # (rank, ranks): this rank's share of the store's images

    def load(self) -> tuple[Run, Dataset, list[Any]]:
        """The run, the store and its completely tiled images (of ``split``) the run can take."""
        dataset = Dataset(self.data)
        run = load_run(self.run_dir, dataset, inference_device(self.device), self.checkpoint)
        entries = [e for e in dataset.entries(split=self.split) if e.complete]
        if not entries and not self.problems:
            raise StoreError(dataset.path, "no completely tiled images to predict")
        return run, dataset, self.screen(run, dataset, entries)

    def screen(self, run: Run, dataset: Dataset, entries: list[Any]) -> list[Any]:
        """The ``entries`` the run can take (``hiresctl.train.inputs``): the refused go to
        ``problems``, the conversions made to ``converted`` and ``notes``."""
        rank, ranks = self.shard
        entries = entries[rank::ranks]
        screen = screen_inputs(
            run.trained_on, entries, str(dataset.path), self.rescale, self.drop_channels
        )
        self.problems += screen.refused
        self.notes += screen.note_lines()
        for note, ids in screen.notes.items():
            self.converted.update(dict.fromkeys(ids, note))
        if not screen.kept and entries:
            raise StoreError(dataset.path, f"no image the run can take: {screen.refused[0]}")
        return screen.kept


@dataclass
class Predictor:
    formats: tuple[str, ...]  # what the task's runs can write; all of them by default
    write: Callable[[PredictJob], list[dict[str, Any]]]  # predict, write; one row per image


_PREDICTORS: dict[str, Predictor] = {}


def predicts(
    task: str, formats: tuple[str, ...]
) -> Callable[
    [Callable[[PredictJob], list[dict[str, Any]]]], Callable[[PredictJob], list[dict[str, Any]]]
]:
    """Decorator: what ``predict`` writes for runs of ``task`` (one per registered task)."""

    def add(
        write: Callable[[PredictJob], list[dict[str, Any]]],
    ) -> Callable[[PredictJob], list[dict[str, Any]]]:
        _PREDICTORS[task] = Predictor(formats, write)
        return write

    return add


def predict_formats(task: str) -> tuple[str, ...]:
    """The output formats of ``task``'s runs (empty where predict does not handle it)."""
    predictor = _PREDICTORS.get(task)
    return predictor.formats if predictor else ()


@predicts("seg", ("ngff", "geojson", "csv", "json", "png"))
def _predict_segmentation(job: PredictJob) -> list[dict[str, Any]]:
    dataset = Dataset(job.data)
    store = job.folder / STORE

    def finish(row: dict[str, Any]) -> None:
        root = zarr.open_group(str(store), mode="r")
        names = {int(v): str(n) for v, n in hires_attrs(root)["classes"].items()}
        segmentation_outputs(root, dataset, row, list(names), names, job.folder, job.wanted)
        if "ngff" not in job.wanted:
            row.pop("output", None)
        if job.on_image is not None:
            job.on_image(row)

    rows = predict_masks(
        job.run_dir,
        job.data,
        store,
        job.split,
        job.device,
        job.checkpoint,
        job.probabilities,
        on_image=finish,
        screen=job.screen,
    )
    if "ngff" not in job.wanted:
        shutil.rmtree(store, ignore_errors=True)
    return rows


@predicts("det", ("coco", "geojson", "csv", "json", "png"))
def _predict_detection(job: PredictJob) -> list[dict[str, Any]]:
    run, dataset, entries = job.load()
    return detect_images(
        run, dataset, entries, job.folder, job.wanted, job.on_image, job.score_threshold
    )


@predicts("cls", ("ngff", "csv", "json", "png"))
def _predict_classification(job: PredictJob) -> list[dict[str, Any]]:
    run, dataset, entries = job.load()
    root = None
    if "ngff" in job.wanted:
        root = open_out(
            job.folder / STORE,
            {
                "run": str(job.run_dir),
                "data": str(job.data),
                "task": run.recipe.task,
                "method": run.recipe.method,
            },
        )
    return classify_images(run, dataset, entries, root, job.folder, job.wanted, job.on_image)


def write_rows(rows: list[dict[str, Any]], folder: Path, formats: set[str]) -> None:
    flat = [
        {k: (json.dumps(v) if isinstance(v, dict | list) else v) for k, v in row.items()}
        for row in rows
    ]
    if "json" in formats:
        (folder / "predictions.json").write_text(json.dumps(rows, indent=2))
    if "csv" in formats:
        columns = list(dict.fromkeys(k for row in flat for k in row))
        with open(folder / "predictions.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(flat)
