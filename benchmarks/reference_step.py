"""Training steps against the papers' reference code (R1), side by side.

    python benchmarks/reference_step.py --reference-patchgd PATH --reference-ips PATH
                                        [--side 2048] [--images 4]

Each PATH is a local checkout of the reference repository, used where it lies and never copied
into this project: nyunAI/PatchGD and benbergner/ips (GitHub; `git clone` them anywhere).
PatchGD's code imports pandas, tqdm, transformers and wandb (`pip install pandas tqdm
transformers wandb` beside hiresctl); IPS's imports only torch and scikit-learn.

Both sides train on the same synthetic UltraMNIST images (`--side`², RGB, 10 classes, patch
128: a 16×16 grid, N = 256 patches), one image per step, each side in a fresh process:

* **patchgd**: the reference's `Trainer.train_step` (the no-grad latent fill, J = 4 inner
  iterations of k = 64 patches with gradient, the J losses accumulated into one update, Adam),
  its ResNet-50 → 256 latent and its head (one stride-1 and three stride-2 conv blocks, 256
  wide, flattened into a Linear), on the images decoded from JPEG by its own dataset class;
  against `hiresctl train --method patchgd` with the same encoder, latent, k, J and update rule
  (`head_context 1`, `head_pool avg`: one stride-1 block, then stride-2 blocks and an average),
  reading from the store.
* **ips**: the reference `IPSNet.ips` (M = 32 of N kept, scored I = 32 at a time without
  gradient, ties shuffled) and its forward on the M, NLL loss, backward and AdamW step, ResNet-18
  (four blocks, D = 512), 1-d positions, one query token, each step on the patches of its image
  loaded from the TIFF and cut into the (1, N, 3, p, p) tensor its eager loading passes; against `hiresctl train --method ips` with the same M, I, encoder
  (`latent_dim` unset: 512) and aggregator (8 heads, keys and values 16, inner 512), reading
  from the store.

Step time: hiresctl's is the gap between consecutive step ends (reads included, the first step
left out); the references' the gap between consecutive scheduler (PatchGD) or optimizer (IPS)
steps, their data loading included, the first left out. Medians. Memory: the process's peak RSS, and what it rose above the RSS after imports.

The references need these fixes to run here, the smallest that keep what they compute:
* PatchGD's `Backbone` calls `resnet50(pretrained=True)`, a download: it gets random weights
  (neither side uses pretrained weights).
* PatchGD's `get_head` hard-codes 6 classes (PANDA): the head is its own `CNN_Block` built
  with the same arguments and 10 classes.
* PatchGD's `Trainer` imports wandb; it is installed and never called (`monitor_wandb=False`).

The table replaces the "Against the reference code (R1)" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
sys.path.insert(0, str(HERE))
from _common import publish  # noqa: E402
from steps import hiresctl_steps, store  # noqa: E402

PATCH = 128
CLASSES = 10
PATCHGD = {"latent": 256, "fraction": 0.25, "inner": 4, "lr": 1e-3}
IPS = {"M": 32, "I": 32, "heads": 8, "dim_key": 16, "dim_value": 16, "dim_inner": 512}
COMMON = {
    "patch_size": PATCH,
    "batch_size": 1,
    "epochs": 1,
    "precision": "fp32",
    "train_split": "train",
    "val_split": "none",
    "calibration_batches": 0,
    "warmup": 0.0,
}
HIRESCTL = {
    "patchgd": {
        **COMMON,
        "backbone": "resnet50",
        "latent_dim": PATCHGD["latent"],
        "head_width": 256,
        "head_context": 1,
        "head_pool": "avg",
        "sample_fraction": PATCHGD["fraction"],
        "inner_steps": PATCHGD["inner"],
        "inner_update": "batch",
        "lr": PATCHGD["lr"],
    },
    "ips": {
        **COMMON,
        "backbone": "resnet18",
        "latent_dim": None,
        "memory_size": IPS["M"],
        "iter_size": IPS["I"],
        "heads": IPS["heads"],
        "dim_key": IPS["dim_key"],
        "dim_value": IPS["dim_value"],
        "dim_inner": IPS["dim_inner"],
        "positional": "1d",
        "dropout": 0.1,
        "weight_decay": 0.1,
    },
}


def _rss() -> float:
    return psutil.Process().memory_info().rss / 1e9


def _peak() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


def _sources(side: int, images: int) -> list[tuple[Path, int]]:
    """The store's source TIFFs and their labels (steps.store synthesizes both)."""
    folder = DATA / f"e1_{side}_{images}_src"
    rows = list(csv.DictReader((folder / "labels.csv").open()))
    return [(folder / "images" / r["source"], int(r["label"])) for r in rows]


