"""Segmentation (docs/methods.md §5): the trainers' methods, the loss, whole-image prediction tile by
tile, and the metrics of §8.

Every method predicts an image as a sequence of tiles ``(y, x, logits)`` in level-0 pixels of the
read level, so evaluation and ``hiresctl predict`` never hold a whole-image mask: PatchGD methods
compute each patch's tile exactly as training computes it over the stitched latent (θ2 is 1×1),
the baselines upsample or slice their whole-image logits tile by tile.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hiresctl.data import PatchGrid, PatchReader, ReadRequest, ReadTag
from hiresctl.models import PatchSegmenter, create_seg_network, upsample_region
from hiresctl.train.memory import PatchCost
from hiresctl.train.methods import (
    FULL_SETTING,
    BatchOutput,
    Method,
    Reads,
    StepContext,
    _chunks,
    full_grid,
    resized_setting,
)
from hiresctl.train.patchgd import PatchGD
from hiresctl.train.recipe import Recipe
from hiresctl.train.registry import register_alias, register_method
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


# ---------------------------------------------------------------------------------- metrics


def confusion(pred: np.ndarray, target: np.ndarray, classes: int) -> np.ndarray:
    """(classes, classes) counts, rows = truth, columns = prediction; ignored pixels skipped."""
    valid = target >= 0
    index = target[valid].astype(np.int64) * classes + pred[valid].astype(np.int64)
    return np.bincount(index, minlength=classes * classes).reshape(classes, classes)


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


def binary_image_metrics(matrix: np.ndarray) -> dict[str, float]:
    """docs/methods.md §8 from one image's 2×2 confusion (class 1 positive); undefined values NaN."""
    tn, fp, fn, tp = (float(v) for v in matrix.ravel())
    tpr, tnr = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    fpr, fnr = _ratio(fp, fp + tn), _ratio(fn, fn + tp)
    return {
        "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "iou": _ratio(tp, tp + fp + fn),
        "balanced_accuracy": (tpr + tnr) / 2,
        "plr": _ratio(tpr, fpr) if not math.isnan(tpr) else math.nan,
        "nlr": _ratio(fnr, tnr) if not math.isnan(fnr) else math.nan,
    }


def segmentation_metrics(matrices: list[np.ndarray], class_names: list[str]) -> dict[str, Any]:
    """Per-image metrics averaged over images, as the seed paper reports them.

    Binary: accuracy, F1, IoU, balanced accuracy, PLR, NLR per image from TP/FP/FN/TN, then the
    mean over images; a value undefined for an image (0/0, or x/0 for PLR/NLR) counts as 0 and
    ``undefined`` says for how many images. Multi-class: pixel accuracy, per-class IoU and F1
    pooled over all pixels, and mean IoU (over classes present in the truth or the prediction)
    averaged over images.
    """
    out: dict[str, Any] = {"count": len(matrices), "classes": class_names}
    if not matrices:
        return out
    pooled = np.sum(matrices, axis=0)
    out["pixel_accuracy"] = float(np.trace(pooled) / max(1, pooled.sum()))
    if len(class_names) == 2:
        rows = [binary_image_metrics(m) for m in matrices]
        for key in rows[0]:
            values = np.array([r[key] for r in rows])
            bad = ~np.isfinite(values)
            out[key] = float(np.where(bad, 0.0, values).mean())
            if bad.any():
                out.setdefault("undefined", {})[key] = int(bad.sum())
        out["nan_policy"] = "per-image values that are undefined (0/0, x/0) count as 0"
        out["pooled"] = binary_image_metrics(pooled)
        return out
    tp = np.diag(pooled).astype(float)
    fp, fn = pooled.sum(0) - tp, pooled.sum(1) - tp
    iou = [_ratio(t, t + a + b) for t, a, b in zip(tp, fp, fn, strict=True)]
    f1 = [_ratio(2 * t, 2 * t + a + b) for t, a, b in zip(tp, fp, fn, strict=True)]
    out["per_class"] = {
        name: {"iou": None if math.isnan(i) else i, "f1": None if math.isnan(f) else f}
        for name, i, f in zip(class_names, iou, f1, strict=True)
    }
    out["pooled_mean_iou"] = float(np.nanmean(iou)) if not all(map(math.isnan, iou)) else 0.0
    per_image = []
    for m in matrices:
        t = np.diag(m).astype(float)
        union = m.sum(0) + m.sum(1) - t
        present = union > 0
        per_image.append(float((t[present] / union[present]).mean()) if present.any() else 0.0)
    out["mean_iou"] = float(np.mean(per_image))
    out["macro_f1"] = float(np.nanmean(f1)) if not all(map(math.isnan, f1)) else 0.0
    return out


def monitor_key(classes: int) -> str:
    """The validation metric that picks the best checkpoint."""
    return "f1" if classes == 2 else "mean_iou"


# ---------------------------------------------------------------------------------- methods


def _outputs(num_classes: int) -> int:
    return 1 if num_classes == 2 else num_classes


