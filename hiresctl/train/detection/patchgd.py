"""Detection PatchGD (docs/methods.md §4): every patch's FPN maps stitched per level into the
image grid without gradient; each inner step re-encodes k patches per image with gradient, writes
their maps in place, fuses the global patch's maps (``patchgd-global``), and the FCOS head and
losses run on the whole stitched image. The schedule and the group batches are the PatchGD
engine's (``train/patchgd.py``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from hiresctl.data import PatchGrid, PatchReader, ReadRequest
from hiresctl.models.detection import PatchFCOS
from hiresctl.train.detection.base import EVAL_SCORE_THRESHOLD, CanvasCost, DetectionMethod
from hiresctl.train.detection.coco import Detections
from hiresctl.train.memory import PatchCost, release_freed_memory
from hiresctl.train.methods import BatchOutput, Reads, StepContext
from hiresctl.train.patchgd import PatchGDEngine
from hiresctl.train.recipe import Recipe
from hiresctl.train.registry import register_method
from storage.errors import UsageError


def _grad(leaf: torch.Tensor) -> torch.Tensor:
    """A leaf's gradient after a backward (zeros where nothing reached it)."""
    return leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)


@register_method("det", "patchgd", defaults={"grad_batch": 4})
class DetPatchGD(DetectionMethod):
    """PatchGD for FCOS: stitched FPN maps per level, k patches per image re-encoded with
    gradient per inner step, the head and losses on the whole stitched image."""

    def step_memory(
        self, canvas: CanvasCost, images: list[Any], cost: PatchCost
    ) -> tuple[int, int, int | None]:
        """The encoder's phase of an inner step: the stitched maps, the gradient of every
        patch's maps, and ``grad_batch`` of the k patches and the global patch encoded with
        gradient at once (all of them when it is unset), beside what the same patches'
        encoding without gradient (``fill_batch`` at a time) left to the allocator (measured:
        the heap's release between the phases does not return all of it)."""
        grid, kept = self.largest(images)
        size = self.recipe.patch_size
        wanted = self.engine.patches_per_step(len(kept))
        per_image = canvas.maps(grid.rows * size, grid.cols * size)
        per_image += min(self.recipe.fill_batch, wanted + self.use_global) * cost.nograd
        per_patch = canvas.maps(size, size)
        if self.recipe.grad_batch:
            per_image += min(self.recipe.grad_batch, wanted + self.use_global) * cost.grad
        else:
            per_image += cost.grad if self.use_global else 0
            per_patch += cost.grad
        return per_image, per_patch, wanted

    def step_apart(self, canvas: CanvasCost, images: list[Any], cost: PatchCost) -> int:
        """The phases without gradient through the encoder, each beside the stitched maps: the
        fill (``fill_batch`` patches encoded at once), then in every inner step the maps'
        gradient and the head a level and a branch at a time on the whole stitched canvas."""
        grid, kept = self.largest(images)
        height, width = grid.rows * self.recipe.patch_size, grid.cols * self.recipe.patch_size
        fill = min(self.recipe.fill_batch, len(kept)) * cost.nograd
        return canvas.maps(height, width) + max(fill, canvas.staged(height, width))

    def __init__(self, recipe: Recipe, num_classes: int, reader: PatchReader) -> None:
        if recipe.stride not in (None, recipe.patch_size):
            raise UsageError(
                f"detection stitches patches edge to edge: stride must equal patch_size "
                f"({recipe.patch_size}), got {recipe.stride}"
            )
        super().__init__(recipe, num_classes, reader)
        self.engine = PatchGDEngine(recipe, self.patches, self.use_global)

    def describe(self, image_id: str) -> dict[str, str] | None:
        return self.engine.describe(image_id)

    def plan(self, image_ids: list[str], seed: int, train: bool) -> list[ReadRequest]:
        return self.engine.plan(image_ids, seed, train)

    def _maps(
        self, model: PatchFCOS, image_ids: list[str], device: torch.device
    ) -> list[torch.Tensor]:
        grids = [self.patches(i)[0] for i in image_ids]
        rows, cols = max(g.rows for g in grids), max(g.cols for g in grids)
        p = self.recipe.patch_size
        return [
            torch.zeros(len(image_ids), model.channels, rows * p // s, cols * p // s, device=device)
            for s in model.strides
        ]

    @staticmethod
    def _cells(grid: PatchGrid, indices: np.ndarray, side: int) -> list[tuple[slice, slice]]:
        """Where each patch's map of ``side`` cells lies in the image grid: cell (i, j) of patch
        (r, c) is at (r·side + i, c·side + j)."""
        rows, cols = grid.position(indices)
        return [
            (slice(r * side, (r + 1) * side), slice(c * side, (c + 1) * side))
            for r, c in zip(rows.tolist(), cols.tolist(), strict=True)
        ]

    @classmethod
    def _stitch(
        cls,
        maps: list[torch.Tensor],
        b: int,
        grid: PatchGrid,
        indices: np.ndarray,
        features: list[torch.Tensor],
    ) -> None:
        """Write each patch's map of every level at its place in the image grid."""
        for level, patch_maps in zip(maps, features, strict=True):
            for k, (rows, cols) in enumerate(cls._cells(grid, indices, patch_maps.shape[-1])):
                level[b, :, rows, cols] = patch_maps[k].to(level.dtype)

    @classmethod
    def _gather(
        cls, level: torch.Tensor, b: int, grid: PatchGrid, indices: np.ndarray, side: int
    ) -> torch.Tensor:
        """The inverse of :meth:`_stitch` on one level: the (n, C, side, side) maps of the
        patches at ``indices``."""
        return torch.stack(
            [level[b, :, rows, cols] for rows, cols in cls._cells(grid, indices, side)]
        )

    def _fill_maps(
        self,
        ctx: StepContext,
        model: PatchFCOS,
        maps: list[torch.Tensor],
        request: ReadRequest,
        pixels: torch.Tensor,
    ) -> None:
        if not len(request.indices):
            return
        with torch.no_grad(), ctx.autocast():
            features = model.encode(pixels.to(ctx.device, non_blocking=True))
        self._stitch(maps, request.tag.image, request.grid, request.indices, features)

    def _global(
        self, ctx: StepContext, model: PatchFCOS, pixels: list[torch.Tensor | None]
    ) -> list[torch.Tensor] | None:
        if not self.use_global:
            return None
        with torch.no_grad(), ctx.autocast():
            return model.encode(torch.stack([p for p in pixels if p is not None]).to(ctx.device))

    def train_batch(
        self, ctx: StepContext, image_ids: list[str], targets: torch.Tensor, reads: Reads
    ) -> BatchOutput:
        """Each inner step in two phases that hold memory one after the other: the group's
        patches (and global patches) encoded without gradient at the current weights and
        stitched in, the head's losses and backward on the stitched maps a level and a branch
        at a time (:meth:`PatchFCOS.staged_losses`); then the same patches encoded again with
        gradient and their maps' gradients carried back through the encoder. The gradients
        are those of one backward through encoder, stitched maps and head together."""
        model = self.model
        model.train()
        maps = self._maps(model, image_ids, ctx.device)
        truth = [self._target_dict(i, ctx.device) for i in image_ids]
        sides = [self.side(i) for i in image_ids]
        global_pixels: list[torch.Tensor | None] = [None] * len(image_ids)
        losses: list[float] = []
        inner = 0

        def fill(request: ReadRequest, pixels: torch.Tensor) -> None:
            self._fill_maps(ctx, model, maps, request, pixels)

        for group in self.engine.inner_iterations(reads, fill, global_pixels):
            members, pixels = self.engine.group_pixels(ctx, group, global_pixels)
            losses.append(self._inner_step(ctx, model, maps, members, pixels, sides, truth))
            inner += 1
        return self._finish(ctx, losses, len(image_ids), inner)

    def _inner_step(
        self,
        ctx: StepContext,
        model: PatchFCOS,
        maps: list[torch.Tensor],
        members: list[ReadRequest],
        pixels: torch.Tensor,
        sides: list[int],
        truth: list[dict[str, torch.Tensor]],
    ) -> float:
        """:meth:`train_batch`'s two phases for one group of patches; returns the loss. Both
        encode ``pixels`` in slices (``fill_batch`` without gradient, ``grad_batch`` with it,
        each slice's backward before the next slice runs): the encoder normalises each patch
        on its own (GroupNorm), so slices change nothing but the memory they hold."""
        with torch.no_grad(), ctx.autocast():
            slices = [model.encode(p) for p in pixels.split(self.recipe.fill_batch)]
            g = self._place(
                maps, members, [torch.cat(level) for level in zip(*slices, strict=True)]
            )
            del slices

        def run(backward: Callable[[torch.Tensor], None]) -> float:
            leaves = [m.detach().requires_grad_() for m in maps]
            global_leaves = [x.detach().requires_grad_() for x in g] if g else None
            kept: list[torch.Tensor] = []

            def level_done(level: int) -> None:  # keep the patches' cells, free the rest
                kept.append(self._gathered(model, level, _grad(leaves[level]), members))
                leaves[level].grad = None

            parts = model.staged_losses(
                leaves, global_leaves, sides, truth, backward, ctx.autocast, level_done
            )
            grads = kept
            if global_leaves is not None:
                grads = [
                    torch.cat([a, _grad(b)]) for a, b in zip(grads, global_leaves, strict=True)
                ]
            release_freed_memory(ctx.device)  # the head's pages: the encoder's peak is apart
            size = self.recipe.grad_batch or len(pixels)
            for start in range(0, len(pixels), size):
                with ctx.autocast():
                    features = model.encode(pixels[start : start + size])
                torch.autograd.backward(
                    features,
                    [
                        d[start : start + size].to(f.dtype)
                        for d, f in zip(grads, features, strict=True)
                    ],
                )
                del features
            return sum(parts.values())

        loss = ctx.learn_staged(run)
        ctx.patches_with_grad += sum(len(r.indices) for r in members)
        return loss

    def _target_dict(self, image_id: str, device: torch.device) -> dict[str, torch.Tensor]:
        boxes, labels = self.targets(image_id, train=True)
        return {"boxes": boxes.to(device), "labels": labels.to(device)}

    def _place(
        self, maps: list[torch.Tensor], members: list[ReadRequest], features: list[torch.Tensor]
    ) -> list[torch.Tensor] | None:
        """Stitch the group's patch maps in; the global patches' maps (the batch's tail)."""
        start = 0
        for r in members:
            count = len(r.indices)
            self._stitch(
                maps, r.tag.image, r.grid, r.indices, [f[start : start + count] for f in features]
            )
            start += count
        return [f[start:] for f in features] if self.use_global else None

    def _gathered(
        self, model: PatchFCOS, level: int, maps: torch.Tensor, members: list[ReadRequest]
    ) -> torch.Tensor:
        """The group's patch maps cut from FPN level ``level``'s ``maps``, in :meth:`_place`'s
        order."""
        side = self.recipe.patch_size // model.strides[level]
        return torch.cat(
            [self._gather(maps, r.tag.image, r.grid, r.indices, side) for r in members]
        )

    def detect(self, ctx: StepContext, image_ids: list[str], reads: Reads) -> list[Detections]:
        model = self.model
        model.eval()
        maps = self._maps(model, image_ids, ctx.device)
        global_pixels: list[torch.Tensor | None] = [None] * len(image_ids)
        for request, pixels in reads:
            if request.tag.role == "fill":
                self._fill_maps(ctx, model, maps, request, pixels)
            else:
                global_pixels[request.tag.image] = pixels
        g = self._global(ctx, model, global_pixels)
        with torch.no_grad(), ctx.autocast():
            fused = model.fuse(maps, g, [self.side(i) for i in image_ids])
            found = model.detect(fused, [self.size(i) for i in image_ids], EVAL_SCORE_THRESHOLD)
        return [
            {k: v.float().cpu() if k != "labels" else v.cpu() for k, v in d.items()} for d in found
        ]


@register_method("det", "patchgd-global", defaults={"accumulation_steps": 10, "grad_batch": 4})
class DetPatchGDGlobal(DetPatchGD):
    """PatchGD for FCOS with the global patch's FPN maps fused into the stitched maps."""

    use_global = True


__all__ = ["DetPatchGD", "DetPatchGDGlobal"]
