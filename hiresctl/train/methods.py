"""The training methods: what one image batch reads and computes (docs/methods.md §1–3, §6).

A method plans the reads of an image batch (so the DataLoader can read ahead), then consumes
the pixels in the same order. The shared loop (``trainer.py``) owns the optimizer, schedule,
accumulation, precision, checkpoints and logging; a method calls ``ctx.learn(loss)``
(backward, then an optimizer step once ``accumulation_steps`` backwards have run).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hiresctl.data import (
    NO_FLIP,
    Flip,
    PatchAugment,
    PatchGrid,
    PatchReader,
    PatchStream,
    ReadRequest,
    ReadTag,
    kept_patches,
)
from hiresctl.models import (
    Backbone,
    ImageClassifier,
    IPSClassifier,
    PatchGDClassifier,
    create_backbone,
)
from hiresctl.train.recipe import Recipe
from hiresctl.train.registry import method_class, register_method
from storage.errors import UsageError

Reads = Iterable[tuple[ReadRequest, torch.Tensor]]
OCCLUSION_BATCH = 64  # latent variants per θ2 pass when PatchGD explains a prediction


@dataclass
class StepContext:
    """What a method needs from the loop."""

    model: nn.Module
    device: torch.device
    autocast: Callable[[], AbstractContextManager[Any]]
    backward: Callable[[torch.Tensor], None]  # scales by 1/accumulation, checks for NaN
    step: Callable[[], None]  # optimizer step (gradients averaged across ranks first)
    read: Callable[
        [ReadRequest], torch.Tensor
    ]  # a read the plan could not know (augmented in training)
    accumulation_steps: int = 1  # [ε] backward calls per optimizer step
    micro_steps: int = 0  # backward calls since the last optimizer step
    patches_with_grad: int = 0

    def learn(self, loss: torch.Tensor) -> None:
        """Backward, then an optimizer step once ``accumulation_steps`` backwards have run."""
        self.backward(loss)
        if self.micro_steps >= self.accumulation_steps:
            self.step()

    def learn_part(self, loss: torch.Tensor, parts: int, last: bool) -> None:
        """Backward of one of ``parts`` pieces that together make one micro-step (each scaled
        by 1/parts: their gradients average); the micro-step counts, and the optimizer steps
        every ``accumulation_steps`` of them, once the ``last`` piece has run."""
        self.backward(loss / parts)
        self.micro_steps -= 1
        if last:
            self.micro_steps += 1
            if self.micro_steps >= self.accumulation_steps:
                self.step()


@dataclass
class Heatmap:
    """Where a classifier looked in one image: ``scores`` on a grid of square cells of ``cell``
    pixels of the run's level, from the level's top-left corner (the grid may run past the
    image's right and bottom edges, like the patch grid's padding). ``kind`` says what a score is.
    """

    image_id: str
    scores: np.ndarray  # (rows, cols) float32, ≥ 0
    cell: float
    kind: str


@dataclass
class BatchOutput:
    """What one training batch reports to the loop."""

    loss: float
    logits: torch.Tensor  # (B, classes), detached, on CPU; (B, 0) where a task has no logits
    inner_steps: int = 1
    # The batch's training accuracy as (right, judged) where its unit is not the image
    # (segmentation: pixels); None lets the task judge the logits against the targets.
    score: tuple[int, int] | None = None


class Method(ABC):
    """Base of every method: the patch grid of each image (foreground-filtered), the hooks the
    loop, evaluation, ``--memory-budget`` and the report call, and the shared helpers.

    A method subclasses its task's base (this class for classification, ``DetectionMethod``,
    ``SegmentationMethod``), implements the three abstract hooks, and registers itself with
    ``@register_method(task, name)``; ``task`` and ``name`` are set by the registration.
    """

    task: ClassVar[str] = ""
    name: ClassVar[str] = ""

    def __init__(self, recipe: Recipe, num_classes: int, reader: PatchReader) -> None:
        self.recipe = recipe
        self.num_classes = num_classes
        self.reader = reader
        self._patches: dict[tuple[str, Flip], tuple[PatchGrid, np.ndarray]] = {}
        # The training stream's augmentation (set by the trainer): training plans and targets
        # ask it how each image is mirrored this epoch, as the stream's reads do.
        self.augment: PatchAugment | None = None

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The network this method trains (the loop moves it to the device)."""

    def flip(self, image_id: str, train: bool = True) -> Flip:
        """How training reads mirror ``image_id`` this epoch (never outside training)."""
        return self.augment.flip(image_id) if train and self.augment is not None else NO_FLIP

    def patches(self, image_id: str, train: bool = False) -> tuple[PatchGrid, np.ndarray]:
        """The grid of ``image_id`` and the row-major indices of the patches used (N of them);
        ``train``: of the image as this epoch's training reads mirror it."""
        flip = self.flip(image_id, train)
        if (image_id, flip) not in self._patches:
            grid = self.reader.grid(image_id, self.recipe.patch_size, self.recipe.stride)
            kept = kept_patches(
                self.reader.dataset, image_id, grid, self.recipe.foreground_threshold, flip
            )
            self._patches[image_id, flip] = (grid, kept)
        return self._patches[image_id, flip]

    @abstractmethod
    def plan(self, image_ids: list[str], seed: int, train: bool) -> list[ReadRequest]:
        """Every read of one image batch, in the order :meth:`train_batch` (``train``) or
        inference consumes them; ``seed`` fixes the batch's random choices."""

    @abstractmethod
    def train_batch(
        self, ctx: StepContext, image_ids: list[str], targets: torch.Tensor, reads: Reads
    ) -> BatchOutput:
        """One image batch: forward, ``ctx.learn(loss)`` (as many times as the method steps)."""

    def predict(self, ctx: StepContext, image_ids: list[str], reads: Reads) -> torch.Tensor:
        """Classification: the logits (B, classes) of an image batch read by ``plan(train=False)``."""
        raise UsageError(f"{self.task} method {self.name} has no class logits")

    def explain(
        self, ctx: StepContext, image_ids: list[str], reads: Reads
    ) -> tuple[torch.Tensor, list[Heatmap]]:
        """Logits as :meth:`predict` computes them, and per image where the model looked (none
        by default: the report then shows plain thumbnails)."""
        return self.predict(ctx, image_ids, reads), []

    def calibrate(self, ctx: StepContext, batches: list[list[str]]) -> None:  # noqa: B027
        """Called by the loop after the last batch of an epoch, before validation (re-estimate
        statistics such as BatchNorm's); nothing by default."""

    # Whether the model encodes patches of pixels (False for methods on stored features).
    encodes_pixels = True

    def memory(
        self, model: nn.Module, images: list[Any], per_patch: int
    ) -> tuple[int, int, int | None]:
        """(per image, per patch, patches wanted) of a training step for ``--memory-budget``
        (see ``plan_memory``): bytes held per image of the batch, bytes per patch encoded with
        gradient, and the patches per step the method wants (None: the batch is its unit).
        ``per_patch`` is the measured cost of one ``patch_size`` patch through the encoder with
        gradient; the default is one such patch per image."""
        return 0, per_patch, None

    @abstractmethod
    def describe(self, image_id: str) -> dict[str, str] | None:
        """What the method sees of an image for the report, as the seed paper's tables state
        them: "sampling" (which patches a step uses) and "sees" (at what resolution), and
        "patch" where it differs from ``patch_size``."""

    def backbone(self) -> Backbone:
        return create_backbone(self.recipe.backbone, self.recipe.pretrained)

    def largest(self, images: list[Any]) -> tuple[PatchGrid, np.ndarray]:
        """The grid and kept patches of the image of ``images`` with the most kept patches."""
        return max((self.patches(im.image_id) for im in images), key=lambda g: len(g[1]))


