"""GPU rows G1 and G2: memory and throughput of one training step on a CUDA device.

    python benchmarks/gpu.py [--device cuda] [--g1-side 131072] [--g2-side 4096]

* **G1**: one Iterative Patch Selection training step on one image of ``--g1-side``² (131072²:
  17.2 gigapixels, 262,144 patches of 256²; ResNet-18, M = 16, I = 16): peak memory allocated
  on the device and the patches per second of the whole step (every patch is read and encoded
  once without gradient, M of them again with it). The IPS paper reports about 5 GB.
* **G2**: PatchGD with the global patch against `full` at ``--g2-side``² (ResNet-50, patch
  256, batch 1): images per second of training steps and peak allocated memory, side by side,
  with their ratios.

Both read a Zarr store whose images are mostly fill (only a 512² corner holds pixels), so it
costs seconds to write however large the image; the reads still go chunk by chunk through
the store like any other, and the compute does not depend on what the pixels hold. Every
step runs with the methods' defaults and ``precision: auto`` (bfloat16 where the GPU computes
it). With ``--device cpu`` and small sides the script checks itself on a machine without a
GPU (then nothing is written). On a GPU the table replaces the "GPU (G1, G2)" section of
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
sys.path.insert(0, str(HERE))
from _common import child_json, publish, sparse_store  # noqa: E402

STEP = """
import json, sys, time, torch
from hiresctl.train import build_run, load_recipe
from hiresctl.train.memory import PeakMemory
from storage import Dataset
method, store, image, device, settings, steps = sys.argv[1:7]
device = torch.device(device)
recipe = load_recipe(None, "cls", method, json.loads(settings))
run = build_run(recipe, Dataset(store), ["0", "1"], device)
ctx = run.context(torch.optim.AdamW(run.model.parameters()))
peak = PeakMemory(device)
times = []
for _ in range(int(steps)):
    peak.reset()
    start = time.perf_counter()
    run.step([image], torch.tensor([1]), ctx=ctx)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times.append(time.perf_counter() - start)
name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
print(json.dumps({"peak": peak.peak_bytes(), "kind": peak.kind, "times": times,
                  "patches": run.reader.patches_read, "device": name}))
"""


def step(method: str, store: Path, image: str, device: str, settings: dict, steps: int) -> dict:
    """``steps`` training steps of ``method`` on ``image`` in a fresh process (its own peak)."""
    result = child_json(STEP, method, str(store), image, device, json.dumps(settings), str(steps))
    print(method, image, result, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--g1-side", type=int, default=131072)
    parser.add_argument("--g2-side", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=4, help="G2 steps (the first is left out)")
    args = parser.parse_args()
    sides = sorted({args.g1_side, args.g2_side})
    store = sparse_store(DATA / f"gpu_sparse_{'_'.join(map(str, sides))}.zarr", sides)
    common = {
        "batch_size": 1,
        "precision": "auto",
        "full_max_pixels": 2**40,
        "calibration_batches": 0,
    }
    g1 = step(
        "ips",
        store,
        f"side{args.g1_side}",
        args.device,
        {**common, "backbone": "resnet18", "patch_size": 256, "memory_size": 16, "iter_size": 16},
        1,
    )
    g1_seconds = g1["times"][0]
    g2 = {
        method: step(
            method,
            store,
            f"side{args.g2_side}",
            args.device,
            {**common, "backbone": "resnet50", "patch_size": 256},
            args.steps,
        )
        for method in ("patchgd-global", "full")
    }
    rate = {m: 1 / statistics.median(r["times"][1:] or r["times"]) for m, r in g2.items()}
    gb = {m: r["peak"] / 2**30 for m, r in g2.items()}
    gigapixels = args.g1_side**2 / 1e9
    lines = [
        f"## GPU (G1, G2), {time.strftime('%Y-%m-%d')}, {g1['device']}",
        "",
        f"Command: `python benchmarks/gpu.py --device {args.device} --g1-side {args.g1_side} "
        f"--g2-side {args.g2_side}`. Peak memory is the device's peak allocated ({g1['kind']}); "
        "`precision: auto`, the methods' defaults, one image per step, the image mostly fill "
        "(see the script).",
        "",
        "| row | what | result | peer |",
        "|---|---|---|---|",
        f"| G1 | IPS step, ResNet-18, patch 256, M = I = 16, one {args.g1_side}² image "
        f"({gigapixels:.1f} gigapixels, {g1['patches']:,} patches read) | peak "
        f"**{g1['peak'] / 2**30:.2f} GiB**, {g1_seconds:.0f} s, "
        f"{g1['patches'] / g1_seconds:,.0f} patches/s | IPS paper: about 5 GB |",
        f"| G2 | PatchGD + global, ResNet-50, patch 256, {args.g2_side}² | "
        f"**{rate['patchgd-global']:.2f} images/s**, peak {gb['patchgd-global']:.2f} GiB | "
        f"`full`: {rate['full']:.2f} images/s, peak {gb['full']:.2f} GiB; ratios: speed "
        f"{rate['patchgd-global'] / rate['full']:.2f}×, memory "
        f"{gb['patchgd-global'] / gb['full']:.2f}× |",
    ]
    if args.device.startswith("cuda"):
        publish(lines, "gpu")
    else:  # a check of the script itself: BENCHMARKS.md keeps GPU rows only
        print("\n".join(lines))


if __name__ == "__main__":
    main()
