"""The whole-image classification baselines (docs/methods.md §6): ``downsample`` (the image
resized to one patch, read from the pyramid) and ``full`` (the whole level at once)."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hiresctl.data import PatchGrid, ReadRequest, ReadTag
from hiresctl.models import ImageClassifier
from hiresctl.train.classification.base import ClassificationMethod
from hiresctl.train.memory import PatchCost
from hiresctl.train.methods import (
    FULL_SETTING,
    Heatmap,
    Reads,
    StepContext,
    full_grid,
    resized_setting,
)
from hiresctl.train.registry import register_method
from storage.errors import UsageError

# oneDNN's channels-last convolution backward falls off a cliff on very large inputs: a ResNet-18
# stem (3 -> 64, 7x7, stride 2) computed its weight gradient in 0.42 s at 2896² and in over a
# minute at 4096² (2 CPU threads), where the default layout's whole ResNet-18 step took 32 s. A
# network fed whole images larger than this on a CPU runs in the default layout (BENCHMARKS.md,
# E1); patches and thumbnails stay channels-last, where it is 20-45% faster.
CHANNELS_LAST_MAX_PIXELS = 2896 * 2896


class WholeImage(ClassificationMethod):
    """Baselines that see the whole image at once: ``downsample`` (§6) and ``full``."""

    def _layout(self, ctx: StepContext, images: list[torch.Tensor]) -> None:
        """The default memory layout for the model from the first image over
        :data:`CHANNELS_LAST_MAX_PIXELS` on a CPU (once: later steps keep it)."""
        large = max(p.shape[-2] * p.shape[-1] for p in images) > CHANNELS_LAST_MAX_PIXELS
        if large and ctx.device.type == "cpu" and not getattr(self, "_default_layout", False):
            self.model.to(memory_format=torch.contiguous_format)
            self._default_layout = True

    def build_model(self) -> nn.Module:
        return ImageClassifier(self.backbone(), self.num_classes)

    @abstractmethod
    def request(self, image_id: str, b: int) -> ReadRequest:
        """The one read of ``image_id``, the ``b``-th image of its batch."""

    def plan(self, image_ids: list[str], seed: int, train: bool) -> list[ReadRequest]:
        return [self.request(image_id, b) for b, image_id in enumerate(image_ids)]

    def forward(
        self, ctx: StepContext, image_ids: list[str], reads: Reads, train: bool
    ) -> torch.Tensor:
        return self._forward(ctx, reads)

    def _forward(self, ctx: StepContext, reads: Reads) -> torch.Tensor:
        images = [p for _, p in reads]
        self._layout(ctx, images)
        if len({tuple(p.shape) for p in images}) == 1:
            return self.model(torch.stack(images).to(ctx.device, non_blocking=True))
        return torch.cat([self.model(p.unsqueeze(0).to(ctx.device)) for p in images])

    @abstractmethod
    def input_side(self, image_id: str) -> tuple[int, int]:
        """(side of the square the model sees, side of the level square it covers)."""

    def memory(
        self, model: nn.Module, images: list[Any], cost: PatchCost
    ) -> tuple[int, int, int | None]:
        side = max(self.input_side(im.image_id)[0] for im in images)
        return 0, cost.scaled(side, self.recipe.patch_size).grad, None

    def explain(
        self, ctx: StepContext, image_ids: list[str], reads: Reads
    ) -> tuple[torch.Tensor, list[Heatmap]]:
        """Gradient × input saliency of the predicted class on the input, pooled to ≤ 32²."""
        self.model.eval()
        logits, maps = [], []
        for request, pixels in reads:
            image = pixels[0] if pixels.dim() == 4 else pixels
            x = image.unsqueeze(0).to(ctx.device).float().requires_grad_(True)
            with torch.enable_grad():
                out = self.model(x)
                (grad,) = torch.autograd.grad(out[0, out[0].argmax()], x)
            saliency = (grad * x.detach()).abs().sum(1, keepdim=True)
            seen, covered = self.input_side(request.image_id)
            pool = max(1, seen // 32)
            scores = F.avg_pool2d(saliency, pool, ceil_mode=True)[0, 0].cpu().numpy()
            maps.append(
                Heatmap(
                    request.image_id,
                    scores.astype(np.float32),
                    covered * pool / seen,
                    "input saliency (gradient × input)",
                )
            )
            logits.append(out.detach().float().cpu())
        return torch.cat(logits), maps


@register_method("cls", "downsample")
class Downsample(WholeImage):
    """The whole image resized to ``input_size`` (default ``patch_size``), read from the pyramid."""

    def describe(self, image_id: str) -> dict[str, str] | None:
        _, height, width = self.reader.shape(image_id)
        return resized_setting(height, width, self.recipe.input_size or self.recipe.patch_size)

    def request(self, image_id: str, b: int) -> ReadRequest:
        _, height, width = self.reader.shape(image_id)
        size = self.recipe.input_size or self.recipe.patch_size
        return ReadRequest(
            image_id, "global", PatchGrid.of(height, width, size), tag=ReadTag("image", b)
        )

    def input_side(self, image_id: str) -> tuple[int, int]:
        _, height, width = self.reader.shape(image_id)
        return self.recipe.input_size or self.recipe.patch_size, max(height, width)


@register_method("cls", "full")
class Full(WholeImage):
    """The whole level at full resolution (padded square); refuses images over ``full_max_pixels``."""

    def describe(self, image_id: str) -> dict[str, str] | None:
        return dict(FULL_SETTING)

    def build_model(self) -> nn.Module:
        model = super().build_model()
        transform = getattr(model.backbone, "transform", None)
        if transform is not None and transform.size is not None:
            raise UsageError(
                f"full: {self.recipe.backbone} takes {transform.size}² inputs only and would "
                "shrink the whole image to that; use an encoder of any input size (a CNN, or "
                "a ViT with dynamic_img_size) or a patch method"
            )
        return model

    def request(self, image_id: str, b: int) -> ReadRequest:
        grid = full_grid(self, image_id, "ips")
        return ReadRequest(image_id, "patches", grid, np.zeros(1, np.int64), ReadTag("image", b))

    def _forward(self, ctx: StepContext, reads: Reads) -> torch.Tensor:
        return super()._forward(ctx, ((r, p[0]) for r, p in reads))

    def input_side(self, image_id: str) -> tuple[int, int]:
        _, height, width = self.reader.shape(image_id)
        return max(height, width), max(height, width)
