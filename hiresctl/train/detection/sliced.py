"""Detection's ``sliced`` baseline (SAHI-style, docs/methods.md §4): train on windows of
``patch_size`` (``overlap`` shared with each neighbour), infer on every window and merge the
boxes with class-wise NMS. It borrows the PatchGD engine's schedule (k windows per image per
step, each window once per batch); nothing else of PatchGD."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchvision.ops import batched_nms

from hiresctl.data import NO_FLIP, PatchGrid, PatchReader, ReadRequest, ReadTag
from hiresctl.train.detection.base import EVAL_SCORE_THRESHOLD, CanvasCost, DetectionMethod
from hiresctl.train.detection.coco import Detections
from hiresctl.train.memory import PatchCost
from hiresctl.train.methods import BatchOutput, Reads, StepContext, chunks
from hiresctl.train.patchgd import PatchGDEngine
from hiresctl.train.recipe import Recipe
from hiresctl.train.registry import register_method

NMS_THRESHOLD = 0.6
MIN_VISIBLE = 0.5  # sliced training: a box cut by its window counts if this much of it is inside


@register_method("det", "sliced")
class DetSliced(DetectionMethod):
    """SAHI-style: windows of ``patch_size`` every ``patch_size·(1 − overlap)`` pixels. Training
    visits every window of an image once per batch, k windows per image per step (boxes cut
    by a window count when ≥ half of them is inside); inference detects in every window and
    merges the boxes of all windows with class-wise NMS."""

    def __init__(self, recipe: Recipe, num_classes: int, reader: PatchReader) -> None:
        super().__init__(recipe, num_classes, reader)
        self.engine = PatchGDEngine(recipe, self.patches, use_global=False)

    def step_memory(
        self, canvas: CanvasCost, images: list[Any], cost: PatchCost
    ) -> tuple[int, int, int | None]:
        size = self.recipe.patch_size
        _, kept = self.largest(images)
        return (
            0,
            cost.grad + canvas.memory(size, size),
            self.engine.patches_per_step(len(kept)),
        )

    def describe(self, image_id: str) -> dict[str, str] | None:
        r = self.recipe
        grid, kept = self.patches(image_id)
        k = self.engine.patches_per_step(len(kept))
        return {
            "sampling": f"windows {r.patch_size}² every {grid.stride} px "
            f"(overlap {r.overlap:.0%}), k={k} of N={len(kept)} per step; "
            "inference on every window, merged by NMS",
            "sees": "full resolution, one window at a time",
        }

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
            return self.engine.inner_groups(image_ids, np.random.default_rng(seed))
        requests = []
        for b, image_id in enumerate(image_ids):
            grid, kept = self.patches(image_id)
            for chunk in chunks(kept, self.recipe.fill_batch):
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
        model = self.model
        model.train()
        losses: list[float] = []
        inner = 0

        def unexpected(request: ReadRequest, pixels: torch.Tensor) -> None:
            raise AssertionError(f"sliced training plans only windows, got {request.tag}")

        for group in self.engine.inner_iterations(reads, unexpected, []):
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
        model = self.model
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
                windows = model.detect(
                    model.encode(pixels.to(ctx.device)), sizes, EVAL_SCORE_THRESHOLD
                )
            for (y, x), d in zip(origins, windows, strict=True):
                offset = torch.tensor([x, y, x, y], dtype=torch.float32)
                found[request.tag.image].append(
                    {
                        "boxes": d["boxes"].float().cpu() + offset,
                        "scores": d["scores"].float().cpu(),
                        "labels": d["labels"].cpu(),
                    }
                )
        return [merge_detections(parts, self.recipe.max_detections) for parts in found]


def merge_detections(parts: list[Detections], limit: int) -> Detections:
    """The boxes of overlapping windows as one set: class-wise NMS, best ``limit`` kept."""
    if not parts:
        return {
            "boxes": torch.zeros(0, 4),
            "scores": torch.zeros(0),
            "labels": torch.zeros(0, dtype=torch.int64),
        }
    boxes = torch.cat([d["boxes"] for d in parts])
    scores = torch.cat([d["scores"] for d in parts])
    labels = torch.cat([d["labels"] for d in parts])
    keep = batched_nms(boxes, scores, labels, NMS_THRESHOLD)[:limit]
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


__all__ = ["DetSliced", "merge_detections"]
