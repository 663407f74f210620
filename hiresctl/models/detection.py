"""FCOS on patches with stitched feature maps and a fused global patch (docs/methods.md §4).

Built from torchvision's FCOS parts: the anchor-point generator, the FCOS head (classification,
box regression, centerness), its target matching (center sampling radius 1.5, scale ranges per
level) and losses (focal α=0.25 γ=2, GIoU, centerness BCE, each normalised by the foreground
count), and its post-processing (score threshold, top-k per level, class-wise NMS 0.6). What
torchvision's ``FCOS.forward`` adds is left out on purpose: its transform resizes every image
to 800 px, and the point here is full resolution.

Per FPN level ``l`` every patch yields a map of ``patch_size / stride_l`` cells; the maps are
stitched into the image grid in row-major patch order, so cell (i, j) of patch (r, c) lands at
(r·h_l + i, c·w_l + j), which is where its anchor point lies in the image. With a global patch,
one conv per level fuses the stitched map with the global patch's map upsampled to the grid.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torch.utils.checkpoint import checkpoint_sequential
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.image_list import ImageList
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

from hiresctl.models.backbones import load_weights
from hiresctl.models.segmentation import upsample_region
from storage import UsageError

DET_BACKBONES = ("tiny", "resnet18", "resnet34", "resnet50")
DET_FUSIONS = ("add", "concat")


class FPNBackbone(nn.Module):
    """A CNN body with a feature pyramid: ``forward`` returns one map per level, finest first,
    all with ``out_channels`` channels; level ``l`` has stride ``strides[l]``."""

    def __init__(
        self,
        body: nn.Module,
        return_layers: dict[str, str],
        in_channels: list[int],
        out_channels: int,
        strides: tuple[int, ...],
        p6p7: bool,
    ) -> None:
        super().__init__()
        self.body = IntermediateLayerGetter(body, return_layers=return_layers)
        extra = LastLevelP6P7(out_channels, out_channels) if p6p7 else None
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=extra)
        self.out_channels = out_channels
        self.strides = strides

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(self.body(x))


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels // 4) or 1, channels)


def create_fpn_backbone(
    name: str, channels: int = 256, pretrained: str | Path | None = None
) -> FPNBackbone:
    """ResNet + FPN with P3–P7 (strides 8–128), as torchvision's FCOS builds it, or ``tiny``
    (five convs, P3–P5, strides 8–32) for tests and CPU demos. Normalisation is GroupNorm:
    patches of one image are few per step, and batch statistics of so few would drift between
    the no-gradient fill and the gradient steps. ``pretrained``: a local ResNet state dict."""
    if name not in DET_BACKBONES:
        raise UsageError(f"unknown detection backbone {name!r}; valid: {', '.join(DET_BACKBONES)}")
    if channels % 16:
        raise UsageError(f"latent_dim (FPN channels) must be a multiple of 16, got {channels}")
    if name == "tiny":

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
                _group_norm(cout),
                nn.ReLU(inplace=True),
            )

        body = nn.Sequential(
            OrderedDict(
                [
                    ("stem", block(3, 16)),
                    ("c2", block(16, 32)),
                    ("c3", block(32, 48)),
                    ("c4", block(48, 64)),
                    ("c5", block(64, 96)),
                ]
            )
        )
        layers = {"c3": "0", "c4": "1", "c5": "2"}
        return FPNBackbone(body, layers, [48, 64, 96], channels, (8, 16, 32), p6p7=False)
    net = getattr(torchvision.models, name)(weights=None, norm_layer=_group_norm)
    if pretrained:
        load_weights(net, pretrained)
    body = nn.Sequential(OrderedDict(list(net.named_children())[:-2]))  # drop avgpool and fc
    widths = [128, 256, 512] if name in ("resnet18", "resnet34") else [512, 1024, 2048]
    layers = {"layer2": "0", "layer3": "1", "layer4": "2"}
    return FPNBackbone(body, layers, widths, channels, (8, 16, 32, 64, 128), p6p7=True)


class RecomputedTower(nn.Sequential):
    """An FCOS head tower (conv, GroupNorm, ReLU per block) that, when training, keeps only
    each block's input and recomputes the block in backward: on a stitched 4096² canvas the
    towers' activations are the largest tensors of a step. Same parameters and state dict
    keys as the plain ``nn.Sequential``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        blocks = max(1, len(self) // 3)
        out: torch.Tensor = checkpoint_sequential(self, blocks, x, use_reentrant=False)
        return out


LOSS_TERMS = ("classification", "bbox_regression", "bbox_ctrness")
MATCH_CHUNK = 32768  # anchors matched at once: bounds the (anchors × boxes × 4) temporaries


def match_anchors(
    anchors: torch.Tensor,
    boxes: torch.Tensor,
    counts: list[int],
    radius: float,
    chunk: int = MATCH_CHUNK,
) -> torch.Tensor:
    """FCOS's assignment of true boxes to anchor points (torchvision's ``FCOS.compute_loss``
    rule, the same result): a point takes the smallest box whose centre is within ``radius``
    strides, that contains it and whose largest side distance suits the point's level; -1
    where none does. Computed ``chunk`` anchors at a time, so a 4096² canvas (350k points)
    with hundreds of boxes never holds the full pairwise tables."""
    total = anchors.shape[0]
    matched = torch.full((total,), -1, dtype=torch.int64, device=anchors.device)
    if boxes.numel() == 0:
        return matched
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    first, last = counts[0], total - counts[-1]
    for start in range(0, total, chunk):
        part = anchors[start : start + chunk]
        index = torch.arange(start, start + len(part), device=anchors.device)
        points = (part[:, :2] + part[:, 2:]) / 2
        sizes = part[:, 2] - part[:, 0]
        near = (points[:, None, :] - centres[None]).abs_().amax(2) < radius * sizes[:, None]
        x, y = points[:, 0:1], points[:, 1:2]
        sides = torch.stack([x - boxes[:, 0], y - boxes[:, 1], boxes[:, 2] - x, boxes[:, 3] - y], 2)
        near &= sides.amin(2) > 0
        lower = torch.where(index < first, torch.zeros_like(sizes), sizes * 4)
        upper = torch.where(index >= last, torch.full_like(sizes, float("inf")), sizes * 8)
        reach = sides.amax(2)
        near &= (reach > lower[:, None]) & (reach < upper[:, None])
        score = near.to(torch.float32) * (1e8 - areas[None, :])
        best, idx = score.max(1)
        idx[best < 1e-5] = -1
        matched[start : start + len(part)] = idx
    return matched


class PatchFCOS(nn.Module):
    """FCOS whose feature maps may come from stitched patches (and a fused global patch).

    ``encode`` runs backbone + FPN on pixels (a batch of patches, a global patch, a crop or a
    whole resized image); ``fuse`` adds the global patch through one conv per level; ``losses``
    and ``detect`` run the FCOS head on maps that cover a canvas of (height, width) pixels.
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        channels: int = 256,
        use_global: bool = False,
        fusion: str = "concat",
        head_convs: int = 4,
        pretrained: str | Path | None = None,
        max_detections: int = 100,
        recompute_head: bool = True,
    ) -> None:
        super().__init__()
        if fusion not in DET_FUSIONS:
            raise UsageError(f"fusion {fusion!r}: valid for detection: {', '.join(DET_FUSIONS)}")
        encoder = create_fpn_backbone(backbone, channels, pretrained)
        anchors = AnchorGenerator(
            tuple((s,) for s in encoder.strides), ((1.0,),) * len(encoder.strides)
        )
        head = FCOSHead(channels, 1, num_classes, num_convs=head_convs)
        if recompute_head:
            for branch in (head.classification_head, head.regression_head):
                branch.conv = RecomputedTower(*branch.conv)
        self.detector = FCOS(
            encoder,
            num_classes,
            anchor_generator=anchors,
            head=head,
            score_thresh=0.2,
            nms_thresh=0.6,
            detections_per_img=max_detections,
        )
        self.num_classes = num_classes
        self.channels = channels
        self.use_global = use_global
        self.fusion_mode = fusion
        self.fusion: nn.ModuleList | None = None
        if use_global:
            cin = 2 * channels if fusion == "concat" else channels
            convs = []
            for _ in encoder.strides:
                conv = nn.Conv2d(cin, channels, 3, padding=1)
                with torch.no_grad():  # start as the identity on the stitched map
                    conv.weight.zero_()
                    nn.init.dirac_(conv.weight[:, :channels])
                    nn.init.zeros_(conv.bias)  # type: ignore[arg-type]
                convs.append(conv)
            self.fusion = nn.ModuleList(convs)

    @property
    def encoder(self) -> FPNBackbone:
        backbone = self.detector.backbone
        assert isinstance(backbone, FPNBackbone)
        return backbone

    @property
    def strides(self) -> tuple[int, ...]:
        return self.encoder.strides

    @property
    def max_stride(self) -> int:
        return self.strides[-1]

    def encode(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, h, w) → one (B, C, h/s, w/s) map per level; h, w multiples of the top stride."""
        return list(self.encoder(pixels).values())

    def fuse(
        self,
        stitched: list[torch.Tensor],
        global_maps: list[torch.Tensor] | None,
        sides: list[int],
    ) -> list[torch.Tensor]:
        """G_l(stitched_l, up(global_l)) per level. ``global_maps[l]`` (B, C, p/s, p/s) covers
        the letterboxed square of ``sides[b]`` pixels from the image's top-left corner; it is
        resampled onto the stitched grid (zero past the square)."""
        if self.fusion is None or global_maps is None:
            return stitched
        return [
            self.fuse_level(level, stitched[level], global_maps[level], sides)
            for level in range(len(stitched))
        ]

    def fuse_level(
        self, level: int, maps: torch.Tensor, global_map: torch.Tensor, sides: list[int]
    ) -> torch.Tensor:
        """:meth:`fuse` of one level."""
        assert self.fusion is not None
        stride = self.strides[level]
        height, width = maps.shape[-2:]
        up = torch.cat(
            [
                upsample_region(
                    global_map[b : b + 1].float(),
                    sides[b] / stride,  # type: ignore[arg-type]
                    0,
                    0,
                    height,
                    width,
                )
                for b in range(len(sides))
            ]
        ).to(maps.dtype)
        conv = self.fusion[level]
        assert isinstance(conv, nn.Conv2d)
        if self.fusion_mode == "add":
            out: torch.Tensor = conv(maps + up)
            return out
        # the conv over [maps, up] as the sum of its two halves: the same output, and the
        # stitched maps' gradient is a tensor of its own, not a view into the concatenation's
        channels, weight, padding = maps.shape[1], conv.weight, (1, 1)
        return nn.functional.conv2d(
            maps, weight[:, :channels], conv.bias, padding=padding
        ) + nn.functional.conv2d(up, weight[:, channels:], padding=padding)

    def _anchors(self, features: list[torch.Tensor], height: int, width: int) -> list[torch.Tensor]:
        batch = features[0].shape[0]
        shape_only = features[0].new_zeros(()).expand(batch, 3, height, width)
        return self.detector.anchor_generator(
            ImageList(shape_only, [(height, width)] * batch), features
        )

    def losses(
        self, features: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """FCOS losses of maps covering a canvas of ``features[0]`` cells × stride pixels;
        ``targets[b]``: ``boxes`` (n, 4) x0, y0, x1, y1 canvas pixels, ``labels`` (n,)."""
        height = features[0].shape[-2] * self.strides[0]
        width = features[0].shape[-1] * self.strides[0]
        head = self.detector.head(features)
        anchors = self._anchors(features, height, width)
        counts = [f.shape[-2] * f.shape[-1] for f in features]
        radius = self.detector.center_sampling_radius
        matched = [
            match_anchors(a, t["boxes"], counts, radius)
            for a, t in zip(anchors, targets, strict=True)
        ]
        out: dict[str, torch.Tensor] = self.detector.head.compute_loss(
            targets, head, anchors, matched
        )
        return out

    def staged_losses(
        self,
        stitched: list[torch.Tensor],
        global_maps: list[torch.Tensor] | None,
        sides: list[int],
        targets: list[dict[str, torch.Tensor]],
        backward: Callable[[torch.Tensor], None],
        autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
        level_done: Callable[[int], None] | None = None,
    ) -> dict[str, float]:
        """``losses(fuse(stitched, global_maps, sides), targets)`` and its backward, one FPN level
        and one head branch at a time, so that only one level's branch holds activations.

        ``stitched`` and ``global_maps`` are leaves that require gradient: their ``.grad``
        receives the gradient, the fusion convs' and the head's parameters theirs, exactly as a
        backward of the whole loss would give them (the towers' GroupNorm normalises each level
        of each image on its own, and every loss term is a sum over anchor points divided by the
        foreground count of the whole canvas, counted here before any level runs). Each piece
        of the loss goes to ``backward``; a level's fusion conv runs without gradient before its
        branches and again with gradient after them. The forwards run inside ``autocast()``,
        the backwards outside it. ``level_done(l)`` runs once level ``l``'s gradients are in
        (the caller may take ``stitched[l].grad`` and free it). Returns the loss terms' values."""
        height = stitched[0].shape[-2] * self.strides[0]
        width = stitched[0].shape[-1] * self.strides[0]
        anchors = self._anchors(stitched, height, width)
        counts = [f.shape[-2] * f.shape[-1] for f in stitched]
        radius = self.detector.center_sampling_radius
        matched = [
            match_anchors(a, t["boxes"], counts, radius).split(counts)
            for a, t in zip(anchors, targets, strict=True)
        ]
        anchors_by_level = [a.split(counts) for a in anchors]
        foreground = max(1, sum(int((m >= 0).sum()) for per_image in matched for m in per_image))
        head = self.detector.head
        totals = dict.fromkeys(LOSS_TERMS, 0.0)
        fused = self.fusion is not None and global_maps is not None
        for level, maps in enumerate(stitched):
            if fused:
                assert global_maps is not None
                with torch.no_grad(), autocast():
                    x = self.fuse_level(level, maps, global_maps[level], sides)
                x.requires_grad_()
            else:
                x = maps
            level_matched = [m[level] for m in matched]
            level_anchors = [a[level] for a in anchors_by_level]
            # compute_loss divides by this level's foreground: scaled to the canvas's
            share = max(1, sum(int((m >= 0).sum()) for m in level_matched)) / foreground
            for terms in (LOSS_TERMS[:1], LOSS_TERMS[1:]):
                with autocast():
                    outputs = self._branch(x, terms == LOSS_TERMS[:1])
                    parts = head.compute_loss(targets, outputs, level_anchors, level_matched)
                    piece = sum((parts[t] for t in terms), torch.zeros((), device=x.device))
                    piece = piece * share
                backward(piece)
                for t in terms:
                    totals[t] += float(parts[t].detach()) * share
                del outputs, parts, piece
            if fused:
                assert global_maps is not None
                grad = x.grad
                del x
                with autocast():
                    again = self.fuse_level(level, maps, global_maps[level], sides)
                torch.autograd.backward(again, grad)
                del again, grad
            if level_done is not None:
                level_done(level)
        return totals

    def _branch(self, x: torch.Tensor, classification: bool) -> dict[str, torch.Tensor]:
        """One head branch on one level's maps; the other branch's outputs as zeros without
        gradient (compute_loss wants all three; only the branch's own terms are used)."""
        head = self.detector.head
        batch, _, height, width = x.shape
        points = height * width
        if classification:
            logits = head.classification_head([x])
            return {
                "cls_logits": logits,
                "bbox_regression": logits.new_zeros(batch, points, 4),
                "bbox_ctrness": logits.new_zeros(batch, points, 1),
            }
        regression, centerness = head.regression_head([x])
        return {
            "cls_logits": regression.new_zeros(batch, points, self.num_classes),
            "bbox_regression": regression,
            "bbox_ctrness": centerness,
        }

    def detect(
        self,
        features: list[torch.Tensor],
        image_sizes: list[tuple[int, int]],
        score_threshold: float = 0.05,
    ) -> list[dict[str, torch.Tensor]]:
        """Boxes (x0, y0, x1, y1 canvas pixels, clipped to each image's (height, width)),
        scores and labels; at most ``max_detections`` per image after class-wise NMS."""
        height = features[0].shape[-2] * self.strides[0]
        width = features[0].shape[-1] * self.strides[0]
        head = self.detector.head(features)
        anchors = self._anchors(features, height, width)
        counts = [f.shape[-2] * f.shape[-1] for f in features]
        split = {k: list(v.float().split(counts, dim=1)) for k, v in head.items()}
        per_level = [list(a.split(counts)) for a in anchors]
        previous = self.detector.score_thresh
        self.detector.score_thresh = score_threshold
        try:
            detections: list[dict[str, torch.Tensor]] = self.detector.postprocess_detections(
                split, per_level, image_sizes
            )
        finally:
            self.detector.score_thresh = previous
        return detections


__all__ = [
    "DET_BACKBONES",
    "DET_FUSIONS",
    "FPNBackbone",
    "PatchFCOS",
    "create_fpn_backbone",
    "match_anchors",
]
