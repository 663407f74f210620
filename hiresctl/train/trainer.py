"""The one training loop every method shares.

AdamW, warm-up then linear/cosine decay (stepped once per image batch), gradient accumulation,
mixed precision on CUDA, seeded runs, atomic checkpoints with ``--resume``, JSONL metrics and
TensorBoard logs in the run folder, peak memory and throughput, torchrun DDP.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hiresctl.data import (
    LabelledImage,
    PatchAugment,
    PatchReader,
    PatchStream,
    ReadRequest,
    class_names,
    detection_images,
    labelled_images,
    require_images,
    segmentation_images,
)
from hiresctl.train import distributed
from hiresctl.train.checkpoint import (
    atomic_save,
    checkpoint_recipe,
    load_checkpoint,
    load_weights_into,
)
from hiresctl.train.memory import (
    MemoryPlan,
    PeakMemory,
    activation_bytes,
    current_rss_bytes,
    parameter_bytes,
    plan_memory,
)
from hiresctl.train.methods import Heatmap, Method, StepContext, create_method
from hiresctl.train.recipe import Recipe, dump_recipe, parse_bytes
from hiresctl.train.segmentation import monitor_key, segmentation_metrics
from storage import Dataset, HiresError, StoreError, UsageError

CHECKPOINTS = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"


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


def effective_precision(device: torch.device, precision: str) -> str:
    if precision != "auto":
        return precision
    if device.type == "cpu":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def lr_lambda(recipe: Recipe, total_steps: int) -> Callable[[int], float]:
    warmup = round(recipe.warmup * total_steps)
    floor = recipe.min_lr_ratio

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if recipe.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if recipe.schedule == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return floor + (1 - floor) * (1 - progress)

    return factor


@dataclass
class Run:
    """Everything of one run held in memory while it trains or evaluates."""

    recipe: Recipe
    classes: list[str]
    method: Method
    model: nn.Module
    device: torch.device
    reader: PatchReader
    world: distributed.World = field(default_factory=distributed.World)
    mask_values: list[int] | None = None  # segmentation: the mask value of each class


def build_run(
    recipe: Recipe,
    dataset: Dataset,
    classes: list[str],
    device: torch.device,
    world: distributed.World | None = None,
    mask_values: list[int] | None = None,
) -> Run:
    box_classes = classes if recipe.task == "det" else None
    reader = PatchReader(dataset, level=recipe.level, mask_values=mask_values,
                         box_classes=box_classes)  # fmt: skip
    method = create_method(recipe, len(classes), reader)
    seed_all(recipe.seed)
    model = method.build_model().to(device)
    return Run(recipe, classes, method, model, device, reader, world or distributed.World(),
               mask_values)  # fmt: skip


class _PlannedReads:
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


def _timing(
    images: int, seconds: float, peak: PeakMemory, reads: _PlannedReads
) -> dict[str, float]:
    return {
        "seconds": seconds,
        "images_per_second": images / seconds if seconds else 0.0,
        "peak_memory_gb": peak.peak_bytes() / 1e9,
        "data_wait_fraction": reads.wait_seconds / seconds if seconds else 0.0,
    }


def predict_images(
    run: Run,
    images: list[LabelledImage],
    batch_size: int,
    num_workers: int = 0,
    heatmaps: list[Heatmap] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Logits and targets of ``images`` (this rank's share), with timing and peak memory;
    given a ``heatmaps`` list, also where the model looked in each image (appended to it)."""
    recipe = run.recipe
    stream = PatchStream(run.reader, num_workers=num_workers)
    batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    plans = (
        run.method.plan(
            [im.image_id for im in batch], batch_seed(recipe.seed, 10**6, i), train=False
        )
        for i, batch in enumerate(batches)
    )
    reads = _PlannedReads(stream, iter(plans))
    ctx = step_context(run, optimizer=None, scaler=None, accumulation=1)
    peak = PeakMemory(run.device)
    peak.reset()
    start = time.perf_counter()
    logits, targets = [], []
    for batch in batches:
        ids = [im.image_id for im in batch]
        if heatmaps is None:
            logits.append(run.method.predict(ctx, ids, reads.batch()))
        else:
            out, maps = run.method.explain(ctx, ids, reads.batch())
            logits.append(out)
            heatmaps.extend(maps)
        targets.append(torch.tensor([im.target for im in batch]))
    stats = _timing(len(images), time.perf_counter() - start, peak, reads)
    if not logits:
        return torch.zeros(0, len(run.classes)), torch.zeros(0, dtype=torch.long), stats
    return torch.cat(logits), torch.cat(targets), stats


