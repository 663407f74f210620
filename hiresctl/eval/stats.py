"""Is a difference real? Intervals over test images and paired tests between runs.

COCO AP is not a mean over images: its interval and paired test come from recomputing AP with
pycocotools on the same ``COCO_RESAMPLES`` resampled image sets for every run.

A test split of a few dozen images gives a metric that moves by points from one draw of images
to the next, so a report that ranks runs must say how sure it is. For a metric that is a mean
over images (accuracy: each image right or wrong; segmentation's F1, IoU and mean IoU, computed
per image and averaged, as the seed paper does), the 95% interval is the percentile bootstrap
over test images (images drawn with replacement, ``RESAMPLES`` times, seeded). Two runs on the
same images are compared paired, image by image: McNemar's exact test for accuracy (only the
images one run gets right and the other wrong carry information), and for a per-image score
the paired bootstrap of the difference of means (its interval, and the two-sided p-value: twice
the share of resampled differences on the far side of zero).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

RESAMPLES = 2000
COCO_RESAMPLES = 200  # COCO AP is recomputed by pycocotools for every resample
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A metric's value on the test images and its bootstrap interval."""

    metric: str
    value: float
    low: float
    high: float
    images: int
    level: float = LEVEL
    resamples: int = RESAMPLES

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Comparison:
    """Run ``a`` against run ``b`` on the images both were scored on."""

    a: str
    b: str
    metric: str
    difference: float  # a − b
    low: float  # the difference's bootstrap interval
    high: float
    p_value: float
    test: str  # "McNemar (exact)" | "paired bootstrap"
    images: int
    discordant: tuple[int, int] | None = None  # McNemar: (a right b wrong, a wrong b right)

    @property
    def significant(self) -> bool:
        return self.p_value < 1 - LEVEL

    def to_json(self) -> dict[str, Any]:
        row = asdict(self)
        row["significant"] = self.significant
        return row

    def sentence(self) -> str:
        """``a − b = +0.050 [−0.010, +0.110], p = 0.12 (McNemar, 60 images): not significant``."""
        verdict = "significant" if self.significant else "not significant at the 5% level"
        return (
            f"{self.a} − {self.b}: {self.difference:+.3f} "
            f"[{self.low:+.3f}, {self.high:+.3f}], p = {_p(self.p_value)} "
            f"({self.test}, {self.images} images): {verdict}"
        )


def _p(value: float) -> str:
    return f"{value:.2g}" if value >= 0.001 else "< 0.001"


def _resample(count: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, count) indices of images drawn with replacement."""
    return np.random.default_rng(seed).integers(0, count, (resamples, count))


def bootstrap_interval(
    values: np.ndarray, metric: str, resamples: int = RESAMPLES, seed: int = 0
) -> Interval:
    """The mean of per-image ``values`` and its percentile bootstrap interval."""
    values = np.asarray(values, dtype=np.float64)
    if not len(values):
        return Interval(metric, math.nan, math.nan, math.nan, 0, resamples=0)
    means = values[_resample(len(values), resamples, seed)].mean(1)
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(
        metric, float(values.mean()), float(low), float(high), len(values), resamples=resamples
    )


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[float, tuple[int, int]]:
    """McNemar's exact two-sided p-value for paired right/wrong outcomes, and the discordant
    counts (a right and b wrong, a wrong and b right)."""
    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n = only_a + only_b
    if n == 0:
        return 1.0, (0, 0)
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n  # binomial(n, 1/2) tail
    return min(1.0, 2 * tail), (only_a, only_b)


def paired_comparison(
    a_name: str,
    b_name: str,
    metric: str,
    a: np.ndarray,
    b: np.ndarray,
    binary: bool,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Comparison:
    """Run ``a`` against ``b`` on paired per-image values (``binary``: right/wrong outcomes,
    tested with McNemar; else scores, tested with the paired bootstrap)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff = a - b
    if not len(diff):
        return Comparison(a_name, b_name, metric, math.nan, math.nan, math.nan, 1.0, "none", 0)
    means = diff[_resample(len(diff), resamples, seed)].mean(1)
    tail = (1 - LEVEL) / 2 * 100
    low, high = (float(v) for v in np.percentile(means, [tail, 100 - tail]))
    if binary:
        p, discordant = mcnemar(a > 0.5, b > 0.5)
        return Comparison(
            a_name,
            b_name,
            metric,
            float(diff.mean()),
            low,
            high,
            p,
            "McNemar (exact)",
            len(diff),
            discordant,
        )
    # two-sided: how often the resampled difference falls on the other side of zero
    share = float((means <= 0).mean() if diff.mean() >= 0 else (means >= 0).mean())
    p = min(1.0, 2 * share) if share else 1 / resamples  # never crossed: below 2/resamples
    if not diff.any():
        p = 1.0
    return Comparison(
        a_name, b_name, metric, float(diff.mean()), low, high, p, "paired bootstrap", len(diff)
    )


