"""Patch-streaming and training benchmarks S1, S2, M1, L1 with their targets (BENCHMARKS.md), side by side.

    python benchmarks/training.py [--rows S1,M1,L1] [--repeats 3] [--reads 400]

S1  random 256² patch reads at level 0, 1 process: hiresctl's PatchReader on the store vs
    openslide's read_region on the source (the 16384² pyramidal JPEG TIFF of tiling.py)
S2  the same reads as a share of the codec's decode limit (decoding equivalent chunks alone)
M1  peak memory of one training step (PatchGD+global, IPS) on 1k² → 64k² images (sparsely
    written stores), next to the `full` baseline on the same images
L1  data-wait fraction of a PatchGD+global training run (is training input-bound?)

Inputs go to benchmarks/data/ (ignored by git). The results replace the "Training" section of
BENCHMARKS.md. Each M1 measurement runs in a fresh process so its peak is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
sys.path.insert(0, str(HERE))
from _common import child_json, publish, sparse_store  # noqa: E402
from _common import hiresctl as _hiresctl  # noqa: E402


def jpeg_store() -> tuple[Path, Path]:
    from tiling import make_slide

    source = make_slide(DATA / "slide_16384.tif", 16384)
    store = DATA / "s1_jpeg.zarr"
    if not store.exists():
        _hiresctl(
            "tile", str(source), "--out", str(store), "--codec", "jpeg", "--jpeg-quality", "90"
        )
    return source, store


# ----------------------------------------------------------------------------------- S1 / S2


def bench_reads(reads: int, repeats: int) -> list[tuple]:
    import imagecodecs
    import openslide

    from hiresctl.data import PatchReader

    source, store = jpeg_store()
    reader = PatchReader(store, threads=1)
    image_id = reader.dataset.image_ids()[0]
    _, height, width = reader.shape(image_id)
    slide = openslide.OpenSlide(str(source))
    rates: dict[str, list[float]] = {"hiresctl": [], "openslide": [], "decode": []}
    for repeat in range(repeats):
        rng = np.random.default_rng(repeat)
        ys = rng.integers(0, height // 256, reads) * 256
        xs = rng.integers(0, width // 256, reads) * 256
        start = time.perf_counter()
        patches = [
            reader.read_region(image_id, int(y), int(x), 256) for y, x in zip(ys, xs, strict=True)
        ]
        rates["hiresctl"].append(reads / (time.perf_counter() - start))
        start = time.perf_counter()
        for y, x in zip(ys, xs, strict=True):
            np.asarray(slide.read_region((int(x), int(y)), 0, (256, 256)).convert("RGB"))
        rates["openslide"].append(reads / (time.perf_counter() - start))
        # The decode limit: the same patches as Q90 JPEG chunks, decoded alone (no I/O, no zarr).
        encoded = [
            imagecodecs.jpeg_encode(np.ascontiguousarray(np.moveaxis(p, 0, -1)), level=90)
            for p in patches
        ]
        start = time.perf_counter()
        for blob in encoded:
            imagecodecs.jpeg_decode(blob)
        rates["decode"].append(reads / (time.perf_counter() - start))
    med = {k: statistics.median(v) for k, v in rates.items()}
    return [
        (
            "S1",
            f"{reads} random 256² reads, level 0, 16384² JPEG slide, 1 process",
            "`openslide.OpenSlide.read_region` (+ RGB array)",
            f"{med['hiresctl']:.0f} patches/s",
            f"{med['openslide']:.0f} patches/s",
            f"{med['hiresctl'] / med['openslide']:.2f}×",
            "≥ 3× openslide",
        ),
        (
            "S2",
            "same reads vs decoding the chunks alone",
            "JPEG decode of the same 256² chunks",
            f"{med['hiresctl']:.0f} patches/s",
            f"{med['decode']:.0f} patches/s",
            f"{100 * med['hiresctl'] / med['decode']:.0f}% of the decode limit",
            "≥ 70%",
        ),
    ]


# ---------------------------------------------------------------------------------------- M1


STEP = """
import json, sys, time, torch
from hiresctl.train import build_run, load_recipe
from hiresctl.train.memory import PeakMemory, current_rss_bytes
from storage import Dataset
method, store, image = sys.argv[1], sys.argv[2], sys.argv[3]
# the method's own defaults (what `hiresctl train --method M` gets), with the sizes fixed
recipe = load_recipe(None, "cls", method, dict(
    backbone="tiny", patch_size=256, batch_size=1, patches_per_step=16, inner_steps=1,
    memory_size=16, iter_size=16, full_max_pixels=2**40, precision="fp32"))
run = build_run(recipe, Dataset(store), ["0", "1"], torch.device("cpu"))
ctx = run.context(torch.optim.AdamW(run.model.parameters()))
peak = PeakMemory(torch.device("cpu"))
base = current_rss_bytes()
peak.reset()
start = time.perf_counter()
run.step([image], torch.tensor([1]), ctx=ctx)
print(json.dumps({"peak": peak.peak_bytes(), "base": base, "seconds": time.perf_counter() - start,
                  "patches": run.reader.patches_read}))
