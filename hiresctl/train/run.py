"""A run in memory: its recipe, task, method, model, device and reader; building one, loading a
trained one from its folder, and what every loop over images shares (the planned reads of
batches, precision, the hooks a method calls)."""

from __future__ import annotations

import contextlib
import json
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from hiresctl.data import PatchAugment, PatchReader, PatchStream, ReadRequest
from hiresctl.train import distributed
from hiresctl.train.checkpoint import checkpoint_recipe, load_checkpoint, load_weights_into
from hiresctl.train.memory import PeakMemory
from hiresctl.train.methods import Method, StepContext, create_method
from hiresctl.train.recipe import Recipe
from hiresctl.train.registry import task_class
from storage import Dataset
from storage.errors import HiresError, StoreError, UsageError

if TYPE_CHECKING:  # annotations only: the tasks import this module
    from hiresctl.train.tasks.base import Task

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


class TrainingDiverged(HiresError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def resolve_device(name: str, world: distributed.World | None = None) -> torch.device:
    if name not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device {name!r}: choose auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", world.local_rank if world else 0)


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def batch_seed(*parts: int) -> int:
    return zlib.crc32(":".join(map(str, parts)).encode())


def autocast_factory(
    device: torch.device, precision: str
) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    precision = effective_precision(device, precision)
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (Intel AMX tiles or AVX-512 BF16), the
    case where oneDNN's bfloat16 convolutions beat float32 ones."""
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(torch.cpu, probe, None)
        try:
            if check is not None and check():
                return True
        except RuntimeError:  # an older torch without the probe's kernel
            continue
    return False


def effective_precision(device: torch.device, precision: str) -> str:
    """``auto``: bfloat16 autocast where the device computes it natively (a CUDA GPU that
    supports it, else float16; a CPU with AMX or AVX-512 BF16), float32 elsewhere."""
    if precision != "auto":
        return precision
    if device.type == "cpu":
        return "bf16" if cpu_has_bf16() else "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


@dataclass
class Run:
    """Everything of one run held in memory while it trains or evaluates."""

    recipe: Recipe
    classes: list[str]
    task: Task
    method: Method
    model: nn.Module
    device: torch.device
    reader: PatchReader
    world: distributed.World = field(default_factory=distributed.World)
    mask_values: list[int] | None = None  # segmentation: the mask value of each class
    # what the training images were (channels, dtypes, µm/px, level): ``hiresctl.train.inputs``;
    # None for a fresh run or a checkpoint that predates the record
    trained_on: dict[str, Any] | None = None


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
) -> Run:
    """A fresh run of ``recipe`` on ``dataset``: its task, reader, method and model (seeded)."""
    task = get_task(recipe.task)
    reader = PatchReader(dataset, level=recipe.level, mask_values=mask_values,
                         box_classes=classes if task.reads_boxes else None)  # fmt: skip
    method = create_method(recipe, len(classes), reader)
    seed_all(recipe.seed)
    # Convolution weights channels-last: oneDNN (CPU) and cuDNN then run every convolution in
    # that layout, whatever the input's; on 2 CPU cores a training step of `tiny`, `unet-16`
    # and ResNet-18 ran 20–45% faster (BENCHMARKS.md, "Machine limits (C1)"). The values and
    # the state dict's keys are unchanged, so checkpoints load either way.
    model = method.build_model().to(device).to(memory_format=torch.channels_last)
    return Run(recipe, classes, task, method, model, device, reader,
               world or distributed.World(), mask_values)  # fmt: skip


class PlannedReads:
    """One stream of reads for a sequence of image batches; hands each batch its own reads."""

    def __init__(self, stream: PatchStream, plans: Iterator[list[ReadRequest]]) -> None:
        self.lengths: deque[int] = deque()

        def flat() -> Iterator[ReadRequest]:
            for plan in plans:
                self.lengths.append(len(plan))
                yield from plan

        self._items = stream(flat())
        self.wait_seconds = 0.0

    def _next(self) -> tuple[ReadRequest, torch.Tensor]:
        start = time.perf_counter()
        item = next(self._items)
        self.wait_seconds += time.perf_counter() - start
        return item

    def batch(self) -> Iterator[tuple[ReadRequest, torch.Tensor]]:
        first = self._next()  # pulling the first read makes the plan's length known
        count = self.lengths.popleft()
        yield first
        for _ in range(count - 1):
            yield self._next()


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
    run: Run, optimizer: torch.optim.Optimizer | None, scaler: Any, accumulation: int,
    augment: PatchAugment | None = None,
) -> StepContext:  # fmt: skip
    """The loop's hooks for a method; ``augment``: reads the plan could not know in advance
    (IPS's re-read of its selection) are augmented as the planned ones are."""
    autocast = autocast_factory(run.device, run.recipe.precision)
    ctx: StepContext

    def backward(loss: torch.Tensor) -> None:
        if not torch.isfinite(loss.detach()).all():
            raise TrainingDiverged(f"loss became {float(loss.detach())} (not finite)")
        scaled = loss / accumulation
        if scaler is not None:
            scaler.scale(scaled).backward()
        else:
            scaled.backward()
        ctx.micro_steps += 1

    def step() -> None:
        assert optimizer is not None
        distributed.average_gradients(run.model, run.world)
        if scaler is not None:
            scaler.unscale_(optimizer)
        if run.recipe.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.recipe.max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ctx.micro_steps = 0

    read = PatchStream(run.reader, augment=augment).read
    ctx = StepContext(run.model, run.device, autocast, backward, step, read, accumulation)
    return ctx


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
    run = build_run(recipe, dataset, list(state["classes"]), device,
                    mask_values=state.get("mask_values"))  # fmt: skip
    check_inputs(run, state, path)
    load_weights_into(run.model, state, path)
    run.model.eval()
    run.trained_on = state.get("trained_on")
    return run


def _inputs_text(identity: dict[str, Any]) -> str:
    return (f"feature set {identity['features']!r}: {identity['encoder']} ({identity['weights']}), "
            f"patch {identity['patch_size']} at level {identity['level']}, {identity['dim']} wide")  # fmt: skip


def check_inputs(run: Run, state: dict[str, Any], path: Path) -> None:
    """Refuse, naming both, inputs other than those the checkpoint was trained on (a feature
    set embedded again with another encoder under the same name)."""
    saved = state.get("inputs")
    if saved is None:  # pixels only, or a checkpoint that predates the record
        return
    found = run.method.inputs_identity()
    if found != saved:
        now = _inputs_text(found) if found else "no such inputs"
        raise StoreError(
            str(path),
            f"trained on {_inputs_text(saved)}; the store now has {now}. Embed the store as the "
            "run was trained (`hiresctl embed` with those settings under another --name, then "
            "evaluate a run trained on it), or retrain",
        )
