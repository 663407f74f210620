"""A plain PyTorch reference that owes nothing to hiresctl: whole images from the TIFFs, a small
CNN, a bare training loop. The learning benchmark runs it beside hiresctl's methods on the same
images and splits, so a method that learns less than this has a defect to find, not a task
that is too hard.

    python benchmarks/reference.py SYNTH_DIR [--epochs 15] [--batch-size 16] [--seed 0]

``SYNTH_DIR`` is what ``hiresctl synth`` wrote (``images/`` and ``labels.csv``). Prints one JSON
line per epoch and a final one with the test accuracy of the best-validation epoch.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
import torch.nn.functional as F
from torch import nn


class PlainCNN(nn.Module):
    """Five 3×3 conv layers (32–128 wide) with max-pooling between them, a global max-pool and a
    Linear: the network anyone would write first for small objects on a large canvas. With
    ``space_to_depth`` each 2×2 pixel block first becomes four times the channels and the
    first pool is left out (the same resolutions after the first layer)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        widths: tuple[int, ...] = (32, 64, 64, 128, 128),
        space_to_depth: bool = False,
        pool: str = "max",
    ) -> None:
        super().__init__()
        if pool not in ("max", "avg"):
            raise SystemExit(f"pool: max or avg, not {pool!r}")
        self.pool = pool
        layers: list[nn.Module] = [nn.PixelUnshuffle(2)] if space_to_depth else []
        cin = in_channels * (4 if space_to_depth else 1)
        for i, width in enumerate(widths):
            layers += [
                nn.Conv2d(cin, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
            ]
            if i < len(widths) - 1 and not (space_to_depth and i == 0):
                layers.append(nn.MaxPool2d(2))
            cin = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        pooled = features.amax(dim=(2, 3)) if self.pool == "max" else features.mean(dim=(2, 3))
        return self.classifier(pooled)


def build_network(
    net: str,
    in_channels: int,
    num_classes: int,
    widths: tuple[int, ...],
    space_to_depth: bool,
    pool: str = "max",
) -> nn.Module:
    """``plain``: :class:`PlainCNN`; otherwise a torchvision classification network by name
    (``mobilenet_v2``, ``resnet18``…), random weights, as torchvision builds it (global
    average pooling, its own head)."""
    if net == "plain":
        return PlainCNN(in_channels, num_classes, widths, space_to_depth, pool)
    import torchvision

    network = getattr(torchvision.models, net)(weights=None, num_classes=num_classes)
    if in_channels == 1:  # grey images repeated to RGB, as hiresctl reads them
        return nn.Sequential(_Repeat(), network)
    if in_channels != 3:
        raise SystemExit(f"{net}: torchvision's networks take RGB images, not {in_channels} bands")
    return network


class _Repeat(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, 3, -1, -1)


def load_split(root: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{split: (images (n, c, h, w) float in [0, 1], labels (n,))} from a synth folder."""
    with open(root / "labels.csv", newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    classes = sorted({r["label"] for r in rows}, key=lambda v: (len(v), v))
    out: dict[str, tuple[list[np.ndarray], list[int]]] = {}
    for row in rows:
        image = tifffile.imread(root / "images" / row["source"])
        image = image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0)
        images, labels = out.setdefault(row["split"], ([], []))
        images.append(image)
        labels.append(classes.index(row["label"]))
    return {
        split: (torch.from_numpy(np.stack(ims)).float() / 255.0, torch.tensor(labels))
        for split, (ims, labels) in out.items()
    }


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), batch):
            correct += int((model(images[i : i + batch]).argmax(1) == labels[i : i + batch]).sum())
    return correct / max(1, len(images))


def train_reference(
    root: Path,
    epochs: int,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    widths: tuple[int, ...] = (32, 64, 64, 128, 128),
    log=print,
    space_to_depth: bool = False,
    net: str = "plain",
    pool: str = "max",
) -> dict:
    """Train :func:`build_network`'s network on ``root``'s train split; the test accuracy of the epoch with the
    best validation accuracy, the curve, seconds and peak RSS."""
    import psutil

    torch.manual_seed(seed)
    data = load_split(root)
    x, y = data["train"]
    num_classes = int(max(int(v[1].max()) for v in data.values())) + 1
    model = build_network(net, x.shape[1], num_classes, widths, space_to_depth, pool).to(
        memory_format=torch.channels_last
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    curve, best, start, seen = [], (-1.0, 0.0), time.perf_counter(), 0
    train_seconds = 0.0
    for epoch in range(epochs):
        model.train()
        epoch_start = time.perf_counter()
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), batch_size):
            idx = order[i : i + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        train_seconds += time.perf_counter() - epoch_start
        seen += len(x)
        val = accuracy(model, *data["val"], batch_size)
        test = accuracy(model, *data["test"], batch_size)
        curve.append({"epoch": epoch + 1, "val_accuracy": val, "test_accuracy": test})
        log(json.dumps(curve[-1]))
        if val > best[0]:
            best = (val, test)
    return {
        "method": "plain reference",
        "val_accuracy": best[0],
        "test_accuracy": best[1],
        "curve": curve,
        "seconds": time.perf_counter() - start,
        "images_per_second": seen / train_seconds if train_seconds else 0.0,
        "peak_memory_gb": psutil.Process().memory_info().rss / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--net", default="plain", help="plain, or a torchvision network's name")
    parser.add_argument("--widths", default="32,64,64,128,128", help="plain: conv widths")
    parser.add_argument("--space-to-depth", action="store_true", help="plain: a 2×2 s2d stem")
    parser.add_argument("--pool", default="max", help="plain: global max or avg pooling")
    args = parser.parse_args()
    result = train_reference(
        args.root,
        args.epochs,
        args.batch_size,
        seed=args.seed,
        widths=tuple(int(w) for w in args.widths.split(",")),
        space_to_depth=args.space_to_depth,
        net=args.net,
        pool=args.pool,
    )
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}))


if __name__ == "__main__":
    main()
