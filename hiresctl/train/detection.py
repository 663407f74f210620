"""Detection (docs/methods.md §4): FCOS trained on patches, one loop and one checkpoint format with
classification and segmentation, and COCO metrics by pycocotools.

Methods, all on :class:`hiresctl.models.PatchFCOS`:

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
outside (:func:`hiresctl.train.tasks.detection.predict_detections` scales them).
"""

from __future__ import annotations

import contextlib
import io
import math
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torchvision.ops import batched_nms, box_iou

from hiresctl.data import NO_FLIP, PatchGrid, PatchReader, ReadRequest, ReadTag, flip_boxes
from hiresctl.models.detection import MATCH_CHUNK, PatchFCOS, RecomputedTower
from hiresctl.train.memory import PatchCost, release_freed_memory
from hiresctl.train.methods import (
    BatchOutput,
    Method,
    Reads,
    StepContext,
    _chunks,
    resized_setting,
)
from hiresctl.train.patchgd import PatchGD
from hiresctl.train.recipe import Recipe
from hiresctl.train.registry import register_method
from storage.errors import UsageError

EVAL_SCORE_THRESHOLD = 0.05  # docs/methods.md §4: for mAP evaluation (0.2 when predicting)
PREDICT_SCORE_THRESHOLD = 0.2
NMS_THRESHOLD = 0.6
MIN_VISIBLE = 0.5  # sliced training: a box cut by its window counts if this much of it is inside

Detections = dict[str, torch.Tensor]  # boxes (n, 4), scores (n,), labels (n,)


def _grad(leaf: torch.Tensor) -> torch.Tensor:
    """A leaf's gradient after a backward (zeros where nothing reached it)."""
    return leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)


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
        return PatchFCOS(r.backbone, self.num_classes, r.channels, use_global=self.use_global,
                         fusion=r.fusion, head_convs=r.head_convs, pretrained=r.pretrained,
                         max_detections=r.max_detections)  # fmt: skip

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
        assert isinstance(model, PatchFCOS)
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
        return CanvasCost(model.strides, recipe.channels, floats * (towers + 4),
                          floats * staged, most_boxes)  # fmt: skip

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
        ctx: StepContext, model: PatchFCOS, features: list[torch.Tensor],
        truth: list[dict[str, torch.Tensor]],
    ) -> float:  # fmt: skip
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
        return BatchOutput(float(np.mean(losses)) if losses else float("nan"),
                           torch.zeros(batch, 0), inner, score=(0, 0))  # fmt: skip


