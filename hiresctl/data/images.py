"""Which images of a store a run uses, and their class indices."""

from __future__ import annotations

import re
from dataclasses import dataclass

from storage import Dataset, StoreError


@dataclass(frozen=True, slots=True)
class LabelledImage:
    image_id: str
    target: int  # class index into the run's class names


def _natural(label: str) -> tuple[int, float | str]:
    return (0, float(label)) if re.fullmatch(r"-?\d+(\.\d+)?", label) else (1, label)


def class_names(dataset: Dataset) -> list[str]:
    """Sorted class labels of every complete image of the store (numbers in numeric order)."""
    labels = {e.label for e in dataset.entries(complete_only=True) if e.label not in (None, "")}
    return sorted((str(label) for label in labels), key=_natural)


def labelled_images(
    dataset: Dataset, split: str, classes: list[str]
) -> tuple[list[LabelledImage], list[str]]:
    """The complete, labelled images of ``split`` and one problem line per image left out."""
    images: list[LabelledImage] = []
    problems: list[str] = []
    index = {name: i for i, name in enumerate(classes)}
    for entry in dataset.entries(split=split):
        where = f"{dataset.path}/images/{entry.id} ({entry.source})"
        if not entry.complete:
            problems.append(f"{where}: tiling did not finish (status {entry.status}); skipped")
        elif entry.label in (None, ""):
            problems.append(f"{where}: has no class label; skipped")
        elif str(entry.label) not in index:
            problems.append(f"{where}: label {entry.label!r} is not a class of this run; skipped")
        elif problem := _unreadable(dataset, entry.id):
            problems.append(f"{problem}; skipped")
        else:
            images.append(LabelledImage(entry.id, index[str(entry.label)]))
    return images, problems + [f"{p}; skipped" for p in dataset.problems]


def _unreadable(dataset: Dataset, image_id: str) -> str | None:
    """Why a run cannot use an image whose arrays disagree with the tiler's record, else None."""
    try:
        dataset.verify(image_id)
    except StoreError as exc:
        return str(exc)
    return None


def _annotated_images(
    dataset: Dataset, split: str, has: str, missing: str
) -> tuple[list[LabelledImage], list[str]]:
    """The complete images of ``split`` whose entry has ``has`` (target unused)."""
    images: list[LabelledImage] = []
    problems: list[str] = []
    for entry in dataset.entries(split=split):
        where = f"{dataset.path}/images/{entry.id} ({entry.source})"
        if not entry.complete:
            problems.append(f"{where}: tiling did not finish (status {entry.status}); skipped")
        elif not (entry.mask if has == "mask" else entry.extra.get(has)):
            problems.append(f"{where}: has no {missing}; skipped")
        elif problem := _unreadable(dataset, entry.id):
            problems.append(f"{problem}; skipped")
        else:
            images.append(LabelledImage(entry.id, 0))
    return images, problems + [f"{p}; skipped" for p in dataset.problems]


def segmentation_images(
    dataset: Dataset, split: str, classes: list[str]
) -> tuple[list[LabelledImage], list[str]]:
    """The complete images of ``split`` that have a segmentation mask (target unused)."""
    return _annotated_images(dataset, split, "mask", "segmentation mask")


def detection_images(
    dataset: Dataset, split: str, classes: list[str]
) -> tuple[list[LabelledImage], list[str]]:
    """The complete images of ``split`` that have object annotations (an image may have none
    of its boxes, a negative example; target unused)."""
    return _annotated_images(dataset, split, "boxes", "object annotations")


def require_images(
    images: list[LabelledImage], dataset: Dataset, split: str, problems: list[str] | None = None
) -> None:
    """Refuse an empty split; the line names why images were left out, when some were."""
    if not images:
        left = f"; {len(problems)} left out, first: {problems[0]}" if problems else ""
        raise StoreError(
            dataset.path,
            f"no labelled, completely tiled images in split {split!r} "
            "(tile with --labels CSV for classification, --masks DIR for segmentation or "
            "--coco FILE for detection, "
            f"or choose another split){left}",
        )
