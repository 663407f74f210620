"""Detection methods side by side: COCO AP on small objects, peak memory, throughput.

    python benchmarks/detection.py [--side 512] [--count 40] [--objects 12] [--epochs 10]
                                   [--patch-size 128] [--scale-side 4096]
                                   [--skip-quality] [--skip-scale]
                                   [--growth-sides 1024,2048,4096,8192]

Part 1 (quality): `hiresctl synth det-mosaic` (digits and shapes of 12–128 px over photo
textures, 13 classes), tiled with its COCO boxes. patchgd-global, patchgd, downsample and sliced
train the same FCOS (`tiny` backbone + FPN 64 on CPU), patch/window size, epochs, lr and seed;
downsample sees the image resized to one patch side, which is what fits the same memory.
`hiresctl eval` scores the test split with pycocotools.

Part 2 (scale): one epoch on two `--scale-side`² images (4096² by default) with the shipped
`recipes/det-mosaic-*.yaml` (ResNet-18 + FPN 128, patch 512): training and evaluation peak
memory and images/s of each method. Results replace the "detection" and "detection-scale"
sections of BENCHMARKS.md.

Part 3 (growth, D1; only with `--growth-sides`): the training peak of patchgd-global against
sliced on one image of each side (`det-mosaic`, same recipes), one inner step each (the peak of
an inner step is the same for every step of an image); replaces the "detection-growth" section.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import all_in_training, hiresctl, publish, synth_store  # noqa: E402
from learning import sets, train_eval, train_run  # noqa: E402

METHODS = ("patchgd-global", "patchgd", "downsample", "sliced")


def make_dataset(root: Path, side: int, count: int, objects: int | None, seed: int = 7) -> Path:
    extra = ["--objects", str(objects)] if objects else []
    coco = ["--coco", "{synth}/annotations.json", "--chunk", "128"]
    return synth_store(root, "det-mosaic", count, side, seed, extra, coco)


def _value(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def quality(args: argparse.Namespace) -> list[str]:
    root = HERE / "data" / f"detection_{args.side}_{args.count}_{args.objects}"
    store = make_dataset(root, args.side, args.count, args.objects)
    common = ["--task", "det", "--device", "cpu"]
    common += sets(backbone="tiny", latent_dim=64, head_convs=2, patch_size=args.patch_size)
    common += sets(epochs=args.epochs, lr="3e-3", batch_size=2, accumulation_steps=1)
    common += sets(max_detections=100, precision="fp32")
    lines = [
        f"Command: `python benchmarks/detection.py --side {args.side} --count {args.count} "
        f"--objects {args.objects} --epochs {args.epochs} --patch-size {args.patch_size}`: "
        f"`hiresctl synth det-mosaic`, {args.count} images of {args.side}² with {args.objects} "
        "objects each (12–128 px, 13 classes; 70/15/15% train/val/test). Same FCOS (`tiny` "
        f"backbone, FPN 64, 2-conv heads), patch {args.patch_size}, {args.epochs} epochs, batch 2, "
        "lr 3e-3, seed 0; patchgd(-global) update k = 25% of the patches per inner step; "
        f"downsample sees the image resized to {args.patch_size}²; sliced trains on "
        f"{args.patch_size}² windows (20% overlap) and merges every window's boxes by NMS. Test "
        "split, best-validation checkpoint, COCO metrics by pycocotools (APs: area < 32²).",
        "",
        "| method | AP | AP50 | AP75 | APs | APm | APl | train peak RSS GB | eval peak RSS GB "
        "| train images/s | eval images/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        report, summary, _ = train_eval(
            store, root / f"run-{method}", ["--method", method, *common]
        )
        m = report["metrics"]
        print(method, m, flush=True)
        lines.append(
            f"| {method} | {_value(m['ap'])} | {_value(m['ap50'])} | {_value(m['ap75'])} | "
            f"{_value(m['ap_small'])} | {_value(m['ap_medium'])} | {_value(m['ap_large'])} | "
            f"{summary['peak_memory_gb']:.2f} | {report['peak_memory_gb']:.2f} | "
            f"{summary['images_per_second']:.2f} | {report['images_per_second']:.2f} |"
        )
    return lines


def scale(args: argparse.Namespace) -> list[str]:
    root = HERE / "data" / f"detection_scale_{args.scale_side}"
    store = make_dataset(root, args.scale_side, 3, None)
    lines = [
        f"Scale: one epoch on the training images of `hiresctl synth det-mosaic --count 3 --size "
        f"{args.scale_side}` (~150 objects per 4096²) with `recipes/det-mosaic-<method>.yaml` "
        "(ResNet-18 + FPN 128, 4-conv heads, patch 512; patchgd(-global): k = 16 of 64 patches per "
        "inner step, J = 4; downsample: 1024²; sliced: 16 windows of 512² per step, 20% overlap), "
        "then evaluation of the test image. Peak memory is the process's peak RSS (CPU).",
        "",
        "| method | train peak RSS GB | train images/s | eval peak RSS GB | eval images/s |",
        "|---|---|---|---|---|",
    ]
    for method in METHODS:
        recipe = HERE.parent / "recipes" / f"det-mosaic-{method}.yaml"
        options = ["--task", "det", "--recipe", str(recipe), "--device", "cpu"]
        options += sets(epochs=1, val_split="none", precision="fp32")
        report, summary, _ = train_eval(store, root / f"run-{method}", options)
        print(method, summary["peak_memory_gb"], summary["images_per_second"], flush=True)
        lines.append(
            f"| {method} | {summary['peak_memory_gb']:.2f} | {summary['images_per_second']:.3f} | "
            f"{report['peak_memory_gb']:.2f} | {report['images_per_second']:.3f} |"
        )
    return lines


GROWN = ("patchgd-global", "sliced")


def growth(sides: list[int]) -> list[str]:
    peaks: dict[str, list[float]] = {m: [] for m in GROWN}
    seconds: dict[str, list[float]] = {m: [] for m in GROWN}
    for side in sides:
        root = HERE / "data" / f"detection_growth_{side}"
        store = root / "ds.zarr"
        if not (store / "zarr.json").exists():
            synth = root / "synth"
            hiresctl(
                "synth",
                "det-mosaic",
                str(synth),
                "--count",
                "1",
                "--size",
                str(side),
                "--seed",
                "11",
            )
            hiresctl(
                "tile",
                str(synth / "images"),
                "--labels",
                str(all_in_training(synth)),
                "--coco",
                str(synth / "annotations.json"),
                "--chunk",
                "256",
                "--out",
                str(store),
            )
        for method in GROWN:
            recipe = HERE.parent / "recipes" / f"det-mosaic-{method}.yaml"
            options = ["--task", "det", "--recipe", str(recipe), "--device", "cpu"]
            options += sets(epochs=1, val_split="none", inner_steps=1, precision="fp32")
            summary, took = train_run(store, root / f"run-{method}", options)
            peaks[method].append(summary["peak_memory_gb"])
            seconds[method].append(took)
            print(side, method, summary["peak_memory_gb"], flush=True)
    listed = ",".join(str(s) for s in sides)
    lines = [
        f"Command: `python benchmarks/detection.py --skip-quality --skip-scale --growth-sides "
        f"{listed}`. One training image of `hiresctl synth det-mosaic --count 1 --size SIDE` "
        "per side, `recipes/det-mosaic-<method>.yaml` (ResNet-18 + FPN 128, 4-conv heads, "
        "patch 512; patchgd-global: k = 25% of the patches per inner step, re-encoded "
        "`grad_batch` = 4 at a time, and the global patch; sliced: 16 windows of 512² per step), one inner step (`inner_steps=1`: every inner step of an "
        "image peaks alike), each run in a fresh process. Peak: the training process's peak RSS.",
        "",
        "| side | "
        + " | ".join(f"{m} peak GB" for m in GROWN)
        + " | patchgd-global / sliced | "
        + " | ".join(f"{m} s" for m in GROWN)
        + " |",
        "|---" * (2 + 2 * len(GROWN)) + "|",
    ]
    for i, side in enumerate(sides):
        cells = [f"{peaks[m][i]:.2f}" for m in GROWN]
        ratio = peaks[GROWN[0]][i] / peaks[GROWN[1]][i]
        times = [f"{seconds[m][i]:.0f}" for m in GROWN]
        lines.append(f"| {side}² | {' | '.join(cells)} | {ratio:.2f} | {' | '.join(times)} |")
    grown = " · ".join(f"{m} {peaks[m][-1] / peaks[m][0]:.2f}×" for m in GROWN)
    lines += ["", f"Growth from {sides[0]}² to {sides[-1]}²: {grown}."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--count", type=int, default=40)
    parser.add_argument("--objects", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--patch-size", type=int, default=128)
    parser.add_argument("--scale-side", type=int, default=4096)
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--growth-sides", default="", help="e.g. 1024,2048,4096,8192")
    args = parser.parse_args()
    if not args.skip_quality:
        lines = [f"## Detection, {time.strftime('%Y-%m-%d')}, CPU (2 cores)", ""]
        publish([*lines, *quality(args)], "detection")
    if not args.skip_scale:  # its own section: either part can be re-run alone
        lines = [
            f"## Detection at {args.scale_side}², {time.strftime('%Y-%m-%d')}, CPU (2 cores)",
            "",
        ]
        publish([*lines, *scale(args)], "detection-scale")
    if args.growth_sides:
        sides = [int(s) for s in args.growth_sides.split(",")]
        lines = [f"## Detection growth (D1), {time.strftime('%Y-%m-%d')}, CPU (2 cores)", ""]
        publish([*lines, *growth(sides)], "detection-growth")


if __name__ == "__main__":
    main()