@register_method("det", "patchgd", defaults={"grad_batch": 4})
class DetPatchGD(DetectionMethod, PatchGD):
    """PatchGD for FCOS: stitched FPN maps per level, k patches per image re-encoded with
    gradient per inner step, the head and losses on the whole stitched image."""

    def step_memory(
        self, canvas: CanvasCost, images: list[Any], cost: PatchCost
    ) -> tuple[int, int, int | None]:
        """The encoder's phase of an inner step: the stitched maps, the gradient of every
        patch's maps, and ``grad_batch`` of the k patches and the global patch encoded with
        gradient at once (all of them when it is unset), beside what the same patches'
        encoding without gradient (``fill_batch`` at a time) left to the allocator (measured:
        the heap's release between the phases does not return all of it)."""
        grid, kept = self.largest(images)
        size = self.recipe.patch_size
        wanted = self.patches_per_step(len(kept))
        per_image = canvas.maps(grid.rows * size, grid.cols * size)
        per_image += min(self.recipe.fill_batch, wanted + self.use_global) * cost.nograd
        per_patch = canvas.maps(size, size)
        if self.recipe.grad_batch:
            per_image += min(self.recipe.grad_batch, wanted + self.use_global) * cost.grad
        else:
            per_image += cost.grad if self.use_global else 0
            per_patch += cost.grad
        return per_image, per_patch, wanted

    def step_apart(self, canvas: CanvasCost, images: list[Any], cost: PatchCost) -> int:
        """The phases without gradient through the encoder, each beside the stitched maps: the
        fill (``fill_batch`` patches encoded at once), then in every inner step the maps'
        gradient and the head a level and a branch at a time on the whole stitched canvas."""
        grid, kept = self.largest(images)
        height, width = grid.rows * self.recipe.patch_size, grid.cols * self.recipe.patch_size
        fill = min(self.recipe.fill_batch, len(kept)) * cost.nograd
        return canvas.maps(height, width) + max(fill, canvas.staged(height, width))

    def __init__(self, recipe: Recipe, num_classes: int, reader: PatchReader) -> None:
        if recipe.stride not in (None, recipe.patch_size):
            raise UsageError(
                f"detection stitches patches edge to edge: stride must equal patch_size "
                f"({recipe.patch_size}), got {recipe.stride}"
            )
        super().__init__(recipe, num_classes, reader)

    def _maps(
        self, model: PatchFCOS, image_ids: list[str], device: torch.device
    ) -> list[torch.Tensor]:
        grids = [self.patches(i)[0] for i in image_ids]
        rows, cols = max(g.rows for g in grids), max(g.cols for g in grids)
        p = self.recipe.patch_size
        return [torch.zeros(len(image_ids), model.channels, rows * p // s, cols * p // s,
                            device=device) for s in model.strides]  # fmt: skip

    @staticmethod
    def _cells(
        grid: PatchGrid, indices: np.ndarray, side: int
    ) -> list[tuple[slice, slice]]:  # fmt: skip
        """Where each patch's map of ``side`` cells lies in the image grid: cell (i, j) of patch
        (r, c) is at (r·side + i, c·side + j)."""
        rows, cols = grid.position(indices)
        return [(slice(r * side, (r + 1) * side), slice(c * side, (c + 1) * side))
                for r, c in zip(rows.tolist(), cols.tolist(), strict=True)]  # fmt: skip

    @classmethod
    def _stitch(
        cls, maps: list[torch.Tensor], b: int, grid: PatchGrid, indices: np.ndarray,
        features: list[torch.Tensor],
    ) -> None:  # fmt: skip
        """Write each patch's map of every level at its place in the image grid."""
        for level, patch_maps in zip(maps, features, strict=True):
            for k, (rows, cols) in enumerate(cls._cells(grid, indices, patch_maps.shape[-1])):
                level[b, :, rows, cols] = patch_maps[k].to(level.dtype)

    @classmethod
    def _gather(
        cls, level: torch.Tensor, b: int, grid: PatchGrid, indices: np.ndarray, side: int
    ) -> torch.Tensor:
        """The inverse of :meth:`_stitch` on one level: the (n, C, side, side) maps of the
        patches at ``indices``."""
        return torch.stack(
            [level[b, :, rows, cols] for rows, cols in cls._cells(grid, indices, side)]
        )

    def _fill_maps(
        self, ctx: StepContext, model: PatchFCOS, maps: list[torch.Tensor],
        request: ReadRequest, pixels: torch.Tensor,
    ) -> None:  # fmt: skip
        if not len(request.indices):
            return
        with torch.no_grad(), ctx.autocast():
            features = model.encode(pixels.to(ctx.device, non_blocking=True))
        self._stitch(maps, request.tag.image, request.grid, request.indices, features)

    def _global(
        self, ctx: StepContext, model: PatchFCOS, pixels: list[torch.Tensor | None]
    ) -> list[torch.Tensor] | None:
        if not self.use_global:
            return None
        with torch.no_grad(), ctx.autocast():
            return model.encode(torch.stack([p for p in pixels if p is not None]).to(ctx.device))

    def train_batch(
        self, ctx: StepContext, image_ids: list[str], targets: torch.Tensor, reads: Reads
    ) -> BatchOutput:
        """Each inner step in two phases that hold memory one after the other: the group's
        patches (and global patches) encoded without gradient at the current weights and
        stitched in, the head's losses and backward on the stitched maps a level and a branch
        at a time (:meth:`PatchFCOS.staged_losses`); then the same patches encoded again with
        gradient and their maps' gradients carried back through the encoder. The gradients
        are those of one backward through encoder, stitched maps and head together."""
        model: PatchFCOS = ctx.model  # type: ignore[assignment]
        model.train()
        maps = self._maps(model, image_ids, ctx.device)
        truth = [self._target_dict(i, ctx.device) for i in image_ids]
        sides = [self.side(i) for i in image_ids]
        global_pixels: list[torch.Tensor | None] = [None] * len(image_ids)
        losses: list[float] = []
        inner = 0

        def fill(request: ReadRequest, pixels: torch.Tensor) -> None:
            self._fill_maps(ctx, model, maps, request, pixels)

        for group in self.inner_iterations(reads, fill, global_pixels):
            members, pixels = self._group_pixels(ctx, group, global_pixels)
            losses.append(self._inner_step(ctx, model, maps, members, pixels, sides, truth))
            inner += 1
        return self._finish(ctx, losses, len(image_ids), inner)

    def _inner_step(
        self, ctx: StepContext, model: PatchFCOS, maps: list[torch.Tensor],
        members: list[ReadRequest], pixels: torch.Tensor, sides: list[int],
        truth: list[dict[str, torch.Tensor]],
    ) -> float:  # fmt: skip
        """:meth:`train_batch`'s two phases for one group of patches; returns the loss. Both
        encode ``pixels`` in slices (``fill_batch`` without gradient, ``grad_batch`` with it,
        each slice's backward before the next slice runs): the encoder normalises each patch
        on its own (GroupNorm), so slices change nothing but the memory they hold."""
        with torch.no_grad(), ctx.autocast():
            slices = [model.encode(p) for p in pixels.split(self.recipe.fill_batch)]
            g = self._place(
                maps, members, [torch.cat(level) for level in zip(*slices, strict=True)]
            )
            del slices

        def run(backward: Callable[[torch.Tensor], None]) -> float:
            leaves = [m.detach().requires_grad_() for m in maps]
            global_leaves = [x.detach().requires_grad_() for x in g] if g else None
            kept: list[torch.Tensor] = []

            def level_done(level: int) -> None:  # keep the patches' cells, free the rest
                kept.append(self._gathered(model, level, _grad(leaves[level]), members))
                leaves[level].grad = None

            parts = model.staged_losses(leaves, global_leaves, sides, truth, backward,
                                        ctx.autocast, level_done)  # fmt: skip
            grads = kept
            if global_leaves is not None:
                grads = [
                    torch.cat([a, _grad(b)]) for a, b in zip(grads, global_leaves, strict=True)
                ]
            release_freed_memory(ctx.device)  # the head's pages: the encoder's peak is apart
            size = self.recipe.grad_batch or len(pixels)
            for start in range(0, len(pixels), size):
                with ctx.autocast():
                    features = model.encode(pixels[start : start + size])
                torch.autograd.backward(features, [d[start : start + size].to(f.dtype)
                                                   for d, f in zip(grads, features, strict=True)])  # fmt: skip
                del features
            return sum(parts.values())

        loss = ctx.learn_staged(run)
        ctx.patches_with_grad += sum(len(r.indices) for r in members)
        return loss

    def _target_dict(self, image_id: str, device: torch.device) -> dict[str, torch.Tensor]:
        boxes, labels = self.targets(image_id, train=True)
        return {"boxes": boxes.to(device), "labels": labels.to(device)}

    def _group_pixels(
        self, ctx: StepContext, group: list[tuple[ReadRequest, torch.Tensor]],
        global_pixels: list[torch.Tensor | None],
    ) -> tuple[list[ReadRequest], torch.Tensor]:  # fmt: skip
        """An inner step's patches (then the global patches) as one batch on the device."""
        members = [(r, p) for r, p in group if len(r.indices)]
        pieces = [p for _, p in members]
        if self.use_global:
            pieces.append(torch.stack([p for p in global_pixels if p is not None]))
        return [r for r, _ in members], torch.cat(pieces).to(ctx.device, non_blocking=True)

    def _place(
        self, maps: list[torch.Tensor], members: list[ReadRequest], features: list[torch.Tensor]
    ) -> list[torch.Tensor] | None:
        """Stitch the group's patch maps in; the global patches' maps (the batch's tail)."""
        start = 0
        for r in members:
            count = len(r.indices)
            self._stitch(maps, r.tag.image, r.grid, r.indices,
                         [f[start : start + count] for f in features])  # fmt: skip
            start += count
        return [f[start:] for f in features] if self.use_global else None

    def _gathered(
        self, model: PatchFCOS, level: int, maps: torch.Tensor, members: list[ReadRequest]
    ) -> torch.Tensor:
        """The group's patch maps cut from FPN level ``level``'s ``maps``, in :meth:`_place`'s
        order."""
        side = self.recipe.patch_size // model.strides[level]
        return torch.cat([self._gather(maps, r.tag.image, r.grid, r.indices, side)
                          for r in members])  # fmt: skip

    def detect(self, ctx: StepContext, image_ids: list[str], reads: Reads) -> list[Detections]:
        model: PatchFCOS = ctx.model  # type: ignore[assignment]
        model.eval()
        maps = self._maps(model, image_ids, ctx.device)
        global_pixels: list[torch.Tensor | None] = [None] * len(image_ids)
        for request, pixels in reads:
            if request.tag.role == "fill":
                self._fill_maps(ctx, model, maps, request, pixels)
            else:
                global_pixels[request.tag.image] = pixels
        g = self._global(ctx, model, global_pixels)
        with torch.no_grad(), ctx.autocast():
            fused = model.fuse(maps, g, [self.side(i) for i in image_ids])
            found = model.detect(fused, [self.size(i) for i in image_ids], EVAL_SCORE_THRESHOLD)
        return [{k: v.float().cpu() if k != "labels" else v.cpu() for k, v in d.items()}
                for d in found]  # fmt: skip


