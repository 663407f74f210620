"""The base every segmentation method subclasses (docs/methods.md §5), and the loss.

Every method predicts an image as a sequence of tiles ``(y, x, logits)`` in level-0 pixels of the
read level, so evaluation and ``hiresctl predict`` never hold a whole-image mask: PatchGD methods
compute each patch's tile exactly as training computes it over the stitched latent (θ2 is 1×1),
the baselines upsample or slice their whole-image logits tile by tile.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from hiresctl.data import PatchReader, ReadRequest
from hiresctl.models import PatchSegmenter, create_seg_network
from hiresctl.train.methods import Method, Reads, StepContext
from hiresctl.train.recipe import Recipe
from storage.errors import UsageError

IGNORE = -1  # target value of padding and unlabelled pixels
PREDICT_TILE = 512  # output tile side of the whole-image baselines


# ------------------------------------------------------------------------------------ loss


def segmentation_loss(
    logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0
) -> torch.Tensor:
    """BCE + (1 − Dice) for one output channel (binary), CE + (1 − mean Dice) otherwise;
    pixels whose target is ``IGNORE`` count in neither. Dice uses smoothing ``smooth``."""
    logits = logits.float()
    valid = target != IGNORE
    if not valid.any():
        return logits.sum() * 0.0
    if logits.shape[1] == 1:
        scores = logits[:, 0][valid]
        truth = target[valid].float()
        bce = F.binary_cross_entropy_with_logits(scores, truth)
        prob = scores.sigmoid()
        dice = (2 * (prob * truth).sum() + smooth) / (prob.sum() + truth.sum() + smooth)
        return bce + (1 - dice)
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE)
    prob = logits.softmax(1).permute(0, 2, 3, 1)[valid]  # (n, C)
    onehot = F.one_hot(target[valid], logits.shape[1]).float()
    dice = (2 * (prob * onehot).sum(0) + smooth) / (prob.sum(0) + onehot.sum(0) + smooth)
    return ce + (1 - dice.mean())


def predicted_classes(logits: torch.Tensor) -> torch.Tensor:
    """Class index per pixel of (…, outputs, h, w) logits (binary: logit > 0)."""
    if logits.shape[-3] == 1:
        return (logits[..., 0, :, :] > 0).long()
    return logits.argmax(-3)


def outputs(num_classes: int) -> int:
    return 1 if num_classes == 2 else num_classes


class SegmentationMethod(Method):
    """Base of the segmentation methods: θ1 from the segmentation network registry, the square
    the global patch letterboxes (side = longest side of the image), pixel accuracy of a
    training batch; a method adds :meth:`plan_train`, :meth:`plan_image`, :meth:`train_batch`
    and :meth:`predict_tiles`."""

    model: PatchSegmenter

    def __init__(self, recipe: Recipe, num_classes: int, reader: PatchReader) -> None:
        super().__init__(recipe, num_classes, reader)
        if recipe.stride not in (None, recipe.patch_size):
            raise UsageError(
                f"segmentation stitches patches edge to edge: stride must equal patch_size "
                f"({recipe.patch_size}), got {recipe.stride}"
            )

    def network(self) -> nn.Module:
        return create_seg_network(
            self.recipe.backbone, self.recipe.channels, self.recipe.pretrained
        )

    def side(self, image_id: str) -> int:
        _, height, width = self.reader.shape(image_id)
        return max(height, width)

    @abstractmethod
    def predict_tiles(
        self, ctx: StepContext, image_id: str, reads: Reads
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(y, x, logits (outputs, h, w)) tiles covering the image, cropped to its bounds."""

    @abstractmethod
    def plan_image(self, image_id: str) -> list[ReadRequest]:
        """The reads :meth:`predict_tiles` consumes for one image."""

    def plan(self, image_ids: list[str], seed: int, train: bool) -> list[ReadRequest]:
        if not train:
            return [r for image_id in image_ids for r in self.plan_image(image_id)]
        return self.plan_train(image_ids, seed)

    @abstractmethod
    def plan_train(self, image_ids: list[str], seed: int) -> list[ReadRequest]:
        """The reads of one training batch, in the order :meth:`train_batch` consumes them."""

    def calibrate(self, ctx: StepContext, batches: list[list[str]]) -> None:
        """θ2 is a 1×1 conv without BatchNorm: nothing to re-estimate."""

    @staticmethod
    def _score(logits: torch.Tensor, target: torch.Tensor) -> tuple[int, int]:
        """(right, judged) pixels of a training batch."""
        valid = target != IGNORE
        correct = (predicted_classes(logits.detach()) == target) & valid
        return int(correct.sum()), int(valid.sum())

    def _crop(self, image_id: str, y: int, x: int, logits: torch.Tensor) -> torch.Tensor:
        _, height, width = self.reader.shape(image_id)
        return logits[..., : max(0, height - y), : max(0, width - x)]


__all__ = [
    "IGNORE",
    "PREDICT_TILE",
    "SegmentationMethod",
    "outputs",
    "predicted_classes",
    "segmentation_loss",
]