def coco_ap_draws(
    truth: dict[str, Any],
    results: list[dict[str, Any]],
    draws: np.ndarray,
    max_detections: int = 100,
) -> np.ndarray:
    """COCO AP (pycocotools) of the test images resampled by each row of ``draws`` (positions
    into ``truth["images"]``; an image drawn twice counts twice, under a new id)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    by_image: dict[int, list[dict[str, Any]]] = {}
    for a in truth["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    found_by_image: dict[int, list[dict[str, Any]]] = {}
    for d in results:
        found_by_image.setdefault(d["image_id"], []).append(d)
    out = np.zeros(len(draws))
    for row, draw in enumerate(draws):
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        found: list[dict[str, Any]] = []
        for new_id, position in enumerate(draw.tolist(), start=1):
            image = truth["images"][position]
            images.append({**image, "id": new_id})
            for a in by_image.get(image["id"], []):
                annotations.append({**a, "id": len(annotations) + 1, "image_id": new_id})
            found += [{**d, "image_id": new_id} for d in found_by_image.get(image["id"], [])]
        if not annotations or not found:
            continue
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            gt = COCO()
            gt.dataset = {**truth, "images": images, "annotations": annotations}
            gt.createIndex()
            evaluation = COCOeval(gt, gt.loadRes(found), "bbox")
            evaluation.params.maxDets = [1, 10, max_detections]
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        out[row] = max(0.0, float(evaluation.stats[0]))
    return out


def _compare_coco(
    results: dict[str, dict[str, Any]], best: str | None
) -> tuple[dict[str, Interval], list[Comparison]]:
    """Intervals and paired comparisons of COCO AP: every run's AP on the same resampled
    image sets (``COCO_RESAMPLES``), each run's own detections against the truth."""
    import json
    from pathlib import Path

    loaded = {}
    for name, result in results.items():
        files = result.get("files") or {}
        try:
            truth = json.loads(Path(files["ground_truth"]).read_text())
            found = json.loads(Path(files["detections"]).read_text())
        except (KeyError, OSError, ValueError):
            continue
        loaded[name] = (truth, found, int(result.get("max_detections") or 100))
    if not loaded:
        return {}, []
    count = len(next(iter(loaded.values()))[0]["images"])
    draws = _resample(count, COCO_RESAMPLES, 0)
    tail = (1 - LEVEL) / 2 * 100
    aps, intervals = {}, {}
    for name, (truth, found, max_dets) in loaded.items():
        aps[name] = coco_ap_draws(truth, found, draws, max_dets)
        low, high = np.percentile(aps[name], [tail, 100 - tail])
        value = float(results[name]["metrics"].get("ap", math.nan))
        intervals[name] = Interval(
            "ap", value, float(low), float(high), count, resamples=COCO_RESAMPLES
        )
    best = best if best in intervals else max(intervals, key=lambda n: intervals[n].value)
    comparisons = []
    for name in intervals:
        if name == best or len(loaded[name][0]["images"]) != count:
            continue
        diff = aps[best] - aps[name]
        low, high = (float(v) for v in np.percentile(diff, [tail, 100 - tail]))
        point = intervals[best].value - intervals[name].value
        share = float((diff <= 0).mean() if point >= 0 else (diff >= 0).mean())
        p = min(1.0, 2 * share) if share else 1 / COCO_RESAMPLES
        comparisons.append(
            Comparison(best, name, "ap", point, low, high, p, "paired bootstrap of COCO AP", count)
        )
    return intervals, comparisons


def per_image_scores(task: str, result: dict[str, Any]) -> tuple[str, dict[str, float], bool]:
    """The deciding metric's name, its value per image id (the metric is their mean), and
    whether the values are right/wrong outcomes; an empty dict where the metric is not a mean
    over images (COCO AP)."""
    rows = result.get("per_image") or []
    if task == "cls":
        return "accuracy", {r["id"]: float(r["correct"]) for r in rows}, True
    if task == "seg":
        binary = len(result.get("classes") or []) == 2
        key = "f1" if binary else "mean_iou"
        return key, {r["id"]: float(r.get(key) or 0.0) for r in rows}, False
    return "", {}, False


def compare_runs(
    task: str, results: dict[str, dict[str, Any]], best: str | None = None
) -> tuple[dict[str, Interval], list[Comparison]]:
    """Each run's interval of the deciding metric, and the best run (``best``, else the highest
    value) against every other, paired on the images both were scored on."""
    if task == "det":
        return _compare_coco(results, best)
    intervals: dict[str, Interval] = {}
    scores: dict[str, dict[str, float]] = {}
    binary = False
    for name, result in results.items():
        metric, per_image, binary = per_image_scores(task, result)
        if not per_image:
            continue
        scores[name] = per_image
        intervals[name] = bootstrap_interval(np.array(list(per_image.values())), metric)
    if not intervals:
        return {}, []
    best = best if best in intervals else max(intervals, key=lambda n: intervals[n].value)
    comparisons = []
    for name in intervals:
        if name == best:
            continue
        shared = [i for i in scores[best] if i in scores[name]]
        comparisons.append(
            paired_comparison(
                best,
                name,
                intervals[best].metric,
                np.array([scores[best][i] for i in shared]),
                np.array([scores[name][i] for i in shared]),
                binary,
            )
        )
    return intervals, comparisons


__all__ = [
    "Comparison",
    "Interval",
    "bootstrap_interval",
    "compare_runs",
    "mcnemar",
    "paired_comparison",
    "per_image_scores",
]
