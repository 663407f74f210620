"""A new method in one class and one registration (docs/methods.md, "Adding a method"):
``HIRESCTL_PLUGINS=examples/toy_method.py hiresctl train --method patch-vote ...``, or from a
package of your own through the entry point group ``hiresctl.methods``."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hiresctl.data import ReadRequest, ReadTag
from hiresctl.models import ImageClassifier
from hiresctl.train import Method, PatchCost, register_method
from hiresctl.train.methods import BatchOutput, Reads, StepContext


@register_method("cls", "patch-vote", defaults={"bag_size": 8})
class PatchVote(Method):
    """Each of ``bag_size`` random kept patches classifies the image; logits are their mean."""

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

    def vote(self, ctx: StepContext, reads: Reads) -> torch.Tensor:
        return torch.stack([ctx.model(pixels.to(ctx.device)).mean(0) for _, pixels in reads])

    def train_batch(
        self, ctx: StepContext, image_ids: list[str], targets: torch.Tensor, reads: Reads
    ) -> BatchOutput:
        ctx.model.train()
        with ctx.autocast():
            logits = self.vote(ctx, reads)
            loss = F.cross_entropy(logits.float(), targets.to(ctx.device))
        ctx.learn(loss)
        return BatchOutput(float(loss.detach()), logits.detach().float().cpu())

    def predict(self, ctx: StepContext, image_ids: list[str], reads: Reads) -> torch.Tensor:
        ctx.model.eval()
        with torch.no_grad(), ctx.autocast():
            return self.vote(ctx, reads).float().cpu()

    def memory(
        self, model: nn.Module, images: list[object], cost: PatchCost
    ) -> tuple[int, int, None]:
        return 0, cost.grad * self.recipe.bag_size, None  # K patches per image with gradient

    def describe(self, image_id: str) -> dict[str, str]:
        kept = len(self.patches(image_id)[1])
        return {"sampling": f"K={self.recipe.bag_size} of N={kept} patches vote; all N in eval",
                "sees": "full resolution, one patch at a time"}  # fmt: skip
