"""The task contract, and the run a task works on.

A task knows its classes (from the store), the images of a split, the metric that picks the best
checkpoint, how a training batch's accuracy is judged, inference over images with its metrics
(validation in the loop, ``hiresctl eval``), the recipe defaults every method of it starts
from, which backbones it can build and the base class every method of it subclasses. The loop,
evaluation, ``predict`` and the report ask the run's task; none of them branches on a task's
name.

:class:`Run` lives here beside :class:`Task` because each names the other: a run holds its task,
and a task's inference takes the run. Building and loading runs is ``run.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar, cast

import numpy as np
import torch
from torch import nn

from hiresctl.data import LabelledImage, PatchAugment, PatchReader, PatchStream, PlannedReads
from hiresctl.train import distributed
from hiresctl.train.context import autocast_factory, make_context
from hiresctl.train.memory import (
    MemoryPlan,
    PatchCost,
    current_rss_bytes,
    parameter_bytes,
    patch_cost,
    plan_memory,
)
from hiresctl.train.methods import BatchOutput, Method, Reads, StepContext
from hiresctl.train.recipe import Recipe, parse_bytes
from storage import Dataset

M = TypeVar("M", bound=Method)

# on_tile(image_id, y, x, logits, classes, truth): segmentation's per-tile hook
TileHook = Callable[[str, int, int, torch.Tensor, np.ndarray, np.ndarray | None], None]


class Task(ABC, Generic[M]):
    """Base of the three tasks; one instance per run (``Run.task``), registered by name.

    ``method_base`` is the class every method of the task subclasses: the registry refuses, when
    a method registers, one that does not, so a task reads its run's method as that class."""

    name: ClassVar[str] = ""  # set by @register_task
    method_base: ClassVar[type[Method]]  # set by each task
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

    def method(self, run: Run) -> M:
        """The run's method as this task's ``method_base`` (guaranteed by registration)."""
        return cast(M, run.method)

    @abstractmethod
    def backbones(self) -> tuple[str, ...]:
        """The ``backbone`` names this task can build (checked when a recipe loads)."""

    def accepts_backbone(self, name: str) -> bool:
        """Whether ``name`` is a backbone of this task (a task taking timm or Hub names says
        so here)."""
        return name in self.backbones()

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
    def infer(self, run: Run, ctx: StepContext, image_ids: list[str], reads: Reads) -> Any:
        """One batch's inference as the task's method gives it (classification: logits;
        detection: boxes per image, read level; segmentation: each image's tiles)."""

    @abstractmethod
    def validate(
        self, run: Run, images: list[LabelledImage], world: distributed.World
    ) -> dict[str, Any]:
        """Metrics of the run's model on ``images``, each rank inferring its share."""

    @abstractmethod
    def evaluate(
        self,
        run: Run,
        images: list[LabelledImage],
        folder: Path,
        split: str,
        on_tile: TileHook | None = None,
    ) -> tuple[dict[str, Any], dict[str, float]]:
        """``hiresctl eval``: the task's result fields (metrics, per class, per image, files it
        writes beside the run in ``folder``) and the timing and peak memory of inference."""


@dataclass
class Run:
    """Everything of one run held in memory while it trains or evaluates (built by
    ``run.build_run`` or loaded by ``run.load_run``)."""

    recipe: Recipe
    classes: list[str]
    task: Task[Any]
    method: Method
    device: torch.device
    reader: PatchReader
    world: distributed.World = field(default_factory=distributed.World)
    mask_values: list[int] | None = None  # segmentation: the mask value of each class
    # what the training images were (channels, dtypes, µm/px, level): ``hiresctl.train.inputs``;
    # None for a fresh run or a checkpoint that predates the record
    trained_on: dict[str, Any] | None = None

    @property
    def model(self) -> nn.Module:
        """The network, held by the method (one reference: setting it here sets the method's)."""
        return self.method.model

    @model.setter
    def model(self, model: nn.Module) -> None:
        self.method.model = model

    def memory_plan(self, budget_text: str, images: list[LabelledImage]) -> MemoryPlan:
        """``--memory-budget``: what a step costs (one patch measured through the encoder, the
        method's model of the rest) and the batch, accumulation and patches per step chosen."""
        recipe, model = self.recipe, self.model
        budget = parse_bytes(budget_text)
        size = recipe.patch_size
        sample = torch.zeros(1, 3, size, size, device=self.device)
        encoder: nn.Module | None = None
        if self.method.encodes_pixels:  # a feature method's "encoder" takes features, not pixels
            encoder = getattr(model, "encoder", None) or getattr(model, "backbone", None) or model
        autocast = autocast_factory(self.device, recipe.precision)
        cost = patch_cost(encoder, sample, autocast) if encoder is not None else PatchCost(0, 0)
        fixed = 4 * parameter_bytes(model)  # weights, gradients, two AdamW moments
        # measured after `patch_cost`'s backward, so the autograd engine's threads are in it
        baseline = current_rss_bytes() if self.device.type == "cpu" else 0
        per_image, per_patch, patches_wanted = self.method.memory(model, images, cost)
        return plan_memory(
            budget,
            baseline=baseline,
            fixed=fixed,
            per_patch=per_patch,
            per_image=per_image,
            batch_size=recipe.batch_size,
            accumulation_steps=recipe.accumulation_steps,
            patches_wanted=patches_wanted,
            apart=self.method.memory_apart(model, images, cost),
        )

    def context(
        self,
        optimizer: torch.optim.Optimizer | None = None,
        scaler: Any = None,
        accumulation: int = 1,
        augment: PatchAugment | None = None,
    ) -> StepContext:
        """The hooks the method calls (an optimizer step needs ``optimizer``)."""
        return make_context(
            self.model,
            self.device,
            self.reader,
            self.recipe,
            self.world,
            optimizer,
            scaler,
            accumulation,
            augment,
        )

    def reads(self, image_ids: list[str], train: bool, seed: int = 0) -> Reads:
        """One batch's planned reads (``seed`` fixes the plan's random choices), unaugmented."""
        plan = self.method.plan(image_ids, seed, train)
        return PlannedReads(PatchStream(self.reader), iter([plan])).batch()

    def step(
        self,
        image_ids: list[str],
        targets: torch.Tensor,
        optimizer: torch.optim.Optimizer | None = None,
        seed: int = 0,
        ctx: StepContext | None = None,
    ) -> BatchOutput:
        """One training step of the method on ``image_ids`` outside the loop (tests,
        benchmarks): its plan read, then :meth:`Method.train_batch`."""
        ctx = ctx or self.context(optimizer)
        return self.method.train_batch(ctx, image_ids, targets, self.reads(image_ids, True, seed))

    def infer(self, image_ids: list[str], seed: int = 0, ctx: StepContext | None = None) -> Any:
        """One batch's inference outside the loop (see :meth:`Task.infer`)."""
        ctx = ctx or self.context()
        return self.task.infer(self, ctx, image_ids, self.reads(image_ids, False, seed))


__all__ = ["Run", "Task", "TileHook"]
