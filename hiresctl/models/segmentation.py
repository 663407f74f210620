"""Segmentation models (docs/methods.md §5): θ1 networks with an 8-channel output, the 1×1 θ2 fusion,
and the global branch's upsampling, region by region.

θ1 maps (B, 3, p, p) to (B, ``latent_dim``, p, p) at full resolution: a U-Net (``unet``,
``unet-small``, ``unet-tiny``) or torchvision's DeepLabv3 (``deeplabv3-resnet50``,
``deeplabv3-mobilenet``) whose last layer is a 1×1 conv to ``latent_dim`` channels. θ2 is one
1×1 conv over [patch latent, upsampled global latent]; being 1×1, the output at a pixel depends
only on that pixel's two latents, so whole-image prediction can run tile by tile and equal what
training computes over the stitched image.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from hiresctl.models.backbones import load_weights
from storage import UsageError


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net (Ronneberger et al.) with same-padding convolutions, BatchNorm and bilinear
    upsampling; any input size (odd sizes are padded inside and cropped back)."""

    def __init__(self, out_channels: int = 8, width: int = 32, depth: int = 4) -> None:
        super().__init__()
        widths = [width * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([_conv_block(3, widths[0])])
        self.down.extend(_conv_block(widths[i], widths[i + 1]) for i in range(depth))
        self.up = nn.ModuleList(
            _conv_block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(depth))
        )
        self.out = nn.Conv2d(widths[0], out_channels, 1)
        self.depth = depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        multiple = 2**self.depth
        pad_h, pad_w = (-height) % multiple, (-width) % multiple
        if pad_h or pad_w:
            x = F.pad(
                x, (0, pad_w, 0, pad_h), mode="reflect" if min(height, width) > 1 else "constant"
            )
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        skips.pop()
        for block in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], 1))
        return self.out(x)[..., :height, :width]


class DeepLab(nn.Module):
    """torchvision DeepLabv3 with its classifier's last layer a 1×1 conv to ``out_channels``;
    the output is upsampled to the input size (as torchvision does)."""

    def __init__(self, out_channels: int, backbone: str) -> None:
        super().__init__()
        seg = torchvision.models.segmentation
        build = {"resnet50": seg.deeplabv3_resnet50, "mobilenet": seg.deeplabv3_mobilenet_v3_large}
        self.net = build[backbone](
            weights=None, weights_backbone=None, num_classes=out_channels, aux_loss=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)["out"]


SEG_NETWORKS: dict[str, Callable[[int], nn.Module]] = {
    "unet": lambda out: UNet(out, width=32, depth=4),
    "unet-16": lambda out: UNet(out, width=16, depth=4),
    "unet-small": lambda out: UNet(out, width=16, depth=3),
    "unet-tiny": lambda out: UNet(out, width=8, depth=2),
    "deeplabv3-resnet50": lambda out: DeepLab(out, "resnet50"),
    "deeplabv3-mobilenet": lambda out: DeepLab(out, "mobilenet"),
}


def create_seg_network(
    name: str, out_channels: int, pretrained: str | Path | None = None
) -> nn.Module:
    """θ1: a registered segmentation network ending in ``out_channels`` maps at input size.

    ``pretrained`` is a local state dict: a whole network saved by hiresctl, or (DeepLab)
    ImageNet weights of its ResNet/MobileNet backbone, matched by name or order.
    """
    if name not in SEG_NETWORKS:
        raise UsageError(f"unknown segmentation network {name!r}; valid: {', '.join(SEG_NETWORKS)}")
    net = SEG_NETWORKS[name](out_channels)
    if pretrained:
        target = net.net.backbone if isinstance(net, DeepLab) else net
        load_weights(target, pretrained)
    return net