def predict_segmentation(
    run: Run,
    images: list[LabelledImage],
    num_workers: int = 0,
    on_tile: Callable[[str, int, int, torch.Tensor, np.ndarray, np.ndarray | None], None]
    | None = None,
    with_targets: bool = True,
) -> tuple[list[np.ndarray], dict[str, float]]:
    """Segment ``images`` tile by tile at full resolution; per image, the confusion matrix
    against the store's mask (streamed tile by tile too), with timing and peak memory.
    ``on_tile(image_id, y, x, logits, classes, truth)`` sees every tile (e.g. to write
    predictions); ``truth`` is the tile's class indices (-1 unknown), None without targets."""
    from hiresctl.train.segmentation import confusion, predicted_classes

    method = run.method
    stream = PatchStream(run.reader, num_workers=num_workers)
    reads = _PlannedReads(stream, (method.plan_image(im.image_id) for im in images))  # type: ignore[attr-defined]
    ctx = step_context(run, optimizer=None, scaler=None, accumulation=1)
    peak = PeakMemory(run.device)
    peak.reset()
    start = time.perf_counter()
    classes = len(run.classes)
    matrices = []
    for image in images:
        matrix = np.zeros((classes, classes), dtype=np.int64)
        for y, x, logits in method.predict_tiles(ctx, image.image_id, reads.batch()):  # type: ignore[attr-defined]
            pred = predicted_classes(logits).numpy()
            truth = None
            if with_targets:
                height, width = pred.shape
                truth = run.reader.read_mask_region(image.image_id, y, x, width, height)
                matrix += confusion(pred, truth, classes)
            if on_tile is not None:
                on_tile(image.image_id, y, x, logits, pred, truth)
        matrices.append(matrix)
    stats = _timing(len(images), time.perf_counter() - start, peak, reads)
    return matrices, stats


def predict_detections(
    run: Run,
    images: list[LabelledImage],
    num_workers: int = 0,
    batch_size: int | None = None,
) -> tuple[list[dict[str, torch.Tensor]], dict[str, float]]:
    """Boxes (x0, y0, x1, y1 in level-0 pixels), scores and labels per image at the evaluation
    score threshold, with timing and peak memory."""
    method = run.method
    size = batch_size or run.recipe.batch_size
    batches = [images[i : i + size] for i in range(0, len(images), size)]
    stream = PatchStream(run.reader, num_workers=num_workers)
    reads = _PlannedReads(stream, (method.plan([im.image_id for im in batch], 0, train=False)
                                   for batch in batches))  # fmt: skip
    ctx = step_context(run, optimizer=None, scaler=None, accumulation=1)
    peak = PeakMemory(run.device)
    peak.reset()
    start = time.perf_counter()
    found: list[dict[str, torch.Tensor]] = []
    for batch in batches:
        ids = [im.image_id for im in batch]
        for image_id, d in zip(ids, method.detect(ctx, ids, reads.batch()), strict=True):  # type: ignore[attr-defined]
            _, height, width = run.reader.shape(image_id)
            _, height0, width0 = run.reader.entry(image_id).shape
            scale = torch.tensor([width0 / width, height0 / height] * 2)
            found.append({**d, "boxes": d["boxes"] * scale})
    stats = _timing(len(images), time.perf_counter() - start, peak, reads)
    return found, stats


