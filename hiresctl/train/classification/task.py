"""Classification: image labels from the store, inference with heatmaps, accuracy, balanced
accuracy, F1, kappa and AUC (docs/methods.md §8)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from hiresctl.data import LabelledImage, class_names, labelled_images
from hiresctl.models import BACKBONES, KNOWN, is_encoder_name
from hiresctl.train import distributed
from hiresctl.train.classification.base import ClassificationMethod
from hiresctl.train.classification.metrics import classification_metrics, per_class
from hiresctl.train.methods import Heatmap, Reads, StepContext
from hiresctl.train.registry import register_task
from hiresctl.train.run import Inference, batch_seed
from hiresctl.train.task import Run, Task, TileHook
from storage import Dataset, StoreError


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
    batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    plans = (
        run.method.plan(
            [im.image_id for im in batch], batch_seed(recipe.seed, 10**6, i), train=False
        )
        for i, batch in enumerate(batches)
    )
    inference = Inference(run, plans, num_workers)
    logits, targets = [], []
    for batch in batches:
        ids = [im.image_id for im in batch]
        if heatmaps is None:
            logits.append(run.method.predict(inference.ctx, ids, inference.batch()))
        else:
            out, maps = run.method.explain(inference.ctx, ids, inference.batch())
            logits.append(out)
            heatmaps.extend(maps)
        targets.append(torch.tensor([im.target for im in batch]))
    stats = inference.stats(len(images))
    if not logits:
        return torch.zeros(0, len(run.classes)), torch.zeros(0, dtype=torch.long), stats
    return torch.cat(logits), torch.cat(targets), stats


@register_task("cls")
class Classification(Task[ClassificationMethod]):
    title = "classification"
    method_base = ClassificationMethod
    # Nothing pretrained is downloaded, so the default encoder is one that learns from scratch:
    # on Megapixel MNIST 256² (10-pixel digits, 700 training images) `tiny` reached 0.37
    # validation accuracy after 6 epochs of the defaults, where ResNet-18 stayed at chance
    # (0.11 after 3 epochs, 7 min each) and `cnn5` overfitted (0.07–0.14). With a pretrained
    # file, name its network: `backbone=resnet50 pretrained=W.pt`.
    defaults: ClassVar[dict[str, Any]] = {"backbone": "tiny"}
    table_metrics = ("accuracy", "balanced_accuracy", "macro_f1", "auc", "kappa_quadratic")
    worst_images = "Worst images: where the model looked"

    def backbones(self) -> tuple[str, ...]:
        return (*BACKBONES, *KNOWN)

    def accepts_backbone(self, name: str) -> bool:
        return name in self.backbones() or is_encoder_name(name)

    def classes(self, dataset: Dataset) -> tuple[list[str], list[int] | None]:
        classes = class_names(dataset)
        if len(classes) < 2:
            raise StoreError(
                dataset.path, f"needs at least 2 classes to train a classifier, found {classes}"
            )
        return classes, None

    def images(
        self, dataset: Dataset, split: str, classes: list[str]
    ) -> tuple[list[LabelledImage], list[str]]:
        return labelled_images(dataset, split, classes)

    def infer(self, run: Run, ctx: StepContext, image_ids: list[str], reads: Reads) -> torch.Tensor:
        return self.method(run).predict(ctx, image_ids, reads)

    def validate(
        self, run: Run, images: list[LabelledImage], world: distributed.World
    ) -> dict[str, Any]:
        logits, targets, _ = predict_images(
            run, images[world.rank :: world.size], run.recipe.batch_size
        )
        gathered = distributed.gather_objects((logits, targets), world)
        all_logits = torch.cat([g[0] for g in gathered])  # type: ignore[index]
        all_targets = torch.cat([g[1] for g in gathered])  # type: ignore[index]
        out = classification_metrics(all_logits, all_targets, len(run.classes))
        out["loss"] = float(F.cross_entropy(all_logits, all_targets)) if len(all_targets) else None
        return out

    def evaluate(
        self,
        run: Run,
        images: list[LabelledImage],
        folder: Path,
        split: str,
        on_tile: TileHook | None = None,
    ) -> tuple[dict[str, Any], dict[str, float]]:
        logits, targets, stats = predict_images(run, images, run.recipe.batch_size)
        metrics = classification_metrics(logits, targets, len(run.classes))
        matrix = metrics.pop("confusion_matrix", [])
        metrics.pop("count", 0)
        probabilities = logits.softmax(1)
        per_image = [
            {
                "id": image.image_id,
                "target": run.classes[int(t)],
                "predicted": run.classes[int(p.argmax())],
                "correct": bool(int(p.argmax()) == int(t)),
                "confidence": float(p.max()),
                "p_target": float(p[int(t)]),
                "probabilities": [round(float(v), 6) for v in p],
            }
            for image, t, p in zip(images, targets, probabilities, strict=True)
        ]
        body = {
            "metrics": metrics,
            "confusion_matrix": matrix,
            "per_class": per_class(matrix, run.classes),
            "per_image": per_image,
        }
        return body, stats


__all__ = ["Classification", "predict_images"]
