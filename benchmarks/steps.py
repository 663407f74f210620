"""Training-step efficiency (E1): hiresctl's training step against the bare torch work it does.

    python benchmarks/steps.py [--side 4096] [--images 5] [--rounds 2] [--methods patchgd-global,patchgd,ips,downsample,full]

For each classification method, on the same ``--images`` synthetic UltraMNIST images of
``--side``² (ResNet-18, patch 256, the method's defaults, one image per step):

* **hiresctl**: ``Trainer.fit`` for one epoch, as ``hiresctl train`` runs it (reads from the
  store, decode, planning, the method's ``train_batch``, scheduler, bookkeeping); a step's time
  is the time between the ends of two consecutive steps, so the first step's warm-up is left out.
* **bare**: the same tensor work on pixels already in memory, written as a plain torch loop
  with the same model modules and threads: the no-grad latent fill or IPS's selection passes,
  the patches re-encoded with gradient, the head, the loss, backward and the optimizer step.

The ratio is hiresctl / bare (target ≤ 1.15); what is left is reads and decode that the
background reader did not hide (the data-wait column), copies, bookkeeping and Python. Medians
over the steps (at least 3). Inputs go to benchmarks/data/ (ignored by git); the table replaces
the "Step efficiency" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
sys.path.insert(0, str(HERE))
from _common import all_in_training, publish  # noqa: E402
from _common import hiresctl as _hiresctl  # noqa: E402

WARMUP = 2
METHODS = ["patchgd-global", "patchgd", "ips", "downsample", "full"]
# float32: the bare loop runs float32, and E1's history was measured so (`auto` picks bfloat16 on
# CPUs with AMX since 2026-12-06)
SETTINGS = {
    "backbone": "resnet18",
    "patch_size": 256,
    "batch_size": 1,
    "epochs": 1,
    "precision": "fp32",
    "train_split": "train",
    "val_split": "none",
    "calibration_batches": 0,
}


def store(side: int, images: int) -> Path:
    """``images`` UltraMNIST images of ``side``², all in the train split."""
    path = DATA / f"e1_{side}_{images}.zarr"
    if path.exists():
        return path
    source = DATA / f"e1_{side}_{images}_src"
    _hiresctl(
        "synth",
        "ultramnist",
        str(source),
        "--count",
        str(images),
        "--size",
        str(side),
        "--classes",
        "10",
    )
    labels = all_in_training(source)
    _hiresctl("tile", str(source / "images"), "--labels", str(labels), "--out", str(path))
    return path


def hiresctl_steps(
    data: Path, method: str, work: Path, settings: dict[str, Any] | None = None
) -> tuple[list[float], float]:
    """Step times of one epoch of ``Trainer.fit`` (first step left out) and its data-wait
    fraction; ``settings`` (default: E1's) are the recipe's."""
    from hiresctl.train import Trainer, load_recipe

    recipe = load_recipe(None, "cls", method, dict(settings or SETTINGS))
    out = work / method
    shutil.rmtree(out, ignore_errors=True)
    trainer = Trainer(data, out, recipe, log=lambda message: None)
    ends: list[float] = []
    train_batch = trainer.run.method.train_batch

    def timed(*args: Any, **kwargs: Any) -> Any:
        result = train_batch(*args, **kwargs)
        ends.append(time.perf_counter())
        return result

    trainer.run.method.train_batch = timed  # type: ignore[method-assign]
    result = trainer.fit()
    steps = [b - a for a, b in itertools.pairwise(ends)]
    return steps, float(result.summary["data_wait_fraction"] or 0.0)


# ------------------------------------------------------------------------- the bare tensor work


class Pixels:
    """What one step of ``method`` reads of an image, in memory, read once through the store's
    reader (not timed): the patches and the global patch, or the whole level for ``full``."""

    def __init__(self, run: Any, image_id: str, method: str) -> None:
        from hiresctl.data import NO_TAG, PatchStream, ReadRequest

        read = PatchStream(run.reader).read
        grid, kept = run.method.patches(image_id)
        assert len(kept) == grid.rows * grid.cols, "E1 keeps every patch"
        self.grid = grid
        self.whole = read(ReadRequest(image_id, "global", grid, tag=NO_TAG))  # (3, p, p)
        self.full = read(run.method.request(image_id, 0))[0] if method == "full" else self.whole
        patched = method in ("patchgd", "patchgd-global", "ips")
        self.patches = (
            read(ReadRequest(image_id, "patches", grid, kept, NO_TAG))
            if patched
            else torch.empty(0)
        )
        index = torch.arange(len(kept))
        self.rows, self.cols = index // grid.cols, index % grid.cols


def bare_patchgd(
    model: Any, recipe: Any, px: Pixels, target: torch.Tensor, use_global: bool
) -> None:
    """Fill the latent without gradient (``fill_batch`` patches at a time, the encoder's
    BatchNorm on batch statistics where ``fill_mode`` is "train", as classification's default
    is, else on running ones), then J inner steps of k patches with gradient (and the global
    patch), the J losses averaged into one optimizer step."""
    encoder, n = model.encoder, len(px.patches)
    k = math.ceil(n * recipe.sample_fraction)
    inner = math.ceil(n / k)
    latent = torch.zeros(1, model.latent_dim, px.grid.rows, px.grid.cols)
    encoder.train(recipe.fill_mode == "train")
    with torch.no_grad():
        for s in range(0, n, recipe.fill_batch):
            part = slice(s, s + recipe.fill_batch)
            latent[0][:, px.rows[part], px.cols[part]] = encoder(px.patches[part]).T
    model.train()
    order = torch.randperm(n)
    for j in range(inner):
        latent = latent.detach()
        chosen = order[j * k : (j + 1) * k]
        x = px.patches[chosen]
        if use_global:
            x = torch.cat([x, px.whole.unsqueeze(0)])
        features = encoder(x)
        latent[0][:, px.rows[chosen], px.cols[chosen]] = features[: len(chosen)].T
        g = features[len(chosen) :] if use_global else None
        loss = F.cross_entropy(model.classify(latent, g), target)
        (loss / inner).backward()


def bare_ips(model: Any, recipe: Any, px: Pixels, target: torch.Tensor) -> None:
    """Score M, then I at a time against the memory without gradient (the aggregator in eval
    mode, the encoder's BatchNorm on batch statistics where ``select_mode`` is "train", the
    default); keep the top M; encode the M with gradient and classify them."""
    memory, step, cols = recipe.memory_size, recipe.iter_size, px.grid.cols
    order = torch.randperm(len(px.patches))
    model.eval()
    model.encoder.train(recipe.select_mode == "train")
    with torch.no_grad():
        keep = order[:memory]
        emb = model.with_positions(model.encoder(px.patches[keep]), keep, cols)
        for s in range(memory, len(order), step):
            part = order[s : s + step]
            more = model.with_positions(model.encoder(px.patches[part]), part, cols)
            candidates, indices = torch.cat([emb, more]), torch.cat([keep, part])
            top = model.scores(candidates.unsqueeze(0))[0].topk(memory).indices
            emb, keep = candidates[top], indices[top]
    model.train()
    chosen = keep.sort().values
    emb = model.with_positions(model.encoder(px.patches[chosen]), chosen, cols)
    F.cross_entropy(model.classify(emb.unsqueeze(0)), target).backward()


def bare_whole(model: Any, image: torch.Tensor, target: torch.Tensor) -> None:
    model.train()
    F.cross_entropy(model(image.unsqueeze(0)), target).backward()


def bare_steps(data: Path, method: str, repeats: int) -> list[float]:
    """``repeats`` timed bare steps after ``WARMUP`` untimed ones (a fresh model's first steps
    allocate and build its kernels), cycling through the store's images."""
    from hiresctl.train import load_recipe
    from hiresctl.train.run import build_run, get_task
    from storage import Dataset

    recipe = load_recipe(None, "cls", method, dict(SETTINGS))
    dataset = Dataset(data)
    task = get_task("cls")
    classes, _ = task.classes(dataset)
    images, _ = task.images(dataset, "train", classes)
    run = build_run(recipe, dataset, classes, torch.device("cpu"))
    model = run.model
    if method == "full":  # as hiresctl runs a whole image this large (WholeImage._layout)
        model.to(memory_format=torch.contiguous_format)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay
    )
    work: Callable[[Pixels, torch.Tensor], None]
    if method in ("patchgd", "patchgd-global"):

        def work(px: Pixels, t: torch.Tensor) -> None:
            bare_patchgd(model, recipe, px, t, method == "patchgd-global")
    elif method == "ips":

        def work(px: Pixels, t: torch.Tensor) -> None:
            bare_ips(model, recipe, px, t)
    elif method == "downsample":

        def work(px: Pixels, t: torch.Tensor) -> None:
            bare_whole(model, px.whole, t)
    else:

        def work(px: Pixels, t: torch.Tensor) -> None:
            bare_whole(model, px.full, t)

    times = []
    for i in range(repeats + WARMUP):
        image = images[i % len(images)]
        px = Pixels(run, image.image_id, method)
        target = torch.tensor([image.target])
        start = time.perf_counter()
        work(px, target)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times[WARMUP:]