"""


def bench_memory(sides: list[int], full_sides: list[int]) -> list[tuple]:
    every = sorted(set(sides) | set(full_sides))
    store = sparse_store(DATA / f"m1_sparse_{'_'.join(map(str, every))}.zarr", every)
    results: dict[tuple[str, int], dict] = {}
    for method in ("patchgd-global", "ips", "full"):
        for side in sides if method != "full" else full_sides:
            results[(method, side)] = child_json(STEP, method, str(store), f"side{side}")
            print(method, side, results[(method, side)], flush=True)
    rows = []
    for method in ("patchgd-global", "ips", "full"):
        measured = [s for s in (sides if method != "full" else full_sides)]
        cells = []
        for side in measured:
            r = results[(method, side)]
            cells.append(
                f"{side // 1024}k²: {r['peak'] / 1e9:.2f} GB (+{(r['peak'] - r['base']) / 1e9:.2f}), {r['seconds']:.0f} s"
            )
        first, last = results[(method, measured[0])], results[(method, measured[-1])]
        growth = last["peak"] / first["peak"]
        above = (last["peak"] - last["base"]) / max(1, first["peak"] - first["base"])
        rows.append(
            (method, "; ".join(cells), f"{growth:.2f}× ({above:.1f}× above the process baseline)")
        )
    return rows


# ---------------------------------------------------------------------------------------- L1


def bench_data_wait(workers: list[int]) -> list[tuple]:
    work = DATA / "l1"
    store = work / "ds.zarr"
    if not store.exists():
        _hiresctl(
            "synth",
            "ultramnist",
            str(work / "synth"),
            "--count",
            "12",
            "--size",
            "4096",
            "--classes",
            "10",
        )
        _hiresctl(
            "tile",
            str(work / "synth" / "images"),
            "--labels",
            str(work / "synth" / "labels.csv"),
            "--out",
            str(store),
        )
    rows = []
    for count in workers:
        out = work / f"run{count}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "hiresctl",
                "train",
                "--data",
                str(store),
                "--out",
                str(out),
                "--json",
                "--set",
                "backbone=tiny",
                "--set",
                "patch_size=256",
                "--set",
                "epochs=1",
                "--set",
                f"num_workers={count}",
                "--set",
                "val_split=none",
                "--set",
                "train_split=train",
                "--set",
                "precision=fp32",
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode not in (0, 1):
            raise RuntimeError(proc.stderr[-2000:])
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(
            (
                count,
                summary["data_wait_fraction"],
                summary["images_per_second"],
                summary["train_images"],
            )
        )
    return rows


# ------------------------------------------------------------------------------------ report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="S1,M1,L1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reads", type=int, default=400)
    parser.add_argument("--sides", default="1024,4096,16384,65536")
    parser.add_argument("--full-sides", default="1024,2048,4096,8192")
    args = parser.parse_args()
    rows = args.rows.split(",")
    machine = f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.machine()}, CPU only"
    stamp = f"{time.strftime('%Y-%m-%d')}, {machine}"
    # Each row group has its own section in BENCHMARKS.md, so one can be re-run alone.
    if "S1" in rows:
        lines = [
            f"## Patch reads (S1, S2), {stamp}",
            "",
            f"Command: `python benchmarks/training.py --rows S1 --repeats {args.repeats} --reads {args.reads}`. "
            f"Medians of {args.repeats} runs of different random positions (aligned to the 256 grid, which is "
            "how the trainers read). The store was tiled with `--codec jpeg --jpeg-quality 90`.",
            "",
            "| row | what | peer | hiresctl | peer | ratio | target |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in bench_reads(args.reads, args.repeats)]
        publish(lines, "reads")
    if "M1" in rows:
        sides = [int(s) for s in args.sides.split(",")]
        full_sides = [int(s) for s in args.full_sides.split(",")]
        lines = [
            f"## Training-step memory (M1), {stamp}",
            "",
            f"Command: `python benchmarks/training.py --rows M1 --sides {args.sides} --full-sides {args.full_sides}`. "
            "Peak RSS of one training step (one image, batch 1, tiny CNN, patch 256, 16 patches with gradient, "
            "IPS M = I = 16, so every size has at least M patches; otherwise each method's own defaults, as "
            "`hiresctl train --method M` runs it), each in a fresh process; in brackets the part "
            "above the process's RSS before the step (torch and the libraries hold about 1 GB). Stores are "
            "sparsely written; every patch is still read and encoded.",
            "",
            "| method | per image side | growth first → last side | target |",
            "|---|---|---|---|",
        ]
        for method, cells, growth in bench_memory(sides, full_sides):
            target = "∝ pixels (the comparison)" if method == "full" else "≤ 1.2× from 1k² to 64k²"
            lines.append(f"| {method} | {cells} | {growth} | {target} |")
        publish(lines, "memory")
    if "L1" in rows:
        lines = [
            f"## Data wait (L1), {stamp}",
            "",
            "Command: `python benchmarks/training.py --rows L1`: one epoch of `patchgd-global` (tiny CNN, "
            "patch 256) on the 8 training images of 12 synthetic UltraMNIST images of 4096² (zstd store); the fraction of the epoch spent "
            "waiting for pixels.",
            "",
            "| reading (`num_workers`) | data-wait fraction | images/s | images | target |",
            "|---|---|---|---|---|",
        ]
        for count, wait, speed, images in bench_data_wait([0, 1]):
            how = (
                "a background thread (0)"
                if count == 0
                else f"{count} DataLoader process(es) ({count})"
            )
            lines.append(f"| {how} | {wait:.1%} | {speed:.2f} | {images} | ≤ 10% |")
        publish(lines, "wait")


if __name__ == "__main__":
    main()
