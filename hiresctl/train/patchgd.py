"""Classification PatchGD (docs/methods.md §1) and PatchGD with a global patch (§2); detection
and segmentation build on these classes."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hiresctl.data import (
    PatchGrid,
    PatchStream,
    ReadRequest,
    ReadTag,
)
from hiresctl.models import (
    PatchGDClassifier,
    scale_gradient,
)
from hiresctl.train.memory import PatchCost
from hiresctl.train.methods import (
    BatchOutput,
    Heatmap,
    Method,
    Reads,
    StepContext,
    _chunks,
    recalibrate_batchnorm,
)
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
PATCHGD_DEFAULTS: dict[str, Any] = {
    "latent_dim": None,
    "inner_update": "batch",
}


@register_method("cls", "patchgd", defaults=PATCHGD_DEFAULTS)
class PatchGD(Method):
    """PatchGD (§1); with ``use_global`` the seed paper's PatchGD + global patch (§2).

    The head's BatchNorm sees a few images per step on grids that shrink to 1×1, so its running
    statistics trail what the head computes and evaluation drifts from training. At the end of
    each epoch the head's statistics are recomputed ("precise BatchNorm") over the latents of
    ``calibration_batches`` training batches, filled exactly as evaluation fills them.
    """

    use_global = False
    moves_grid = True

    def calibrate(self, ctx: StepContext, batches: list[list[str]]) -> None:
        model: PatchGDClassifier = ctx.model  # type: ignore[assignment]
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

    def patches_per_step(self, count: int) -> int:
        """k = ceil(N·ρ), or the recipe's ``patches_per_step``."""
        if self.recipe.patches_per_step:
            return max(1, min(count, self.recipe.patches_per_step))
        return max(1, math.ceil(count * self.recipe.sample_fraction))

    def memory(
        self, model: nn.Module, images: list[Any], cost: PatchCost
    ) -> tuple[int, int, int | None]:
        """The latent and its gradient copy, the head's stride-1 blocks (conv, ReLU, BN,
        dropout) or the pool's input, one fill batch of pixels; the global patch with gradient."""
        r = self.recipe
        assert isinstance(model, PatchGDClassifier)
        grid, kept = self.largest(images)
        cells = grid.rows * grid.cols
        latent = model.latent_dim * cells * 4
        head = 4 * max(1, r.head_context) * r.head_width * cells * 4
        per_image = 2 * latent + 2 * head + self.beside_inner_steps(len(kept), cost)
        return per_image, cost.grad, self.patches_per_step(len(kept))

    def beside_inner_steps(self, filled: int, cost: PatchCost) -> int:
        """What a step holds per image besides its inner steps' patches, for every PatchGD
        task: the no-grad fill's transient (``fill_batch`` of the ``filled`` patches at once;
        the allocator keeps what it freed beside the inner steps' activations) and the global
        patch, encoded with gradient every step."""
        return min(self.recipe.fill_batch, filled) * cost.nograd + (
            cost.grad if self.use_global else 0
        )

    def describe(self, image_id: str) -> dict[str, str] | None:
        _, kept = self.patches(image_id)
        count = len(kept)
        k = self.patches_per_step(count)
        inner = self.recipe.inner_steps or math.ceil(count / k)
        sampling = f"k={k} of N={count} patches per inner step, J={inner}"
        if self.use_global:
            sampling += f", + global patch {self.recipe.patch_size}²"
        return {"sampling": sampling, "sees": "full resolution, every patch"}

    def plan(self, image_ids: list[str], seed: int, train: bool) -> list[ReadRequest]:
        rng = np.random.default_rng(seed)
        requests: list[ReadRequest] = []
        for b, image_id in enumerate(image_ids):
            grid, kept = self.patches(image_id, train)
            for chunk in _chunks(kept, self.recipe.fill_batch):
                requests.append(ReadRequest(image_id, "patches", grid, chunk, ReadTag("fill", b)))
        if self.use_global:
            for b, image_id in enumerate(image_ids):
                grid = self.patches(image_id, train)[0]
                requests.append(ReadRequest(image_id, "global", grid, tag=ReadTag("global", b)))
        if not train:
            return requests
        return requests + self.inner_groups(image_ids, rng)

    def inner_groups(self, image_ids: list[str], rng: np.random.Generator) -> list[ReadRequest]:
        """The reads of the inner iterations: J groups of k patches per image, each patch of an
        image once before any repeats, tagged ``ReadTag("group", b, last, number=j)`` (``last``: the last read of step j)."""
        requests: list[ReadRequest] = []
        orders, sizes, groups, grids = [], [], [], []
        for image_id in image_ids:
            grid, kept = self.patches(image_id, train=True)
            grids.append(grid)
            k = self.patches_per_step(len(kept))
            orders.append(rng.permutation(kept))
            sizes.append(k)
            groups.append(math.ceil(len(kept) / k))
        for j in range(self.inner_count(image_ids)):
            members = []
            for b, image_id in enumerate(image_ids):
                g = j % groups[b]  # with more inner steps than groups, start over
                indices = orders[b][g * sizes[b] : (g + 1) * sizes[b]]
                members.append(
                    ReadRequest(
                        image_id,
                        "patches",
                        grids[b],
                        indices,
                        ReadTag("group", b, last=b == len(image_ids) - 1, number=j),
                    )
                )
            requests.extend(members)
        return requests

    @staticmethod
    def inner_iterations(
        reads: Reads,
        other: Callable[[ReadRequest, torch.Tensor], None],
        global_pixels: list[torch.Tensor | None],
    ) -> Iterator[list[tuple[ReadRequest, torch.Tensor]]]:
        """Walk a training plan: global patches go into ``global_pixels``, every other read
        that is not part of an inner step (the latent fill, segmentation's labels) to
        ``other``; yields each inner step's group once its last read has arrived."""
        group: list[tuple[ReadRequest, torch.Tensor]] = []
        for request, pixels in reads:
            kind = request.tag.role
            if kind == "global":
                global_pixels[request.tag.image] = pixels
            elif kind != "group":
                other(request, pixels)
            else:
                group.append((request, pixels))
                if request.tag.last:
                    yield group
                    group = []

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

    def _fill(
        self,
        ctx: StepContext,
        model: nn.Module,
        latent: torch.Tensor,
        request: ReadRequest,
        pixels: torch.Tensor,
        train: bool,
        write: Callable[[torch.Tensor, Any, PatchGrid, np.ndarray, torch.Tensor], None]
        | None = None,
    ) -> None:
        """No-grad encode of a fill read, written into ``latent`` (by ``write``, default the
        classification latent's one cell per patch)."""
        if len(request.indices) == 0:
            return
        encoder: nn.Module = model.encoder  # type: ignore[assignment]
        encoder.train(train and self.recipe.fill_mode == "train")
        with torch.no_grad(), ctx.autocast():
            features = encoder(pixels.to(ctx.device, non_blocking=True))
        (write or self._write)(latent, request.tag.image, request.grid, request.indices, features)

    def train_batch(
        self, ctx: StepContext, image_ids: list[str], targets: torch.Tensor, reads: Reads
    ) -> BatchOutput:
        model: PatchGDClassifier = ctx.model  # type: ignore[assignment]
        targets = targets.to(ctx.device)
        latent = self._latent(image_ids, ctx.device, model.latent_dim, train=True)
        global_pixels: list[torch.Tensor | None] = [None] * len(image_ids)
        losses: list[float] = []
        logits = torch.zeros(len(image_ids), self.num_classes)
        inner = 0

        def fill(request: ReadRequest, pixels: torch.Tensor) -> None:
            self._fill(ctx, model, latent, request, pixels, train=True)

        per_batch = self.recipe.inner_update == "batch"
        steps = self.inner_count(image_ids)
        for group in self.inner_iterations(reads, fill, global_pixels):
            # Inner iteration j: re-encode this group with gradient, write it in place.
            model.train()
            latent = latent.detach()
            with ctx.autocast():
                g = self.encode_group(ctx, model.encoder, latent, group, global_pixels, self._write)
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

    def inner_count(self, image_ids: list[str]) -> int:
        """J of a training batch: ``inner_steps``, else the most groups of k any image needs."""
        if self.recipe.inner_steps:
            return self.recipe.inner_steps
        counts = [len(self.patches(i, train=True)[1]) for i in image_ids]
        return max(math.ceil(n / self.patches_per_step(n)) for n in counts)

    def encode_group(
        self,
        ctx: StepContext,
        encoder: nn.Module,
        latent: torch.Tensor,
        group: list[tuple[ReadRequest, torch.Tensor]],
        global_pixels: list[torch.Tensor | None],
        write: Callable[[torch.Tensor, Any, PatchGrid, np.ndarray, torch.Tensor], None],
    ) -> torch.Tensor | None:
        """One inner iteration's encode: the group's patches with gradient, each written in
        place into ``latent`` by ``write``; returns the global patches' encodings (or None).

        Patches and global patches go through the encoder as one batch: BatchNorm then sees one
        mixture in training, whose running statistics suit evaluation too (separate batches
        would leave running statistics half of downsampled images)."""
        members = [(r, p) for r, p in group if len(r.indices)]
        pieces = [p for _, p in members]
        if self.use_global:
            pieces.append(torch.stack([p for p in global_pixels if p is not None]))
        features = encoder(torch.cat(pieces).to(ctx.device, non_blocking=True))
        start = 0
        for r, _ in members:
            write(latent, r.tag.image, r.grid, r.indices, features[start : start + len(r.indices)])
            start += len(r.indices)
        ctx.patches_with_grad += start
        if not self.use_global:
            return None
        return scale_gradient(features[start:], self.global_grad_factor(group, features))

    def global_grad_factor(
        self, group: list[tuple[ReadRequest, torch.Tensor]], features: torch.Tensor
    ) -> torch.Tensor:
        """(B, 1, …) factors on each global patch's gradient (``global_grad``; None: the
        image's k/N, so that over a batch its global patch weighs on the encoder as one of
        its patches does)."""
        factors = torch.ones(len(group))
        if self.recipe.global_grad is not None:
            factors.fill_(self.recipe.global_grad)
        else:
            for r, _ in group:
                kept = len(self.patches(r.image_id, train=True)[1])
                factors[r.tag.image] = len(r.indices) / max(1, kept)
        shape = (len(group),) + (1,) * (features.dim() - 1)
        return factors.to(features.device, features.dtype).view(shape)

    def _eval_latent(
        self, ctx: StepContext, image_ids: list[str], reads: Reads
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The latent and global feature as evaluation computes them (eval mode, no gradient)."""
        model: PatchGDClassifier = ctx.model  # type: ignore[assignment]
        model.eval()
        latent = self._latent(image_ids, ctx.device, model.latent_dim)
        global_pixels: list[torch.Tensor | None] = [None] * len(image_ids)
        for request, pixels in reads:
            if request.tag.role == "fill":
                self._fill(ctx, model, latent, request, pixels, train=False)
            else:
                global_pixels[request.tag.image] = pixels
        g = None
        if self.use_global:
            with torch.no_grad(), ctx.autocast():
                batch = torch.stack([p for p in global_pixels if p is not None])
                g = model.encoder(batch.to(ctx.device)).float()
        return latent, g

    def predict(self, ctx: StepContext, image_ids: list[str], reads: Reads) -> torch.Tensor:
        model: PatchGDClassifier = ctx.model  # type: ignore[assignment]
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
        model: PatchGDClassifier = ctx.model  # type: ignore[assignment]
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
            maps.append(Heatmap(image_id, cam[b, : grid.rows, : grid.cols],
                                float(grid.patch_size), "patch contribution (logit drop when occluded)"))  # fmt: skip
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
