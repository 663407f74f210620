"""Backbone registry: per-patch feature extractors that separate features from heads.

Every backbone maps (B, 3, h, w) to pooled features (B, ``num_features``) with
``forward_features``. Nothing is downloaded: ``pretrained`` is a local path to a state dict
(torchvision or timm layout; a ``module.`` prefix from DDP is stripped).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

from hiresctl.models.stages import ConvStack
from hiresctl.models.weights import read_state
from storage import UsageError

POOLS = ("avg", "max")


class Backbone(nn.Module):
    """A feature extractor with ``num_features`` pooled outputs.

    ``pool`` is how the spatial map becomes one vector: ``avg`` (what ImageNet networks were
    trained with) or ``max``, which keeps the answer of the strongest location and so does not
    dilute a small object by the empty area around it.
    """

    num_features: int

    def __init__(self, body: nn.Module, num_features: int, pool: str = "avg") -> None:
        super().__init__()
        if pool not in POOLS:
            raise UsageError(f"unknown pooling {pool!r}; valid: {', '.join(POOLS)}")
        self.body = body
        self.num_features = num_features
        self.pooling = pool
        self.pool: nn.Module = nn.AdaptiveMaxPool2d(1) if pool == "max" else nn.AdaptiveAvgPool2d(1)

    def forward_maps(self, x: torch.Tensor) -> torch.Tensor:
        """(B, F, h', w') spatial features."""
        return self.body(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, F) pooled features."""
        if isinstance(self.body, ConvStack):  # its last stage and the pool in one pass
            return self.body.forward_max(x, self.pool)
        return self.pool(self.body(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


def _conv_pool_stack(widths: tuple[int, ...], space_to_depth: bool = False) -> ConvStack:
    """3×3 conv → BatchNorm → ReLU per width, a 2×2 max-pool between consecutive ones.

    The first conv runs at full resolution, so strokes a few pixels wide survive it (a stride-2
    first layer halves a 10-pixel digit before anything has looked at it). With
    ``space_to_depth`` every 2×2 block of pixels first becomes 12 channels (nothing is lost),
    and the first conv and pool are replaced by one conv at half resolution on them: a quarter
    of the pixels, none of their information dropped, and no full-resolution activation to
    write, read and normalise (the full-resolution stage is memory-bound on a CPU). On a CPU
    each BatchNorm → ReLU → max-pool runs at the pooled resolution (``stages.py``: the same
    function, parameters and state dict)."""
    layers: list[nn.Module] = []
    cin = 3
    if space_to_depth:
        layers.append(nn.PixelUnshuffle(2))
        cin = 12
    for i, width in enumerate(widths):
        layers += [
            nn.Conv2d(cin, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        ]
        if i < len(widths) - 1 and not (space_to_depth and i == 0):
            layers.append(nn.MaxPool2d(2))
        cin = width
    return ConvStack(*layers)


def _tiny() -> Backbone:
    """Four 3×3 convs (16–64 wide, about 46k parameters) with max-pooling and a global max-pool:
    small enough that tests and the demo train on a CPU in seconds, able to find objects of a
    few pixels (an earlier all-stride-2, average-pooled version could not)."""
    return Backbone(_conv_pool_stack((16, 32, 48, 64)), 64, pool="max")


def _cnn5() -> Backbone:
    """Five 3×3 convs (32–128 wide, about 0.3M parameters) with max-pooling and a global
    max-pool: the plain CNN one writes first for small objects on a large canvas; the learning
    benchmark's bare-PyTorch reference is this network."""
    return Backbone(_conv_pool_stack((32, 64, 64, 128, 128)), 128, pool="max")


def _tiny_s2d() -> Backbone:
    """``tiny`` with a space-to-depth stem: each 2×2 pixel block becomes 12 channels and the
    16-wide first conv runs on those at half resolution, where ``tiny``'s ran at full
    resolution and was max-pooled; the same widths, depth and final resolution."""
    return Backbone(_conv_pool_stack((16, 32, 48, 64), space_to_depth=True), 64, pool="max")


def _cnn5_s2d() -> Backbone:
    """``cnn5`` with the space-to-depth stem of ``tiny-s2d``."""
    return Backbone(_conv_pool_stack((32, 64, 64, 128, 128), space_to_depth=True), 128, pool="max")


def _resnet(name: str) -> Callable[[], Backbone]:
    def build() -> Backbone:
        net = getattr(torchvision.models, name)(weights=None)
        body = nn.Sequential(*list(net.children())[:-2])  # drop avgpool and fc
        return Backbone(body, net.fc.in_features)

    return build


def _mobilenet_v2() -> Backbone:
    net = torchvision.models.mobilenet_v2(weights=None)
    return Backbone(net.features, net.last_channel)


BACKBONES: dict[str, Callable[[], Backbone]] = {
    "tiny": _tiny,
    "resnet18": _resnet("resnet18"),
    "resnet34": _resnet("resnet34"),
    "resnet50": _resnet("resnet50"),
    "mobilenet_v2": _mobilenet_v2,
    "cnn5": _cnn5,
    "tiny-s2d": _tiny_s2d,
    "cnn5-s2d": _cnn5_s2d,
}


def create_registered(name: str, pretrained: str | Path | None = None) -> Backbone:
    """Build a registered backbone, optionally loading local weights (``create_backbone``
    of ``encoders.py`` builds every name: these and the timm, Hub and short names)."""
    if name not in BACKBONES:
        raise UsageError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)}")
    backbone = BACKBONES[name]()
    if pretrained:
        load_pretrained(backbone, pretrained)
    return backbone


def load_pretrained(backbone: Backbone, path: str | Path) -> None:
    """Load a torchvision/timm-style state dict from ``path`` into ``backbone``'s body."""
    load_weights(backbone.body, path)


HEAD_KEYS = ("fc.", "classifier.")  # torchvision's ImageNet heads, never loaded for features


def load_weights(body: nn.Module, path: str | Path) -> None:
    """Load the tensors of a local state dict that fit ``body`` (by name, else by order)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: pretrained weights not found (give a local .pt/.pth file)")
    state = read_state(path)
    own = body.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    used = set(matched)
    if not matched:
        # torchvision names ("layer1.0.conv1.weight") differ from the headless body's
        # ("4.0.conv1.weight") but come in the same order with the same shapes.
        matched, used = _by_order(state, own)
    if not matched:
        raise UsageError(f"{path}: no tensor matches the backbone's layers (wrong architecture?)")
    # A partial load would train on a mix of pretrained and random layers without a word:
    # every tensor must come from the file, but for a classifier head the product drops ...
    missing = [
        k
        for k in own
        if k not in matched
        and not k.startswith(HEAD_KEYS)
        and not k.endswith("num_batches_tracked")
    ]
    # ... and every tensor of the file must find its place (resnet34's file holds all of
    # resnet18's names and shapes, and more); BatchNorm statistics may go unused (GroupNorm).
    unused = [
        k
        for k in state
        if k not in used
        and not k.startswith(HEAD_KEYS)
        and not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    ]
    if unused and not missing:
        raise UsageError(
            f"{path}: holds {len(unused)} tensors the network lacks (first {unused[0]!r}); "
            "weights of a deeper or other network?"
        )
    if missing:
        first = missing[0]
        found = f"{tuple(state[first].shape)} in the file" if first in state else "absent"
        raise UsageError(
            f"{path}: fits {len(own) - len(missing)} of {len(own)} tensors of the network "
            f"(first misfit {first!r}: {tuple(own[first].shape)} expected, {found}); weights of "
            "another architecture or width?"
        )
    body.load_state_dict(matched, strict=False)


def _by_order(
    state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Match a torchvision full-model state dict to the headless body by order and shape:
    the body's tensors, and the file's names they came from."""
    source = [(k, v) for k, v in state.items() if not k.startswith(HEAD_KEYS)]
    if len(source) < len(own):
        return {}, set()
    out, used = {}, set()
    for (own_key, own_value), (key, value) in zip(own.items(), source, strict=False):
        if own_value.shape != value.shape:
            return {}, set()
        out[own_key] = value
        used.add(key)
    return out, used