def _jpegs(side: int, images: int) -> Path:
    """The same images as JPEG files, as the PatchGD reference's UltraMNIST dataset reads them."""
    import cv2
    import tifffile

    folder = DATA / f"r1_{side}_{images}_jpeg"
    folder.mkdir(parents=True, exist_ok=True)
    for path, _ in _sources(side, images):
        target = folder / f"{path.stem}.jpeg"
        if not target.exists():
            pixels = tifffile.imread(path)
            cv2.imwrite(
                str(target), cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95]
            )
    return folder


# ---------------------------------------------------------------------------- the references


def reference_patchgd(checkout: Path, side: int, images: int) -> dict[str, Any]:
    base = _rss()
    sys.path.insert(0, str(checkout / "patch_gd"))
    import models as ref_models  # the reference's models.py
    import pandas as pd
    import torchvision

    # fix 1: no download; the reference's own Backbone, random weights
    ref_models.resnet50 = lambda pretrained=False, **_: torchvision.models.resnet50(weights=None)
    import train_utils  # the reference's Trainer
    from data_utils import UltraMNISTDataset
    from utils import get_transforms

    grid = side // PATCH

    def head(name: str, latent: int) -> torch.nn.Module:  # fix 2: get_head with 10 classes
        return ref_models.CNN_Block(
            num_layers_sr=(1, 3),
            latent_dim=latent,
            feature_dim=256,
            num_classes=CLASSES,
            num_patches=grid,
        )

    train_utils.get_head_from_name = head
    sources = _sources(side, images)
    frame = pd.DataFrame(
        {"image_id": [p.stem for p, _ in sources], "digit_sum": [label for _, label in sources]}
    )
    dataset = UltraMNISTDataset(
        frame, str(_jpegs(side, images)), get_transforms(side, [0.1307] * 3, [0.3081] * 3)
    )
    trainer = train_utils.Trainer(
        seed=0,
        experiment="r1",
        train_dataset=dataset,
        val_dataset=dataset,
        batch_size=1,
        num_workers=0,
        num_classes=CLASSES,
        accelarator="cpu",
        run_name="r1",
        head="original",
        latent_dimension=PATCHGD["latent"],
        num_patches=grid,
        patch_size=PATCH,
        stride=PATCH,
        percent_sampling=PATCHGD["fraction"],
        learning_rate=PATCHGD["lr"],
        epochs=1,
        inner_iteration=PATCHGD["inner"],
        grad_accumulation=True,
        warmup_epochs=0,
        decay_factor=2,
        monitor_wandb=False,
        save_models=False,
        model_save_dir=str(DATA / "r1"),
    )
    ends: list[float] = []
    step = trainer.scheduler.step

    def timed(*args: Any, **kwargs: Any) -> Any:  # one scheduler step per image batch
        ends.append(time.perf_counter())
        return step(*args, **kwargs)

    trainer.scheduler.step = timed
    trainer.train_step()
    return {"steps": [b - a for a, b in itertools.pairwise(ends)], "base": base}


