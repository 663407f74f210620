"""Detection's ``downsample`` baseline (docs/methods.md §6): FCOS on the whole image letterboxed
to a square and resized to ``input_size``."""

from __future__ import annotations

from typing import Any

import torch

from hiresctl.data import PatchGrid, ReadRequest, ReadTag
from hiresctl.train.detection.base import EVAL_SCORE_THRESHOLD, CanvasCost, DetectionMethod
from hiresctl.train.detection.coco import Detections
from hiresctl.train.memory import PatchCost
from hiresctl.train.methods import BatchOutput, Reads, StepContext, resized_setting
from hiresctl.train.registry import register_method


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
        return [
            ReadRequest(i, "global", PatchGrid.of(*self.size(i), side), tag=ReadTag("image", b))
            for b, i in enumerate(image_ids)
        ]

    def _scale(self, image_id: str) -> float:
        return self.input_side() / self.side(image_id)

    def train_batch(
        self, ctx: StepContext, image_ids: list[str], targets: torch.Tensor, reads: Reads
    ) -> BatchOutput:
        model = self.model
        model.train()
        pixels = torch.stack([p for _, p in reads]).to(ctx.device)
        truth = []
        for image_id in image_ids:
            boxes, labels = self.targets(image_id, train=True)
            truth.append(
                {
                    "boxes": (boxes * self._scale(image_id)).to(ctx.device),
                    "labels": labels.to(ctx.device),
                }
            )
        with ctx.autocast():
            features = model.encode(pixels)
        ctx.patches_with_grad += len(image_ids)
        return self._finish(ctx, [self._learn(ctx, model, features, truth)], len(image_ids), 1)

    def detect(self, ctx: StepContext, image_ids: list[str], reads: Reads) -> list[Detections]:
        model = self.model
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
            out.append(
                {"boxes": boxes, "scores": d["scores"].float().cpu(), "labels": d["labels"].cpu()}
            )
        return out


__all__ = ["DetDownsample"]
