"""Evaluation: metrics of a trained run on a split of a dataset store, by the run's task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from hiresctl.data import require_images
from hiresctl.eval.common import result_header, save_result
from hiresctl.train import Run, inference_device, load_run
from hiresctl.train.inputs import screen_inputs
from hiresctl.train.task import TileHook
from storage import Dataset, StoreError


def run_task(run_dir: str | Path) -> str:
    """The task a run folder was trained for (from its saved recipe)."""
    path = Path(run_dir) / "recipe.yaml"
    try:
        recipe = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise StoreError(str(run_dir), "not a run folder (no recipe.yaml); train first") from None
    return str(recipe.get("task", "cls"))


def evaluate(
    run_dir: str | Path,
    data: str | Path,
    split: str = "test",
    device: str = "auto",
    checkpoint: str = "best",
    on_tile: TileHook | None = None,
    run: Run | None = None,
    rescale: bool = False,
    drop_channels: bool = False,
) -> dict[str, Any]:
    """Evaluate a run with its task's metrics on ``split``; also written to
    ``RUN/eval-<split>.json``. ``on_tile``: segmentation's hook on every predicted tile with its
    truth; ``run``: the run already loaded from ``run_dir``, else it is loaded here."""
    dataset = Dataset(data)
    torch_device = inference_device(device)
    run = run or load_run(run_dir, dataset, torch_device, checkpoint)
    images, problems = run.task.images(dataset, split, run.classes)
    screen = screen_inputs(
        run.trained_on,
        [dataset.entry(im.image_id) for im in images],
        str(dataset.path),
        rescale,
        drop_channels,
    )
    usable = {entry.id for entry in screen.kept}
    images = [im for im in images if im.image_id in usable]
    problems += [f"{line}; skipped" for line in screen.refused]
    require_images(images, dataset, split, problems)
    body, stats = run.task.evaluate(run, images, Path(run_dir), split, on_tile=on_tile)
    result = result_header(run, run_dir, data, split, len(images), stats, torch_device)
    result.update(body)
    result["skipped"] = problems
    result["input_conversions"] = screen.note_lines()
    return save_result(run_dir, split, result)


__all__ = ["evaluate", "run_task"]
