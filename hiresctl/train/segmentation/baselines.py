"""Segmentation's whole-image baselines (docs/methods.md §6): ``downsample`` (the image resized
to ``input_size``, predictions upsampled tile by tile) and ``full`` (the whole level at once)."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from hiresctl.data import PatchGrid, ReadRequest, ReadTag
from hiresctl.models import PatchSegmenter, upsample_region
from hiresctl.train.memory import PatchCost
from hiresctl.train.methods import (
    FULL_SETTING,
    BatchOutput,
    Reads,
    StepContext,
    full_grid,
    resized_setting,
)
from hiresctl.train.registry import register_method
from hiresctl.train.segmentation.base import (
    PREDICT_TILE,
    SegmentationMethod,
    outputs,
    segmentation_loss,
)


class SegWholeImage(SegmentationMethod):
    """Baselines that segment the whole image in one forward pass."""

    def build_model(self) -> nn.Module:
        return PatchSegmenter(
            self.network(), outputs(self.num_classes), self.recipe.channels, use_global=False
        )

    @abstractmethod
    def requests(self, image_id: str, b: int) -> list[ReadRequest]:
        """The image and target reads of ``image_id``, the ``b``-th image of its batch."""

    @abstractmethod
    def input_side(self, image_id: str) -> int:
        """Side of the square the network sees."""

    def memory(
        self, model: nn.Module, images: list[Any], cost: PatchCost
    ) -> tuple[int, int, int | None]:
        side = max(self.input_side(im.image_id) for im in images)
        return 0, cost.scaled(side, self.recipe.patch_size).grad, None

    def plan_train(self, image_ids: list[str], seed: int) -> list[ReadRequest]:
        return [r for b, image_id in enumerate(image_ids) for r in self.requests(image_id, b)]

    def plan_image(self, image_id: str) -> list[ReadRequest]:
        return [r for r in self.requests(image_id, 0) if not r.kind.startswith("mask")]

    @staticmethod
    def _image(pixels: torch.Tensor) -> torch.Tensor:
        """(3, h, w) of a global read, or of a one-patch read (1, 3, h, w)."""
        return pixels if pixels.dim() == 3 else pixels[0]

    def train_batch(
        self, ctx: StepContext, image_ids: list[str], targets: torch.Tensor, reads: Reads
    ) -> BatchOutput:
        images, masks = [], []
        for request, pixels in reads:
            if request.kind.startswith("mask"):  # (h, w) or one patch's (1, h, w)
                masks.append(pixels if pixels.dim() == 2 else pixels[0])
            else:
                images.append(self._image(pixels))
        self.model.train()
        target = torch.stack(masks).to(ctx.device)
        with ctx.autocast():
            logits = self.model(torch.stack(images).to(ctx.device, non_blocking=True))
            loss = segmentation_loss(logits, target)
        ctx.learn(loss)
        return BatchOutput(
            float(loss.detach()), torch.zeros(len(image_ids), 0), 1, self._score(logits, target)
        )

    def _logits(self, ctx: StepContext, reads: Reads) -> torch.Tensor:
        [(_, pixels)] = list(reads)
        self.model.eval()
        with torch.no_grad(), ctx.autocast():
            return self.model(self._image(pixels).unsqueeze(0).to(ctx.device)).float()


@register_method("seg", "downsample")
class SegDownsample(SegWholeImage):
    """The whole image resized to ``input_size`` (default ``patch_size``); targets resized by
    nearest label; predictions upsampled (bilinear logits) to full resolution tile by tile."""

    def input_side(self, image_id: str) -> int:
        return self.recipe.input_size or self.recipe.patch_size

    def describe(self, image_id: str) -> dict[str, str] | None:
        _, height, width = self.reader.shape(image_id)
        return resized_setting(height, width, self.input_side(image_id))

    def requests(self, image_id: str, b: int) -> list[ReadRequest]:
        _, height, width = self.reader.shape(image_id)
        grid = PatchGrid.of(height, width, self.recipe.input_size or self.recipe.patch_size)
        return [
            ReadRequest(image_id, "global", grid, tag=ReadTag("image", b)),
            ReadRequest(image_id, "mask_global", grid, tag=ReadTag("target", b)),
        ]

    def predict_tiles(
        self, ctx: StepContext, image_id: str, reads: Reads
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        logits = self._logits(ctx, reads)
        side = self.side(image_id)
        _, height, width = self.reader.shape(image_id)
        for y in range(0, height, PREDICT_TILE):
            for x in range(0, width, PREDICT_TILE):
                h, w = min(PREDICT_TILE, height - y), min(PREDICT_TILE, width - x)
                yield y, x, upsample_region(logits, side, y, x, h, w)[0].cpu()


@register_method("seg", "full")
class SegFull(SegWholeImage):
    """The whole image at full resolution (padded square); refuses images over
    ``full_max_pixels``."""

    def input_side(self, image_id: str) -> int:
        return self.side(image_id)

    def describe(self, image_id: str) -> dict[str, str] | None:
        return dict(FULL_SETTING)

    def requests(self, image_id: str, b: int) -> list[ReadRequest]:
        grid = full_grid(self, image_id, "patchgd")
        first = np.zeros(1, dtype=np.int64)
        return [
            ReadRequest(image_id, "patches", grid, first, ReadTag("image", b)),
            ReadRequest(image_id, "mask", grid, first, ReadTag("target", b)),
        ]

    def predict_tiles(
        self, ctx: StepContext, image_id: str, reads: Reads
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        logits = self._logits(ctx, reads)[0].cpu()
        _, height, width = self.reader.shape(image_id)
        for y in range(0, height, PREDICT_TILE):
            for x in range(0, width, PREDICT_TILE):
                yield (
                    y,
                    x,
                    logits[:, y : y + PREDICT_TILE, x : x + PREDICT_TILE][
                        :, : height - y, : width - x
                    ],
                )


__all__ = ["SegDownsample", "SegFull", "SegWholeImage"]