def scaled_cost(per_patch: int, side: int, patch_size: int) -> int:
    """The cost of one ``side``² input, from that of one ``patch_size``² patch."""
    return int(per_patch * (side / patch_size) ** 2)


def resized_setting(height: int, width: int, size: int) -> dict[str, str]:
    """The report's words for a method that sees the whole image resized to ``size``²."""
    side = max(height, width)
    return {"patch": "—", "sampling": f"whole image resized to {size}²",
            "sees": f"1/{side / size:.3g} resolution ({side}→{size} px per side)"}  # fmt: skip


FULL_SETTING = {"patch": "—", "sampling": "whole image at once", "sees": "full resolution"}


def recalibrate_batchnorm(module: nn.Module, inputs: list[torch.Tensor]) -> None:
    """Recompute the running statistics of ``module``'s BatchNorm layers as the plain average
    over ``inputs`` (dropout off, no gradients); a no-op without inputs or BatchNorm."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not inputs or not norms:
        return
    was_training = module.training
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the calibration batches
    module.train()
    for m in module.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    with torch.no_grad():
        for x in inputs:
            module(x)
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    module.train(was_training)


# Unprojected cells, no context block: on Megapixel MNIST a projection or a conv block before the
# grid's maximum learned several times slower than the whole-image CNN; without them the model is
# that CNN computed patch by patch (BENCHMARKS.md, learning). One optimizer step per image batch:
# with a step per inner iteration (J per batch on the same images) the training loss of Megapixel
# MNIST rose above chance (2.56 after an epoch) where averaging the J gradients matched the
# whole-image network (2.46; it: 2.45).
PATCHGD_DEFAULTS: dict[str, Any] = {"latent_dim": None, "inner_update": "batch"}


def _chunks(indices: np.ndarray, size: int) -> list[np.ndarray]:
    return [indices[i : i + size] for i in range(0, len(indices), size)] or [indices[:0]]


@register_method("cls", "patchgd", defaults=PATCHGD_DEFAULTS)
class PatchGD(Method):
    """PatchGD (§1); with ``use_global`` the seed paper's PatchGD + global patch (§2).

    The head's BatchNorm sees a few images per step on grids that shrink to 1×1, so its running
    statistics trail what the head computes and evaluation drifts from training. At the end of
    each epoch the head's statistics are recomputed ("precise BatchNorm") over the latents of
    ``calibration_batches`` training batches, filled exactly as evaluation fills them.
    """

    use_global = False

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
        self, model: nn.Module, images: list[Any], per_patch: int
    ) -> tuple[int, int, int | None]:
        """The latent and its gradient copy, the head's stride-1 blocks (conv, ReLU, BN,
        dropout) or the pool's input, one fill batch of pixels; the global patch with gradient."""
        r = self.recipe
        assert isinstance(model, PatchGDClassifier)
        grid, kept = self.largest(images)
        cells = grid.rows * grid.cols
        latent = model.latent_dim * cells * 4
        head = 4 * max(1, r.head_context) * r.head_width * cells * 4
        per_image = 2 * latent + 2 * head + r.fill_batch * r.patch_size**2 * 3 * 4
        if self.use_global:
            per_image += per_patch
        return per_image, per_patch, self.patches_per_step(len(kept))

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
                requests.append(
                    ReadRequest(
                        image_id, "global", self.patches(image_id)[0], tag=ReadTag("global", b)
                    )
                )
        if not train:
            return requests
        return requests + self.inner_groups(image_ids, rng)

    def inner_groups(self, image_ids: list[str], rng: np.random.Generator) -> list[ReadRequest]:
        """The reads of the inner iterations: J groups of k patches per image, each patch of an
        image once before any repeats, tagged ``ReadTag("group", b, last, number=j)`` (``last``: the last read of step j)."""
        requests: list[ReadRequest] = []
        orders, sizes, groups = [], [], []
        for image_id in image_ids:
            _, kept = self.patches(image_id, train=True)
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
                        self.patches(image_id)[0],
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

    def _latent(self, image_ids: list[str], device: torch.device, dim: int) -> torch.Tensor:
        rows = max(self.patches(i)[0].rows for i in image_ids)
        cols = max(self.patches(i)[0].cols for i in image_ids)
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
        latent = self._latent(image_ids, ctx.device, model.latent_dim)
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
        return features[start:] if self.use_global else None

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
    defaults={**PATCHGD_DEFAULTS, "accumulation_steps": 1, "fusion": "concat"},
)
class PatchGDGlobal(PatchGD):
    """PatchGD + global patch (§2): PatchGD with the whole image resized to one patch, encoded
    with gradient every step and fused with every cell of the latent."""

    use_global = True


