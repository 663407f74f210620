"""PatchGD parts: the patch encoder, the latent head and global-patch fusion (docs/methods.md §1–2)."""

from __future__ import annotations

import torch
from torch import nn

from hiresctl.models.backbones import Backbone
from storage import UsageError

FUSIONS = ("add", "concat")
HEAD_POOLS = ("max", "avg", "avgmax")


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(factor)  # type: ignore[attr-defined]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (factor,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return grad * factor, None


def scale_gradient(x: torch.Tensor, factor: float | torch.Tensor) -> torch.Tensor:
    """``x`` unchanged, with the gradient that flows back through it multiplied by ``factor``
    (a number, or a tensor broadcast against ``x``, e.g. one factor per image)."""
    factor = torch.as_tensor(factor, dtype=x.dtype, device=x.device)
    scaled: torch.Tensor = _ScaleGradient.apply(x, factor)
    return scaled


class PatchEncoder(nn.Module):
    """θ1: backbone features of a patch, projected to ``latent_dim`` (D) by a Linear, or kept as
    they are (``latent_dim=None``: D is the backbone's width).

    Kept as they are, each latent channel is one backbone channel's strongest response in the
    patch, so a maximum over the grid is exactly the whole-image network's global maximum. A
    projection mixes channels before that maximum, and on small-object tasks a head over
    projected cells learns several times slower (docs/methods.md §1)."""

    def __init__(self, backbone: Backbone, latent_dim: int | None = 256) -> None:
        super().__init__()
        self.backbone = backbone
        self.project: nn.Module = (
            nn.Identity() if latent_dim is None else nn.Linear(backbone.num_features, latent_dim)
        )
        self.latent_dim = backbone.num_features if latent_dim is None else latent_dim

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.project(self.backbone.forward_features(patches))


class GridBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that normalises with its running statistics when a training batch has a single
    value per channel (one image whose grid has shrunk to 1×1), where batch statistics do not
    exist. Large images are often trained one per batch, so this case is ordinary here."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] * x.shape[2] * x.shape[3] == 1:
            return nn.functional.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        return super().forward(x)


def _head_block(cin: int, cout: int, stride: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1),
        nn.ReLU(inplace=True),
        GridBatchNorm2d(cout),
        nn.Dropout2d(dropout),
    )


class GlobalPool(nn.Module):
    """(B, C, h, w) → (B, C) by ``max``, ``avg``, or both side by side (``avgmax``, 2C)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        if mode not in HEAD_POOLS:
            raise UsageError(f"unknown head pooling {mode!r}; valid: {', '.join(HEAD_POOLS)}")
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "max":
            return x.amax(dim=(2, 3))
        if self.mode == "avg":
            return x.mean(dim=(2, 3))
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


class PatchGDHead(nn.Module):
    """θ2 over the latent grid; any grid size (global pooling, never a flatten).

    ``context`` stride-1 blocks [Conv3×3 → ReLU → BN → Dropout2d] first (each cell sees its
    neighbours), then for ``pool="avg"`` (the PatchGD paper's head, with ``context=1``) three
    more blocks at stride 2 and the grid's average; for ``max`` the grid's maximum (one cell can
    decide, as in multiple-instance learning), for ``avgmax`` average and maximum side by side;
    then dropout and a Linear. Where the class hangs on a few small objects, the averaging heads
    blend the cells that hold them with all the others (docs/methods.md §1).
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        width: int = 256,
        dropout: float = 0.2,
        pool: str = "max",
        context: int = 0,
    ) -> None:
        super().__init__()
        strided = 3 if pool == "avg" else 0
        dims = [in_dim] + [width] * (context + strided)
        strides = [1] * context + [2] * strided
        self.blocks = nn.Sequential(
            *(_head_block(dims[i], dims[i + 1], s, dropout) for i, s in enumerate(strides))
        )
        self.pool = GlobalPool(pool)
        features = dims[-1] * (2 if pool == "avgmax" else 1)
        self.classifier = nn.Linear(features, num_classes)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.blocks(latent)))


class PatchGDClassifier(nn.Module):
    """PatchGD (``use_global=False``) or PatchGD + global patch (the default method).

    ``classify(latent, global_feature)`` fuses the same way in training and evaluation:
    ``add`` broadcasts g over the grid (``latent + g[:, :, None, None]``), ``concat`` appends
    it as D extra channels.
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        latent_dim: int | None = None,
        head_width: int = 256,
        dropout: float = 0.2,
        use_global: bool = True,
        fusion: str = "add",
        head_pool: str = "max",
        head_context: int = 0,
    ) -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise UsageError(f"unknown fusion {fusion!r}; valid: {', '.join(FUSIONS)}")
        self.encoder = PatchEncoder(backbone, latent_dim)
        self.use_global = use_global
        self.fusion = fusion
        dim = self.encoder.latent_dim
        in_dim = 2 * dim if use_global and fusion == "concat" else dim
        self.head = PatchGDHead(in_dim, num_classes, head_width, dropout, head_pool, head_context)

    @property
    def latent_dim(self) -> int:
        return self.encoder.latent_dim

    def fuse(self, latent: torch.Tensor, global_feature: torch.Tensor | None) -> torch.Tensor:
        if not self.use_global:
            return latent
        if global_feature is None:
            raise ValueError("this model fuses a global patch; pass its feature")
        grid = global_feature[:, :, None, None].expand(-1, -1, *latent.shape[-2:])
        if self.fusion == "add":
            return latent + grid
        return torch.cat([latent, grid], dim=1)

    def classify(
        self, latent: torch.Tensor, global_feature: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.head(self.fuse(latent, global_feature))


class ImageClassifier(nn.Module):
    """The baselines' model: one image (downsampled or full) → backbone → Linear."""

    def __init__(self, backbone: Backbone, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(backbone.num_features, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone.forward_features(images))
