"""The training methods: what one image batch reads and computes (docs/methods.md §1–3, §6).

A method plans the reads of an image batch (so the DataLoader can read ahead), then consumes
the pixels in the same order. The shared loop (``trainer.py``) owns the optimizer, schedule,
accumulation, precision, checkpoints and logging; a method calls ``ctx.learn(loss)``
(backward, then an optimizer step once ``accumulation_steps`` backwards have run).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from torch import nn

from hiresctl.data import (
    NO_FLIP,
    Flip,
    PatchAugment,
    PatchGrid,
    PatchReader,
    ReadRequest,
    kept_patches,
)
from hiresctl.models import (
    Backbone,
    create_backbone,
)
from hiresctl.train.memory import PatchCost
from hiresctl.train.recipe import Recipe
from hiresctl.train.registry import method_class
from storage.errors import UsageError

T = TypeVar("T")

Reads = Iterable[tuple[ReadRequest, torch.Tensor]]


@dataclass
class StepContext:
    """What a method needs from the loop."""

    model: nn.Module
    device: torch.device
    autocast: Callable[[], AbstractContextManager[Any]]
    backward: Callable[[torch.Tensor], None]  # scales by 1/accumulation, checks for NaN
    step: Callable[[], None]  # optimizer step (gradients averaged across ranks first)
    read: Callable[
        [ReadRequest], torch.Tensor
    ]  # a read the plan could not know (augmented in training)
    accumulation_steps: int = 1  # [ε] backward calls per optimizer step
    micro_steps: int = 0  # backward calls since the last optimizer step
    patches_with_grad: int = 0

    def learn(self, loss: torch.Tensor) -> None:
        """Backward, then an optimizer step once ``accumulation_steps`` backwards have run."""
        self.backward(loss)
        if self.micro_steps >= self.accumulation_steps:
            self.step()

    def learn_staged(self, run: Callable[[Callable[[torch.Tensor], None]], T]) -> T:
        """One micro-step whose backward comes in pieces: ``run`` calls the backward it is given
        on each piece of the loss (the pieces' gradients add up) and carries any gradients
        the pieces left on leaves on through the rest of the graph itself; then the optimizer
        steps once ``accumulation_steps`` micro-steps have run. Returns what ``run`` returns."""
        before = self.micro_steps
        result = run(self.backward)
        self.micro_steps = before + 1
        if self.micro_steps >= self.accumulation_steps:
            self.step()
        return result

    def learn_part(self, loss: torch.Tensor, parts: int, last: bool) -> None:
        """Backward of one of ``parts`` pieces that together make one micro-step (each scaled
        by 1/parts: their gradients average); the micro-step counts, and the optimizer steps
        every ``accumulation_steps`` of them, once the ``last`` piece has run."""
        self.backward(loss / parts)
        self.micro_steps -= 1
        if last:
            self.micro_steps += 1
            if self.micro_steps >= self.accumulation_steps:
                self.step()


@dataclass
class Heatmap:
    """Where a classifier looked in one image: ``scores`` on a grid of square cells of ``cell``
    pixels of the run's level, from the level's top-left corner (the grid may run past the
    image's right and bottom edges, like the patch grid's padding). ``kind`` says what a score is.
    """

    image_id: str
    scores: np.ndarray  # (rows, cols) float32, ≥ 0
    cell: float
    kind: str


@dataclass
class BatchOutput:
    """What one training batch reports to the loop."""

    loss: float
    logits: torch.Tensor  # (B, classes), detached, on CPU; (B, 0) where a task has no logits
    inner_steps: int = 1
    # The batch's training accuracy as (right, judged) where its unit is not the image
    # (segmentation: pixels); None lets the task judge the logits against the targets.
    score: tuple[int, int] | None = None


class Method(ABC):
    """Base of every method: the patch grid of each image (foreground-filtered), the hooks the
    loop, evaluation, ``--memory-budget`` and the report call, and the shared helpers.

    A method subclasses its task's base (``ClassificationMethod``, ``DetectionMethod``,
    ``SegmentationMethod``: the registry refuses another), implements the abstract hooks, and
    registers itself with ``@register_method(task, name)``; ``task`` and ``name`` are set by
    the registration. ``self.model`` is the network :meth:`build_model` made, on its device
    (set when the run is built); a method's base narrows its type.
    """

    task: ClassVar[str] = ""
    name: ClassVar[str] = ""
    # Whether training may lay the patch grid with an offset (``grid_offset: random``): the
    # method reads the grid of :meth:`patches` with ``train=True`` everywhere in training.
    moves_grid: ClassVar[bool] = False
    model: nn.Module

    def __init__(self, recipe: Recipe, num_classes: int, reader: PatchReader) -> None:
        self.recipe = recipe
        self.num_classes = num_classes
        self.reader = reader
        self._patches: dict[tuple[str, Flip, tuple[int, int]], tuple[PatchGrid, np.ndarray]] = {}
        # The training stream's augmentation (set by the trainer): training plans and targets
        # ask it how each image is mirrored this epoch, as the stream's reads do.
        self.augment: PatchAugment | None = None
        # A checkpoint's record of its encoder (timm, Hub and short names): the backbone is
        # rebuilt from it, the checkpoint bringing the weights (set before build_model).
        self.encoder_record: dict[str, Any] | None = None

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The network this method trains (the loop moves it to the device)."""

    def flip(self, image_id: str, train: bool = True) -> Flip:
        """How training reads mirror ``image_id`` this epoch (never outside training)."""
        return self.augment.flip(image_id) if train and self.augment is not None else NO_FLIP

    def grid_offset(self, image_id: str, train: bool = True) -> tuple[int, int]:
        """Where this epoch's training grid of ``image_id`` starts (``grid_offset``); (0, 0)
        outside training."""
        if not train or self.augment is None or not self.moves_grid:
            return 0, 0
        return self.augment.offset(image_id, self.recipe.stride or self.recipe.patch_size)

    def patches(self, image_id: str, train: bool = False) -> tuple[PatchGrid, np.ndarray]:
        """The grid of ``image_id`` and the row-major indices of the patches used (N of them);
        ``train``: of the image as this epoch's training reads mirror and offset it."""
        flip, offset = self.flip(image_id, train), self.grid_offset(image_id, train)
        key = (image_id, flip, offset)
        if key not in self._patches:
            grid = self.reader.grid(image_id, self.recipe.patch_size, self.recipe.stride, offset)
            kept = kept_patches(
                self.reader.dataset, image_id, grid, self.recipe.foreground_threshold, flip
            )
            if len(self._patches) > 4096:  # offsets vary by epoch: keep the cache bounded
                self._patches.clear()
            self._patches[key] = (grid, kept)
        return self._patches[key]

    @abstractmethod
    def plan(self, image_ids: list[str], seed: int, train: bool) -> list[ReadRequest]:
        """Every read of one image batch, in the order :meth:`train_batch` (``train``) or
        inference consumes them; ``seed`` fixes the batch's random choices."""

    @abstractmethod
    def train_batch(
        self, ctx: StepContext, image_ids: list[str], targets: torch.Tensor, reads: Reads
    ) -> BatchOutput:
        """One image batch: forward, ``ctx.learn(loss)`` (as many times as the method steps)."""

    def predict(self, ctx: StepContext, image_ids: list[str], reads: Reads) -> torch.Tensor:
        """Classification: the logits (B, classes) of an image batch read by ``plan(train=False)``."""
        raise UsageError(f"{self.task} method {self.name} has no class logits")

    def explain(
        self, ctx: StepContext, image_ids: list[str], reads: Reads
    ) -> tuple[torch.Tensor, list[Heatmap]]:
        """Logits as :meth:`predict` computes them, and per image where the model looked (none
        by default: the report then shows plain thumbnails)."""
        return self.predict(ctx, image_ids, reads), []

    def calibrate(self, ctx: StepContext, batches: list[list[str]]) -> None:  # noqa: B027
        """Called by the loop after the last batch of an epoch, before validation (re-estimate
        statistics such as BatchNorm's); nothing by default."""

    # Whether the model encodes patches of pixels (False for methods on stored features).
    encodes_pixels = True

    def inputs_identity(self) -> dict[str, Any] | None:
        """What the method's inputs were computed with beyond the store's pixels (a feature
        set's encoder, weights, patch and level): saved in every checkpoint and checked when a
        run is loaded, so a run never reads inputs other than those it was trained on. None
        when pixels are all it reads."""
        return None

    def prepared_seconds(self) -> float | None:
        """Seconds spent before training on what the method trains on (a stored feature set's
        extraction), so comparisons count them in; None when the method needs nothing."""
        return None

    def memory(
        self, model: nn.Module, images: list[Any], cost: PatchCost
    ) -> tuple[int, int, int | None]:
        """(per image, per patch, patches wanted) of a training step for ``--memory-budget``
        (see ``plan_memory``): bytes held per image of the batch, bytes per patch encoded with
        gradient, and the patches per step the method wants (None: the batch is its unit).
        ``cost`` is the measured cost of one ``patch_size`` patch through the encoder, with
        gradient and without (a no-grad pass, such as a latent fill or a selection, is a
        transient per image); the default is one such patch per image, with gradient."""
        return 0, cost.grad, None

    def memory_apart(self, model: nn.Module, images: list[Any], cost: PatchCost) -> int:
        """Bytes per image of a phase of the step in which no patch holds activations for
        backward (detection's PatchGD runs the head on the stitched maps before the encoder's
        backward): ``--memory-budget`` takes the step's peak as the larger of this and
        :meth:`memory`'s per image and patches. 0: the step has no such phase."""
        return 0

    @abstractmethod
    def describe(self, image_id: str) -> dict[str, str] | None:
        """What the method sees of an image for the report, as the seed paper's tables state
        them: "sampling" (which patches a step uses) and "sees" (at what resolution), and
        "patch" where it differs from ``patch_size``."""

    def backbone(self) -> Backbone:
        backbone = create_backbone(
            self.recipe.backbone, self.recipe.pretrained, self.encoder_record
        )
        if self.recipe.grad_checkpointing:
            set_checkpointing = getattr(backbone, "set_grad_checkpointing", None)
            if set_checkpointing is None:
                raise UsageError(
                    f"grad_checkpointing: backbone {self.recipe.backbone!r} does not support "
                    "it (timm encoders do)"
                )
            set_checkpointing(True)
        return backbone

    def largest(self, images: list[Any]) -> tuple[PatchGrid, np.ndarray]:
        """The grid and kept patches of the image of ``images`` with the most kept patches."""
        return max((self.patches(im.image_id) for im in images), key=lambda g: len(g[1]))