# patch 50 is the Megapixel MNIST setting: see its recipe
@register_method("cls", "ips", defaults={"latent_dim": 128, "weight_decay": 0.1, "schedule": "cosine",
                                         "min_lr_ratio": 1e-3, "dropout": 0.1})  # fmt: skip
class IPS(Method):
    """Iterative Patch Selection (§3): select M of N patches without gradient, train on them."""

    def memory(
        self, model: nn.Module, images: list[Any], per_patch: int
    ) -> tuple[int, int, int | None]:
        """The memory buffer and one scored group of pixels per image; M patches with gradient."""
        r = self.recipe
        return (
            (r.memory_size + r.iter_size) * r.patch_size**2 * 3 * 4,
            per_patch * r.memory_size,
            None,
        )

    def describe(self, image_id: str) -> dict[str, str] | None:
        _, kept = self.patches(image_id)
        r = self.recipe
        return {"sampling": f"M={r.memory_size} of N={len(kept)} patches, I={r.iter_size}",
                "sees": "full resolution, selected patches"}  # fmt: skip

    def build_model(self) -> nn.Module:
        r = self.recipe
        return IPSClassifier(
            self.backbone(),
            self.num_classes,
            latent_dim=r.latent_dim,
            heads=r.heads,
            dim_key=r.dim_key,
            dim_value=r.dim_value,
            dim_inner=r.dim_inner,
            dropout=r.dropout,
            positional=r.positional,
        )

    def plan(self, image_ids: list[str], seed: int, train: bool) -> list[ReadRequest]:
        rng = np.random.default_rng(seed)
        memory, step = self.recipe.memory_size, self.recipe.iter_size
        requests: list[ReadRequest] = []
        for b, image_id in enumerate(image_ids):
            grid, kept = self.patches(image_id, train)
            order = rng.permutation(kept)  # ties break at random
            parts = (
                [order[:memory], *_chunks(order[memory:], step)] if len(order) > memory else [order]
            )
            parts = [p for p in parts if len(p)]
            for i, part in enumerate(parts):
                requests.append(
                    ReadRequest(
                        image_id,
                        "patches",
                        grid,
                        part,
                        ReadTag("select", b, last=i == len(parts) - 1),
                    )
                )
        return requests

    def _select(
        self, ctx: StepContext, reads: Reads, count: int
    ) -> list[tuple[ReadRequest, torch.Tensor]]:
        """Per image, the M best-scoring patches' indices; pixels read again from the store."""
        model: IPSClassifier = ctx.model  # type: ignore[assignment]
        model.eval()
        selected: list[tuple[ReadRequest, torch.Tensor]] = []
        memory_emb: torch.Tensor | None = None
        memory_idx: torch.Tensor | None = None
        for request, pixels in reads:
            indices = torch.as_tensor(request.indices, device=ctx.device)
            with torch.no_grad(), ctx.autocast():
                emb = model.encoder(pixels.to(ctx.device, non_blocking=True)).float()
                emb = model.with_positions(emb, indices, request.grid.cols)
                if memory_emb is None or memory_idx is None:
                    memory_emb, memory_idx = emb, indices
                else:
                    candidates = torch.cat([memory_emb, emb])
                    candidate_idx = torch.cat([memory_idx, indices])
                    scores = model.scores(candidates.unsqueeze(0))[0]
                    top = scores.topk(min(self.recipe.memory_size, len(scores))).indices
                    memory_emb, memory_idx = candidates[top], candidate_idx[top]
            if request.tag.last:  # last read of this image: selection done
                assert memory_idx is not None
                chosen = np.sort(memory_idx.cpu().numpy())
                again = ReadRequest(
                    request.image_id,
                    "patches",
                    request.grid,
                    chosen,
                    ReadTag("selected", request.tag.image),
                )
                selected.append((again, ctx.read(again)))
                memory_emb = memory_idx = None
        if len(selected) != count:
            raise RuntimeError(f"selection produced {len(selected)} of {count} images")
        return selected

    def _logits(
        self, ctx: StepContext, selected: list[tuple[ReadRequest, torch.Tensor]]
    ) -> torch.Tensor:
        model: IPSClassifier = ctx.model  # type: ignore[assignment]
        pixels = torch.cat([p for _, p in selected]).to(ctx.device, non_blocking=True)
        emb = model.encoder(pixels).float()
        out, start = [], 0
        for request, p in selected:
            part = emb[start : start + len(p)]
            start += len(p)
            indices = torch.as_tensor(request.indices, device=ctx.device)
            out.append(
                model.classify(model.with_positions(part, indices, request.grid.cols).unsqueeze(0))
            )
        return torch.cat(out)

    def train_batch(
        self, ctx: StepContext, image_ids: list[str], targets: torch.Tensor, reads: Reads
    ) -> BatchOutput:
        selected = self._select(ctx, reads, len(image_ids))
        ctx.model.train()
        with ctx.autocast():
            logits = self._logits(ctx, selected)
            loss = F.cross_entropy(logits.float(), targets.to(ctx.device))
        ctx.patches_with_grad += sum(len(p) for _, p in selected)
        ctx.learn(loss)
        return BatchOutput(float(loss.detach()), logits.detach().float().cpu())

    def predict(self, ctx: StepContext, image_ids: list[str], reads: Reads) -> torch.Tensor:
        selected = self._select(ctx, reads, len(image_ids))
        ctx.model.eval()
        with torch.no_grad(), ctx.autocast():
            return self._logits(ctx, selected).float().cpu()

    def explain(
        self, ctx: StepContext, image_ids: list[str], reads: Reads
    ) -> tuple[torch.Tensor, list[Heatmap]]:
        """The M selected patches, scored by the aggregator's attention; unselected patches 0."""
        model: IPSClassifier = ctx.model  # type: ignore[assignment]
        selected = self._select(ctx, reads, len(image_ids))
        model.eval()
        maps = []
        with torch.no_grad(), ctx.autocast():
            logits = self._logits(ctx, selected).float().cpu()
            for request, pixels in selected:
                indices = torch.as_tensor(request.indices, device=ctx.device)
                emb = model.encoder(pixels.to(ctx.device)).float()
                emb = model.with_positions(emb, indices, request.grid.cols)
                attention = model.scores(emb.unsqueeze(0))[0].float().cpu().numpy()
                grid = request.grid
                scores = np.zeros((grid.rows, grid.cols), dtype=np.float32)
                rows, cols = grid.position(request.indices)
                scores[rows, cols] = attention
                maps.append(Heatmap(request.image_id, scores, float(grid.patch_size),
                                    "selected patches (attention)"))  # fmt: skip
        return logits, maps


