"""The one training loop every method shares.

AdamW, warm-up then linear/cosine decay (stepped once per image batch), gradient accumulation,
mixed precision on CUDA, seeded runs, atomic checkpoints with ``--resume``, JSONL metrics and
TensorBoard logs in the run folder, peak memory and throughput, torchrun DDP.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hiresctl.data import LabelledImage, PatchAugment, PatchStream, PlannedReads, require_images
from hiresctl.models import model_encoder
from hiresctl.train import distributed
from hiresctl.train.checkpoint import (
    atomic_save,
    checkpoint_recipe,
    load_checkpoint,
    load_weights_into,
)
from hiresctl.train.inputs import input_record
from hiresctl.train.memory import (
    MemoryPlan,
    PeakMemory,
    keep_large_allocations,
    map_large_allocations,
)
from hiresctl.train.methods import BatchOutput, StepContext
from hiresctl.train.progress import describe_epoch, describe_progress
from hiresctl.train.recipe import Recipe, dump_recipe, lr_lambda
from hiresctl.train.run import (
    BEST,
    CHECKPOINTS,
    LAST,
    METRICS,
    Run,
    TrainingDiverged,
    batch_seed,
    build_run,
    check_inputs,
    effective_precision,
    get_task,
    read_metrics,
    resolve_device,
    step_context,
)
from storage import Dataset
from storage.errors import UsageError

PROGRESS_SECONDS = 60.0


@dataclass
class _Loop:
    """What one ``fit`` carries from batch to batch and epoch to epoch."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: Any
    precision: str
    start_epoch: int = 0
    start_batch: int = 0
    global_step: int = 0
    best: float | None = None
    writer: Any = None
    augment: PatchAugment | None = None
    stream: PatchStream | None = None
    ctx: StepContext | None = None
    peak: PeakMemory | None = None
    inputs: dict[str, Any] | None = None
    trained_on: dict[str, Any] | None = None
    train_seconds: float = 0.0
    wait_seconds: float = 0.0
    images_seen: int = 0
    epoch_start: float = 0.0
    last_val: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    run_dir: Path
    summary: dict[str, Any]
    problems: list[str]