@register_method("det", "patchgd-global", defaults={"accumulation_steps": 10, "grad_batch": 4})
class DetPatchGDGlobal(DetPatchGD):
    """PatchGD for FCOS with the global patch's FPN maps fused into the stitched maps."""

    use_global = True


@register_method("det", "downsample")
class DetDownsample(DetectionMethod):
    """FCOS on the whole image letterboxed to a square and resized to ``input_size``."""

    side_key = "input_size"

    def step_memory(
        self, canvas: CanvasCost, images: list[Any], cost: PatchCost
    ) -> tuple[int, int, int | None]:
        side = self.input_side()
        scaled = cost.scaled(side, self.recipe.patch_size).grad
        return 0, scaled + canvas.memory(side, side), None

    def describe(self, image_id: str) -> dict[str, str] | None:
        return resized_setting(*self.size(image_id), self.input_side())

    def input_side(self) -> int:
        return self.recipe.input_size or self.recipe.patch_size

    def plan(self, image_ids: list[str], seed: int, train: bool) -> list[ReadRequest]:
        side = self.input_side()
        return [ReadRequest(i, "global", PatchGrid.of(*self.size(i), side), tag=ReadTag("image", b))
                for b, i in enumerate(image_ids)]  # fmt: skip

    def _scale(self, image_id: str) -> float:
        return self.input_side() / self.side(image_id)

    def train_batch(
        self, ctx: StepContext, image_ids: list[str], targets: torch.Tensor, reads: Reads
    ) -> BatchOutput:
        model: PatchFCOS = ctx.model  # type: ignore[assignment]
        model.train()
        pixels = torch.stack([p for _, p in reads]).to(ctx.device)
        truth = []
        for image_id in image_ids:
            boxes, labels = self.targets(image_id, train=True)
            truth.append({"boxes": (boxes * self._scale(image_id)).to(ctx.device),
                          "labels": labels.to(ctx.device)})  # fmt: skip
        with ctx.autocast():
            features = model.encode(pixels)
        ctx.patches_with_grad += len(image_ids)
        return self._finish(ctx, [self._learn(ctx, model, features, truth)], len(image_ids), 1)

    def detect(self, ctx: StepContext, image_ids: list[str], reads: Reads) -> list[Detections]:
        model: PatchFCOS = ctx.model  # type: ignore[assignment]
        model.eval()
        pixels = torch.stack([p for _, p in reads]).to(ctx.device)
        sizes = []
        for image_id in image_ids:
            height, width = self.size(image_id)
            scale = self._scale(image_id)
            sizes.append((max(1, round(height * scale)), max(1, round(width * scale))))
        with torch.no_grad(), ctx.autocast():
            found = model.detect(model.encode(pixels), sizes, EVAL_SCORE_THRESHOLD)
        out = []
        for image_id, d in zip(image_ids, found, strict=True):
            boxes = d["boxes"].float().cpu() / self._scale(image_id)
            out.append({"boxes": boxes, "scores": d["scores"].float().cpu(),
                        "labels": d["labels"].cpu()})  # fmt: skip
        return out