class WholeImage(Method):
    """Baselines that see the whole image at once: ``downsample`` (§6) and ``full``."""

    def build_model(self) -> nn.Module:
        return ImageClassifier(self.backbone(), self.num_classes)

    @abstractmethod
    def request(self, image_id: str, b: int) -> ReadRequest:
        """The one read of ``image_id``, the ``b``-th image of its batch."""

    def plan(self, image_ids: list[str], seed: int, train: bool) -> list[ReadRequest]:
        return [self.request(image_id, b) for b, image_id in enumerate(image_ids)]

    def _forward(self, ctx: StepContext, reads: Reads) -> torch.Tensor:
        images = [p for _, p in reads]
        if len({tuple(p.shape) for p in images}) == 1:
            return ctx.model(torch.stack(images).to(ctx.device, non_blocking=True))
        return torch.cat([ctx.model(p.unsqueeze(0).to(ctx.device)) for p in images])

    def train_batch(
        self, ctx: StepContext, image_ids: list[str], targets: torch.Tensor, reads: Reads
    ) -> BatchOutput:
        ctx.model.train()
        with ctx.autocast():
            logits = self._forward(ctx, reads)
            loss = F.cross_entropy(logits.float(), targets.to(ctx.device))
        ctx.learn(loss)
        return BatchOutput(float(loss.detach()), logits.detach().float().cpu())

    def predict(self, ctx: StepContext, image_ids: list[str], reads: Reads) -> torch.Tensor:
        ctx.model.eval()
        with torch.no_grad(), ctx.autocast():
            return self._forward(ctx, reads).float().cpu()

    @abstractmethod
    def input_side(self, image_id: str) -> tuple[int, int]:
        """(side of the square the model sees, side of the level square it covers)."""

    def memory(
        self, model: nn.Module, images: list[Any], per_patch: int
    ) -> tuple[int, int, int | None]:
        side = max(self.input_side(im.image_id)[0] for im in images)
        return 0, scaled_cost(per_patch, side, self.recipe.patch_size), None

    def explain(
        self, ctx: StepContext, image_ids: list[str], reads: Reads
    ) -> tuple[torch.Tensor, list[Heatmap]]:
        """Gradient × input saliency of the predicted class on the input, pooled to ≤ 32²."""
        ctx.model.eval()
        logits, maps = [], []
        for request, pixels in reads:
            image = pixels[0] if pixels.dim() == 4 else pixels
            x = image.unsqueeze(0).to(ctx.device).float().requires_grad_(True)
            with torch.enable_grad():
                out = ctx.model(x)
                (grad,) = torch.autograd.grad(out[0, out[0].argmax()], x)
            saliency = (grad * x.detach()).abs().sum(1, keepdim=True)
            seen, covered = self.input_side(request.image_id)
            pool = max(1, seen // 32)
            scores = F.avg_pool2d(saliency, pool, ceil_mode=True)[0, 0].cpu().numpy()
            maps.append(Heatmap(request.image_id, scores.astype(np.float32),
                                covered * pool / seen, "input saliency (gradient × input)"))  # fmt: skip
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

    def request(self, image_id: str, b: int) -> ReadRequest:
        _, height, width = self.reader.shape(image_id)
        side = max(height, width)
        if side * side > self.recipe.full_max_pixels:
            raise UsageError(
                f"image {image_id} ({height}×{width}) is too large for method `full` "
                f"(full_max_pixels={self.recipe.full_max_pixels}); use patchgd-global or ips"
            )
        grid = PatchGrid.of(height, width, side)
        return ReadRequest(
            image_id, "patches", grid, np.zeros(1, dtype=np.int64), ReadTag("image", b)
        )

    def _forward(self, ctx: StepContext, reads: Reads) -> torch.Tensor:
        return super()._forward(ctx, ((r, p[0]) for r, p in reads))

    def input_side(self, image_id: str) -> tuple[int, int]:
        _, height, width = self.reader.shape(image_id)
        return max(height, width), max(height, width)


def create_method(recipe: Recipe, num_classes: int, reader: PatchReader) -> Method:
    """The method registered as ``recipe.task``/``recipe.method``."""
    method: Method = method_class(recipe.task, recipe.method)(recipe, num_classes, reader)
    return method
