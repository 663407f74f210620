"""Iterative Patch Selection (docs/methods.md §3): select M of N patches without gradient,
train on them."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from hiresctl.data import ReadRequest, ReadTag
from hiresctl.models import IPSClassifier
from hiresctl.train.classification.base import ClassificationMethod
from hiresctl.train.memory import PatchCost
from hiresctl.train.methods import Heatmap, Reads, StepContext, chunks
from hiresctl.train.registry import register_method


# patch 50 is the Megapixel MNIST setting: see its recipe
@register_method(
    "cls",
    "ips",
    defaults={
        "latent_dim": 128,
        "weight_decay": 0.1,
        "schedule": "cosine",
        "min_lr_ratio": 1e-3,
        "dropout": 0.1,
    },
)
class IPS(ClassificationMethod):
    """Iterative Patch Selection (§3): select M of N patches without gradient, train on them."""

    model: IPSClassifier

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
        return {
            "sampling": f"M={r.memory_size} of N={len(kept)} patches, I={r.iter_size}",
            "sees": "full resolution, selected patches",
        }

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
                [order[:memory], *chunks(order[memory:], step)] if len(order) > memory else [order]
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
        self, ctx: StepContext, reads: Reads, count: int, train: bool = False
    ) -> list[tuple[ReadRequest, torch.Tensor]]:
        """Per image, the M best-scoring patches, in index order, with their pixels: the
        memory buffer keeps the pixels of the patches it keeps (the M + I that ``memory``
        counts), so the pass with gradient reads nothing again from the store. Without
        gradient, the aggregator in eval mode; the encoder's BatchNorm in training as
        ``select_mode`` says (batch statistics by default), in evaluation on running ones."""
        model = self.model
        model.eval()
        if train and self.recipe.select_mode == "train":
            model.encoder.train()
        selected: list[tuple[ReadRequest, torch.Tensor]] = []
        memory_emb: torch.Tensor | None = None
        memory_idx: torch.Tensor | None = None
        memory_pixels: torch.Tensor | None = None
        for request, pixels in reads:
            indices = torch.as_tensor(request.indices, device=ctx.device)
            with torch.no_grad(), ctx.autocast():
                emb = model.encoder(pixels.to(ctx.device, non_blocking=True)).float()
                emb = model.with_positions(emb, indices, request.grid.cols)
                if memory_emb is None or memory_idx is None or memory_pixels is None:
                    memory_emb, memory_idx, memory_pixels = emb, indices, pixels
                else:
                    candidates = torch.cat([memory_emb, emb])
                    candidate_idx = torch.cat([memory_idx, indices])
                    scores = model.scores(candidates.unsqueeze(0))[0]
                    top = scores.topk(min(self.recipe.memory_size, len(scores))).indices
                    memory_emb, memory_idx = candidates[top], candidate_idx[top]
                    memory_pixels = _rows_of_two(memory_pixels, pixels, top.cpu())
            if request.tag.last:  # last read of this image: selection done
                assert memory_idx is not None and memory_pixels is not None
                kept_idx = memory_idx.cpu()
                order = kept_idx.argsort()
                chosen = kept_idx[order].numpy()
                kept = ReadRequest(
                    request.image_id,
                    "patches",
                    request.grid,
                    chosen,
                    ReadTag("selected", request.tag.image),
                )
                selected.append((kept, memory_pixels[order]))
                memory_emb = memory_idx = memory_pixels = None
        if len(selected) != count:
            raise RuntimeError(f"selection produced {len(selected)} of {count} images")
        return selected

    def _logits(
        self, ctx: StepContext, selected: list[tuple[ReadRequest, torch.Tensor]]
    ) -> torch.Tensor:
        model = self.model
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

    def forward(
        self, ctx: StepContext, image_ids: list[str], reads: Reads, train: bool
    ) -> torch.Tensor:
        selected = self._select(ctx, reads, len(image_ids), train)  # without gradient
        if train:
            self.model.train()
            ctx.patches_with_grad += sum(len(p) for _, p in selected)
        return self._logits(ctx, selected)

    def explain(
        self, ctx: StepContext, image_ids: list[str], reads: Reads
    ) -> tuple[torch.Tensor, list[Heatmap]]:
        """The M selected patches, scored by the aggregator's attention; unselected patches 0."""
        model = self.model
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
                maps.append(
                    Heatmap(
                        request.image_id,
                        scores,
                        float(grid.patch_size),
                        "selected patches (attention)",
                    )
                )
        return logits, maps


def _rows_of_two(first: torch.Tensor, second: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``torch.cat([first, second])[index]`` without the concatenation: only the picked rows
    are copied."""
    out = first.new_empty((len(index), *first.shape[1:]))
    inside = index < len(first)
    out[inside] = first[index[inside]]
    out[~inside] = second[index[~inside] - len(first)]
    return out


__all__ = ["IPS"]