class SegmentationMethod(Method):
    """Base of the segmentation methods: θ1 from the segmentation network registry, the square
    the global patch letterboxes (side = longest side of the image), pixel accuracy of a
    training batch; a method adds :meth:`plan_train`, :meth:`plan_image`, :meth:`train_batch`
    and :meth:`predict_tiles`."""

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


# The grid laid at a random offset each epoch: on DRIVE, with mirroring, test F1 0.755 where the
# fixed grid (no mirroring) gave 0.727 (BENCHMARKS.md, "Learning: DRIVE").
@register_method("seg", "patchgd", defaults={"grid_offset": "random"})
class SegPatchGD(SegmentationMethod, PatchGD):
    """PatchGD for segmentation (§5): θ1 on every patch fills a (B, 8, H, W) latent without
    gradient; each inner step re-encodes k patches per image with gradient, θ2 (1×1 conv)
    segments the whole latent and the loss covers the whole image. ``patchgd`` has no global
    branch; ``patchgd-global`` adds up(θ1(resize(image, p))) to the concatenation. (Its former
    name ``tiled`` is still accepted.)"""

    use_global = False
    moves_grid = True

    def memory(
        self, model: nn.Module, images: list[Any], cost: PatchCost
    ) -> tuple[int, int, int | None]:
        """The latent, its copy with gradient, the global latent, their concatenation, the
        logits and the loss's temporaries (per output), the int64 target; the global patch."""
        grid, kept = self.largest(images)
        pixels = grid.rows * grid.cols * self.recipe.patch_size**2
        outputs = int(getattr(model, "outputs", 1))
        per_image = pixels * (4 * self.recipe.channels * 4 + 3 * outputs * 4 + 8)
        per_image += self.beside_inner_steps(grid.num_patches, cost)
        return per_image, cost.grad, self.patches_per_step(len(kept))

    def build_model(self) -> nn.Module:
        return PatchSegmenter(self.network(), _outputs(self.num_classes), self.recipe.channels,
                              use_global=self.use_global)  # fmt: skip

    def plan_train(self, image_ids: list[str], seed: int) -> list[ReadRequest]:
        rng = np.random.default_rng(seed)
        requests: list[ReadRequest] = []
        for b, image_id in enumerate(image_ids):
            grid, _ = self.patches(image_id, train=True)
            everything = np.arange(grid.num_patches)  # the latent is filled everywhere
            for chunk in _chunks(everything, self.recipe.fill_batch):
                requests.append(ReadRequest(image_id, "patches", grid, chunk, ReadTag("fill", b)))
                requests.append(ReadRequest(image_id, "mask", grid, chunk, ReadTag("mask", b)))
            if self.use_global:
                requests.append(ReadRequest(image_id, "global", grid, tag=ReadTag("global", b)))
        return requests + self.inner_groups(image_ids, rng)

    def _canvas(self, image_ids: list[str]) -> tuple[int, int]:
        """(height, width) of a training batch's stitched canvas: its grids' frames."""
        grids = [self.patches(i, train=True)[0] for i in image_ids]
        p = self.recipe.patch_size
        return max(g.rows for g in grids) * p, max(g.cols for g in grids) * p

    def _place(
        self,
        canvas: torch.Tensor,
        b: int,
        grid: PatchGrid,
        indices: np.ndarray,
        tiles: torch.Tensor,
    ) -> None:
        p = grid.patch_size
        for index, tile in zip(indices.tolist(), tiles, strict=True):
            y, x = grid.frame_origin(index)
            canvas[b, ..., y : y + p, x : x + p] = tile.to(canvas.dtype)

    def _global_logits(
        self, g: torch.Tensor, image_ids: list[str], height: int, width: int
    ) -> torch.Tensor:
        """The global part of the logits over the training canvas (B, outputs, H, W): each
        image's low-resolution global logits upsampled into its grid's frame."""
        pieces = []
        for b, image_id in enumerate(image_ids):
            top, left = self.patches(image_id, train=True)[0].offset  # the image in the frame
            pieces.append(
                upsample_region(g[b : b + 1], self.side(image_id), -top, -left, height, width)
            )
        return torch.cat(pieces)

    def train_batch(
        self, ctx: StepContext, image_ids: list[str], targets: torch.Tensor, reads: Reads
    ) -> BatchOutput:
        model: PatchSegmenter = ctx.model  # type: ignore[assignment]
        height, width = self._canvas(image_ids)
        batch = len(image_ids)
        latent = torch.zeros(batch, model.latent_dim, height, width, device=ctx.device)
        target = torch.full((batch, height, width), IGNORE, dtype=torch.long, device=ctx.device)
        global_pixels: list[torch.Tensor | None] = [None] * batch
        losses: list[float] = []
        score = (0, 0)
        inner = 0

        def fill_or_label(request: ReadRequest, pixels: torch.Tensor) -> None:
            if request.tag.role == "mask":
                self._place(
                    target, request.tag.image, request.grid, request.indices, pixels.to(ctx.device)
                )
            else:
                self._fill(ctx, model, latent, request, pixels, train=True, write=self._place)

        fresh: list[tuple[int, PatchGrid, np.ndarray, torch.Tensor]] = []

        def keep(
            _: torch.Tensor, b: Any, grid: PatchGrid, indices: np.ndarray, tiles: torch.Tensor
        ) -> None:
            fresh.append((int(b), grid, indices, tiles))

        for group in self.inner_iterations(reads, fill_or_label, global_pixels):
            model.train()
            fresh.clear()
            with ctx.autocast():
                g = self.encode_group(ctx, model.encoder, latent, group, global_pixels, keep)
                # θ2 on the canvas as the latent holds it (no gradient into the encoder), then
                # on the group's tiles, with gradient, in their places: the logits of the whole
                # image with the group re-encoded, as θ2 over the stitched latent gives them.
                logits = model.local_logits(latent)
                for b, grid, indices, tiles in fresh:
                    self._place(logits, b, grid, indices, model.local_logits(tiles))
                if g is not None:
                    logits = logits + self._global_logits(
                        model.global_logits(g), image_ids, height, width
                    )
                logits = logits + model.bias()
                loss = segmentation_loss(logits, target)
            ctx.learn(loss)
            for b, grid, indices, tiles in fresh:  # the re-encoded tiles stay for later steps
                self._place(latent, b, grid, indices, tiles.detach())
            losses.append(float(loss.detach()))
            score = self._score(logits, target)
            inner += 1
        if ctx.micro_steps:
            ctx.step()
        return BatchOutput(
            float(np.mean(losses)) if losses else float("nan"), torch.zeros(batch, 0), inner, score
        )

    def plan_image(self, image_id: str) -> list[ReadRequest]:
        grid, _ = self.patches(image_id)
        requests = []
        if self.use_global:
            requests.append(ReadRequest(image_id, "global", grid, tag=ReadTag("global", 0)))
        for chunk in _chunks(np.arange(grid.num_patches), self.recipe.fill_batch):
            requests.append(ReadRequest(image_id, "patches", grid, chunk, ReadTag("tile", 0)))
        return requests

    def predict_tiles(
        self, ctx: StepContext, image_id: str, reads: Reads
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        model: PatchSegmenter = ctx.model  # type: ignore[assignment]
        model.eval()
        side = self.side(image_id)
        g = None
        for request, pixels in reads:
            with torch.no_grad(), ctx.autocast():
                if request.kind == "global":
                    g = model.encoder(pixels.unsqueeze(0).to(ctx.device)).float()
                    continue
                tiles = model.encoder(pixels.to(ctx.device, non_blocking=True)).float()
                p = request.grid.patch_size
                origins = [request.grid.origin(int(i)) for i in request.indices]
                global_tiles = None
                if self.use_global:
                    assert g is not None
                    global_tiles = torch.cat(
                        [upsample_region(g, side, y, x, p, p) for y, x in origins]
                    )
                logits = model.segment(tiles, global_tiles).float().cpu()
            for (y, x), tile in zip(origins, logits, strict=True):
                yield y, x, self._crop(image_id, y, x, tile)


# The global patch's gradient scaled by k/N: on DRIVE, unscaled, it pulled the shared U-Net
# towards the downsampled image (validation F1 0.54 after 6 epochs where `patchgd` had 0.64,
# test 0.699 against 0.755); scaled, 0.64 after 6 and 0.760 (BENCHMARKS.md, "Learning: DRIVE").
@register_method("seg", "patchgd-global", defaults={"grid_offset": "random", "global_grad": None})
class SegPatchGDGlobal(SegPatchGD):
    """``patchgd`` plus the global patch: up(θ1(resize(image, p))) joins the latent."""

    use_global = True


class SegWholeImage(SegmentationMethod):
    """Baselines that segment the whole image in one forward pass."""

    def build_model(self) -> nn.Module:
        return PatchSegmenter(self.network(), _outputs(self.num_classes), self.recipe.channels,
                              use_global=False)  # fmt: skip

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
        ctx.model.train()
        target = torch.stack(masks).to(ctx.device)
        with ctx.autocast():
            logits = ctx.model(torch.stack(images).to(ctx.device, non_blocking=True))
            loss = segmentation_loss(logits, target)
        ctx.learn(loss)
        return BatchOutput(float(loss.detach()), torch.zeros(len(image_ids), 0), 1,
                           self._score(logits, target))  # fmt: skip

    def _logits(self, ctx: StepContext, reads: Reads) -> torch.Tensor:
        [(_, pixels)] = list(reads)
        ctx.model.eval()
        with torch.no_grad(), ctx.autocast():
            return ctx.model(self._image(pixels).unsqueeze(0).to(ctx.device)).float()


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
        return [ReadRequest(image_id, "global", grid, tag=ReadTag("image", b)),
                ReadRequest(image_id, "mask_global", grid, tag=ReadTag("target", b))]  # fmt: skip

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
        return [ReadRequest(image_id, "patches", grid, first, ReadTag("image", b)),
                ReadRequest(image_id, "mask", grid, first, ReadTag("target", b))]  # fmt: skip

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


register_alias("seg", "tiled", "patchgd")

__all__ = [
    "IGNORE",
    "SegmentationMethod",
    "binary_image_metrics",
    "confusion",
    "monitor_key",
    "predicted_classes",
    "segmentation_loss",
    "segmentation_metrics",
]