def detection_metrics(
    run: Run, images: list[LabelledImage], detections: list[dict[str, torch.Tensor]]
) -> dict[str, Any]:
    """COCO metrics of ``detections`` against the store's boxes (level-0 pixels)."""
    from hiresctl.train.detection import coco_metrics, coco_results

    truth = coco_truth(run, images)
    return coco_metrics(truth, coco_results(detections), run.recipe.max_detections)


def coco_truth(run: Run, images: list[LabelledImage]) -> dict[str, Any]:
    """The COCO ground truth of ``images`` from the store, in level-0 pixels."""
    from hiresctl.train.detection import coco_ground_truth

    ids = [im.image_id for im in images]
    sizes, truth = [], []
    index = {name: i for i, name in enumerate(run.classes)}
    for image_id in ids:
        _, height, width = run.reader.entry(image_id).shape
        sizes.append((height, width))
        boxes, names = run.reader.dataset.boxes(image_id)
        labels = np.array([index.get(n, -1) for n in names], dtype=np.int64)
        keep = labels >= 0
        truth.append((boxes[keep], labels[keep]))
    return coco_ground_truth(ids, sizes, truth, run.classes)


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


def _memory_plan(run: Run, budget_text: str, images: list[LabelledImage]) -> MemoryPlan:
    """Estimate what a step costs and choose batch, accumulation and patches per step."""
    recipe, model = run.recipe, run.model
    budget = parse_bytes(budget_text)
    size = recipe.patch_size
    sample = torch.zeros(1, 3, size, size, device=run.device)
    encoder: nn.Module | None = getattr(model, "encoder", None) or getattr(model, "backbone", None)
    if encoder is None and run.method.encodes_pixels:
        encoder = model
    # Backward keeps about the forward activations again (gradients of each), plus the inputs.
    per_patch = (
        2 * activation_bytes(encoder, sample) + sample.numel() * 4 if encoder is not None else 0
    )
    fixed = 4 * parameter_bytes(model)  # weights, gradients, two AdamW moments
    baseline = current_rss_bytes() if run.device.type == "cpu" else 0
    per_image = 0
    patches_wanted: int | None = None
    own = run.method.memory(images, per_patch)  # a method that states its own cost
    if own is not None:
        per_image, per_patch, patches_wanted = own
    elif recipe.task == "det":
        per_image, per_patch, patches_wanted = _detection_memory(run, images, per_patch)
    elif recipe.task == "seg" and recipe.method in ("tiled", "patchgd-global"):
        biggest = max((run.method.patches(im.image_id) for im in images), key=lambda g: len(g[1]))
        grid, kept = biggest
        pixels = grid.rows * grid.cols * size * size
        outputs = getattr(model, "outputs", 1)
        # latent, its copy with gradient, the global latent, their concatenation, the logits and
        # the loss's temporaries (per output), the int64 target
        per_image = pixels * (4 * recipe.channels * 4 + 3 * outputs * 4 + 8)
        if recipe.method == "patchgd-global":
            per_image += per_patch
        patches_wanted = run.method.patches_per_step(len(kept))  # type: ignore[attr-defined]
    elif recipe.method in ("patchgd", "patchgd-global"):
        biggest = max((run.method.patches(im.image_id) for im in images), key=lambda g: len(g[1]))
        grid, kept = biggest
        latent = int(model.latent_dim) * grid.rows * grid.cols * 4  # type: ignore[arg-type]
        # the stride-1 blocks' activations (conv, ReLU, BN, dropout), or the pool's input
        head = 4 * max(1, recipe.head_context) * recipe.head_width * grid.rows * grid.cols * 4
        per_image = 2 * latent + 2 * head + recipe.fill_batch * size * size * 3 * 4
        if recipe.method == "patchgd-global":
            per_image += per_patch
        patches_wanted = run.method.patches_per_step(len(kept))  # type: ignore[attr-defined]
    elif recipe.method == "ips":
        per_image = (recipe.memory_size + recipe.iter_size) * size * size * 3 * 4
        patches_wanted = None
        per_patch *= recipe.memory_size
    elif recipe.method == "downsample":
        side = recipe.input_size or size
        per_patch = int(per_patch * (side / size) ** 2)
    elif recipe.method == "full":
        side = max(max(run.reader.shape(im.image_id)[1:]) for im in images)
        per_patch = int(per_patch * (side / size) ** 2)
    return plan_memory(
        budget,
        baseline=baseline,
        fixed=fixed,
        per_patch=per_patch,
        per_image=per_image,
        batch_size=recipe.batch_size,
        accumulation_steps=recipe.accumulation_steps,
        patches_wanted=patches_wanted,
    )


