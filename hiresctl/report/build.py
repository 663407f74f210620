"""Collect what a report shows: each run's settings, curves, training summary, evaluation and
figures (heatmaps of where classifiers looked, segmentation overlays), and which run is best."""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from hiresctl.eval import evaluate, run_task
from hiresctl.eval.stats import Comparison, Interval, compare_runs
from hiresctl.report.drawers import OverlayCollector, figure_drawer, read_json
from hiresctl.report.markdown import render_markdown
from hiresctl.report.model import LOWER_IS_BETTER, METRIC_NAMES, RunReport
from hiresctl.report.render import charts, render_html
from hiresctl.train import (
    Run,
    get_task,
    inference_device,
    load_run,
    read_metrics,
)
from storage import Dataset, UsageError
from storage.errors import NoSpaceError, no_space


@contextlib.contextmanager
def _writing(out: Path) -> Iterator[None]:
    """A full, over-quota or read-only ``out`` while the report is written: one error naming the
    folder; ``report.html``, written last and whole, is then absent, so nothing looks done."""
    try:
        yield
    except Exception as exc:
        full = no_space(exc)
        if full is None:
            raise
        raise NoSpaceError(
            out / "report.html",
            full,
            then="the report was not written: free space (or choose another --out) and run the "
            "same command again",
        ) from exc


def _write_whole(path: Path, text: str) -> None:
    """``path`` written under a temporary name, then renamed: never a partial file in place."""
    part = path.with_name(f".{path.name}.part")
    try:
        part.write_text(text)
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)


def _names(folders: list[Path]) -> list[str]:
    names = [f.name for f in folders]
    if len(set(names)) < len(names):
        names = [f"{f.parent.name}/{f.name}" for f in folders]
    if len(set(names)) < len(names):
        names = [str(f) for f in folders]
    return names


def describe_setting(run: Run, image_id: str) -> dict[str, str]:
    """What the method sees of an image: input size, patch, sampling and resolution, as the
    seed paper's tables state them (the method's own words, ``Method.describe``)."""
    recipe = run.recipe
    _, height, width = run.reader.shape(image_id)
    level = f" (level {recipe.level})" if recipe.level else ""
    out = {"input": f"{height}×{width}{level}", "patch": f"{recipe.patch_size}²"}
    out.update(run.method.describe(image_id) or {})
    return out


# ------------------------------------------------------------------------------ the report


def _table_row(report: RunReport) -> dict[str, Any]:
    metrics = report.result["metrics"]
    row = {k: metrics.get(k) for k in get_task(report.result["task"]).table_metrics}
    row.update(
        {
            "train_peak_gb": report.summary.get("peak_memory_gb"),
            "train_images_per_second": report.summary.get("images_per_second"),
            "eval_peak_gb": report.result.get("peak_memory_gb"),
            "eval_images_per_second": report.result.get("images_per_second"),
            "train_seconds": report.summary.get("train_seconds"),
            "prepared_seconds": report.summary.get("prepared_seconds"),
        }
    )
    if row["train_seconds"] is not None:  # what the run cost in all, its inputs counted in
        row["total_seconds"] = row["train_seconds"] + (row["prepared_seconds"] or 0.0)
    return row


