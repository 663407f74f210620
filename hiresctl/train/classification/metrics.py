"""Classification metrics (docs/methods.md §8): accuracy, balanced accuracy, macro F1,
quadratic kappa, AUC and the confusion matrix, and each class's precision, recall and F1."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


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


def per_class(matrix: list[list[int]], classes: list[str]) -> dict[str, dict[str, Any]]:
    """Precision, recall, F1 and support of each class from a confusion matrix (rows: true)."""
    m = np.asarray(matrix, dtype=float)
    out: dict[str, dict[str, Any]] = {}
    if m.size == 0:
        return out
    for i, name in enumerate(classes):
        tp, predicted, support = m[i, i], m[:, i].sum(), m[i].sum()
        precision = tp / predicted if predicted else None
        recall = tp / support if support else None
        f1 = (
            2 * precision * recall / (precision + recall)
            if precision and recall
            else (0.0 if support else None)
        )
        out[name] = {"precision": precision, "recall": recall, "f1": f1, "support": int(support)}
    return out


__all__ = ["classification_metrics", "per_class"]
