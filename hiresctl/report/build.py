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

import numpy as np
import torch
import yaml

from hiresctl.data import LabelledImage
from hiresctl.eval import evaluate, run_task
from hiresctl.eval.stats import Comparison, Interval, compare_runs
from hiresctl.report import figures
from hiresctl.report.model import LOWER_IS_BETTER, METRIC_NAMES, Figure, RunReport
from hiresctl.report.render import charts, render_html, render_markdown
from hiresctl.train import (
    Heatmap,
    Run,
    get_task,
    load_run,
    predict_images,
    read_metrics,
    resolve_device,
)
from storage import Dataset, StoreError, UsageError
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
            out / "report.html", full,
            then="the report was not written: free space (or choose another --out) and run the "
            "same command again",
        ) from exc  # fmt: skip


def _write_whole(path: Path, text: str) -> None:
    """``path`` written under a temporary name, then renamed: never a partial file in place."""
    part = path.with_name(f".{path.name}.part")
    try:
        part.write_text(text)
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)


SHOWN = 6  # worst images shown per run
THUMB = 320  # longest side of a shown thumbnail
CROP = 192  # side of a full-resolution segmentation crop


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise StoreError(str(path), f"is not valid JSON ({exc.msg}, line {exc.lineno})") from None


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


# ------------------------------------------------------------------------ classification


# Per task: what the report draws of a run (the worst images, with where the model looked, or
# overlays of predictions on the truth); ``collector`` saw every tile evaluation predicted.
FigureDrawer = Callable[[RunReport, Run, Dataset, Path, "OverlayCollector"], None]
_DRAWERS: dict[str, FigureDrawer] = {}


def draws(task: str) -> Callable[[FigureDrawer], FigureDrawer]:
    """Decorator: ``task``'s figure drawer (one per registered task; a test checks it)."""

    def add(drawer: FigureDrawer) -> FigureDrawer:
        _DRAWERS[task] = drawer
        return drawer

    return add


def figure_drawer(task: str) -> FigureDrawer | None:
    return _DRAWERS.get(task)


@draws("cls")
def _classification_figures(
    report: RunReport, run: Run, dataset: Dataset, out: Path, collector: OverlayCollector
) -> None:
    rows = report.result["per_image"]
    worst = sorted(rows, key=lambda r: (r["correct"], r["p_target"]))[:SHOWN]
    images = [LabelledImage(r["id"], run.classes.index(r["target"])) for r in worst]
    maps: list[Heatmap] = []
    if images:  # every classification method explains its predictions
        predict_images(run, images, run.recipe.batch_size, heatmaps=maps)
    by_id = {m.image_id: m for m in maps}
    folder = Path("figures") / figures.slug(report.name)
    for row in worst:
        thumb = figures.to_rgb8(dataset.thumbnail(row["id"]))
        plain = figures.fit(thumb, THUMB)
        link = folder / f"{figures.slug(row['id'])}-thumbnail.png"
        figures.save_png(out / link, thumb)
        heat = by_id.get(row["id"])
        shown = plain
        if heat is not None:
            _, height, width = run.reader.shape(row["id"])
            shown = figures.heatmap_overlay(plain, heat.scores, heat.cell, (height, width))
        path = folder / f"{figures.slug(row['id'])}.png"
        png = figures.save_png(out / path, shown)
        verdict = "correct" if row["correct"] else "wrong"
        caption = (f"{row['id']}: true {row['target']}, predicted {row['predicted']} ({verdict}, "
                   f"p(true) {row['p_target']:.2f})")  # fmt: skip
        if heat is not None:
            caption += f"; {heat.kind}"
        report.shown.append(
            Figure(path.as_posix(), figures.data_uri(png), caption, link.as_posix())
        )
    classes = report.result["classes"]
    if len(classes) == 2 and rows:
        targets = np.array([classes.index(r["target"]) for r in rows])
        if len(set(targets.tolist())) == 2:
            scores = np.array([r["probabilities"][1] for r in rows])
            fpr, tpr, auc = figures.roc_curve(targets, scores)
            report.roc = {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "auc": auc,
                          "positive": classes[1]}  # fmt: skip


# -------------------------------------------------------------------------- segmentation


