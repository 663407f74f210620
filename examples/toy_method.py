"""A new method in one class and one registration (docs/methods.md, "Adding a method"):
``HIRESCTL_PLUGINS=examples/toy_method.py hiresctl train --method patch-vote ...``, or from a
package of your own through the entry point group ``hiresctl.methods``."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from hiresctl.data import ReadRequest, ReadTag
from hiresctl.models import ImageClassifier
from hiresctl.train import ClassificationMethod, PatchCost, register_method
from hiresctl.train.methods import Reads, StepContext


@register_method("cls", "patch-vote", defaults={"bag_size": 8})
class PatchVote(ClassificationMethod):
    """Each of ``bag_size`` random kept patches classifies the image; logits are their mean.

    The classification base owns the training step (cross-entropy, the optimizer's hooks) and
    inference; a method gives the model, its reads and :meth:`forward`."""

    model: ImageClassifier

    def build_model(self) -> nn.Module:
        return ImageClassifier(self.backbone(), self.num_classes)

    def plan(self, image_ids: list[str], seed: int, train: bool) -> list[ReadRequest]:
        rng = np.random.default_rng(seed)
        reads = []
        for b, image_id in enumerate(image_ids):
            grid, kept = self.patches(image_id, train)
            chosen = np.sort(rng.permutation(kept)[: self.recipe.bag_size]) if train else kept
            reads.append(ReadRequest(image_id, "patches", grid, chosen, ReadTag("vote", b)))
        return reads

    def forward(
        self, ctx: StepContext, image_ids: list[str], reads: Reads, train: bool
    ) -> torch.Tensor:
        return torch.stack([self.model(pixels.to(ctx.device)).mean(0) for _, pixels in reads])

    def memory(
        self, model: nn.Module, images: list[object], cost: PatchCost
    ) -> tuple[int, int, None]:
        return 0, cost.grad * self.recipe.bag_size, None  # K patches per image with gradient

    def describe(self, image_id: str) -> dict[str, str]:
        kept = len(self.patches(image_id)[1])
        return {
            "sampling": f"K={self.recipe.bag_size} of N={kept} patches vote; all N in eval",
            "sees": "full resolution, one patch at a time",
        }
