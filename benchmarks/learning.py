"""Does PatchGD + global patch beat the downsampled baseline where detail matters? (side by side)

    python benchmarks/learning.py [--side 512] [--count 200] [--epochs 10]

Data: `hiresctl synth fine-detail`: noise images in which class 1 holds a 32² one-pixel
checkerboard (0/180) and class 0 a flat 32² square of the same mean (90), at a random place.
Downsampling averages the checkerboard into the flat square, so the classes differ only at
full resolution. Every method
trains with the same tiny CNN, patch size, epochs and seed on the same store; the test split
is evaluated with `hiresctl eval`. Results replace the "learning" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from training import publish  # noqa: E402

METHODS = ("patchgd-global", "patchgd", "ips", "downsample")
EXTRA = {"ips": ["--set", "memory_size=8", "--set", "iter_size=16", "--set", "heads=4"]}


def make_dataset(root: Path, side: int, count: int, seed: int = 3) -> Path:
    store = root / "ds.zarr"
    if not store.exists():
        hiresctl = [sys.executable, "-m", "hiresctl"]
        synth = [*hiresctl, "synth", "fine-detail", str(root / "synth"), "--count", str(count)]
        subprocess.run(
            [*synth, "--size", str(side), "--seed", str(seed)], check=True, capture_output=True
        )
        labels = str(root / "synth" / "labels.csv")
        tile = [
            *hiresctl,
            "tile",
            str(root / "synth" / "images"),
            "--labels",
            labels,
            "--out",
            str(store),
        ]
        subprocess.run(tile, check=True, capture_output=True)
    return store


def train_and_evaluate(store: Path, out: Path, options: list[str]) -> tuple[dict, dict, float]:
    """``hiresctl train`` into a fresh ``out`` then ``hiresctl eval`` on the test split:
    (eval report, training summary, training seconds)."""
    subprocess.run(["rm", "-rf", str(out)], check=True)
    start = time.perf_counter()
    train = subprocess.run(
        [sys.executable, "-m", "hiresctl", "train", "--data", str(store), "--out", str(out), "--json", *options],
        capture_output=True, text=True,
    )  # fmt: skip
    if train.returncode:
        raise RuntimeError(train.stderr[-2000:])
    seconds = time.perf_counter() - start
    summary = json.loads(train.stdout.strip().splitlines()[-1])
    evaluated = subprocess.run(
        [sys.executable, "-m", "hiresctl", "eval", str(out), "--data", str(store), "--split", "test", "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(evaluated.stdout), summary, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--patch-size", type=int, default=64)
    args = parser.parse_args()
    root = HERE / "data" / f"learning_{args.side}_{args.count}"
    store = make_dataset(root, args.side, args.count)
    common = [
        "--set", "backbone=tiny", "--set", f"patch_size={args.patch_size}", "--set", "latent_dim=64",
        "--set", "head_width=64", "--set", f"epochs={args.epochs}", "--device", "cpu",
    ]  # fmt: skip
    rows = []
    for method in METHODS:
        report, summary, seconds = train_and_evaluate(
            store, root / f"run-{method}", ["--method", method, *common, *EXTRA.get(method, [])]
        )
        rows.append((method, report, summary, seconds))
        print(method, report["metrics"], flush=True)
    lines = [
        f"## Learning where detail matters, {time.strftime('%Y-%m-%d')}, CPU",
        "",
        f"Command: `python benchmarks/learning.py --side {args.side} --count {args.count} --epochs {args.epochs}`: "
        f"`hiresctl synth fine-detail`, {args.count} images of {args.side}² (70/15/15% train/val/test); class 1 holds a 32² one-pixel "
        "checkerboard, class 0 a flat square of the same mean, so downsampling erases the difference. "
        f"Same tiny CNN, patch {args.patch_size}, {args.epochs} epochs, seed 0 for every method (IPS keeps "
        "M = 8 of the 64 patches, scoring I = 16 at a time, 4 heads); test split, best-validation checkpoint.",
        "",
        "| method | test accuracy | test AUC | training peak RSS GB | eval peak RSS GB | train images/s | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, report, summary, seconds in rows:
        m = report["metrics"]
        lines.append(
            f"| {method} | {m['accuracy']:.3f} | {m.get('auc', float('nan')):.3f} | {summary['peak_memory_gb']:.2f} | "
            f"{report['peak_memory_gb']:.2f} | {summary['images_per_second']:.2f} | {seconds:.0f} |"
        )
    publish(lines, "learning")


if __name__ == "__main__":
    main()
