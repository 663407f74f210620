"""Classification PatchGD (docs/methods.md §1) and PatchGD with a global patch (§2): a latent
grid of one cell per patch, filled and re-encoded by the PatchGD engine (``train/patchgd.py``),
classified by θ2."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hiresctl.data import PatchGrid, PatchReader, PatchStream, ReadRequest
from hiresctl.models import PatchGDClassifier
from hiresctl.train.classification.base import ClassificationMethod
from hiresctl.train.memory import PatchCost
from hiresctl.train.methods import (
    BatchOutput,
    Heatmap,
    Reads,
    StepContext,
    recalibrate_batchnorm,
)
from hiresctl.train.patchgd import PatchGDEngine
from hiresctl.train.recipe import Recipe
from hiresctl.train.registry import register_method

OCCLUSION_BATCH = 64  # latent variants per θ2 pass when PatchGD explains a prediction

# Unprojected cells, no context block: on Megapixel MNIST a projection or a conv block before the
# grid's maximum learned several times slower than the whole-image CNN; without them the model is
# that CNN computed patch by patch (BENCHMARKS.md, learning). One optimizer step per image batch:
# with a step per inner iteration (J per batch on the same images) the training loss of Megapixel
# MNIST rose above chance (2.56 after an epoch) where averaging the J gradients matched the
# whole-image network (2.46; it: 2.45). The grid stays fixed (`grid_offset: none`): on Megapixel
# MNIST 256² a grid laid at a random offset each epoch was 30% slower (patches straddle the
# store's chunks) and reached 0.24 and 0.27 test accuracy against 0.35 fixed (BENCHMARKS.md,
# learning); segmentation, where thin objects cut by a fixed grid are never seen whole, moves it.
# The fill normalises with batch statistics (`fill_mode: train`, as the reference code does): the
# inner steps' patches are normalised by theirs, and with the fill on running statistics the two
# halves of one latent differ in scale, so the grid's maximum often picks a cell without gradient.
# On real-MNIST Megapixel MNIST 512² (patch 64, seed 0) validation after 2 epochs was 0.43 and
# 0.48 against 0.32 and 0.40 (mean of 3 seeds) filled on running statistics (BENCHMARKS.md).
PATCHGD_DEFAULTS: dict[str, Any] = {
    "latent_dim": None,
    "inner_update": "batch",
    "fill_mode": "train",
}


@register_method("cls", "patchgd", defaults=PATCHGD_DEFAULTS)
class PatchGD(ClassificationMethod):
    """PatchGD (§1); with ``use_global`` the seed paper's PatchGD + global patch (§2).

    The head's BatchNorm sees a few images per step on grids that shrink to 1×1, so its running
    statistics trail what the head computes and evaluation drifts from training. At the end of
    each epoch the head's statistics are recomputed ("precise BatchNorm") over the latents of
    ``calibration_batches`` training batches, filled exactly as evaluation fills them.
    """

    use_global = False
    moves_grid = True
    model: PatchGDClassifier

    def __init__(self, recipe: Recipe, num_classes: int, reader: PatchReader) -> None:
        super().__init__(recipe, num_classes, reader)
        self.engine = PatchGDEngine(recipe, self.patches, self.use_global)

    def calibrate(self, ctx: StepContext, batches: list[list[str]]) -> None:
        model = self.model
        read = PatchStream(self.reader).read  # as evaluation reads: not augmented
        fused = []
        for index, image_ids in enumerate(batches):
            plan = self.plan(image_ids, index, train=False)
            latent, g = self._eval_latent(ctx, image_ids, ((r, read(r)) for r in plan))
            fused.append(model.fuse(latent, g))
        recalibrate_batchnorm(model.head, fused)
        model.train()

    def build_model(self) -> nn.Module:
        r = self.recipe
        return PatchGDClassifier(
            self.backbone(),
            self.num_classes,
            latent_dim=r.latent_dim,
            head_width=r.head_width,
            dropout=r.dropout,
            use_global=self.use_global,
            fusion=r.fusion,
            head_pool=r.head_pool,
            head_context=r.head_context,
        )

    def memory(
        self, model: nn.Module, images: list[Any], cost: PatchCost
    ) -> tuple[int, int, int | None]:
        """The latent and its gradient copy, the head's stride-1 blocks (conv, ReLU, BN,
        dropout) or the pool's input, one fill batch of pixels; the global patch with gradient."""
        r = self.recipe
        grid, kept = self.largest(images)
        cells = grid.rows * grid.cols
        latent = self.model.latent_dim * cells * 4
        head = 4 * max(1, r.head_context) * r.head_width * cells * 4
        per_image = 2 * latent + 2 * head + self.engine.beside_inner_steps(len(kept), cost)
        return per_image, cost.grad, self.engine.patches_per_step(len(kept))

    def describe(self, image_id: str) -> dict[str, str] | None:
        return self.engine.describe(image_id)

    def plan(self, image_ids: list[str], seed: int, train: bool) -> list[ReadRequest]:
        return self.engine.plan(image_ids, seed, train)

    def _latent(
        self, image_ids: list[str], device: torch.device, dim: int, train: bool = False
    ) -> torch.Tensor:
        rows = max(self.patches(i, train)[0].rows for i in image_ids)
        cols = max(self.patches(i, train)[0].cols for i in image_ids)
        return torch.zeros(len(image_ids), dim, rows, cols, device=device)

    @staticmethod
    def _write(
        latent: torch.Tensor,
        b: int | torch.Tensor,
        grid: PatchGrid,
        indices: np.ndarray,
        features: torch.Tensor,
    ) -> None:
        rows, cols = grid.position(indices)
        rows_t = torch.as_tensor(rows, device=latent.device)
        cols_t = torch.as_tensor(cols, device=latent.device)
        batch = (
            torch.as_tensor(b, device=latent.device).expand(len(indices))
            if not isinstance(b, torch.Tensor)
            else b
        )
        latent[batch, :, rows_t, cols_t] = features.to(latent.dtype)

    def train_batch(
        self, ctx: StepContext, image_ids: list[str], targets: torch.Tensor, reads: Reads
    ) -> BatchOutput:
        model, engine = self.model, self.engine
        targets = targets.to(ctx.device)
        latent = self._latent(image_ids, ctx.device, model.latent_dim, train=True)
        global_pixels: list[torch.Tensor | None] = [None] * len(image_ids)
        losses: list[float] = []
        logits = torch.zeros(len(image_ids), self.num_classes)
        inner = 0

        def fill(request: ReadRequest, pixels: torch.Tensor) -> None:
            engine.fill(ctx, model.encoder, latent, request, pixels, True, self._write)

        per_batch = self.recipe.inner_update == "batch"
        steps = engine.inner_count(image_ids)
        for group in engine.inner_iterations(reads, fill, global_pixels):
            # Inner iteration j: re-encode this group with gradient, write it in place.
            model.train()
            latent = latent.detach()
            with ctx.autocast():
                g = engine.encode_group(
                    ctx, model.encoder, latent, group, global_pixels, self._write
                )
                out = model.classify(latent, g)
                loss = F.cross_entropy(out.float(), targets)
            inner += 1
            if per_batch:  # the J inner gradients averaged: one micro-step per image batch
                ctx.learn_part(loss, steps, last=inner == steps)
            else:
                ctx.learn(loss)
            losses.append(float(loss.detach()))
            logits = out.detach().float().cpu()
        if not per_batch and ctx.micro_steps:  # flush what is left of this batch's accumulation
            ctx.step()
        return BatchOutput(float(np.mean(losses)) if losses else float("nan"), logits, inner)

    def _eval_latent(
        self, ctx: StepContext, image_ids: list[str], reads: Reads
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The latent and global feature as evaluation computes them (eval mode, no gradient)."""
        model = self.model
        model.eval()
        latent = self._latent(image_ids, ctx.device, model.latent_dim)
        global_pixels: list[torch.Tensor | None] = [None] * len(image_ids)
        for request, pixels in reads:
            if request.tag.role == "fill":
                self.engine.fill(ctx, model.encoder, latent, request, pixels, False, self._write)
            else:
                global_pixels[request.tag.image] = pixels
        g = None
        if self.use_global:
            with torch.no_grad(), ctx.autocast():
                batch = torch.stack([p for p in global_pixels if p is not None])
                g = model.encoder(batch.to(ctx.device)).float()
        return latent, g

    def predict(self, ctx: StepContext, image_ids: list[str], reads: Reads) -> torch.Tensor:
        model = self.model
        latent, g = self._eval_latent(ctx, image_ids, reads)
        with torch.no_grad(), ctx.autocast():
            return model.classify(latent, g).float().cpu()

    def explain(
        self, ctx: StepContext, image_ids: list[str], reads: Reads
    ) -> tuple[torch.Tensor, list[Heatmap]]:
        """Each patch's contribution to the predicted class: how much its logit drops when the
        patch's latent cell is replaced by the image's mean patch feature (occlusion on the
        latent grid; negative effects clipped). Only θ2 runs again, ``OCCLUSION_BATCH`` variants
        at a time, so this costs no extra patch encoding."""
        model = self.model
        latent, g = self._eval_latent(ctx, image_ids, reads)
        with torch.no_grad(), ctx.autocast():
            out = model.classify(latent, g).float()
        cam = np.zeros((len(image_ids), *latent.shape[-2:]), dtype=np.float32)
        for b, image_id in enumerate(image_ids):
            grid, kept = self.patches(image_id)
            rows, cols = grid.position(kept)
            z = latent[b : b + 1]
            mean = z[0][:, rows, cols].mean(1)
            target = int(out[b].argmax())
            gb = g[b : b + 1] if g is not None else None
            for start in range(0, len(kept), OCCLUSION_BATCH):
                r = torch.as_tensor(rows[start : start + OCCLUSION_BATCH], device=z.device)
                c = torch.as_tensor(cols[start : start + OCCLUSION_BATCH], device=z.device)
                variants = z.repeat(len(r), 1, 1, 1)
                variants[torch.arange(len(r), device=z.device), :, r, c] = mean
                with torch.no_grad(), ctx.autocast():
                    gv = gb.expand(len(r), -1) if gb is not None else None
                    logits = model.classify(variants, gv).float()[:, target]
                drop = (out[b, target] - logits).clamp_min(0).cpu().numpy()
                cam[b, rows[start : start + len(r)], cols[start : start + len(r)]] = drop
        maps = []
        for b, image_id in enumerate(image_ids):
            grid = self.patches(image_id)[0]
            maps.append(
                Heatmap(
                    image_id,
                    cam[b, : grid.rows, : grid.cols],
                    float(grid.patch_size),
                    "patch contribution (logit drop when occluded)",
                )
            )
        return out.detach().float().cpu(), maps


# The global patch's feature concatenated to every cell, not added: added, it shares the
# head's weights with the cells' (a max over z + g cannot ignore g), and the first epoch's
# training loss on Megapixel MNIST was 2.58; concatenated, 2.49 (without the global: 2.46).
@register_method(
    "cls",
    "patchgd-global",
    defaults={**PATCHGD_DEFAULTS, "accumulation_steps": 1, "fusion": "concat", "global_grad": None},
)
class PatchGDGlobal(PatchGD):
    """PatchGD + global patch (§2): PatchGD with the whole image resized to one patch, encoded
    with gradient every step and fused with every cell of the latent."""

    use_global = True
