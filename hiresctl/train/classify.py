"""Classification methods besides PatchGD: Iterative Patch Selection (docs/methods.md §3) and
the whole-image baselines (§6): ``downsample`` and ``full``."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hiresctl.data import (
    PatchGrid,
    ReadRequest,
    ReadTag,
)
from hiresctl.models import (
    ImageClassifier,
    IPSClassifier,
)
from hiresctl.train.memory import PatchCost
from hiresctl.train.methods import (
    FULL_SETTING,
    BatchOutput,
    Heatmap,
    Method,
    Reads,
    StepContext,
    _chunks,
    full_grid,
    resized_setting,
)
from hiresctl.train.registry import register_method


# patch 50 is the Megapixel MNIST setting: see its recipe
@register_method("cls", "ips", defaults={"latent_dim": 128, "weight_decay": 0.1, "schedule": "cosine",
                                         "min_lr_ratio": 1e-3, "dropout": 0.1})  # fmt: skip
class IPS(Method):
    """Iterative Patch Selection (§3): select M of N patches without gradient, train on them."""

    def memory(
        self, model: nn.Module, images: list[Any], cost: PatchCost
    ) -> tuple[int, int, int | None]:
        """The memory buffer and one scored group of pixels per image; M patches with gradient
        (an image with fewer kept patches than M or M + I holds only those). The selection's
        no-grad transient (its largest group: the first M, or I after them) counts only where
        it exceeds the M patches' activations: measured through a step, the pass with gradient
        reuses what the selection freed."""
        r = self.recipe
        most = len(self.largest(images)[1])
        kept = min(r.memory_size, most)
        scored = max(kept, min(r.iter_size, max(0, most - r.memory_size)))
        return (
            min(r.memory_size + r.iter_size, most) * r.patch_size**2 * 3 * 4
            + max(0, scored * cost.nograd - kept * cost.grad),
            cost.grad * kept,
            None,
        )

    def describe(self, image_id: str) -> dict[str, str] | None:
        _, kept = self.patches(image_id)
        r = self.recipe
        return {"sampling": f"M={r.memory_size} of N={len(kept)} patches, I={r.iter_size}",
                "sees": "full resolution, selected patches"}  # fmt: skip

    def build_model(self) -> nn.Module:
        r = self.recipe
        return IPSClassifier.on_patches(
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
        self, model: nn.Module, images: list[Any], cost: PatchCost
    ) -> tuple[int, int, int | None]:
        side = max(self.input_side(im.image_id)[0] for im in images)
        return 0, cost.scaled(side, self.recipe.patch_size).grad, None

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
        grid = full_grid(self, image_id, "ips")
        return ReadRequest(image_id, "patches", grid, np.zeros(1, np.int64), ReadTag("image", b))

    def _forward(self, ctx: StepContext, reads: Reads) -> torch.Tensor:
        return super()._forward(ctx, ((r, p[0]) for r, p in reads))

    def input_side(self, image_id: str) -> tuple[int, int]:
        _, height, width = self.reader.shape(image_id)
        return max(height, width), max(height, width)
