"""The task contract: what classification, detection and segmentation each own.

A task knows its classes (from the store), the images of a split, the metric that picks the best
checkpoint, how a training batch's accuracy is judged, inference over images with its metrics
(validation in the loop, ``hiresctl eval``), the recipe defaults every method of it starts
from, and which backbones it can build. The loop, evaluation, ``predict`` and the report ask the
run's task; none of them branches on a task's name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from hiresctl.data import LabelledImage
from storage import Dataset

if TYPE_CHECKING:  # annotations only: a run holds its task
    from hiresctl.train.distributed import World
    from hiresctl.train.methods import BatchOutput
    from hiresctl.train.run import Run

# on_tile(image_id, y, x, logits, classes, truth): segmentation's per-tile hook
TileHook = Callable[[str, int, int, torch.Tensor, np.ndarray, np.ndarray | None], None]


class Task(ABC):
    """Base of the three tasks; one instance per run (``Run.task``), registered by name."""

    name: ClassVar[str] = ""  # set by @register_task
    title: ClassVar[str] = ""  # what the report calls it
    # Recipe defaults of every method of the task (a method's own defaults override them).
    defaults: ClassVar[dict[str, Any]] = {}
    reads_boxes: ClassVar[bool] = False  # the patch reader serves object boxes
    # The report: the comparison table's metrics in order (the first decides), the names of the training accuracy and of what the confusion matrix counts,
    # the title over the worst images, and what the overlay colours (TP, FP, FN) mean.
    table_metrics: ClassVar[tuple[str, ...]] = ()
    train_accuracy: ClassVar[str] = "Training accuracy"
    judged: ClassVar[str] = "images"
    worst_images: ClassVar[str] = "Worst images"
    legend: ClassVar[tuple[str, str, str] | None] = None

    @abstractmethod
    def backbones(self) -> tuple[str, ...]:
        """The ``backbone`` names this task can build (checked when a recipe loads)."""

    @abstractmethod
    def classes(self, dataset: Dataset) -> tuple[list[str], list[int] | None]:
        """Class names of a new run, and for segmentation the mask value of each class; a
        store that cannot train this task raises ``StoreError`` naming what is missing."""

    @abstractmethod
    def images(
        self, dataset: Dataset, split: str, classes: list[str]
    ) -> tuple[list[LabelledImage], list[str]]:
        """The usable images of ``split`` and one line per image that was left out."""

    def monitor(self, classes: list[str]) -> str:
        """The validation metric whose best value keeps ``best.pt`` (higher is better)."""
        return "accuracy"

    def score(self, output: BatchOutput, targets: torch.Tensor) -> tuple[int, int]:
        """(right, judged) of one training batch: the method's own count, else logits' argmax
        against the image targets."""
        if output.score is not None:
            return output.score
        return int((output.logits.argmax(1) == targets).sum()), len(targets)

    @abstractmethod
    def validate(self, run: Run, images: list[LabelledImage], world: World) -> dict[str, Any]:
        """Metrics of the run's model on ``images``, each rank inferring its share."""

    @abstractmethod
    def evaluate(
        self, run: Run, images: list[LabelledImage], folder: Path, split: str,
        on_tile: TileHook | None = None,
    ) -> tuple[dict[str, Any], dict[str, float]]:  # fmt: skip
        """``hiresctl eval``: the task's result fields (metrics, per class, per image, files it
        writes beside the run in ``folder``) and the timing and peak memory of inference."""


__all__ = ["Task", "TileHook"]