@register_method("det", "sliced")
class DetSliced(DetectionMethod, PatchGD):
    """SAHI-style: windows of ``patch_size`` every ``patch_size·(1 − overlap)`` pixels. Training
    visits every window of an image once per batch, k windows per image per step (boxes cut
    by a window count when ≥ half of them is inside); inference detects in every window and
    merges the boxes of all windows with class-wise NMS."""

    def step_memory(
        self, canvas: CanvasCost, images: list[Any], cost: PatchCost
    ) -> tuple[int, int, int | None]:
        size = self.recipe.patch_size
        _, kept = self.largest(images)
        return (
            0,
            cost.grad + canvas.memory(size, size),
            self.patches_per_step(len(kept)),
        )

    def describe(self, image_id: str) -> dict[str, str] | None:
        r = self.recipe
        grid, kept = self.patches(image_id)
        k = self.patches_per_step(len(kept))
        return {"sampling": f"windows {r.patch_size}² every {grid.stride} px "
                            f"(overlap {r.overlap:.0%}), k={k} of N={len(kept)} per step; "
                            "inference on every window, merged by NMS",
                "sees": "full resolution, one window at a time"}  # fmt: skip

    def window_stride(self) -> int:
        return max(1, round(self.recipe.patch_size * (1 - self.recipe.overlap)))

    def patches(self, image_id: str, train: bool = False) -> tuple[PatchGrid, np.ndarray]:
        """Every window (no foreground filter, so mirroring changes nothing here)."""
        key = (image_id, NO_FLIP, (0, 0))
        if key not in self._patches:
            grid = self.reader.grid(image_id, self.recipe.patch_size, self.window_stride())
            self._patches[key] = (grid, np.arange(grid.num_patches))
        return self._patches[key]

    def plan(self, image_ids: list[str], seed: int, train: bool) -> list[ReadRequest]:
        if train:
            return self.inner_groups(image_ids, np.random.default_rng(seed))
        requests = []
        for b, image_id in enumerate(image_ids):
            grid, kept = self.patches(image_id)
            for chunk in _chunks(kept, self.recipe.fill_batch):
                requests.append(ReadRequest(image_id, "patches", grid, chunk, ReadTag("tile", b)))
        return requests

    def window_targets(
        self, image_id: str, y: int, x: int, device: torch.device
    ) -> dict[str, torch.Tensor]:
        """The image's boxes (as training mirrors it) inside the window at (y, x), clipped, in
        window pixels."""
        boxes, labels = self.targets(image_id, train=True)
        p = self.recipe.patch_size
        shifted = boxes - torch.tensor([x, y, x, y], dtype=boxes.dtype)
        clipped = shifted.clamp(0, p)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
        keep = inside >= MIN_VISIBLE * area.clamp_min(1e-6)
        return {"boxes": clipped[keep].to(device), "labels": labels[keep].to(device)}

    def train_batch(
        self, ctx: StepContext, image_ids: list[str], targets: torch.Tensor, reads: Reads
    ) -> BatchOutput:
        model: PatchFCOS = ctx.model  # type: ignore[assignment]
        model.train()
        losses: list[float] = []
        inner = 0

        def unexpected(request: ReadRequest, pixels: torch.Tensor) -> None:
            raise AssertionError(f"sliced training plans only windows, got {request.tag}")

        for group in self.inner_iterations(reads, unexpected, []):
            crops, truth = [], []
            for r, p in group:
                for index, crop in zip(r.indices.tolist(), p, strict=True):
                    y, x = r.grid.origin(index)
                    crops.append(crop)
                    truth.append(self.window_targets(r.image_id, y, x, ctx.device))
            with ctx.autocast():
                features = model.encode(torch.stack(crops).to(ctx.device))
            ctx.patches_with_grad += len(crops)
            losses.append(self._learn(ctx, model, features, truth))
            inner += 1
        return self._finish(ctx, losses, len(image_ids), inner)

    def detect(self, ctx: StepContext, image_ids: list[str], reads: Reads) -> list[Detections]:
        model: PatchFCOS = ctx.model  # type: ignore[assignment]
        model.eval()
        found: list[list[Detections]] = [[] for _ in image_ids]
        p = self.recipe.patch_size
        for request, pixels in reads:
            if not len(request.indices):
                continue
            height, width = self.size(request.image_id)
            origins = [request.grid.origin(int(i)) for i in request.indices]
            sizes = [(min(p, height - y), min(p, width - x)) for y, x in origins]
            with torch.no_grad(), ctx.autocast():
                windows = model.detect(model.encode(pixels.to(ctx.device)), sizes,
                                       EVAL_SCORE_THRESHOLD)  # fmt: skip
            for (y, x), d in zip(origins, windows, strict=True):
                offset = torch.tensor([x, y, x, y], dtype=torch.float32)
                found[request.tag.image].append({"boxes": d["boxes"].float().cpu() + offset,
                                              "scores": d["scores"].float().cpu(),
                                              "labels": d["labels"].cpu()})  # fmt: skip
        return [merge_detections(parts, self.recipe.max_detections) for parts in found]


