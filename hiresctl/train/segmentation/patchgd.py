"""Segmentation PatchGD (docs/methods.md §5): θ1 on every patch fills a latent canvas without
gradient; each inner step re-encodes k patches per image with gradient (the PatchGD engine,
``train/patchgd.py``), θ2 (1×1 conv) segments the whole latent and the loss covers the whole
image; ``patchgd-global`` adds the upsampled global patch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from hiresctl.data import PatchGrid, PatchReader, ReadRequest, ReadTag
from hiresctl.models import PatchSegmenter, upsample_region
from hiresctl.train.memory import PatchCost
from hiresctl.train.methods import BatchOutput, Reads, StepContext, chunks
from hiresctl.train.patchgd import PatchGDEngine
from hiresctl.train.recipe import Recipe
from hiresctl.train.registry import register_alias, register_method
from hiresctl.train.segmentation.base import IGNORE, SegmentationMethod, outputs, segmentation_loss


# The grid laid at a random offset each epoch: on DRIVE, with mirroring, test F1 0.755 where the
# fixed grid (no mirroring) gave 0.727 (BENCHMARKS.md, "Learning: DRIVE").
@register_method("seg", "patchgd", defaults={"grid_offset": "random"})
class SegPatchGD(SegmentationMethod):
    """PatchGD for segmentation (§5): θ1 on every patch fills a (B, 8, H, W) latent without
    gradient; each inner step re-encodes k patches per image with gradient, θ2 (1×1 conv)
    segments the whole latent and the loss covers the whole image. ``patchgd`` has no global
    branch; ``patchgd-global`` adds up(θ1(resize(image, p))) to the concatenation. (Its former
    name ``tiled`` is still accepted.)"""

    use_global = False
    moves_grid = True

    def __init__(self, recipe: Recipe, num_classes: int, reader: PatchReader) -> None:
        super().__init__(recipe, num_classes, reader)
        self.engine = PatchGDEngine(recipe, self.patches, self.use_global)

    def describe(self, image_id: str) -> dict[str, str] | None:
        return self.engine.describe(image_id)

    def memory(
        self, model: nn.Module, images: list[Any], cost: PatchCost
    ) -> tuple[int, int, int | None]:
        """The latent, its copy with gradient, the global latent, their concatenation, the
        logits and the loss's temporaries (per output), the int64 target; the global patch."""
        grid, kept = self.largest(images)
        pixels = grid.rows * grid.cols * self.recipe.patch_size**2
        outputs = int(getattr(model, "outputs", 1))
        per_image = pixels * (4 * self.recipe.channels * 4 + 3 * outputs * 4 + 8)
        per_image += self.engine.beside_inner_steps(grid.num_patches, cost)
        return per_image, cost.grad, self.engine.patches_per_step(len(kept))

    def build_model(self) -> nn.Module:
        return PatchSegmenter(
            self.network(),
            outputs(self.num_classes),
            self.recipe.channels,
            use_global=self.use_global,
        )

    def plan_train(self, image_ids: list[str], seed: int) -> list[ReadRequest]:
        rng = np.random.default_rng(seed)
        requests: list[ReadRequest] = []
        for b, image_id in enumerate(image_ids):
            grid, _ = self.patches(image_id, train=True)
            everything = np.arange(grid.num_patches)  # the latent is filled everywhere
            for chunk in chunks(everything, self.recipe.fill_batch):
                requests.append(ReadRequest(image_id, "patches", grid, chunk, ReadTag("fill", b)))
                requests.append(ReadRequest(image_id, "mask", grid, chunk, ReadTag("mask", b)))
            if self.use_global:
                requests.append(ReadRequest(image_id, "global", grid, tag=ReadTag("global", b)))
        return requests + self.engine.inner_groups(image_ids, rng)

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
        model, engine = self.model, self.engine
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
                engine.fill(ctx, model.encoder, latent, request, pixels, True, self._place)

        fresh: list[tuple[int, PatchGrid, np.ndarray, torch.Tensor]] = []

        def keep(
            _: torch.Tensor, b: Any, grid: PatchGrid, indices: np.ndarray, tiles: torch.Tensor
        ) -> None:
            fresh.append((int(b), grid, indices, tiles))

        for group in engine.inner_iterations(reads, fill_or_label, global_pixels):
            model.train()
            fresh.clear()
            with ctx.autocast():
                g = engine.encode_group(ctx, model.encoder, latent, group, global_pixels, keep)
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
        for chunk in chunks(np.arange(grid.num_patches), self.recipe.fill_batch):
            requests.append(ReadRequest(image_id, "patches", grid, chunk, ReadTag("tile", 0)))
        return requests

    def predict_tiles(
        self, ctx: StepContext, image_id: str, reads: Reads
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        model = self.model
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


register_alias("seg", "tiled", "patchgd")

__all__ = ["SegPatchGD", "SegPatchGDGlobal"]
