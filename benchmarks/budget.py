"""`--memory-budget` against what a step really takes (B1), every task × method, two sizes.

    python benchmarks/budget.py [--sides 1024,2048] [--tasks cls,det,seg]

For every registered task × method and each side: one epoch of `hiresctl train` on two
training images of that side (`synth fine-detail`, `det-mosaic`, `seg-vessels`), batch 1, with
a budget far above need (so the plan keeps the recipe's settings and only estimates), each run
in a fresh process. The plan's estimate of a step's peak is set beside the run's measured peak
(peak RSS on CPU, since the run's start: the process baseline is in both); in brackets both
above the process's baseline, the part the estimate models. Target: the estimate within ±15%
of the measured peak and never more than 5% below it (a budget that trusts it never
overshoots). Backbones: ResNet-18 (classification, detection with FPN 128), the segmentation
default; patches 256 (detection 512). The feature methods train on `hiresctl embed`'s
ResNet-18 features of the same patches. The table replaces the "Memory budget (B1)" section of
BENCHMARKS.md; every row measured is also kept in benchmarks/data/b1_results.json, so
`--tasks det` measures detection again and the table keeps the other tasks' latest rows, each with
its own run's baseline and date (`--tasks ''` redraws the table from them alone).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
sys.path.insert(0, str(HERE))
from _common import all_in_training, publish  # noqa: E402
from _common import hiresctl as _hiresctl  # noqa: E402

SYNTH = {"cls": "fine-detail", "det": "det-mosaic", "seg": "seg-vessels"}
SETTINGS = {
    "cls": ["--set", "backbone=resnet18", "--set", "patch_size=256"],
    "det": ["--set", "backbone=resnet18", "--set", "patch_size=512", "--set", "latent_dim=128"],
    "seg": ["--set", "patch_size=256"],
}
FEATURE_METHODS = ("abmil", "transmil", "ips-features")
BUDGET = "64GiB"  # far above need: the plan estimates, it does not shrink
LOW, HIGH = 0.95, 1.15


def make_store(task: str, side: int) -> Path:
    """Two ``side``² images of the task's synthesizer, both in the training split."""
    store = DATA / f"b1_{task}_{side}.zarr"
    if (store / "zarr.json").exists():
        return store
    synth = DATA / f"b1_{task}_{side}_src"
    _hiresctl("synth", SYNTH[task], str(synth), "--count", "2", "--size", str(side), "--seed", "3")
    labels = all_in_training(synth)
    extra = {
        "det": ["--coco", str(synth / "annotations.json")],
        "seg": ["--masks", str(synth / "masks"), "--mask-classes", str(synth / "classes.csv")],
    }
    _hiresctl(
        "tile",
        str(synth / "images"),
        "--labels",
        str(labels),
        "--out",
        str(store),
        *extra.get(task, []),
    )
    return store


def methods() -> dict[str, list[str]]:
    proc = _hiresctl("methods", "--json")
    listed = json.loads(proc.stdout)
    found: dict[str, list[str]] = {}
    for row in listed if isinstance(listed, list) else listed.get("methods", []):
        found.setdefault(row["task"], []).append(row["method"])
    return found


# methods that read the whole image at its size: a fixed-size encoder (a ViT) cannot take it
WHOLE_IMAGE = ("full",)


def measure(task: str, method: str, store: Path, side: int, encoder: str = "resnet18") -> dict:
    tag = "" if encoder == "resnet18" else f"-{encoder.replace(':', '_').replace('/', '_')}"
    out = DATA / "b1_runs" / f"{task}-{method}-{side}{tag}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    options = [
        "train",
        "--task",
        task,
        "--method",
        method,
        "--data",
        str(store),
        "--out",
        str(out),
        "--memory-budget",
        BUDGET,
        "--set",
        "epochs=1",
        "--set",
        "val_split=none",
        "--set",
        "batch_size=1",
        "--set",
        "accumulation_steps=1",
        "--device",
        "cpu",
        "--set",
        "precision=fp32",
        "--json",
    ]
    if method in FEATURE_METHODS:
        _hiresctl(
            "embed", str(store), "--backbone", "resnet18", "--patch-size", "256", "--name", "b1"
        )
        options += ["--set", "features=b1"]
    else:
        options += SETTINGS[task]
        if task == "cls" and encoder != "resnet18":
            options += ["--set", f"backbone={encoder}"]
    summary = json.loads(_hiresctl(*options).stdout.strip().splitlines()[-1])
    return summary