def reference_ips(checkout: Path, side: int, images: int) -> dict[str, Any]:
    import tifffile

    base = _rss()
    sys.path.insert(0, str(checkout))
    from architecture.ips_net import IPSNet  # the reference's network
    from utils.utils import Struct

    n = (side // PATCH) ** 2
    task = {"id": 0, "name": "label", "act_fn": "softmax", "metric": "accuracy"}
    conf = Struct(
        n_class=CLASSES,
        M=IPS["M"],
        I=IPS["I"],
        D=512,
        use_pos=True,
        tasks={"task0": task},
        shuffle=True,
        shuffle_style="batch",
        is_image=True,
        enc_type="resnet18",
        pretrained=False,
        n_chan_in=3,
        n_res_blocks=4,
        n_token=1,
        H=IPS["heads"],
        D_k=IPS["dim_key"],
        D_v=IPS["dim_value"],
        D_inner=IPS["dim_inner"],
        attn_dropout=0.1,
        dropout=0.1,
        N=n,
    )
    device = torch.device("cpu")
    net = IPSNet(device, conf).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.1)
    loss_nll = torch.nn.NLLLoss()
    ends = []
    for path, label in _sources(side, images):  # each step loads its image, as their loop does
        pixels = torch.from_numpy(np.atleast_3d(tifffile.imread(path))).permute(2, 0, 1)
        pixels = pixels.expand(3, -1, -1).float() / 255  # grey as RGB, as hiresctl reads it
        patches = pixels.unfold(1, PATCH, PATCH).unfold(2, PATCH, PATCH)  # (3, r, c, p, p)
        patches = patches.permute(1, 2, 0, 3, 4).reshape(1, n, 3, PATCH, PATCH).contiguous()
        target = torch.tensor([label])
        net.train()
        mem_patch, mem_pos = net.ips(patches)
        preds = net(mem_patch, mem_pos)
        loss = loss_nll(torch.log(preds["label"] + 1e-6), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ends.append(time.perf_counter())
    return {"steps": [b - a for a, b in itertools.pairwise(ends)], "base": base}


def ours(method: str, side: int, images: int) -> dict[str, Any]:
    base = _rss()
    steps, wait = hiresctl_steps(store(side, images), method, DATA / "r1_runs", HIRESCTL[method])
    return {"steps": steps, "base": base, "wait": wait}


# ---------------------------------------------------------------------------------- driver


def measure(row: str, side: int, images: int, checkout: Path | None) -> dict[str, Any]:
    """One side of one row in a fresh process (its peak its own)."""
    command = [
        sys.executable,
        __file__,
        "--one",
        row,
        "--side",
        str(side),
        "--images",
        str(images),
    ] + (["--checkout", str(checkout)] if checkout else [])
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{row}: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def one(row: str, side: int, images: int, checkout: Path | None) -> None:
    store(side, images)  # made before the process's baseline is taken (a no-op once it exists)
    torch.manual_seed(0)
    np.random.seed(0)
    if row == "reference-patchgd" and checkout:
        result = reference_patchgd(checkout, side, images)
    elif row == "reference-ips" and checkout:
        result = reference_ips(checkout, side, images)
    else:
        result = ours(row, side, images)
    result.update(peak=_peak(), threads=torch.get_num_threads())
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference-patchgd", type=Path, help="a checkout of nyunAI/PatchGD")
    parser.add_argument("--reference-ips", type=Path, help="a checkout of benbergner/ips")
    parser.add_argument("--side", type=int, default=2048)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--one")
    parser.add_argument("--checkout", type=Path)
    args = parser.parse_args()
    if args.one:
        one(args.one, args.side, args.images, args.checkout)
        return
    store(args.side, args.images)  # synthesized and tiled once, before any timing
    checkouts = {"patchgd": args.reference_patchgd, "ips": args.reference_ips}
    results = []
    for method, checkout in checkouts.items():
        if checkout is None:
            print(f"{method}: no --reference-{method} checkout given; row skipped", flush=True)
            continue
        theirs = measure(f"reference-{method}", args.side, args.images, checkout.resolve())
        mine = measure(method, args.side, args.images, None)
        results.append((method, mine, theirs))
        t_ours, t_ref = statistics.median(mine["steps"]), statistics.median(theirs["steps"])
        print(
            f"{method}: hiresctl {t_ours:.2f} s at {mine['peak']:.2f} GB, reference "
            f"{t_ref:.2f} s at {theirs['peak']:.2f} GB",
            flush=True,
        )
    if not results:
        return
    machine = (
        f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
        f"{platform.machine()}, CPU only, {results[0][1]['threads']} threads"
    )
    command = "python benchmarks/reference_step.py --reference-patchgd PATCHGD --reference-ips IPS"
    lines = [
        f"## Against the reference code (R1), {time.strftime('%Y-%m-%d')}, {machine}",
        "",
        f"Command: `{command} --side {args.side} --images {args.images}` (PATCHGD, IPS: local "
        "checkouts of nyunAI/PatchGD and benbergner/ips). One training step per image on "
        f"{args.images} synthetic UltraMNIST images of {args.side}² (patch {PATCH}, "
        f"N = {(args.side // PATCH) ** 2}), each side in a fresh process. PatchGD: ResNet-50 → "
        f"{PATCHGD['latent']} latent, k = {math.ceil((args.side // PATCH) ** 2 * PATCHGD['fraction'])}, "
        f"J = {PATCHGD['inner']}, one update per image; IPS: ResNet-18 (D 512), M = {IPS['M']}, "
        f"I = {IPS['I']}. Every step's time includes its data: the references decode their "
        "images (PatchGD from JPEG, IPS from the TIFF), hiresctl reads the store. Fixes the references needed to run: "
        "random weights instead of PatchGD's `resnet50(pretrained=True)` download, and its head "
        "built with 10 classes (hard-coded 6); see the script. Peak: the process's peak RSS "
        "(in brackets, above its RSS after imports).",
        "",
        "| method | hiresctl s/step | reference s/step | time ratio | hiresctl peak GB | "
        "reference peak GB | memory ratio | steps (hiresctl, reference) | target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, mine, theirs in results:
        t_ours, t_ref = statistics.median(mine["steps"]), statistics.median(theirs["steps"])
        met = t_ours < t_ref and mine["peak"] <= theirs["peak"]
        lines.append(
            f"| {method} | {t_ours:.2f} | {t_ref:.2f} | {t_ours / t_ref:.2f}× | "
            f"{mine['peak']:.2f} (+{mine['peak'] - mine['base']:.2f}) | "
            f"{theirs['peak']:.2f} (+{theirs['peak'] - theirs['base']:.2f}) | "
            f"{mine['peak'] / theirs['peak']:.2f}× | {len(mine['steps'])}, {len(theirs['steps'])} | "
            f"faster at no more memory: **{'met' if met else 'not met'}** |"
        )
    publish(lines, "reference-steps")


if __name__ == "__main__":
    main()