def _detection_memory(
    run: Run, images: list[LabelledImage], per_patch: int
) -> tuple[int, int, int | None]:
    """(per image, per patch, patches wanted) of a detection step: the FCOS head's activations
    on the canvas it sees (stitched image, window or resized image), the stitched maps and
    their gradient copies, and target matching (anchor points × boxes, at most
    ``MATCH_CHUNK`` points at a time)."""
    from hiresctl.models.detection import MATCH_CHUNK, PatchFCOS, RecomputedTower
    from hiresctl.train.detection import DetectionMethod
    from hiresctl.train.methods import PatchGD

    recipe, method, model = run.recipe, run.method, run.model
    assert isinstance(method, DetectionMethod) and isinstance(model, PatchFCOS)
    channels = recipe.channels
    # per anchor point, in maps of `channels` floats: both branches' towers (conv, GroupNorm,
    # ReLU per block; a recomputed tower keeps each block's input and redoes one block at a
    # time in backward), plus the predictions and their gradients
    recomputed = isinstance(model.detector.head.classification_head.conv, RecomputedTower)
    towers = 2 * recipe.head_convs + 3 if recomputed else 6 * recipe.head_convs
    head = channels * 4 * (towers + 4)
    most_boxes = max((len(method.targets(im.image_id)[0]) for im in images), default=0)

    def cells(height: int, width: int) -> int:
        return sum((height // s) * (width // s) for s in model.strides)

    def matching(points: int) -> int:
        return 48 * max(1, most_boxes) * min(points, MATCH_CHUNK)

    if not isinstance(method, PatchGD):  # downsample: one resized image
        side = method.input_side()
        scaled = int(per_patch * (side / recipe.patch_size) ** 2)
        points = cells(side, side)
        return 0, scaled + points * head + matching(points), None
    size = recipe.patch_size
    grid, kept = max((method.patches(im.image_id) for im in images), key=lambda g: len(g[1]))
    wanted = method.patches_per_step(len(kept))
    if recipe.method == "sliced":
        points = cells(size, size)
        return 0, per_patch + points * head + matching(points), wanted
    canvas = cells(grid.rows * size, grid.cols * size)
    maps = canvas * channels * 4 * (2 + (3 if method.use_global else 0))
    per_image = maps + canvas * head + matching(canvas)
    if method.use_global:
        per_image += per_patch  # the global patch, encoded with gradient every step
    return per_image, per_patch, wanted


def task_classes(dataset: Dataset, task: str) -> tuple[list[str], list[int] | None]:
    """Class names of a new run, and for segmentation the mask value of each class."""
    if task == "seg":
        named = dataset.mask_classes()
        if len(named) < 2:
            raise StoreError(
                dataset.path,
                f"needs masks with at least 2 label values to train a segmenter, found "
                f"{list(named) or 'no masks'} (tile with --masks DIR)",
            )
        return list(named.values()), list(named)
    if task == "det":
        names = dataset.box_classes()
        if not names:
            raise StoreError(
                dataset.path,
                "has no object annotations to train a detector (tile with --coco FILE or "
                "--annotations PATH)",
            )
        return names, None
    classes = class_names(dataset)
    if len(classes) < 2:
        raise StoreError(
            dataset.path, f"needs at least 2 classes to train a classifier, found {classes}"
        )
    return classes, None


def classification_metrics(
    logits: torch.Tensor, targets: torch.Tensor, classes: int
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro F1, quadratic kappa, AUC (binary), confusion matrix."""
    from sklearn import metrics as skm

    y_true = targets.numpy()
    y_pred = logits.argmax(1).numpy() if len(logits) else np.zeros(0, dtype=int)
    labels = list(range(classes))
    out: dict[str, Any] = {"count": len(y_true)}
    if not len(y_true):
        return out
    out["accuracy"] = float(skm.accuracy_score(y_true, y_pred))
    matrix = skm.confusion_matrix(y_true, y_pred, labels=labels)
    recalls = [matrix[i, i] / matrix[i].sum() for i in labels if matrix[i].sum()]
    out["balanced_accuracy"] = float(np.mean(recalls))
    out["macro_f1"] = float(
        skm.f1_score(y_true, y_pred, labels=sorted(set(y_true)), average="macro", zero_division=0)
    )
    if len(set(y_true)) > 1 or len(set(y_pred)) > 1:
        kappa = skm.cohen_kappa_score(y_true, y_pred, labels=labels, weights="quadratic")
        out["kappa_quadratic"] = float(kappa) if np.isfinite(kappa) else 0.0
    if classes == 2 and len(set(y_true)) == 2:
        probs = logits.softmax(1)[:, 1].numpy()
        out["auc"] = float(skm.roc_auc_score(y_true, probs))
    out["confusion_matrix"] = matrix.tolist()
    return out


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
        self.world = distributed.init_world(
            "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"
        )
        self.log = log if self.world.main else (lambda message: None)  # rank 0 speaks for all
        self.device = resolve_device(device, self.world)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dataset = Dataset(data)
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
            classes, mask_values = task_classes(self.dataset, recipe.task)
        self.recipe = recipe
        select = {"seg": segmentation_images, "det": detection_images}.get(
            recipe.task, labelled_images
        )
        self.train_images, self.problems = select(self.dataset, recipe.train_split, classes)
        require_images(self.train_images, self.dataset, recipe.train_split)
        self.val_images, val_problems = select(self.dataset, recipe.val_split, classes)
        self.problems += val_problems
        self.problems = list(dict.fromkeys(self.problems))  # a damaged image is named once
        self.monitor = {"seg": monitor_key(len(classes)), "det": "ap"}.get(recipe.task, "accuracy")
        self.run = build_run(recipe, self.dataset, classes, self.device, self.world, mask_values)
        self.memory_plan: MemoryPlan | None = None
        if recipe.memory_budget and not resume:
            self.memory_plan = _memory_plan(self.run, recipe.memory_budget, self.train_images)
            changes: dict[str, Any] = {
                "batch_size": self.memory_plan.batch_size,
                "accumulation_steps": self.memory_plan.accumulation_steps,
            }
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
        with open(self.out / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(row) + "\n")

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainResult:
        recipe, run = self.recipe, self.run
        model = run.model
        distributed.broadcast_model(model, self.world)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay
        )
        batches_per_epoch = len(self._batches(0))
        total = recipe.epochs * batches_per_epoch
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe, total))
        precision = effective_precision(self.device, recipe.precision)
        scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        start_epoch, start_batch, global_step, best = 0, 0, 0, None
        if self.checkpoint is not None:
            load_weights_into(model, self.checkpoint, self.out / CHECKPOINTS / LAST)
            # The scheduler exists already, so loading the optimizer restores the lr it had.
            optimizer.load_state_dict(self.checkpoint["optimizer"])
            scheduler.load_state_dict(self.checkpoint["scheduler"])
            if scaler is not None and self.checkpoint.get("scaler"):
                scaler.load_state_dict(self.checkpoint["scaler"])
            start_epoch = self.checkpoint["epoch"]
            start_batch = self.checkpoint["batch"]
            global_step = self.checkpoint["step"]
            best = self.checkpoint.get("best")
            torch.set_rng_state(self.checkpoint["rng"]["torch"])
            self.log(
                f"resuming {self.out} at epoch {start_epoch + 1}, batch {start_batch}, step {global_step}"
            )
        if self.world.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "recipe.yaml").write_text(dump_recipe(recipe))
            (self.out / "classes.json").write_text(json.dumps(self.run.classes))
        writer = self._tensorboard()
        augment = PatchAugment(recipe.augment, recipe.seed, recipe.geometric)
        run.method.augment = augment  # training plans and targets mirror as the reads do
        stream = PatchStream(run.reader, num_workers=recipe.num_workers, augment=augment)
        ctx = step_context(run, optimizer, scaler, recipe.accumulation_steps, augment)
        peak = PeakMemory(self.device)
        peak.reset()
        train_seconds, wait_seconds, images_seen = 0.0, 0.0, 0
        last_val: dict[str, Any] = {}

        def state(epoch: int, batch: int) -> dict[str, Any]:
            return {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "epoch": epoch,
                "batch": batch,
                "step": global_step,
                "best": best,
                "recipe": recipe.to_dict(),
                "classes": self.run.classes,
                "mask_values": self.run.mask_values,
                "rng": {"torch": torch.get_rng_state()},
            }

        try:
            for epoch in range(start_epoch, recipe.epochs):
                augment.epoch = epoch
                batches = self._batches(epoch)
                first = start_batch if epoch == start_epoch else 0
                plans = (
                    run.method.plan(
                        [im.image_id for im in batch],
                        batch_seed(recipe.seed, epoch, index, self.world.rank),
                        train=True,
                    )
                    for index, batch in enumerate(batches)
                    if index >= first
                )
                reads = _PlannedReads(stream, plans)
                losses, correct, count, judged = [], 0, 0, 0
                epoch_start = time.perf_counter()
                for index in range(first, len(batches)):
                    batch = batches[index]
                    targets = torch.tensor([im.target for im in batch])
                    try:
                        output = run.method.train_batch(
                            ctx, [im.image_id for im in batch], targets, reads.batch()
                        )
                    except TrainingDiverged as exc:
                        raise TrainingDiverged(
                            f"{self.out}: {exc} at epoch {epoch + 1}, batch {index + 1}, step {global_step}; "
                            f"the last good checkpoint is kept in {self.out / CHECKPOINTS} (lower lr or check the data)"
                        ) from None
                    scheduler.step()
                    global_step += 1
                    losses.append(output.loss)
                    if "correct" in output.extra:  # segmentation: pixels
                        correct += output.extra["correct"]
                        judged += output.extra["pixels"]
                    else:
                        correct += int((output.logits.argmax(1) == targets).sum())
                        judged += len(batch)
                    count += len(batch)
                    if writer is not None:
                        writer.add_scalar("train/loss", output.loss, global_step)
                        writer.add_scalar("train/lr", scheduler.get_last_lr()[0], global_step)
                    if (
                        recipe.checkpoint_every
                        and (index + 1) % recipe.checkpoint_every == 0
                        and index + 1 < len(batches)
                    ):
                        self._save(LAST, state(epoch, index + 1))
                if recipe.calibration_batches:
                    run.method.calibrate(
                        ctx,
                        [[im.image_id for im in b] for b in batches[: recipe.calibration_batches]],
                    )
                seconds = time.perf_counter() - epoch_start
                train_seconds += seconds
                wait_seconds += reads.wait_seconds
                images_seen += count * self.world.size
                row: dict[str, Any] = {
                    "epoch": epoch + 1,
                    "step": global_step,
                    "lr": scheduler.get_last_lr()[0],
                    "train_loss": float(np.mean(losses)) if losses else None,
                    "train_accuracy": correct / judged if judged else None,
                    "images_per_second": count * self.world.size / seconds if seconds else None,
                    "data_wait_fraction": reads.wait_seconds / seconds if seconds else None,
                    "peak_memory_gb": peak.peak_bytes() / 1e9,
                }
                last_val = self._validate()
                row.update(
                    {f"val_{k}": v for k, v in last_val.items()
                     if isinstance(v, int | float) and not isinstance(v, bool)}
                )  # fmt: skip
                score = last_val.get(self.monitor)
                improved = score is not None and (best is None or score >= best)
                if improved:
                    best = score
                self._save(LAST, state(epoch + 1, 0))
                if improved or not self.val_images:
                    self._save(BEST, state(epoch + 1, 0))
                self._metrics_line(row)
                if writer is not None:
                    for key, value in row.items():
                        if isinstance(value, float) and key not in ("epoch", "step"):
                            writer.add_scalar(key.replace("_", "/", 1), value, global_step)
                self.log(_describe_epoch(row, recipe.epochs, self.monitor))
        finally:
            if writer is not None:
                writer.close()
        summary = {
            "task": recipe.task,
            "method": recipe.method,
            "epochs": recipe.epochs,
            "steps": global_step,
            "classes": self.run.classes,
            "train_images": len(self.train_images),
            "val_images": len(self.val_images),
            "peak_memory_gb": peak.peak_bytes() / 1e9,
            "peak_memory_kind": peak.kind,
            "images_per_second": images_seen / train_seconds if train_seconds else None,
            "data_wait_fraction": wait_seconds / train_seconds if train_seconds else None,
            "patches_with_grad": ctx.patches_with_grad,
            "device": str(self.device),
            "precision": precision,
            "world_size": self.world.size,
            "val": dict(last_val),
            "monitor": self.monitor,
            "best_val": best,
            "best_val_accuracy": best if self.monitor == "accuracy" else None,
            "memory_plan": self.memory_plan.describe() if self.memory_plan else None,
            "skipped": self.problems,
        }
        if self.world.main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return TrainResult(self.out, summary, self.problems)

    def _validate(self) -> dict[str, Any]:
        if not self.val_images:
            return {}
        share = self.val_images[self.world.rank :: self.world.size]
        if self.recipe.task == "det":
            found, _ = predict_detections(self.run, share)
            gathered = distributed.gather_objects((share, found), self.world)
            images = [im for part in gathered for im in part[0]]  # type: ignore[index]
            detections = [d for part in gathered for d in part[1]]  # type: ignore[index]
            return detection_metrics(self.run, images, detections)
        if self.recipe.task == "seg":
            matrices, _ = predict_segmentation(self.run, share)
            gathered = distributed.gather_objects(matrices, self.world)
            every = [m for part in gathered for m in part]  # type: ignore[attr-defined]
            return segmentation_metrics(every, self.run.classes)
        logits, targets, _ = predict_images(self.run, share, self.recipe.batch_size)
        gathered = distributed.gather_objects((logits, targets), self.world)
        all_logits = torch.cat([g[0] for g in gathered])  # type: ignore[index]
        all_targets = torch.cat([g[1] for g in gathered])  # type: ignore[index]
        out = classification_metrics(all_logits, all_targets, len(self.run.classes))
        out["loss"] = (
            float(torch.nn.functional.cross_entropy(all_logits, all_targets))
            if len(all_targets)
            else None
        )
        return out

    def _tensorboard(self) -> Any:
        if not self.world.main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency; a broken install only loses the curves
            self.log("tensorboard is not importable; writing metrics.jsonl only")
            return None
        return SummaryWriter(str(self.out / "tensorboard"))


def _describe_epoch(row: dict[str, Any], epochs: int, monitor: str = "accuracy") -> str:
    parts = [f"epoch {row['epoch']}/{epochs}", f"loss {row['train_loss']:.4f}"]
    if row.get(f"val_{monitor}") is not None:
        parts.append(f"val {monitor.replace('_', ' ')} {row[f'val_{monitor}']:.3f}")
    if row.get("images_per_second"):
        parts.append(f"{row['images_per_second']:.2f} images/s")
    parts.append(f"peak {row['peak_memory_gb']:.2f} GB")
    return " · ".join(parts)


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
    load_weights_into(run.model, state, path)
    run.model.eval()
    return run


__all__ = [
    "Run",
    "TrainResult",
    "Trainer",
    "TrainingDiverged",
    "build_run",
    "classification_metrics",
    "coco_truth",
    "detection_metrics",
    "load_run",
    "predict_detections",
    "predict_images",
    "predict_segmentation",
    "resolve_device",
    "task_classes",
]