def merge_detections(parts: list[Detections], limit: int) -> Detections:
    """The boxes of overlapping windows as one set: class-wise NMS, best ``limit`` kept."""
    if not parts:
        return {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                "labels": torch.zeros(0, dtype=torch.int64)}  # fmt: skip
    boxes = torch.cat([d["boxes"] for d in parts])
    scores = torch.cat([d["scores"] for d in parts])
    labels = torch.cat([d["labels"] for d in parts])
    keep = batched_nms(boxes, scores, labels, NMS_THRESHOLD)[:limit]
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


# ------------------------------------------------------------------------------- COCO metrics

COCO_KEYS = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")
RECALL_KEYS = ("ar1", "ar10", "ar", "ar_small", "ar_medium", "ar_large")


def coco_ground_truth(
    image_ids: list[str],
    sizes: list[tuple[int, int]],
    truth: list[tuple[np.ndarray, np.ndarray]],
    classes: list[str],
) -> dict[str, Any]:
    """A COCO detection dataset (image ids 1..N in the given order, category ids 1..C in the
    run's class order, boxes [x, y, w, h] in level-0 pixels)."""
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for number, (image_id, (height, width), (boxes, labels)) in enumerate(
        zip(image_ids, sizes, truth, strict=True), start=1
    ):
        images.append({"id": number, "file_name": image_id, "height": height, "width": width})
        for box, label in zip(boxes.tolist(), labels.tolist(), strict=True):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append({"id": len(annotations) + 1, "image_id": number,
                                "category_id": int(label) + 1, "bbox": [box[0], box[1], w, h],
                                "area": w * h, "iscrowd": 0})  # fmt: skip
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(classes)]
    return {"images": images, "annotations": annotations, "categories": categories}


