"""Intervals over test images and paired tests between runs (hiresctl.eval.stats)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hiresctl.eval.stats import (
    bootstrap_interval,
    compare_runs,
    mcnemar,
    paired_comparison,
)


def test_mcnemar_is_the_exact_binomial_test_on_discordant_images() -> None:
    # 10 images only a gets right, 2 only b: p = 2 · P(X ≤ 2), X ~ Binomial(12, 1/2)
    a = np.array([1] * 10 + [0] * 2 + [1] * 30 + [0] * 8, bool)
    b = np.array([0] * 10 + [1] * 2 + [1] * 30 + [0] * 8, bool)
    p, discordant = mcnemar(a, b)
    assert discordant == (10, 2)
    assert p == pytest.approx(2 * (1 + 12 + 66) / 2**12)
    assert mcnemar(a, a) == (1.0, (0, 0))  # the same answers: nothing to tell apart
    assert mcnemar(b, a)[0] == pytest.approx(p)  # symmetric


def test_the_bootstrap_interval_holds_the_mean_and_narrows_with_more_images() -> None:
    rng = np.random.default_rng(0)
    few = rng.random(20) < 0.7
    many = rng.random(2000) < 0.7
    small, large = bootstrap_interval(few, "accuracy"), bootstrap_interval(many, "accuracy")
    for found, values in ((small, few), (large, many)):
        assert found.low <= found.value <= found.high
        assert found.value == pytest.approx(values.mean())
    assert large.high - large.low < (small.high - small.low) / 4
    assert bootstrap_interval(few, "accuracy") == small  # seeded: the same every time


def test_the_interval_covers_the_truth_about_as_often_as_it_says() -> None:
    rng = np.random.default_rng(1)
    hits = 0
    for _ in range(200):
        sample = rng.normal(0.6, 0.2, 60)
        found = bootstrap_interval(sample, "f1", resamples=400, seed=int(rng.integers(1 << 30)))
        hits += found.low <= 0.6 <= found.high
    assert 0.88 <= hits / 200 <= 0.99


def test_paired_bootstrap_tells_a_real_difference_from_noise() -> None:
    rng = np.random.default_rng(2)
    base = rng.random(40)
    better = paired_comparison("a", "b", "f1", base + 0.05 + rng.normal(0, 0.01, 40), base, False)
    assert better.significant and better.difference == pytest.approx(0.05, abs=0.01)
    assert better.low > 0 and better.test == "paired bootstrap"
    noise = paired_comparison("a", "b", "f1", base + rng.normal(0, 0.05, 40), base, False)
    assert not noise.significant and noise.low < 0 < noise.high
    same = paired_comparison("a", "b", "f1", base, base, False)
    assert same.p_value == 1.0 and same.difference == 0


def test_compare_runs_pairs_the_winner_with_every_run_on_shared_images() -> None:
    rows_a = [{"id": f"i{n}", "correct": n % 10 != 0} for n in range(50)]  # 0.90
    rows_b = [{"id": f"i{n}", "correct": n % 2 == 0} for n in range(50)]  # 0.50
    rows_c = [{"id": f"i{n}", "correct": n % 10 not in (0, 1)} for n in range(40)]  # 40 shared
    results = {"a": {"per_image": rows_a}, "b": {"per_image": rows_b}, "c": {"per_image": rows_c}}
    intervals, comparisons = compare_runs("cls", results)
    assert intervals["a"].value == pytest.approx(0.9) and intervals["b"].value == 0.5
    assert {(c.a, c.b) for c in comparisons} == {("a", "b"), ("a", "c")}
    against_b = next(c for c in comparisons if c.b == "b")
    assert against_b.test == "McNemar (exact)" and against_b.significant
    against_c = next(c for c in comparisons if c.b == "c")
    assert against_c.images == 40 and not against_c.significant
    seg = {
        "x": {
            "classes": ["bg", "v"],
            "per_image": [{"id": "1", "f1": 0.8}, {"id": "2", "f1": None}],
        }
    }
    intervals, comparisons = compare_runs("seg", seg)
    assert intervals["x"].value == pytest.approx(0.4) and not comparisons  # undefined counts 0
    assert compare_runs("det", {"x": {"per_image": [{"id": "1"}]}}) == ({}, [])
    assert math.isnan(bootstrap_interval(np.array([]), "f1").value)


def test_coco_ap_intervals_resample_images_and_pair_the_runs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """AP is recomputed by pycocotools on resampled image sets; a run that finds every box
    beats one that finds half of them, paired on the same draws."""
    import json

    from hiresctl.eval.stats import coco_ap_draws

    images = [{"id": i, "file_name": f"{i}.tif", "width": 100, "height": 100} for i in range(1, 21)]
    annotations = [
        {
            "id": i,
            "image_id": i,
            "category_id": 1,
            "bbox": [10, 10, 30, 30],
            "area": 900.0,
            "iscrowd": 0,
        }
        for i in range(1, 21)
    ]
    truth = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "x"}]}
    every = [
        {"image_id": i, "category_id": 1, "bbox": [10, 10, 30, 30], "score": 0.9}
        for i in range(1, 21)
    ]
    half = [d for d in every if d["image_id"] % 2]
    draws = np.array([list(range(20)), [0] * 20])
    np.testing.assert_allclose(coco_ap_draws(truth, every, draws), [1.0, 1.0], atol=1e-6)
    assert coco_ap_draws(truth, half, draws)[1] > 0.99  # image 1 only: it was found
    results = {}
    for name, found in (("all", every), ("half", half)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "gt.json").write_text(json.dumps(truth))
        (folder / "det.json").write_text(json.dumps(found))
        results[name] = {
            "metrics": {"ap": 1.0 if name == "all" else 0.5},
            "files": {
                "ground_truth": str(folder / "gt.json"),
                "detections": str(folder / "det.json"),
            },
        }
    intervals, comparisons = compare_runs("det", results)
    assert intervals["all"].low == intervals["all"].high == pytest.approx(1.0)
    assert intervals["half"].low < 0.5 < intervals["half"].high
    [c] = comparisons
    assert (c.a, c.b) == ("all", "half") and c.significant and c.low > 0