class OverlayCollector:
    """Sees every predicted tile during evaluation and keeps, per image, the prediction and the
    truth subsampled to ≤ ``THUMB`` pixels a side, and the ``CROP``² full-resolution window with
    the most wrong pixels: a few hundred KB whatever the image size."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.small: dict[str, tuple[int, np.ndarray, np.ndarray]] = {}
        self.crops: dict[str, tuple[int, int, int, np.ndarray, np.ndarray]] = {}

    def __call__(
        self, image_id: str, y: int, x: int, logits: torch.Tensor, pred: np.ndarray,
        truth: np.ndarray | None,
    ) -> None:  # fmt: skip
        if truth is None:
            return
        if image_id not in self.small:
            _, height, width = self.run.reader.shape(image_id)
            step = max(1, math.ceil(max(height, width) / THUMB))
            shape = (math.ceil(height / step), math.ceil(width / step))
            self.small[image_id] = (step, np.full(shape, -1), np.full(shape, -1))
        step, small_pred, small_truth = self.small[image_id]
        oy, ox = (-y) % step, (-x) % step
        sub_p, sub_t = pred[oy::step, ox::step], truth[oy::step, ox::step]
        ty, tx = (y + oy) // step, (x + ox) // step
        h = min(sub_p.shape[0], small_pred.shape[0] - ty)
        w = min(sub_p.shape[1], small_pred.shape[1] - tx)
        if h > 0 and w > 0:
            small_pred[ty : ty + h, tx : tx + w] = sub_p[:h, :w]
            small_truth[ty : ty + h, tx : tx + w] = sub_t[:h, :w]
        wrong = (pred != truth) & (truth >= 0)
        count = int(wrong.sum())
        if count and count > self.crops.get(image_id, (-1,))[0]:
            ys, xs = np.nonzero(wrong)
            cy = int(np.clip(ys.mean() - CROP // 2, 0, max(0, pred.shape[0] - CROP)))
            cx = int(np.clip(xs.mean() - CROP // 2, 0, max(0, pred.shape[1] - CROP)))
            self.crops[image_id] = (count, y + cy, x + cx,
                                    pred[cy : cy + CROP, cx : cx + CROP].copy(),
                                    truth[cy : cy + CROP, cx : cx + CROP].copy())  # fmt: skip


@draws("seg")
def _segmentation_figures(
    report: RunReport, run: Run, dataset: Dataset, out: Path, collector: OverlayCollector
) -> None:
    rows = report.result["per_image"]
    key = "f1" if len(run.classes) == 2 else "mean_iou"
    worst = sorted(rows, key=lambda r: r.get(key) if r.get(key) is not None else -1.0)[:SHOWN]
    folder = Path("figures") / figures.slug(report.name)
    for row in worst:
        image_id = row["id"]
        if image_id not in collector.small:
            continue
        _, small_pred, small_truth = collector.small[image_id]
        thumb = figures.to_rgb8(dataset.thumbnail(image_id))
        link = folder / f"{figures.slug(image_id)}-thumbnail.png"
        figures.save_png(out / link, thumb)
        base = figures.resize(thumb, small_pred.shape)
        overlay = figures.segmentation_overlay(base, small_pred, small_truth)
        path = folder / f"{figures.slug(image_id)}.png"
        png = figures.save_png(out / path, overlay)
        score = row.get(key)
        caption = f"{image_id}: {key} {score:.3f}" if score is not None else image_id
        report.shown.append(Figure(path.as_posix(), figures.data_uri(png),
                                   caption + " (green TP, red FP, blue FN)", link.as_posix()))  # fmt: skip
        if image_id in collector.crops:
            count, y, x, pred, truth = collector.crops[image_id]
            region = run.reader.read_region(image_id, y, x, CROP)
            pixels = figures.to_rgb8(np.asarray(region))[: pred.shape[0], : pred.shape[1]]
            crop = figures.segmentation_overlay(pixels, pred, truth)
            crop_path = folder / f"{figures.slug(image_id)}-crop.png"
            zoom = figures.resize(crop, (CROP * 2, CROP * 2), nearest=True)
            png = figures.save_png(out / crop_path, zoom)
            report.shown.append(Figure(
                crop_path.as_posix(), figures.data_uri(png),
                f"{image_id}: full resolution at y={y}, x={x} ({count} wrong pixels in its tile)",
            ))  # fmt: skip


# ----------------------------------------------------------------------------- detection


def _coco_files(result: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    """Per image of the evaluation (in its order): (true boxes, labels) and (boxes, scores,
    labels) of the detections at or above the matching threshold, from the COCO files the
    evaluation wrote."""
    from hiresctl.train.detection.coco import coco_boxes

    truth = _read_json(Path(result["files"]["ground_truth"]))
    found = _read_json(Path(result["files"]["detections"])) or []
    threshold = result["matching"]["score_threshold"]
    kept = [d for d in found if d["score"] >= threshold]
    # results have the dataset's image ids: the same grouping gives boxes, labels and scores
    scores: list[list[float]] = [[] for _ in truth["images"]]
    for d in kept:
        scores[d["image_id"] - 1].append(d["score"])
    boxes = coco_boxes({"images": truth["images"], "annotations": kept})
    detections = [(b, np.asarray(s, np.float32), c)
                  for (b, c), s in zip(boxes, scores, strict=True)]  # fmt: skip
    return coco_boxes(truth), detections


def _focus(truth: np.ndarray, found: np.ndarray, boxes: np.ndarray, hits: np.ndarray) -> Any:
    """The box a zoomed crop centres on: the smallest missed object, else the smallest object,
    else the first false positive; None when the image has neither."""
    areas = (truth[:, 2] - truth[:, 0]) * (truth[:, 3] - truth[:, 1])
    if (~found).any():
        missed = np.flatnonzero(~found)
        return truth[missed[areas[missed].argmin()]]
    if len(truth):
        return truth[areas.argmin()]
    if (~hits).any():
        return boxes[np.flatnonzero(~hits)[0]]
    return None


@draws("det")
def _detection_figures(
    report: RunReport, run: Run, dataset: Dataset, out: Path, collector: OverlayCollector
) -> None:
    """The worst images (lowest recall at IoU 0.5, then most false positives): boxes on the
    thumbnail and a full-resolution crop around the smallest object it missed."""
    from hiresctl.train.detection.coco import match_detections

    result = report.result
    rows = result["per_image"]
    truths, detections = _coco_files(result)
    order = sorted(range(len(rows)), key=lambda i: (
        rows[i]["recall"] if rows[i]["recall"] is not None else 1.0, -rows[i]["false_positives"]))  # fmt: skip
    folder = Path("figures") / figures.slug(report.name)
    for i in order[:SHOWN]:
        row = rows[i]
        image_id = row["id"]
        (truth, truth_labels), (boxes, scores, labels) = truths[i], detections[i]
        hits, found = match_detections(truth, truth_labels, boxes, scores, labels)
        thumb = figures.to_rgb8(dataset.thumbnail(image_id))
        link = folder / f"{figures.slug(image_id)}-thumbnail.png"
        figures.save_png(out / link, thumb)
        plain = figures.fit(thumb, THUMB)
        _, height, width = dataset.entry(image_id).shape
        scale = (plain.shape[0] / height, plain.shape[1] / width)
        shown = figures.detection_overlay(plain, scale, (0, 0), truth, found, boxes, hits)
        path = folder / f"{figures.slug(image_id)}.png"
        png = figures.save_png(out / path, shown)
        caption = (f"{image_id}: found {row['found']} of {row['objects']} objects, "
                   f"{row['false_positives']} false positives (boxes scored ≥ "
                   f"{result['matching']['score_threshold']}, IoU ≥ 0.5)")  # fmt: skip
        report.shown.append(
            Figure(path.as_posix(), figures.data_uri(png), caption, link.as_posix())
        )
        focus = _focus(truth, found, boxes, hits)
        if focus is None:
            continue
        # the crop is read at the run's level; boxes stay in level-0 pixels
        _, read_h, _ = run.reader.shape(image_id)
        ratio = read_h / height
        cx, cy = (focus[0] + focus[2]) / 2, (focus[1] + focus[3]) / 2
        side = CROP / ratio  # level-0 pixels the crop spans
        x0 = float(np.clip(cx - side / 2, 0, max(0.0, width - side)))
        y0 = float(np.clip(cy - side / 2, 0, max(0.0, height - side)))
        region = run.reader.read_region(image_id, round(y0 * ratio), round(x0 * ratio), CROP)
        zoom = 2
        pixels = figures.resize(figures.to_rgb8(np.asarray(region)), (CROP * zoom, CROP * zoom),
                                nearest=True)  # fmt: skip
        crop = figures.detection_overlay(pixels, (ratio * zoom, ratio * zoom), (y0, x0),
                                         truth, found, boxes, hits, thickness=2)  # fmt: skip
        crop_path = folder / f"{figures.slug(image_id)}-crop.png"
        png = figures.save_png(out / crop_path, crop)
        size = f"{focus[2] - focus[0]:.0f}×{focus[3] - focus[1]:.0f} px"
        report.shown.append(Figure(
            crop_path.as_posix(), figures.data_uri(png),
            f"{image_id}: ×{zoom} zoom at x={x0:.0f}, y={y0:.0f} around a {size} object",
        ))  # fmt: skip


# ------------------------------------------------------------------------------ the report


def _table_row(report: RunReport) -> dict[str, Any]:
    metrics = report.result["metrics"]
    row = {k: metrics.get(k) for k in get_task(report.result["task"]).table_metrics}
    row.update({
        "train_peak_gb": report.summary.get("peak_memory_gb"),
        "train_images_per_second": report.summary.get("images_per_second"),
        "eval_peak_gb": report.result.get("peak_memory_gb"),
        "eval_images_per_second": report.result.get("images_per_second"),
        "train_seconds": report.summary.get("train_seconds"),
        "prepared_seconds": report.summary.get("prepared_seconds"),
    })  # fmt: skip
    if row["train_seconds"] is not None:  # what the run cost in all, its inputs counted in
        row["total_seconds"] = row["train_seconds"] + (row["prepared_seconds"] or 0.0)
    return row


def best_runs(rows: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """Per column, the run(s) with the best value (ties share), for columns ≥ 2 runs have."""
    best: dict[str, list[str]] = {}
    columns = {k for row in rows.values() for k in row}
    for column in columns:
        values = {n: r[column] for n, r in rows.items()
                  if isinstance(r.get(column), int | float) and math.isfinite(r[column])}  # fmt: skip
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
    text = (f"{top.name} ({top.result['method']}) {lead} {name}: {value:.3f}{shown}, at "
            f"{rows[top.name]['train_peak_gb'] or 0:.2f} GB peak training memory{_time(rows[top.name])} and "
            f"{rows[top.name]['eval_images_per_second'] or 0:.2f} images/s in evaluation; "
            f"it sees {top.setting['sees']}.")  # fmt: skip
    tested = {c.b: c for c in comparisons or [] if c.a == top.name}
    for other, score in scored[1:]:
        shown = _interval_text((intervals or {}).get(other.name))
        text += (f" {other.name} ({other.result['method']}) reaches {score:.3f}{shown} "
                 f"({score - value:+.3f}) at {rows[other.name]['train_peak_gb'] or 0:.2f} GB"
                 f"{_time(rows[other.name])}; "
                 f"it sees {other.setting['sees']}.")  # fmt: skip
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
    torch_device = resolve_device(device)
    reports: list[RunReport] = []
    for name, folder in zip(_names(runs), runs, strict=True):
        log(f"evaluating {name} on {data} [{split}]")
        run = load_run(folder, dataset, torch_device, checkpoint)
        collector = OverlayCollector(run)
        hook = collector if write and drawer is not None else None
        result = evaluate(folder, data, split, device, checkpoint, on_tile=hook, run=run,
                          rescale=rescale, drop_channels=drop_channels)  # fmt: skip
        recipe = yaml.safe_load((folder / "recipe.yaml").read_text()) or {}
        first = result["per_image"][0]["id"] if result.get("per_image") else None
        setting = describe_setting(run, first) if first else {}
        report = RunReport(name, folder, recipe, _read_json(folder / "summary.json") or {},
                           read_metrics(folder), result, setting)  # fmt: skip
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
    shapes = sorted(((entry.shape[1], entry.shape[2]) for entry in entries),
                    key=lambda shape: shape[0] * shape[1])  # fmt: skip
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
            {"name": r.name, "run": str(r.folder), "method": r.result["method"],
             "setting": r.setting, "recipe": r.recipe, "training": r.summary,
             "evaluation": r.result, "roc_auc": r.roc["auc"] if r.roc else None}
            for r in reports
        ],
    }  # fmt: skip
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