def coco_boxes(dataset: dict[str, Any]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per image of a COCO dataset or results' image order (ids 1..N, as
    :func:`coco_ground_truth` numbers them): (n, 4) x0, y0, x1, y1 boxes and (n,) class
    indices (category id − 1)."""
    count = len(dataset["images"])
    boxes: list[list[list[float]]] = [[] for _ in range(count)]
    labels: list[list[int]] = [[] for _ in range(count)]
    for a in dataset["annotations"]:
        x, y, w, h = a["bbox"]
        boxes[a["image_id"] - 1].append([x, y, x + w, y + h])
        labels[a["image_id"] - 1].append(a["category_id"] - 1)
    return [(np.asarray(b, np.float32).reshape(-1, 4), np.asarray(c, np.int64))
            for b, c in zip(boxes, labels, strict=True)]  # fmt: skip


def coco_results(detections: list[Detections]) -> list[dict[str, Any]]:
    """COCO results: one {image_id, category_id, bbox [x, y, w, h], score} per box."""
    out = []
    for number, d in enumerate(detections, start=1):
        for box, score, label in zip(d["boxes"].tolist(), d["scores"].tolist(),
                                     d["labels"].tolist(), strict=True):  # fmt: skip
            out.append({"image_id": number, "category_id": int(label) + 1,
                        "bbox": [round(box[0], 2), round(box[1], 2), round(box[2] - box[0], 2),
                                 round(box[3] - box[1], 2)],
                        "score": round(float(score), 5)})  # fmt: skip
    return out


def coco_metrics(
    ground_truth: dict[str, Any], results: list[dict[str, Any]], max_detections: int = 100
) -> dict[str, Any]:
    """COCO AP, AP50, AP75, APs/m/l, AR and per-class AP by pycocotools' COCOeval (bbox), with
    ``maxDets = [1, 10, max_detections]``. Without any detection every value is 0."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    classes = [c["name"] for c in ground_truth["categories"]]
    out: dict[str, Any] = {"count": len(ground_truth["images"]),
                           "objects": len(ground_truth["annotations"]),
                           "detections": len(results)}  # fmt: skip
    if not results or not ground_truth["annotations"]:
        out.update({k: 0.0 for k in (*COCO_KEYS, *RECALL_KEYS)})
        counts = np.bincount([a["category_id"] - 1 for a in ground_truth["annotations"]],
                             minlength=len(classes))  # fmt: skip
        out["per_class"] = {name: {"ap": 0.0, "ap50": 0.0, "objects": int(counts[k])}
                            for k, name in enumerate(classes)}  # fmt: skip
        out["by_size"] = _by_size(ground_truth, out)
        out["pr_curve"] = None
        out["max_detections"] = max_detections
        return out
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):  # pycocotools prints its progress
        truth = COCO()
        truth.dataset = ground_truth
        truth.createIndex()
        found = truth.loadRes(results)
        evaluation = COCOeval(truth, found, "bbox")
        evaluation.params.maxDets = [1, 10, max_detections]
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = [float(v) for v in evaluation.stats]
    # -1 means "no object of that size": reported as None
    for key, value in zip((*COCO_KEYS, *RECALL_KEYS), stats, strict=True):
        out[key] = None if value < 0 else value
    precision = evaluation.eval["precision"]  # (iou, recall, class, area, maxDets)
    counts = np.bincount([a["category_id"] - 1 for a in ground_truth["annotations"]],
                         minlength=len(classes))  # fmt: skip
    per_class = {}
    for k, name in enumerate(classes):
        per_class[name] = {"ap": _mean_valid(precision[:, :, k, 0, -1]),
                           "ap50": _mean_valid(precision[0, :, k, 0, -1]),
                           "objects": int(counts[k])}  # fmt: skip
    out["per_class"] = per_class
    out["by_size"] = _by_size(ground_truth, out)
    # precision at each of COCO's 101 recall thresholds, averaged over the classes that have
    # objects (the curve whose area is AP50 / AP75)
    curve: dict[str, Any] = {"recall": [float(r) for r in evaluation.params.recThrs]}
    for name, iou in (("iou50", 0), ("iou75", 5)):
        curve[name] = [_mean_valid(precision[iou, r, :, 0, -1]) for r in range(precision.shape[1])]
    out["pr_curve"] = curve
    out["max_detections"] = max_detections
    return out