def best_runs(rows: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """Per column, the run(s) with the best value (ties share), for columns ≥ 2 runs have."""
    best: dict[str, list[str]] = {}
    columns = {k for row in rows.values() for k in row}
    for column in columns:
        values = {
            n: r[column]
            for n, r in rows.items()
            if isinstance(r.get(column), int | float) and math.isfinite(r[column])
        }
        if len(values) < 2:
            continue
        pick = min if column in LOWER_IS_BETTER else max
        target = pick(values.values())
        best[column] = [n for n, v in values.items() if math.isclose(v, target, rel_tol=1e-9)]
    return best


def _time(row: dict[str, Any]) -> str:
    """ ", N s of training (+ M s extracting features)", where recorded."""
    if row.get("train_seconds") is None:
        return ""
    text = f", {row['train_seconds']:.0f} s of training"
    if row.get("prepared_seconds") is not None:
        text += f" + {row['prepared_seconds']:.0f} s extracting features"
    return text


def verdict(
    task: str,
    rows: dict[str, dict[str, Any]],
    reports: list[RunReport],
    intervals: dict[str, Interval] | None = None,
    comparisons: list[Comparison] | None = None,
) -> str:
    """One paragraph: which run won on the deciding metric, by how much, at what cost, what
    each run saw of the images, and whether each difference is more than the test images'
    sampling noise (``comparisons``: the winner against every other run, paired)."""
    key = get_task(task).table_metrics[0]
    scored: list[tuple[RunReport, float]] = [
        (r, float(rows[r.name][key])) for r in reports if rows[r.name].get(key) is not None
    ]
    if not scored:
        return "No run has a value for the deciding metric."
    scored.sort(key=lambda p: p[1], reverse=True)
    top, value = scored[0]
    name = METRIC_NAMES.get(key, key)
    lead = "has the best" if len(scored) > 1 else "reaches"
    shown = _interval_text((intervals or {}).get(top.name))
    text = (
        f"{top.name} ({top.result['method']}) {lead} {name}: {value:.3f}{shown}, at "
        f"{rows[top.name]['train_peak_gb'] or 0:.2f} GB peak training memory{_time(rows[top.name])} and "
        f"{rows[top.name]['eval_images_per_second'] or 0:.2f} images/s in evaluation; "
        f"it sees {top.setting['sees']}."
    )
    tested = {c.b: c for c in comparisons or [] if c.a == top.name}
    for other, score in scored[1:]:
        shown = _interval_text((intervals or {}).get(other.name))
        text += (
            f" {other.name} ({other.result['method']}) reaches {score:.3f}{shown} "
            f"({score - value:+.3f}) at {rows[other.name]['train_peak_gb'] or 0:.2f} GB"
            f"{_time(rows[other.name])}; "
            f"it sees {other.setting['sees']}."
        )
        if other.name in tested:
            text += f" Paired on the same images, {_difference_text(tested[other.name])}."
    return text


def _interval_text(interval: Interval | None) -> str:
    if interval is None or not math.isfinite(interval.low):
        return ""
    return f" (95% interval {interval.low:.3f}–{interval.high:.3f} over {interval.images} images)"


def _difference_text(c: Comparison) -> str:
    """``the difference is real (McNemar p = 0.003)`` or ``… within noise (…)``."""
    where = f"{c.test}, p = {c.p_value:.2g}" if c.p_value >= 0.001 else f"{c.test}, p < 0.001"
    if c.significant:
        return f"the difference is real ({where})"
    return f"the difference is within the test images' noise ({where})"


def build_report(
    runs: list[Path],
    data: Path,
    split: str = "test",
    out: Path | None = None,
    device: str = "auto",
    checkpoint: str = "best",
    log: Callable[[str], None] = lambda message: None,
    write: bool = True,
    rescale: bool = False,
    drop_channels: bool = False,
) -> dict[str, Any]:
    """Evaluate ``runs`` on ``split`` of ``data`` and write ``report.html``, ``report.md`` and
    ``metrics.json`` (plus ``figures/``) into ``out``; returns the metrics object. Without
    ``write``, only the metrics object (no figures are drawn)."""
    if not runs:
        raise UsageError("give at least one run folder")
    tasks = {str(run): run_task(run) for run in runs}
    if len(set(tasks.values())) > 1:
        raise UsageError(f"runs of different tasks cannot be compared side by side: {tasks}")
    task = next(iter(tasks.values()))
    drawer = figure_drawer(task)
    out = Path(out) if out is not None else (runs[0] / f"report-{split}")
    if write:
        if out.exists() and not out.is_dir():
            raise UsageError(f"{out}: --out exists and is not a folder")
        with _writing(out):
            out.mkdir(parents=True, exist_ok=True)
            (out / "report.html").unlink(missing_ok=True)  # an earlier report is not this one
    dataset = Dataset(data)
    torch_device = inference_device(device)
    reports: list[RunReport] = []
    for name, folder in zip(_names(runs), runs, strict=True):
        log(f"evaluating {name} on {data} [{split}]")
        run = load_run(folder, dataset, torch_device, checkpoint)
        collector = OverlayCollector(run)
        hook = collector if write and drawer is not None else None
        result = evaluate(
            folder,
            data,
            split,
            device,
            checkpoint,
            on_tile=hook,
            run=run,
            rescale=rescale,
            drop_channels=drop_channels,
        )
        recipe = yaml.safe_load((folder / "recipe.yaml").read_text()) or {}
        first = result["per_image"][0]["id"] if result.get("per_image") else None
        setting = describe_setting(run, first) if first else {}
        report = RunReport(
            name,
            folder,
            recipe,
            read_json(folder / "summary.json") or {},
            read_metrics(folder),
            result,
            setting,
        )
        if write and drawer is not None:
            log(f"drawing {name}'s figures")
            with _writing(out):
                drawer(report, run, dataset, out, collector)
        reports.append(report)
    rows = {r.name: _table_row(r) for r in reports}
    best = best_runs(rows)
    deciding = get_task(task).table_metrics[0]
    leader = best[deciding][0] if best.get(deciding) else None
    intervals, comparisons = compare_runs(task, {r.name: r.result for r in reports}, leader)
    entries = dataset.entries(complete_only=True)
    splits: dict[str, int] = {}
    for entry in entries:
        splits[entry.split] = splits.get(entry.split, 0) + 1
    shapes = sorted(
        ((entry.shape[1], entry.shape[2]) for entry in entries),
        key=lambda shape: shape[0] * shape[1],
    )
    dataset_summary = {
        "path": str(data),
        "images": len(entries),
        "splits": splits,
        "classes": reports[0].result["classes"],
        "smallest": list(shapes[0]) if shapes else None,
        "largest": list(shapes[-1]) if shapes else None,
        "mpp": sorted({e.mpp for e in entries if e.mpp is not None}),
    }
    metrics = {
        "task": task,
        "data": str(data),
        "split": split,
        "dataset": dataset_summary,
        "deciding_metric": get_task(task).table_metrics[0],
        "verdict": verdict(task, rows, reports, intervals, comparisons),
        "table": rows,
        "best": best,
        "intervals": {name: i.to_json() for name, i in intervals.items()},
        "comparisons": [c.to_json() for c in comparisons],
        "runs": [
            {
                "name": r.name,
                "run": str(r.folder),
                "method": r.result["method"],
                "setting": r.setting,
                "recipe": r.recipe,
                "training": r.summary,
                "evaluation": r.result,
                "roc_auc": r.roc["auc"] if r.roc else None,
            }
            for r in reports
        ],
    }
    if not write:
        return metrics
    log(f"writing the report into {out}")
    with _writing(out):
        for stem, _, svg in charts(metrics, reports):
            (out / "figures").mkdir(exist_ok=True)
            (out / "figures" / f"{stem}.svg").write_text(svg)
        _write_whole(out / "metrics.json", json.dumps(metrics, indent=2, default=str))
        _write_whole(out / "report.md", render_markdown(metrics, reports))
        _write_whole(out / "report.html", render_html(metrics, reports))  # last: the report is done
    metrics["report"] = str(out / "report.html")
    return metrics
