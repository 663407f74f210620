"""The PatchGD engine (docs/methods.md §1, §2, §4, §5): what every task's PatchGD does the same
way, held (not inherited) by the classification, detection and segmentation PatchGD methods and
by detection's ``sliced`` (which borrows its schedule).

- the schedule: k patches per inner step, J inner steps per image batch, each kept patch of an
  image once before any repeats (:meth:`PatchGDEngine.inner_groups`);
- the fill: every kept patch encoded without gradient into what the task stitches them into (a
  latent grid, FPN maps, a canvas), through a ``write`` the task gives;
- an inner step's encode: the group's patches (and the global patches) with gradient as one
  batch, each written in place; the global patch's gradient into the shared encoder scaled
  (``global_grad``);
- what a step holds per image beside its patches (for ``--memory-budget``);
- the report's words for what the method sees.

What a task stitches, how its head runs and what it learns from stay in the task's method.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from hiresctl.data import PatchGrid, ReadRequest, ReadTag
from hiresctl.models import scale_gradient
from hiresctl.train.memory import PatchCost
from hiresctl.train.methods import Reads, StepContext, chunks
from hiresctl.train.recipe import Recipe

# write(target, image in batch, grid, patch indices, encoded patches): put encoded patches in place
Write = Callable[[torch.Tensor, Any, PatchGrid, np.ndarray, torch.Tensor], None]
# patches(image_id, train): an image's grid and the indices of its kept patches
Patches = Callable[[str, bool], tuple[PatchGrid, np.ndarray]]
Group = list[tuple[ReadRequest, torch.Tensor]]


class PatchGDEngine:
    """The PatchGD schedule and encodes over a method's patches (``patches``), with or without
    the global patch (``use_global``)."""

    def __init__(self, recipe: Recipe, patches: Patches, use_global: bool) -> None:
        self.recipe = recipe
        self.patches = patches
        self.use_global = use_global

    # ------------------------------------------------------------------------------ schedule

    def patches_per_step(self, count: int) -> int:
        """k = ceil(N·ρ), or the recipe's ``patches_per_step``."""
        if self.recipe.patches_per_step:
            return max(1, min(count, self.recipe.patches_per_step))
        return max(1, math.ceil(count * self.recipe.sample_fraction))

    def inner_count(self, image_ids: list[str]) -> int:
        """J of a training batch: ``inner_steps``, else the most groups of k any image needs."""
        if self.recipe.inner_steps:
            return self.recipe.inner_steps
        counts = [len(self.patches(i, True)[1]) for i in image_ids]
        return max(math.ceil(n / self.patches_per_step(n)) for n in counts)

    def plan(self, image_ids: list[str], seed: int, train: bool) -> list[ReadRequest]:
        """Fill reads of every kept patch (``fill_batch`` at a time), the global patches, then
        in training the inner steps' groups."""
        rng = np.random.default_rng(seed)
        requests: list[ReadRequest] = []
        for b, image_id in enumerate(image_ids):
            grid, kept = self.patches(image_id, train)
            for chunk in chunks(kept, self.recipe.fill_batch):
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
        image once before any repeats, tagged ``ReadTag("group", b, last, number=j)``
        (``last``: the last read of step j)."""
        requests: list[ReadRequest] = []
        orders, sizes, groups, grids = [], [], [], []
        for image_id in image_ids:
            grid, kept = self.patches(image_id, True)
            grids.append(grid)
            k = self.patches_per_step(len(kept))
            orders.append(rng.permutation(kept))
            sizes.append(k)
            groups.append(math.ceil(len(kept) / k))
        last = len(image_ids) - 1
        for j in range(self.inner_count(image_ids)):
            for b, image_id in enumerate(image_ids):
                g = j % groups[b]  # with more inner steps than groups, start over
                indices = orders[b][g * sizes[b] : (g + 1) * sizes[b]]
                tag = ReadTag("group", b, last=b == last, number=j)
                requests.append(ReadRequest(image_id, "patches", grids[b], indices, tag))
        return requests

    @staticmethod
    def inner_iterations(
        reads: Reads,
        other: Callable[[ReadRequest, torch.Tensor], None],
        global_pixels: list[torch.Tensor | None],
    ) -> Iterator[Group]:
        """Walk a training plan: global patches go into ``global_pixels``, every other read
        that is not part of an inner step (the fill, segmentation's labels) to ``other``;
        yields each inner step's group once its last read has arrived."""
        group: Group = []
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

    # ------------------------------------------------------------------------------- encodes

    def fill(
        self,
        ctx: StepContext,
        encoder: nn.Module,
        target: torch.Tensor,
        request: ReadRequest,
        pixels: torch.Tensor,
        train: bool,
        write: Write,
    ) -> None:
        """No-grad encode of a fill read, put in ``target`` by ``write``; the encoder in train
        mode only in training with ``fill_mode: train``."""
        if len(request.indices) == 0:
            return
        encoder.train(train and self.recipe.fill_mode == "train")
        with torch.no_grad(), ctx.autocast():
            features = encoder(pixels.to(ctx.device, non_blocking=True))
        write(target, request.tag.image, request.grid, request.indices, features)

    def group_pixels(
        self, ctx: StepContext, group: Group, global_pixels: list[torch.Tensor | None]
    ) -> tuple[list[ReadRequest], torch.Tensor]:
        """An inner step's patches (then the global patches) as one batch on the device."""
        members = [(r, p) for r, p in group if len(r.indices)]
        pieces = [p for _, p in members]
        if self.use_global:
            pieces.append(torch.stack([p for p in global_pixels if p is not None]))
        return [r for r, _ in members], torch.cat(pieces).to(ctx.device, non_blocking=True)

    def encode_group(
        self,
        ctx: StepContext,
        encoder: nn.Module,
        target: torch.Tensor,
        group: Group,
        global_pixels: list[torch.Tensor | None],
        write: Write,
    ) -> torch.Tensor | None:
        """One inner iteration's encode: the group's patches with gradient, each put in
        ``target`` by ``write``; returns the global patches' encodings (or None).

        Patches and global patches go through the encoder as one batch: BatchNorm then sees one
        mixture in training, whose running statistics suit evaluation too (separate batches
        would leave running statistics half of downsampled images)."""
        members, pixels = self.group_pixels(ctx, group, global_pixels)
        features = encoder(pixels)
        start = 0
        for r in members:
            write(target, r.tag.image, r.grid, r.indices, features[start : start + len(r.indices)])
            start += len(r.indices)
        ctx.patches_with_grad += start
        if not self.use_global:
            return None
        return scale_gradient(features[start:], self.global_grad_factor(group, features))

    def global_grad_factor(self, group: Group, features: torch.Tensor) -> torch.Tensor:
        """(B, 1, …) factors on each global patch's gradient (``global_grad``; None: the
        image's k/N, so that over a batch its global patch weighs on the encoder as one of
        its patches does)."""
        factors = torch.ones(len(group))
        if self.recipe.global_grad is not None:
            factors.fill_(self.recipe.global_grad)
        else:
            for r, _ in group:
                kept = len(self.patches(r.image_id, True)[1])
                factors[r.tag.image] = len(r.indices) / max(1, kept)
        shape = (len(group),) + (1,) * (features.dim() - 1)
        return factors.to(features.device, features.dtype).view(shape)

    # ------------------------------------------------------------------ memory and the report

    def beside_inner_steps(self, filled: int, cost: PatchCost) -> int:
        """What a step holds per image besides its inner steps' patches: the no-grad fill's
        transient (``fill_batch`` of the ``filled`` patches at once; the allocator keeps what
        it freed beside the inner steps' activations) and the global patch, encoded with
        gradient every step."""
        return min(self.recipe.fill_batch, filled) * cost.nograd + (
            cost.grad if self.use_global else 0
        )

    def describe(self, image_id: str) -> dict[str, str]:
        """The report's words: k of N patches per inner step, J, the global patch."""
        _, kept = self.patches(image_id, False)
        count = len(kept)
        k = self.patches_per_step(count)
        inner = self.recipe.inner_steps or math.ceil(count / k)
        sampling = f"k={k} of N={count} patches per inner step, J={inner}"
        if self.use_global:
            sampling += f", + global patch {self.recipe.patch_size}²"
        return {"sampling": sampling, "sees": "full resolution, every patch"}


__all__ = ["PatchGDEngine", "Write"]