def measure(data: Path, method: str, work: Path, repeats: int, rounds: int) -> dict[str, Any]:
    """One method in a fresh process (its own peak), printed as one line of key=value."""
    proc = subprocess.run(
        [
            sys.executable,
            __file__,
            "--one",
            method,
            "--data",
            str(data),
            "--work",
            str(work),
            "--repeats",
            str(repeats),
            "--rounds",
            str(rounds),
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        raise RuntimeError(f"{method}: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def one(data: Path, method: str, work: Path, repeats: int, rounds: int) -> None:
    """``rounds`` times an epoch in the trainer, then the bare loop: alternating, so a stretch
    of slower cores (the host's other work) falls on both sides rather than on one."""
    torch.manual_seed(0)
    ours: list[list[float]] = []
    bare: list[list[float]] = []
    waits = []
    for _ in range(rounds):
        steps, wait = hiresctl_steps(data, method, work)
        ours.append(steps)
        waits.append(wait)
        bare.append(bare_steps(data, method, repeats))
    print(
        json.dumps(
            {
                "hiresctl": ours,
                "bare": bare,
                "wait": statistics.mean(waits),
                "threads": torch.get_num_threads(),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=4096)
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--one")
    parser.add_argument("--data", type=Path)
    parser.add_argument("--work", type=Path, default=DATA / "e1_runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="alternate the trainer's epoch and the bare loop this many times per method",
    )
    args = parser.parse_args()
    if args.one:
        one(args.data, args.one, args.work, args.repeats, args.rounds)
        return
    data = store(args.side, args.images)
    rows = []
    for method in args.methods.split(","):
        result = measure(data, method, args.work, max(args.repeats, args.images - 1), args.rounds)
        rounds = [
            statistics.median(a) / statistics.median(b)
            for a, b in zip(result["hiresctl"], result["bare"], strict=True)
        ]
        every_ours = [t for steps in result["hiresctl"] for t in steps]
        every_bare = [t for steps in result["bare"] for t in steps]
        ours, bare = statistics.median(every_ours), statistics.median(every_bare)
        rows.append((method, ours, bare, rounds, result["wait"], len(every_ours), len(every_bare)))
        print(
            f"{method}: hiresctl {ours:.2f} s, bare {bare:.2f} s, ratio {ours / bare:.3f} "
            f"(rounds {', '.join(f'{r:.3f}' for r in rounds)}), data wait {result['wait']:.1%}",
            flush=True,
        )
    machine = f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.machine()}, CPU only"
    lines = [
        f"## Step efficiency (E1), {time.strftime('%Y-%m-%d')}, {machine}",
        "",
        f"Command: `python benchmarks/steps.py --side {args.side} --images {args.images}"
        f"{f' --rounds {args.rounds}' if args.rounds != 2 else ''}`. One training "
        f"step (one {args.side}² synthetic UltraMNIST image, ResNet-18, patch 256, each method's "
        "defaults, `calibration_batches=0`, float32) in hiresctl's trainer against the same "
        "tensor work written as a bare torch loop on pixels already in memory, same model "
        "modules (channels-last as hiresctl builds them; the default layout for `full`, as "
        "hiresctl runs images this large), same "
        f"process, {result['threads']} threads. {args.rounds} rounds per method, each an epoch "
        "in the trainer and then the bare loop, so that a stretch of slower cores falls on "
        "both; medians over every round's steps (the trainer's first step of an epoch left "
        "out), and each round's own ratio; data wait: the share of the hiresctl epochs spent "
        "waiting for pixels.",
        "",
        "| method | hiresctl s/step | bare torch s/step | ratio | ratio per round | data wait "
        "| steps (hiresctl, bare) | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, ours, bare, rounds, wait, n_ours, n_bare in rows:
        verdict = "met" if ours / bare <= 1.15 else "not met"
        lines.append(
            f"| {method} | {ours:.2f} | {bare:.2f} | {ours / bare:.2f}× | "
            f"{', '.join(f'{r:.2f}' for r in rounds)} | {wait:.1%} | "
            f"{n_ours}, {n_bare} | ≤ 1.15×: **{verdict}** |"
        )
    publish(lines, "steps")


if __name__ == "__main__":
    main()