def baseline_gb() -> float:
    """The RSS of a process that has imported what `hiresctl train` imports, before any model."""
    code = (
        "import psutil, torch, torchvision, hiresctl.train, hiresctl.models; "
        "print(psutil.Process().memory_info().rss / 1e9)"
    )
    return float(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sides", default="1024,2048")
    parser.add_argument("--tasks", default="cls,det,seg")
    parser.add_argument(
        "--encoders",
        default="resnet18",
        help="classification's encoders, e.g. resnet18,timm:vit_small_patch16_224 (a ViT's "
        "rows skip `full` and the feature methods)",
    )
    args = parser.parse_args()
    sides = [int(s) for s in args.sides.split(",")]
    registered = methods()
    base = baseline_gb()
    kept = DATA / "b1_results.json"
    results = json.loads(kept.read_text()) if kept.exists() else {}
    today = time.strftime("%Y-%m-%d")
    for task in [t for t in args.tasks.split(",") if t]:  # --tasks '': the kept rows' table
        for side in sides:
            store = make_store(task, side)
            encoders = args.encoders.split(",") if task == "cls" else ["resnet18"]
            for encoder, method in ((e, m) for e in encoders for m in registered.get(task, [])):
                other = encoder != "resnet18"
                if other and (method in WHOLE_IMAGE or method in FEATURE_METHODS):
                    continue
                summary = measure(task, method, store, side, encoder)
                estimate, peak = summary["memory_estimate_gb"], summary["peak_memory_gb"]
                name = f"{method} ({encoder})" if other else method
                results[f"{task} {name} {side}"] = [task, name, side, estimate, peak, base, today]
                kept.write_text(json.dumps(results, indent=1))
                print(
                    f"{task} {name} {side}: estimate {estimate:.2f} GB, peak {peak:.2f} GB, "
                    f"ratio {estimate / peak:.2f}",
                    flush=True,
                )
    order = {t: i for i, t in enumerate(SYNTH)}
    rows = sorted(results.values(), key=lambda r: (order.get(r[0], 9), r[2]))
    measured_tasks = ",".join(sorted({r[0] for r in rows}, key=lambda t: order.get(t, 9)))
    measured_sides = ",".join(str(side) for side in sorted({r[2] for r in rows}))
    machine = f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.machine()}, CPU only"
    lines = [
        f"## Memory budget (B1), {today}, {machine}",
        "",
        f"Command: `python benchmarks/budget.py --sides {measured_sides} --tasks {measured_tasks}"
        f"{' --encoders ' + args.encoders if args.encoders != 'resnet18' else ''}`. "
        "One epoch on two training images per side, batch 1, `--memory-budget "
        f"{BUDGET}` (the plan estimates without shrinking anything), each run in a fresh process; "
        "ResNet-18 for classification and detection (FPN 128, patch 512), the segmentation "
        "default network, patch 256; the feature methods on ResNet-18 features; a row "
        "`method (encoder)` trains classification with that encoder instead (random "
        "weights; a ViT's patches resized to its input side inside it). Estimate: the "
        "plan's step peak; peak: the run's peak RSS; in brackets both above the baseline "
        "measured beside them, a process that has imported torch and hiresctl (this run's: "
        f"{base:.2f} GB; it moves with how much of torch's libraries the page cache holds, "
        "so each row keeps its own run's). Target: estimate / peak in "
        f"[{LOW}, {HIGH}].",
        "",
        "| task | method | side | estimate GB | measured peak GB | estimate / peak | target "
        "| measured |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:  # rows kept from before baselines and dates were stored: this run's
        task, method, side, estimate, peak = row[:5]
        row_base = row[5] if len(row) > 5 else base
        when = row[6] if len(row) > 6 else "earlier"
        ratio = estimate / peak
        verdict = "met" if LOW <= ratio <= HIGH else "not met"
        lines.append(
            f"| {task} | {method} | {side}² | {estimate:.2f} (+{estimate - row_base:.2f}) | "
            f"{peak:.2f} (+{peak - row_base:.2f}) | {ratio:.2f} | **{verdict}** | {when} |"
        )
    publish(lines, "budget")


if __name__ == "__main__":
    main()
