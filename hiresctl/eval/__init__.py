"""Evaluation: metrics of a trained run on a split of a dataset store."""

from hiresctl.eval.classification import evaluate_classification

__all__ = ["evaluate_classification"]
