"""The base of every classification method: one image batch's step written once.

A method gives :meth:`ClassificationMethod.forward` (the batch's logits from its reads) and
gets the training step (cross-entropy, ``ctx.learn``) and inference; methods whose step is
not one forward (PatchGD's inner steps) override :meth:`train_batch` and :meth:`predict`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hiresctl.train.methods import BatchOutput, Method, Reads, StepContext
from storage.errors import UsageError


class ClassificationMethod(Method):
    """A classification method: logits (B, classes) per image batch."""

    def forward(
        self, ctx: StepContext, image_ids: list[str], reads: Reads, train: bool
    ) -> torch.Tensor:
        """(B, classes) logits of an image batch. Called in autocast with the model in train
        mode (``train``) or in eval mode without gradient; a method that needs another mode
        for part of it (IPS's selection) switches and switches back."""
        raise UsageError(f"classification method {self.name} computes no logits in one forward")

    def train_batch(
        self, ctx: StepContext, image_ids: list[str], targets: torch.Tensor, reads: Reads
    ) -> BatchOutput:
        self.model.train()
        with ctx.autocast():
            logits = self.forward(ctx, image_ids, reads, train=True)
            loss = F.cross_entropy(logits.float(), targets.to(ctx.device))
        ctx.learn(loss)
        return BatchOutput(float(loss.detach()), logits.detach().float().cpu())

    def predict(self, ctx: StepContext, image_ids: list[str], reads: Reads) -> torch.Tensor:
        self.model.eval()
        with torch.no_grad(), ctx.autocast():
            return self.forward(ctx, image_ids, reads, train=False).float().cpu()


__all__ = ["ClassificationMethod"]
