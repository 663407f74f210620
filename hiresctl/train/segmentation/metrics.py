"""Segmentation metrics (docs/methods.md §8): per-image confusion matrices, F1, IoU, balanced
accuracy, PLR and NLR (binary), pixel accuracy and per-class IoU and F1 (multi-class)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def confusion(pred: np.ndarray, target: np.ndarray, classes: int) -> np.ndarray:
    """(classes, classes) counts, rows = truth, columns = prediction; ignored pixels skipped."""
    valid = target >= 0
    index = target[valid].astype(np.int64) * classes + pred[valid].astype(np.int64)
    return np.bincount(index, minlength=classes * classes).reshape(classes, classes)


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


def binary_image_metrics(matrix: np.ndarray) -> dict[str, float]:
    """docs/methods.md §8 from one image's 2×2 confusion (class 1 positive); undefined values NaN."""
    tn, fp, fn, tp = (float(v) for v in matrix.ravel())
    tpr, tnr = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    fpr, fnr = _ratio(fp, fp + tn), _ratio(fn, fn + tp)
    return {
        "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "iou": _ratio(tp, tp + fp + fn),
        "balanced_accuracy": (tpr + tnr) / 2,
        "plr": _ratio(tpr, fpr) if not math.isnan(tpr) else math.nan,
        "nlr": _ratio(fnr, tnr) if not math.isnan(fnr) else math.nan,
    }


def segmentation_metrics(matrices: list[np.ndarray], class_names: list[str]) -> dict[str, Any]:
    """Per-image metrics averaged over images, as the seed paper reports them.

    Binary: accuracy, F1, IoU, balanced accuracy, PLR, NLR per image from TP/FP/FN/TN, then the
    mean over images; a value undefined for an image (0/0, or x/0 for PLR/NLR) counts as 0 and
    ``undefined`` says for how many images. Multi-class: pixel accuracy, per-class IoU and F1
    pooled over all pixels, and mean IoU (over classes present in the truth or the prediction)
    averaged over images.
    """
    out: dict[str, Any] = {"count": len(matrices), "classes": class_names}
    if not matrices:
        return out
    pooled = np.sum(matrices, axis=0)
    out["pixel_accuracy"] = float(np.trace(pooled) / max(1, pooled.sum()))
    if len(class_names) == 2:
        rows = [binary_image_metrics(m) for m in matrices]
        for key in rows[0]:
            values = np.array([r[key] for r in rows])
            bad = ~np.isfinite(values)
            out[key] = float(np.where(bad, 0.0, values).mean())
            if bad.any():
                out.setdefault("undefined", {})[key] = int(bad.sum())
        out["nan_policy"] = "per-image values that are undefined (0/0, x/0) count as 0"
        out["pooled"] = binary_image_metrics(pooled)
        return out
    tp = np.diag(pooled).astype(float)
    fp, fn = pooled.sum(0) - tp, pooled.sum(1) - tp
    iou = [_ratio(t, t + a + b) for t, a, b in zip(tp, fp, fn, strict=True)]
    f1 = [_ratio(2 * t, 2 * t + a + b) for t, a, b in zip(tp, fp, fn, strict=True)]
    out["per_class"] = {
        name: {"iou": None if math.isnan(i) else i, "f1": None if math.isnan(f) else f}
        for name, i, f in zip(class_names, iou, f1, strict=True)
    }
    out["pooled_mean_iou"] = float(np.nanmean(iou)) if not all(map(math.isnan, iou)) else 0.0
    per_image = []
    for m in matrices:
        t = np.diag(m).astype(float)
        union = m.sum(0) + m.sum(1) - t
        present = union > 0
        per_image.append(float((t[present] / union[present]).mean()) if present.any() else 0.0)
    out["mean_iou"] = float(np.mean(per_image))
    out["macro_f1"] = float(np.nanmean(f1)) if not all(map(math.isnan, f1)) else 0.0
    return out


def monitor_key(classes: int) -> str:
    """The validation metric that picks the best checkpoint."""
    return "f1" if classes == 2 else "mean_iou"


__all__ = ["binary_image_metrics", "confusion", "monitor_key", "segmentation_metrics"]