def resized_setting(height: int, width: int, size: int) -> dict[str, str]:
    """The report's words for a method that sees the whole image resized to ``size``²."""
    side = max(height, width)
    return {
        "patch": "—",
        "sampling": f"whole image resized to {size}²",
        "sees": f"1/{side / size:.3g} resolution ({side}→{size} px per side)",
    }


FULL_SETTING = {"patch": "—", "sampling": "whole image at once", "sees": "full resolution"}


def full_grid(method: Method, image_id: str, instead: str) -> PatchGrid:
    """The one-patch grid of a ``full`` method (the padded square of the whole level); an image
    over ``full_max_pixels`` is refused, naming the method to use ``instead``."""
    _, height, width = method.reader.shape(image_id)
    side = max(height, width)
    if side * side > method.recipe.full_max_pixels:
        raise UsageError(
            f"image {image_id} ({height}×{width}) is too large for method `full` "
            f"(full_max_pixels={method.recipe.full_max_pixels}); use patchgd-global or {instead}"
        )
    return PatchGrid.of(height, width, side)


def recalibrate_batchnorm(module: nn.Module, inputs: list[torch.Tensor]) -> None:
    """Recompute the running statistics of ``module``'s BatchNorm layers as the plain average
    over ``inputs`` (dropout off, no gradients); a no-op without inputs or BatchNorm."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not inputs or not norms:
        return
    was_training = module.training
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the calibration batches
    module.train()
    for m in module.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    with torch.no_grad():
        for x in inputs:
            module(x)
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    module.train(was_training)


def chunks(indices: np.ndarray, size: int) -> list[np.ndarray]:
    return [indices[i : i + size] for i in range(0, len(indices), size)] or [indices[:0]]


def create_method(recipe: Recipe, num_classes: int, reader: PatchReader) -> Method:
    """The method registered as ``recipe.task``/``recipe.method``."""
    method: Method = method_class(recipe.task, recipe.method)(recipe, num_classes, reader)
    return method
