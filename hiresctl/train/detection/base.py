"""The base every detection method subclasses (docs/methods.md §4): FCOS trained on patches,
one loop and one checkpoint format with classification and segmentation.

Methods, all on :class:`hiresctl.models.PatchFCOS`, each a module of this package:

- ``patchgd-global`` (the seed paper's): every patch's FPN maps are stitched per level into the
  image grid without gradient; each inner step re-encodes k patches per image with gradient,
  writes their maps in place, fuses the global patch's maps by one conv per level, and the FCOS
  head and losses run on the whole stitched image (boxes in image coordinates). Backbone, FPN,
  fusion and head all learn.
- ``patchgd``: the same without the global patch.
- ``downsample``: FCOS on the whole image letterboxed and resized to ``input_size``.
- ``sliced``: the SAHI-style baseline: train on windows of ``patch_size`` (``overlap`` shared
  with each neighbour), infer on every window and merge the boxes with class-wise NMS.

Boxes are x0, y0, x1, y1 in pixels of the run's read level inside a method, level-0 pixels
outside (:func:`hiresctl.train.detection.task.predict_detections` scales them).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from hiresctl.data import PatchReader, flip_boxes
from hiresctl.models.detection import MATCH_CHUNK, PatchFCOS, RecomputedTower
from hiresctl.train.detection.coco import Detections
from hiresctl.train.memory import PatchCost
from hiresctl.train.methods import BatchOutput, Method, Reads, StepContext
from hiresctl.train.recipe import Recipe
from storage.errors import UsageError

EVAL_SCORE_THRESHOLD = 0.05  # docs/methods.md §4: for mAP evaluation (0.2 when predicting)
PREDICT_SCORE_THRESHOLD = 0.2
NMS_THRESHOLD = 0.6


def top_stride(backbone: str) -> int:
    """The coarsest FPN stride of a detection backbone (patch sides must be multiples)."""
    return 32 if backbone == "tiny" else 128


@dataclass(frozen=True)
class CanvasCost:
    """What the FCOS head costs on a canvas of anchor points (one per cell of every FPN
    stride), with ``channels`` floats per point in each map: in one pass (``whole`` bytes per
    point: both branches' activations and predictions, the gradients through them) or a level
    and a branch at a time (:meth:`PatchFCOS.staged_losses`: ``branch`` bytes per point of the
    largest level, beside the gradient of the maps it reads); and target matching against at
    most ``most_boxes`` boxes, ``MATCH_CHUNK`` points at a time."""

    strides: tuple[int, ...]
    channels: int
    whole: int
    branch: int
    most_boxes: int

    def points(self, height: int, width: int) -> int:
        return sum((height // s) * (width // s) for s in self.strides)

    def maps(self, height: int, width: int) -> int:
        """One copy of the FPN maps of the canvas, every level."""
        return self.points(height, width) * self.channels * 4

    def matching(self, height: int, width: int) -> int:
        return 48 * max(1, self.most_boxes) * min(self.points(height, width), MATCH_CHUNK)

    def memory(self, height: int, width: int) -> int:
        """The head and losses in one pass, matching beside them."""
        return self.points(height, width) * self.whole + self.matching(height, width)

    def staged(self, height: int, width: int) -> int:
        """The head and losses a level and a branch at a time; matching runs before them."""
        largest = (height // self.strides[0]) * (width // self.strides[0])
        head = largest * self.branch
        return self.maps(height, width) + max(head, self.matching(height, width))


class DetectionMethod(Method):
    """Base of the detection methods: the model, the targets of an image, the side checks,
    the memory of a step; a method adds :meth:`plan`, :meth:`train_batch` and :meth:`detect`."""

    use_global = False
    model: PatchFCOS
    moves_grid = False  # boxes and stitched maps assume the grid starts at the image's corner
    side_key: ClassVar[str] = "patch_size"  # the recipe key that sets what the network sees

    def __init__(self, recipe: Recipe, num_classes: int, reader: PatchReader) -> None:
        super().__init__(recipe, num_classes, reader)
        stride = top_stride(recipe.backbone)
        side = self.input_side()
        if side % stride:
            raise UsageError(
                f"detection with backbone {recipe.backbone} needs "
                f"{self.side_key} to be a "
                f"multiple of {stride} (its coarsest FPN stride), got {side}"
            )
        self._targets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def input_side(self) -> int:
        """Side of what the network sees at once."""
        return self.recipe.patch_size

    def build_model(self) -> PatchFCOS:
        r = self.recipe
        return PatchFCOS(
            r.backbone,
            self.num_classes,
            r.channels,
            use_global=self.use_global,
            fusion=r.fusion,
            head_convs=r.head_convs,
            pretrained=r.pretrained,
            max_detections=r.max_detections,
        )

    def calibrate(self, ctx: StepContext, batches: list[list[str]]) -> None:
        """GroupNorm only: nothing to re-estimate."""

    def targets(self, image_id: str, train: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, 4) float32 boxes in read-level pixels and (n,) int64 class indices; ``train``:
        in the image as this epoch's training reads mirror it."""
        if image_id not in self._targets:
            xyxy, classes = self.reader.boxes(image_id)
            self._targets[image_id] = (torch.from_numpy(xyxy), torch.from_numpy(classes))
        boxes, labels = self._targets[image_id]
        flip = self.flip(image_id, train)
        if flip:
            boxes = torch.from_numpy(flip_boxes(boxes.numpy(), flip, *self.size(image_id)))
        return boxes, labels

    def side(self, image_id: str) -> int:
        _, height, width = self.reader.shape(image_id)
        return max(height, width)

    def size(self, image_id: str) -> tuple[int, int]:
        _, height, width = self.reader.shape(image_id)
        return height, width

    @abstractmethod
    def detect(self, ctx: StepContext, image_ids: list[str], reads: Reads) -> list[Detections]:
        """Per image: boxes (read-level pixels), scores, labels; the evaluation threshold."""

    def canvas(self, model: nn.Module, images: list[Any]) -> CanvasCost:
        """What the FCOS head costs this model on a canvas (see :class:`CanvasCost`)."""
        recipe = self.recipe
        model = self.model
        # per point, in maps of `channels` floats: the towers (conv, GroupNorm, ReLU per
        # block; a recomputed tower keeps each block's input and redoes one block at a time
        # in backward), the predictions and the gradients through them
        recomputed = isinstance(model.detector.head.classification_head.conv, RecomputedTower)
        convs = recipe.head_convs
        towers = 2 * convs + 3 if recomputed else 6 * convs  # both branches, one pass
        tower = convs + 3 if recomputed else 3 * convs  # one branch, staged
        staged = tower + 4 + (2 if self.use_global else 0)  # + the fused map and its gradient
        most_boxes = max((len(self.targets(im.image_id)[0]) for im in images), default=0)
        floats = recipe.channels * 4
        return CanvasCost(
            model.strides, recipe.channels, floats * (towers + 4), floats * staged, most_boxes
        )

    def memory(
        self, model: nn.Module, images: list[Any], cost: PatchCost
    ) -> tuple[int, int, int | None]:
        """The FCOS head on the canvas it sees (stitched image, window or resized image), the
        stitched maps, and target matching (see :class:`CanvasCost`)."""
        return self.step_memory(self.canvas(model, images), images, cost)

    def memory_apart(self, model: nn.Module, images: list[Any], cost: PatchCost) -> int:
        return self.step_apart(self.canvas(model, images), images, cost)

    @abstractmethod
    def step_memory(
        self, canvas: CanvasCost, images: list[Any], cost: PatchCost
    ) -> tuple[int, int, int | None]:
        """:meth:`memory` of this method, given what a canvas of the head costs."""

    def step_apart(self, canvas: CanvasCost, images: list[Any], cost: PatchCost) -> int:
        """:meth:`memory_apart` of this method, given what a canvas of the head costs; 0: the
        step has no phase apart from its patches."""
        return 0

    @staticmethod
    def _learn(
        ctx: StepContext,
        model: PatchFCOS,
        features: list[torch.Tensor],
        truth: list[dict[str, torch.Tensor]],
    ) -> float:
        """One micro-step on maps the encoder just made with gradient: the head and losses in
        one pass and one backward (the encoder's graph is held through the head either way, so
        running the head a level at a time would not lower the peak). Returns the loss."""
        with ctx.autocast():
            parts = model.losses(features, truth)
        loss = sum(parts.values(), torch.zeros((), device=features[0].device))
        ctx.learn(loss)
        return float(loss.detach())

    @staticmethod
    def _finish(ctx: StepContext, losses: list[float], batch: int, inner: int) -> BatchOutput:
        """Flush the batch's accumulation; no per-image score while training (the loop's
        train accuracy stays empty)."""
        if ctx.micro_steps:
            ctx.step()
        return BatchOutput(
            float(np.mean(losses)) if losses else float("nan"),
            torch.zeros(batch, 0),
            inner,
            score=(0, 0),
        )


__all__ = [
    "EVAL_SCORE_THRESHOLD",
    "PREDICT_SCORE_THRESHOLD",
    "CanvasCost",
    "DetectionMethod",
    "top_stride",
]