def _mean_valid(values: np.ndarray) -> float | None:
    """Mean of COCOeval precision entries, leaving out -1 (nothing to measure)."""
    kept = values[values > -1]
    return float(kept.mean()) if kept.size else None


SIZE_AREAS = {"small": (0.0, 32.0**2), "medium": (32.0**2, 96.0**2), "large": (96.0**2, math.inf)}


def _by_size(ground_truth: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """COCO's object sizes (area < 32², < 96², larger): objects, AP and AR of each."""
    areas = [float(a["area"]) for a in ground_truth["annotations"]]
    return {size: {"objects": sum(low <= a < high for a in areas),
                   "ap": metrics.get(f"ap_{size}"), "ar": metrics.get(f"ar_{size}")}
            for size, (low, high) in SIZE_AREAS.items()}  # fmt: skip


def match_detections(
    truth_boxes: np.ndarray, truth_labels: np.ndarray, boxes: np.ndarray, scores: np.ndarray,
    labels: np.ndarray, iou: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Greedy matching as COCO does it at one IoU threshold: detections in descending score
    take the best-overlapping unmatched true box of their class. Returns (detection is a true
    positive, true box was found)."""
    found = np.zeros(len(boxes), dtype=bool)
    hit = np.zeros(len(truth_boxes), dtype=bool)
    if not len(boxes) or not len(truth_boxes):
        return found, hit
    overlaps = box_iou(torch.as_tensor(boxes, dtype=torch.float32),
                       torch.as_tensor(truth_boxes, dtype=torch.float32)).numpy()  # fmt: skip
    same = np.asarray(labels)[:, None] == np.asarray(truth_labels)[None, :]
    overlaps = np.where(same, overlaps, 0.0)
    for d in np.argsort(-np.asarray(scores), kind="stable"):
        candidates = np.where(hit, 0.0, overlaps[d])
        best = int(candidates.argmax())
        if candidates[best] >= iou:
            found[d] = hit[best] = True
    return found, hit


def monitor_key() -> str:
    return "ap"


__all__ = [
    "COCO_KEYS",
    "EVAL_SCORE_THRESHOLD",
    "PREDICT_SCORE_THRESHOLD",
    "DetectionMethod",
    "coco_boxes",
    "coco_ground_truth",
    "coco_metrics",
    "coco_results",
    "match_detections",
    "merge_detections",
]
