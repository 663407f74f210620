"""A plain PyTorch U-Net on DRIVE that owes nothing to hiresctl: the official TIFFs and GIFs read
with Pillow, random crops, a bare loop. The DRIVE benchmark (``benchmarks/drive.py``) runs it
beside hiresctl's segmentation methods with the same wall-clock budget, so a method that learns
less than this has a defect to find.

    python benchmarks/reference_drive.py --data-root DRIVE [--seconds 600] [--width 16] [--seed 0]

``DRIVE`` is the official layout (``training/{images,1st_manual,mask}``,
``test/{images,1st_manual,mask}``). Training images 21–36 train, 37–40 validate (the best
validation F1 of the checks made every ``--check-every`` seconds picks the weights), the 20 test
images are scored at full resolution against ``1st_manual``, per image then averaged, inside
the field-of-view mask and over the whole image. Prints one JSON line per check and a final one.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

TRAIN = range(21, 37)
VAL = range(37, 41)
TEST = range(1, 21)


def load_drive(root: Path, numbers: range, part: str) -> list[tuple[np.ndarray, ...]]:
    """[(image (3, h, w) float32 in [0, 1], vessels (h, w) uint8 0/1, fov (h, w) bool)]."""
    out = []
    for n in numbers:
        image = np.asarray(
            Image.open(root / part / "images" / f"{n:02d}_{part}.tif").convert("RGB")
        )
        vessels = np.asarray(Image.open(root / part / "1st_manual" / f"{n:02d}_manual1.gif"))
        fov = np.asarray(Image.open(root / part / "mask" / f"{n:02d}_{part}_mask.gif"))
        out.append(
            (
                np.moveaxis(image, -1, 0).astype(np.float32) / 255.0,
                (vessels > 0).astype(np.uint8),
                fov > 0,
            )
        )
    return out


def block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class PlainUNet(nn.Module):
    """U-Net: ``depth`` poolings, widths ``width``·2^i, bilinear upsampling, one output logit."""

    def __init__(self, width: int = 16, depth: int = 4) -> None:
        super().__init__()
        widths = [width * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([block(3, widths[0])])
        self.down.extend(block(widths[i], widths[i + 1]) for i in range(depth))
        self.up = nn.ModuleList(
            block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(depth))
        )
        self.out = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, layer in enumerate(self.down):
            x = layer(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        skips.pop()
        for layer in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = layer(torch.cat([x, skip], 1))
        return self.out(x)


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = logits.sigmoid()
    dice = (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
    return bce + 1 - dice


def predict(model: nn.Module, image: np.ndarray, multiple: int, tile: int = 0) -> np.ndarray:
    """(h, w) bool vessel prediction of the whole image (padded to a multiple, cropped back);
    with ``tile``, of each ``tile``² tile on its own (edge to edge, padded with zeros past the
    image, as a patch method predicts), to measure what seeing no context across tiles costs."""
    _, h, w = image.shape
    x = torch.from_numpy(image)[None]
    model.eval()
    if tile:
        x = F.pad(x, (0, (-w) % tile, 0, (-h) % tile))
        out = torch.zeros(x.shape[-2:], dtype=torch.bool)
        with torch.no_grad():
            for y in range(0, x.shape[-2], tile):
                for left in range(0, x.shape[-1], tile):
                    piece = x[..., y : y + tile, left : left + tile]
                    out[y : y + tile, left : left + tile] = model(piece)[0, 0] > 0
        return out[:h, :w].numpy()
    x = F.pad(x, (0, (-w) % multiple, 0, (-h) % multiple), mode="reflect")
    with torch.no_grad():
        return (model(x)[0, 0, :h, :w] > 0).numpy()


def metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """The seed paper's per-image metrics (undefined values are NaN here)."""
    tp = float((pred & truth).sum())
    fp = float((pred & ~truth).sum())
    fn = float((~pred & truth).sum())
    tn = float((~pred & ~truth).sum())

    def ratio(a: float, b: float) -> float:
        return a / b if b else math.nan

    tpr, tnr, fpr, fnr = (
        ratio(tp, tp + fn),
        ratio(tn, tn + fp),
        ratio(fp, fp + tn),
        ratio(fn, fn + tp),
    )
    return {
        "accuracy": ratio(tp + tn, tp + tn + fp + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "iou": ratio(tp, tp + fp + fn),
        "balanced_accuracy": (tpr + tnr) / 2,
        "plr": ratio(tpr, fpr),
        "nlr": ratio(fnr, tnr),
    }


def score(
    model: nn.Module, data: list[tuple[np.ndarray, ...]], multiple: int, tile: int = 0
) -> dict[str, dict[str, float]]:
    """Mean over images of each metric (undefined counted as 0), inside the FOV and whole image."""
    rows: dict[str, list[dict[str, float]]] = {"fov": [], "image": []}
    per_image_f1 = []
    for image, vessels, fov in data:
        pred, truth = predict(model, image, multiple, tile), vessels.astype(bool)
        rows["fov"].append(metrics(pred[fov], truth[fov]))
        rows["image"].append(metrics(pred, truth))
        per_image_f1.append(rows["fov"][-1]["f1"])
    out = {
        where: {k: float(np.nan_to_num([r[k] for r in found], nan=0.0).mean()) for k in found[0]}
        for where, found in rows.items()
    }
    out["per_image_f1_fov"] = per_image_f1  # type: ignore[assignment]
    return out


def train_reference(
    root: Path,
    seconds: float,
    width: int = 16,
    depth: int = 4,
    crop: int = 128,
    batch: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
    check_every: float = 60.0,
    log=print,
) -> dict:
    import psutil

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train, val, test = (
        load_drive(root, TRAIN, "training"),
        load_drive(root, VAL, "training"),
        load_drive(root, TEST, "test"),
    )
    model = PlainUNet(width, depth)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    multiple = 2**depth
    start = time.perf_counter()
    trained = 0.0
    steps, best, best_state, curve = 0, -1.0, None, []
    next_check = check_every
    while trained < seconds:
        tick = time.perf_counter()
        model.train()
        xs, ys = [], []
        for _ in range(batch):
            image, vessels, _fov = train[rng.integers(len(train))]
            _, h, w = image.shape
            y, x = rng.integers(h - crop + 1), rng.integers(w - crop + 1)
            xs.append(image[:, y : y + crop, x : x + crop])
            ys.append(vessels[None, y : y + crop, x : x + crop])
        logits = model(torch.from_numpy(np.stack(xs)))
        loss = loss_fn(logits, torch.from_numpy(np.stack(ys)).float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
        trained += time.perf_counter() - tick
        if trained >= next_check or trained >= seconds:
            next_check += check_every
            f1 = score(model, val, multiple)["fov"]["f1"]
            curve.append(
                {"seconds": round(trained, 1), "steps": steps, "loss": loss.item(), "val_f1": f1}
            )
            log(json.dumps(curve[-1]))
            if f1 > best:
                best = f1
                best_state = {k: v.clone() for k, v in model.state_dict().items()}
    assert best_state is not None
    model.load_state_dict(best_state)
    test_scores = score(model, test, multiple)
    tiled = score(model, test, multiple, tile=crop)["fov"]  # the same weights, tile by tile
    return {
        "method": "plain PyTorch U-Net",
        "width": width,
        "depth": depth,
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": steps,
        "crops_per_second": steps * batch / trained,
        "train_seconds": trained,
        "seconds": time.perf_counter() - start,
        "val_f1": best,
        "test": test_scores,
        "test_tiled_fov": tiled,
        "curve": curve,
        "peak_memory_gb": psutil.Process().memory_info().rss / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, required=True, help="the DRIVE folder")
    parser.add_argument("--seconds", type=float, default=600.0, help="training wall-clock budget")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-every", type=float, default=60.0)
    args = parser.parse_args()
    result = train_reference(
        args.data_root,
        args.seconds,
        args.width,
        args.depth,
        seed=args.seed,
        check_every=args.check_every,
    )
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}))


if __name__ == "__main__":
    main()
