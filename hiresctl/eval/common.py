"""What every task's evaluation result says besides its metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from hiresctl.train import Run
from hiresctl.train.memory import PeakMemory


def result_header(
    run: Run,
    run_dir: str | Path,
    data: str | Path,
    split: str,
    count: int,
    stats: dict[str, float],
    device: torch.device,
) -> dict[str, Any]:
    """Run, data, split, classes, peak memory and throughput of one evaluation."""
    return {
        "task": run.recipe.task,
        "method": run.recipe.method,
        "run": str(run_dir),
        "data": str(data),
        "split": split,
        "count": count,
        "classes": run.classes,
        "peak_memory_gb": stats["peak_memory_gb"],
        "peak_memory_kind": PeakMemory(device).kind,
        "images_per_second": stats["images_per_second"],
        "device": str(device),
    }


def save_result(run_dir: str | Path, split: str, result: dict[str, Any]) -> dict[str, Any]:
    """Write ``RUN/eval-<split>.json`` and return the result."""
    Path(run_dir, f"eval-{split}.json").write_text(json.dumps(result, indent=2))
    return result