def upsample_region(
    maps: torch.Tensor, side: int, y: int, x: int, height: int, width: int
) -> torch.Tensor:
    """Rows [y, y+height) × cols [x, x+width) of ``maps`` (B, C, h, w) bilinearly resized to
    (side, side), computed without materialising the (side, side) map. Equal to
    ``F.interpolate(maps, (side, side), mode="bilinear", align_corners=False)[..., y:, x:]``
    inside the square; zero outside it (the grid's padding beyond the letterboxed square, and
    above or left of it where a training grid is offset)."""
    batch, _c, h, w = maps.shape
    device = maps.device
    ys = (torch.arange(y, y + height, device=device, dtype=torch.float32) + 0.5) * (h / side) - 0.5
    xs = (torch.arange(x, x + width, device=device, dtype=torch.float32) + 0.5) * (w / side) - 0.5
    # normalised coordinates for grid_sample (align_corners=False): pixel i ↔ (2i + 1) / n - 1
    gy = ((ys.clamp(0, h - 1) + 0.5) * 2 / h - 1).view(height, 1).expand(height, width)
    gx = ((xs.clamp(0, w - 1) + 0.5) * 2 / w - 1).view(1, width).expand(height, width)
    grid = torch.stack([gx, gy], -1).unsqueeze(0).expand(batch, height, width, 2)
    out = F.grid_sample(maps, grid.to(maps.dtype), mode="bilinear", align_corners=False)
    rows = torch.arange(y, y + height, device=device)
    cols = torch.arange(x, x + width, device=device)
    inside_y = ((rows >= 0) & (rows < side)).view(1, 1, height, 1)
    inside_x = ((cols >= 0) & (cols < side)).view(1, 1, 1, width)
    return out * (inside_y & inside_x).to(out.dtype)


class PatchSegmenter(nn.Module):
    """θ1 (``encoder``) on patches and on the global patch, θ2 (``head``) a 1×1 conv over the
    concatenation of the stitched patch latent and the upsampled global latent (or the patch
    latent alone without ``use_global``). ``outputs`` is 1 for binary tasks (a logit per pixel)
    or the number of classes."""

    def __init__(
        self, encoder: nn.Module, outputs: int, latent_dim: int = 8, use_global: bool = True
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.latent_dim = latent_dim
        self.use_global = use_global
        self.outputs = outputs
        self.head = nn.Conv2d(latent_dim * (2 if use_global else 1), outputs, 1)

    def segment(self, latent: torch.Tensor, global_latent: torch.Tensor | None) -> torch.Tensor:
        """(B, outputs, h, w) logits from the latent and the global latent of the same region."""
        if self.use_global:
            assert global_latent is not None
            latent = torch.cat([latent, global_latent.to(latent.dtype)], 1)
        return self.head(latent)

    # θ2 is linear and 1×1, and bilinear upsampling is linear per channel, so the head of the
    # concatenation splits into a patch part and a global part, and the global part may be
    # applied before upsampling: W·[z, up(g)] + b = W_z·z + up(W_g·g) + b. Training uses the
    # split to upsample `outputs` channels instead of `latent_dim` over the whole canvas.

    def local_logits(self, latent: torch.Tensor) -> torch.Tensor:
        """W_z·z: the patch latent's part of the logits, without the bias."""
        weight = self.head.weight[:, : self.latent_dim]
        return torch.nn.functional.conv2d(latent, weight.to(latent.dtype))

    def global_logits(self, global_latent: torch.Tensor) -> torch.Tensor:
        """W_g·g at the global patch's resolution (upsample it to place it), without the bias."""
        weight = self.head.weight[:, self.latent_dim :]
        return torch.nn.functional.conv2d(global_latent, weight.to(global_latent.dtype))

    def bias(self) -> torch.Tensor:
        """The head's bias as (1, outputs, 1, 1)."""
        bias = self.head.bias
        assert bias is not None
        return bias.view(1, -1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Whole-image use (downsample/full baselines): θ2(θ1(x)) without a global branch."""
        return self.segment(self.encoder(x), None)


__all__ = [
    "SEG_NETWORKS",
    "DeepLab",
    "PatchSegmenter",
    "UNet",
    "create_seg_network",
    "upsample_region",
]
