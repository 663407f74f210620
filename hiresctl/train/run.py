"""Building a run (recipe, task, method, model, device and reader) or loading a trained one from
its folder, and what every loop over images shares: an inference pass's planned reads, timing and
peak memory, the step context a method gets."""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hiresctl.data import PatchAugment, PatchReader, PatchStream, PlannedReads, ReadRequest
from hiresctl.train import distributed
from hiresctl.train.checkpoint import checkpoint_recipe, load_checkpoint, load_weights_into
from hiresctl.train.context import (
    TrainingDiverged,
    autocast_factory,
    cpu_has_bf16,
    effective_precision,
)
from hiresctl.train.memory import PeakMemory, keep_large_allocations
from hiresctl.train.methods import StepContext, create_method
from hiresctl.train.recipe import Recipe
from hiresctl.train.registry import task_class
from hiresctl.train.task import Run, Task
from storage import Dataset
from storage.errors import StoreError, UsageError

CHECKPOINTS = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"
METRICS = "metrics.jsonl"  # one JSON line per finished epoch


def read_metrics(folder: Path) -> list[dict[str, Any]]:
    """A run folder's epoch lines, leaving out a line cut by an interrupted run."""
    path = Path(folder) / METRICS
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def resolve_device(name: str, world: distributed.World | None = None) -> torch.device:
    if name not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device {name!r}: choose auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", world.local_rank if world else 0)


def inference_device(name: str) -> torch.device:
    """:func:`resolve_device` for a process that only runs models forward (eval, predict, the
    report): on a CPU its large activations stay in glibc's heap between batches
    (:func:`~hiresctl.train.memory.keep_large_allocations`), as training keeps them."""
    device = resolve_device(name)
    keep_large_allocations(device)
    return device


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def batch_seed(*parts: int) -> int:
    return zlib.crc32(":".join(map(str, parts)).encode())


def get_task(name: str) -> Task:
    """The task registered as ``name`` (cls, det, seg)."""
    task: Task = task_class(name)()
    return task


def build_run(
    recipe: Recipe,
    dataset: Dataset,
    classes: list[str],
    device: torch.device,
    world: distributed.World | None = None,
    mask_values: list[int] | None = None,
    encoder: dict[str, Any] | None = None,
) -> Run:
    """A fresh run of ``recipe`` on ``dataset``: its task, reader, method and model (seeded);
    ``encoder``: a checkpoint's record of its encoder, to rebuild it without its weights."""
    task = get_task(recipe.task)
    reader = PatchReader(
        dataset,
        level=recipe.level,
        mask_values=mask_values,
        box_classes=classes if task.reads_boxes else None,
    )
    method = create_method(recipe, len(classes), reader)
    method.encoder_record = encoder
    seed_all(recipe.seed)
    # Convolution weights channels-last: oneDNN (CPU) and cuDNN then run every convolution in
    # that layout, whatever the input's; on 2 CPU cores a training step of `tiny`, `unet-16`
    # and ResNet-18 ran 20–45% faster (BENCHMARKS.md, "Machine limits (C1)"). The values and
    # the state dict's keys are unchanged, so checkpoints load either way.
    model = method.build_model().to(device).to(memory_format=torch.channels_last)
    method.model = model  # the method's own reference, typed by its base
    return Run(
        recipe, classes, task, method, device, reader, world or distributed.World(), mask_values
    )


class Inference:
    """One inference pass over images: the planned reads of its batches (read ahead by
    ``num_workers``), the step context in evaluation mode, and its timing and peak memory."""

    def __init__(self, run: Run, plans: Iterator[list[ReadRequest]], num_workers: int = 0) -> None:
        self.reads = PlannedReads(PatchStream(run.reader, num_workers=num_workers), plans)
        self.ctx = step_context(run, optimizer=None, scaler=None, accumulation=1)
        self.peak = PeakMemory(run.device)
        self.peak.reset()
        self.start = time.perf_counter()

    def batch(self) -> Iterator[tuple[ReadRequest, torch.Tensor]]:
        """The reads of the next planned batch."""
        return self.reads.batch()

    def stats(self, images: int) -> dict[str, float]:
        """Seconds, images/s, peak memory (GB) and the share of time spent waiting on reads."""
        seconds = time.perf_counter() - self.start
        return {
            "seconds": seconds,
            "images_per_second": images / seconds if seconds else 0.0,
            "peak_memory_gb": self.peak.peak_bytes() / 1e9,
            "data_wait_fraction": self.reads.wait_seconds / seconds if seconds else 0.0,
        }


def step_context(
    run: Run,
    optimizer: torch.optim.Optimizer | None,
    scaler: Any,
    accumulation: int,
    augment: PatchAugment | None = None,
) -> StepContext:
    """The loop's hooks for the run's method (:meth:`Run.context` with the loop's optimizer,
    scaler, accumulation and augmentation)."""
    return run.context(optimizer, scaler, accumulation, augment)


def load_run(
    run_dir: str | Path, dataset: Dataset, device: torch.device, which: str = "best"
) -> Run:
    """Rebuild a trained run (recipe, classes, weights) from its folder."""
    folder = Path(run_dir)
    path = folder / CHECKPOINTS / (BEST if which == "best" else LAST)
    if not path.is_file():
        path = folder / CHECKPOINTS / LAST
    if not path.is_file():
        raise StoreError(
            str(folder), "no checkpoint in this run folder (did `hiresctl train` finish an epoch?)"
        )
    state = load_checkpoint(path)
    recipe = checkpoint_recipe(state, path).replace(pretrained=None)
    run = build_run(
        recipe,
        dataset,
        list(state["classes"]),
        device,
        mask_values=state.get("mask_values"),
        encoder=state.get("encoder"),
    )
    check_inputs(run, state, path)
    load_weights_into(run.model, state, path)
    run.model.eval()
    run.trained_on = state.get("trained_on")
    return run


def _inputs_text(identity: dict[str, Any]) -> str:
    return (
        f"feature set {identity['features']!r}: {identity['encoder']} ({identity['weights']}), "
        f"patch {identity['patch_size']} at level {identity['level']}, {identity['dim']} wide"
    )


def check_inputs(run: Run, state: dict[str, Any], path: Path) -> None:
    """Refuse, naming both, inputs other than those the checkpoint was trained on (a feature
    set embedded again with another encoder under the same name)."""
    saved = state.get("inputs")
    if saved is None:  # pixels only, or a checkpoint that predates the record
        return
    found = run.method.inputs_identity()
    if found != saved:
        now = _inputs_text(found) if found else "no such inputs"
        fields = sorted(k for k in {*saved, *(found or {})} if saved.get(k) != (found or {}).get(k))
        raise StoreError(
            str(path),
            f"trained on {_inputs_text(saved)}; the store now has {now} (differing: "
            f"{', '.join(fields)}). Embed the store as the "
            "run was trained (`hiresctl embed` with those settings under another --name, then "
            "evaluate a run trained on it), or retrain",
        )


__all__ = [
    "BEST",
    "CHECKPOINTS",
    "LAST",
    "METRICS",
    "Inference",
    "Run",
    "TrainingDiverged",
    "autocast_factory",
    "batch_seed",
    "build_run",
    "check_inputs",
    "cpu_has_bf16",
    "effective_precision",
    "get_task",
    "load_run",
    "read_metrics",
    "resolve_device",
    "seed_all",
    "step_context",
]