class Trainer:
    """``hiresctl train``: one run folder, resumable."""

    def __init__(
        self,
        data: str | Path,
        out: str | Path,
        recipe: Recipe,
        *,
        resume: bool = False,
        device: str = "auto",
        log: Callable[[str], None] = print,
    ) -> None:
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise UsageError(f"{self.out}: --out is a file, not a run folder; choose another --out")
        self.resume = resume
        # A line within the epoch at most this often (rank 0), so a long epoch is not silent.
        self.progress_seconds = PROGRESS_SECONDS
        self.world = distributed.init_world(
            "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"
        )
        self.log = log if self.world.main else (lambda message: None)  # rank 0 speaks for all
        self.device = resolve_device(device, self.world)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dataset = Dataset(data)
        self.task = task = get_task(recipe.task)
        self.checkpoint: dict[str, Any] | None = None
        last = self.out / CHECKPOINTS / LAST
        if resume:
            if not last.is_file():
                raise UsageError(
                    f"{self.out}: nothing to resume (no {CHECKPOINTS}/{LAST}); drop --resume"
                )
            self.checkpoint = load_checkpoint(last)
            saved = checkpoint_recipe(self.checkpoint, last)
            changed = {
                k: v
                for k, v in recipe.to_dict().items()
                if k in ("epochs", "checkpoint_every", "num_workers") and v != getattr(saved, k)
            }
            recipe = saved.replace(**changed)
            classes = list(self.checkpoint["classes"])
            mask_values = self.checkpoint.get("mask_values")
        else:
            if last.is_file():
                raise UsageError(
                    f"{self.out}: already holds a run; pass --resume to continue it or choose another --out"
                )
            classes, mask_values = task.classes(self.dataset)
        self.recipe = recipe
        self.train_images, self.problems = task.images(self.dataset, recipe.train_split, classes)
        require_images(self.train_images, self.dataset, recipe.train_split, self.problems)
        self.val_images, val_problems = task.images(self.dataset, recipe.val_split, classes)
        self.problems += val_problems
        self.problems = list(dict.fromkeys(self.problems))  # a damaged image is named once
        self.monitor = task.monitor(classes)
        self.run = build_run(recipe, self.dataset, classes, self.device, self.world, mask_values)
        self.memory_plan: MemoryPlan | None = None
        transformer = any(getattr(m, "transformer", False) for m in self.run.model.modules())
        if recipe.memory_budget and transformer and map_large_allocations(self.device):
            self.log(
                "under a memory budget with a transformer encoder: allocations of 1 MiB or more "
                "are mapped, so freed activations leave the process (slower; docs/encoders.md)"
            )
        elif not recipe.memory_budget:
            keep_large_allocations(self.device)  # freed activations reused, not faulted in again
        if recipe.memory_budget and not resume:
            self.memory_plan, checkpointed = budget_plan(
                self.run, recipe.memory_budget, self.train_images
            )
            changes: dict[str, Any] = {
                "batch_size": self.memory_plan.batch_size,
                "accumulation_steps": self.memory_plan.accumulation_steps,
            }
            if checkpointed:
                changes["grad_checkpointing"] = True
                self.log("grad_checkpointing=true: the encoder recomputes its blocks to fit")
            if self.memory_plan.patches_per_step is not None:
                changes["patches_per_step"] = self.memory_plan.patches_per_step
            self.recipe = recipe = recipe.replace(**changes)
            self.run.recipe = recipe
            self.run.method.recipe = recipe
            self.log(self.memory_plan.describe())

    # ------------------------------------------------------------------ helpers
    def _shard(self, epoch: int) -> list[LabelledImage]:
        """This rank's images for ``epoch``: one seeded order for all ranks, padded to divide."""
        order = np.random.default_rng(batch_seed(self.recipe.seed, epoch)).permutation(
            len(self.train_images)
        )
        images = [self.train_images[i] for i in order]
        size = self.world.size
        if size > 1:
            padded = (
                math.ceil(len(images) / (size * self.recipe.batch_size))
                * size
                * self.recipe.batch_size
            )
            images = (images * math.ceil(padded / len(images)))[:padded]
            images = images[self.world.rank :: size]
        return images

    def _batches(self, epoch: int) -> list[list[LabelledImage]]:
        images = self._shard(epoch)
        size = self.recipe.batch_size
        return [images[i : i + size] for i in range(0, len(images), size)]

    def _save(self, name: str, state: dict[str, Any]) -> None:
        if self.world.main:
            atomic_save(state, self.out / CHECKPOINTS / name)

    def _metrics_line(self, row: dict[str, Any]) -> None:
        if not self.world.main:
            return
        with open(self.out / METRICS, "a") as handle:
            handle.write(json.dumps(row) + "\n")

    def _seconds_so_far(self) -> float | None:
        """The run's wall time over every epoch in metrics.jsonl (a resumed run's earlier
        epochs too); None where an epoch predates the timing."""
        rows = read_metrics(self.out)
        if not rows or any("seconds" not in row for row in rows):
            return None
        return float(sum(row["seconds"] for row in rows))

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainResult:
        loop = self._start()
        try:
            for epoch in range(loop.start_epoch, self.recipe.epochs):
                first = loop.start_batch if epoch == loop.start_epoch else 0
                row = self._train_epoch(loop, epoch, first)
                self._end_epoch(loop, epoch, row)
        finally:
            if loop.writer is not None:
                loop.writer.close()
        summary = self._summary(loop)
        if self.world.main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return TrainResult(self.out, summary, self.problems)

    def _start(self) -> _Loop:
        """The optimizer, schedule and scaler (restored on ``--resume``), the run folder's
        recipe and classes, the augmentation, the read stream and the step context."""
        recipe, run = self.recipe, self.run
        model = run.model
        distributed.broadcast_model(model, self.world)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay
        )
        total = recipe.epochs * len(self._batches(0))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe, total))
        precision = effective_precision(self.device, recipe.precision)
        scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        loop = _Loop(optimizer, scheduler, scaler, precision)
        if self.checkpoint is not None:
            self._resume(loop, self.checkpoint)
        if self.world.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "recipe.yaml").write_text(dump_recipe(recipe))
            (self.out / "classes.json").write_text(json.dumps(self.run.classes))
        loop.writer = self._tensorboard()
        augment = PatchAugment(recipe.augment, recipe.seed, recipe.geometric, recipe.grid_offset)
        run.method.augment = augment  # training plans and targets mirror as the reads do
        loop.augment = augment
        loop.stream = PatchStream(run.reader, num_workers=recipe.num_workers, augment=augment)
        loop.ctx = step_context(run, optimizer, scaler, recipe.accumulation_steps, augment)
        loop.peak = PeakMemory(self.device)
        loop.peak.reset()
        loop.inputs = run.method.inputs_identity()  # what a loaded checkpoint must read again
        loop.trained_on = (  # what eval and predict check their inputs against
            self.checkpoint.get("trained_on")
            if self.checkpoint is not None
            else input_record(
                (self.dataset.entry(im.image_id) for im in self.train_images), recipe.level
            )
        )
        return loop

    def _resume(self, loop: _Loop, checkpoint: dict[str, Any]) -> None:
        """Weights, optimizer, schedule, scaler, position and RNG of ``last.pt``."""
        last = self.out / CHECKPOINTS / LAST
        check_inputs(self.run, checkpoint, last)
        load_weights_into(self.run.model, checkpoint, last)
        # The scheduler exists already, so loading the optimizer restores the lr it had.
        loop.optimizer.load_state_dict(checkpoint["optimizer"])
        loop.scheduler.load_state_dict(checkpoint["scheduler"])
        if loop.scaler is not None and checkpoint.get("scaler"):
            loop.scaler.load_state_dict(checkpoint["scaler"])
        loop.start_epoch, loop.start_batch = checkpoint["epoch"], checkpoint["batch"]
        loop.global_step = checkpoint["step"]
        loop.best = checkpoint.get("best")
        torch.set_rng_state(checkpoint["rng"]["torch"])
        self.log(
            f"resuming {self.out} at epoch {loop.start_epoch + 1}, batch {loop.start_batch}, "
            f"step {loop.global_step}"
        )

    def _state(self, loop: _Loop, epoch: int, batch: int) -> dict[str, Any]:
        """A checkpoint: everything ``--resume`` restores, and what evaluation checks."""
        return {
            "model": self.run.model.state_dict(),
            "optimizer": loop.optimizer.state_dict(),
            "scheduler": loop.scheduler.state_dict(),
            "scaler": loop.scaler.state_dict() if loop.scaler is not None else None,
            "epoch": epoch,
            "batch": batch,
            "step": loop.global_step,
            "best": loop.best,
            "recipe": self.recipe.to_dict(),
            "classes": self.run.classes,
            "mask_values": self.run.mask_values,
            "rng": {"torch": torch.get_rng_state()},
            "inputs": loop.inputs,
            "trained_on": loop.trained_on,
            "encoder": model_encoder(self.run.model),  # rebuilds it where its weights are not
        }

    def _train_epoch(self, loop: _Loop, epoch: int, first: int) -> dict[str, Any]:
        """Batches ``first``… of ``epoch``, then the method's calibration; the epoch's
        training columns of metrics.jsonl."""
        recipe, run = self.recipe, self.run
        assert loop.augment is not None and loop.stream is not None and loop.ctx is not None
        loop.augment.epoch = epoch
        batches = self._batches(epoch)
        plans = (
            run.method.plan(
                [im.image_id for im in batch],
                batch_seed(recipe.seed, epoch, index, self.world.rank),
                train=True,
            )
            for index, batch in enumerate(batches)
            if index >= first
        )
        reads = PlannedReads(loop.stream, plans)
        losses: list[float] = []
        correct, count, judged = 0, 0, 0
        epoch_start = last_report = time.perf_counter()
        for index in range(first, len(batches)):
            batch = batches[index]
            targets = torch.tensor([im.target for im in batch])
            output = self._train_batch(loop, epoch, index, batch, targets, reads)
            losses.append(output.loss)
            right, seen = run.task.score(output, targets)
            correct += right
            judged += seen
            count += len(batch)
            now = time.perf_counter()
            if now - last_report >= self.progress_seconds and index + 1 < len(batches):
                last_report = now
                self.log(
                    describe_progress(
                        epoch + 1,
                        recipe.epochs,
                        index + 1 - first,
                        len(batches) - first,
                        count * self.world.size,
                        now - epoch_start,
                        losses,
                    )
                )
            if loop.writer is not None:
                loop.writer.add_scalar("train/loss", output.loss, loop.global_step)
                loop.writer.add_scalar(
                    "train/lr", loop.scheduler.get_last_lr()[0], loop.global_step
                )
            every = recipe.checkpoint_every
            if every and (index + 1) % every == 0 and index + 1 < len(batches):
                self._save(LAST, self._state(loop, epoch, index + 1))
        if recipe.calibration_batches:
            calibration = batches[: recipe.calibration_batches]
            run.method.calibrate(loop.ctx, [[im.image_id for im in b] for b in calibration])
        seconds = time.perf_counter() - epoch_start
        loop.train_seconds += seconds
        loop.wait_seconds += reads.wait_seconds
        loop.images_seen += count * self.world.size
        loop.epoch_start = epoch_start
        return {
            "epoch": epoch + 1,
            "step": loop.global_step,
            "lr": loop.scheduler.get_last_lr()[0],
            "train_loss": float(np.mean(losses)) if losses else None,
            "train_accuracy": correct / judged if judged else None,
            "images_per_second": count * self.world.size / seconds if seconds else None,
            "data_wait_fraction": reads.wait_seconds / seconds if seconds else None,
            "peak_memory_gb": loop.peak.peak_bytes() / 1e9 if loop.peak else None,
        }

    def _train_batch(
        self,
        loop: _Loop,
        epoch: int,
        index: int,
        batch: list[LabelledImage],
        targets: torch.Tensor,
        reads: PlannedReads,
    ) -> BatchOutput:
        """One image batch through the method, then the schedule's step."""
        assert loop.ctx is not None
        try:
            output = self.run.method.train_batch(
                loop.ctx, [im.image_id for im in batch], targets, reads.batch()
            )
        except TrainingDiverged as exc:
            raise TrainingDiverged(
                f"{self.out}: {exc} at epoch {epoch + 1}, batch {index + 1}, step "
                f"{loop.global_step}; the last good checkpoint is kept in "
                f"{self.out / CHECKPOINTS} (lower lr or check the data)"
            ) from None
        with warnings.catch_warnings():
            # The schedule counts image batches; with accumulation the first batch ends
            # before the first optimizer step, which torch warns about.
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
            loop.scheduler.step()
        loop.global_step += 1
        return output

    def _end_epoch(self, loop: _Loop, epoch: int, row: dict[str, Any]) -> None:
        """Validation, ``last.pt`` (and ``best.pt`` when the monitored metric improved), the
        metrics line, TensorBoard and the epoch's line in the log."""
        loop.last_val = self._validate()
        row.update(
            {
                f"val_{k}": v
                for k, v in loop.last_val.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
        )
        score = loop.last_val.get(self.monitor)
        improved = score is not None and (loop.best is None or score >= loop.best)
        if improved:
            loop.best = score
        self._save(LAST, self._state(loop, epoch + 1, 0))
        if improved or not self.val_images:
            self._save(BEST, self._state(loop, epoch + 1, 0))
        row["seconds"] = time.perf_counter() - loop.epoch_start  # training, validation, saving
        self._metrics_line(row)
        if loop.writer is not None:
            for key, value in row.items():
                if isinstance(value, float) and key not in ("epoch", "step"):
                    loop.writer.add_scalar(key.replace("_", "/", 1), value, loop.global_step)
        self.log(describe_epoch(row, self.recipe.epochs, self.monitor))

    def _summary(self, loop: _Loop) -> dict[str, Any]:
        """summary.json: what ran, how fast, at what peak, with which result."""
        recipe, run = self.recipe, self.run
        peak = loop.peak.peak_bytes() if loop.peak else 0
        train_seconds = loop.train_seconds
        return {
            "task": recipe.task,
            "method": recipe.method,
            "epochs": recipe.epochs,
            "steps": loop.global_step,
            "classes": run.classes,
            "train_images": len(self.train_images),
            "val_images": len(self.val_images),
            "peak_memory_gb": peak / 1e9,
            "peak_memory_kind": loop.peak.kind if loop.peak else None,
            "images_per_second": loop.images_seen / train_seconds if train_seconds else None,
            "data_wait_fraction": loop.wait_seconds / train_seconds if train_seconds else None,
            "patches_with_grad": loop.ctx.patches_with_grad if loop.ctx else 0,
            "train_seconds": self._seconds_so_far(),
            "prepared_seconds": run.method.prepared_seconds(),
            "device": str(self.device),
            "precision": loop.precision,
            "world_size": self.world.size,
            "val": dict(loop.last_val),
            "monitor": self.monitor,
            "best_val": loop.best,
            "best_val_accuracy": loop.best if self.monitor == "accuracy" else None,
            "memory_plan": self.memory_plan.describe() if self.memory_plan else None,
            "memory_estimate_gb": self.memory_plan.estimate / 1e9 if self.memory_plan else None,
            "skipped": self.problems,
            "trained_on": loop.trained_on,
        }

    def _validate(self) -> dict[str, Any]:
        if not self.val_images:
            return {}
        return self.run.task.validate(self.run, self.val_images, self.world)

    def _tensorboard(self) -> Any:
        if not self.world.main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency; a broken install only loses the curves
            self.log("tensorboard is not importable; writing metrics.jsonl only")
            return None
        return SummaryWriter(str(self.out / "tensorboard"))


__all__ = ["TrainResult", "Trainer"]


def budget_plan(run: Run, budget: str, images: list[LabelledImage]) -> tuple[MemoryPlan, bool]:
    """``--memory-budget``'s plan; with an encoder that can recompute its blocks in the
    backward (timm's gradient checkpointing) and the recipe not asking for it, also the plan
    with it, chosen when the step does not fit otherwise or it fits more patches or images per
    step. Returns the plan and whether checkpointing was switched on for it."""
    try:
        plain: MemoryPlan | None = run.memory_plan(budget, images)
        failure: UsageError | None = None
    except UsageError as exc:
        plain, failure = None, exc
    encoder: Any = next(
        (m for m in run.model.modules() if hasattr(m, "set_grad_checkpointing")), None
    )
    if encoder is not None and not run.recipe.grad_checkpointing:
        try:
            encoder.set_grad_checkpointing(True)
        except UsageError:  # an encoder timm cannot checkpoint
            encoder = None
    if encoder is None or run.recipe.grad_checkpointing:
        if plain is None:
            assert failure is not None
            raise failure
        return plain, False
    try:
        checkpointed: MemoryPlan | None = run.memory_plan(budget, images)
    except UsageError:
        checkpointed = None
    better = checkpointed is not None and (
        plain is None
        or (checkpointed.patches_per_step or 0) > (plain.patches_per_step or 0)
        or checkpointed.batch_size > plain.batch_size
    )
    if better:
        assert checkpointed is not None
        return checkpointed, True
    encoder.set_grad_checkpointing(False)
    if plain is None:
        assert failure is not None
        raise failure
    return plain, False
