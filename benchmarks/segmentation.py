"""Segmentation methods side by side: quality at full resolution, peak memory, throughput.

    python benchmarks/segmentation.py [--side 512] [--count 30] [--epochs 10] [--patch-size 128]

Data: `hiresctl synth seg-vessels` (DRIVE-like: branching vessels tapering to one pixel over a
textured fundus), tiled with its masks. Every method trains the same U-Net (`unet-tiny` on CPU),
patch size, epochs, lr and seed on the same store; `hiresctl eval` scores the test split at full
resolution against the full-resolution masks (per-image metrics averaged over images, docs/methods.md
§8). Results replace the "segmentation" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import publish, synth_store  # noqa: E402
from learning import sets, train_eval  # noqa: E402

METHODS = ("patchgd-global", "patchgd", "downsample", "full")


def make_dataset(root: Path, side: int, count: int, seed: int = 5) -> Path:
    masks = ["--masks", "{synth}/masks", "--mask-classes", "{synth}/classes.csv", "--chunk", "64"]
    return synth_store(root, "seg-vessels", count, side, seed, [], masks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--count", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--patch-size", type=int, default=128)
    parser.add_argument("--backbone", default="unet-tiny")
    args = parser.parse_args()
    root = HERE / "data" / f"segmentation_{args.side}_{args.count}"
    store = make_dataset(root, args.side, args.count)
    common = ["--task", "seg", "--device", "cpu"]
    common += sets(backbone=args.backbone, patch_size=args.patch_size, epochs=args.epochs)
    common += sets(lr="3e-3", batch_size=2, accumulation_steps=1, precision="fp32")
    rows = []
    for method in METHODS:
        report, summary, seconds = train_eval(
            store, root / f"run-{method}", ["--method", method, *common]
        )
        rows.append((method, report, summary, seconds))
        print(method, report["metrics"], flush=True)
    lines = [
        f"## Segmentation, {time.strftime('%Y-%m-%d')}, CPU (2 cores)",
        "",
        f"Command: `python benchmarks/segmentation.py --side {args.side} --count {args.count} "
        f"--epochs {args.epochs} --patch-size {args.patch_size}`: `hiresctl synth seg-vessels`, "
        f"{args.count} images of {args.side}² (70/15/15% train/val/test), vessels tapering to 1 px. "
        f"Same `{args.backbone}` θ1 (8 output channels), patch {args.patch_size}, {args.epochs} epochs, "
        "batch 2, lr 3e-3, seed 0 for every method; patchgd-global and patchgd run J=4 inner steps of "
        f"k=4 patches; downsample sees the image resized to {args.patch_size}². Test split, "
        "best-validation checkpoint, metrics per image at full resolution then averaged "
        "(undefined values count as 0).",
        "",
        "| method | F1 | IoU | accuracy | balanced acc. | PLR | NLR | train peak RSS GB | "
        "eval peak RSS GB | train images/s | eval images/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, report, summary, _seconds in rows:
        m = report["metrics"]
        lines.append(
            f"| {method} | {m['f1']:.3f} | {m['iou']:.3f} | {m['accuracy']:.4f} | "
            f"{m['balanced_accuracy']:.3f} | {m['plr']:.0f} | {m['nlr']:.3f} | "
            f"{summary['peak_memory_gb']:.2f} | {report['peak_memory_gb']:.2f} | "
            f"{summary['images_per_second']:.2f} | {report['images_per_second']:.2f} |"
        )
    publish(lines, "segmentation")


if __name__ == "__main__":
    main()
