"""`hiresctl eval --report`: the numbers in the report are metrics.json's, the best run is
marked, the figures are embedded, classifiers' heatmaps point at what decides, and the page
renders in a real browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from hiresctl.data import LabelledImage
from hiresctl.train import load_run, predict_images
from storage import Dataset
from tests.stores import make_store, planted_images

TINY = {
    "backbone": "tiny",
    "patch_size": 32,
    "latent_dim": 32,
    "head_width": 32,
    "batch_size": 4,
    "lr": 3e-3,
}


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("planted")
    images, labels = planted_images(
        40, 128, 32, seed=0, split_of=lambda i: "val" if i >= 30 else "train"
    )
    return make_store(root, images, labels), images


@pytest.fixture(scope="module")
def runs(
    planted: tuple[Path, dict[str, np.ndarray]], tmp_path_factory: pytest.TempPathFactory
) -> list[Path]:
    """A PatchGD run that learns the planted square (no global patch: its only evidence is the
    patches), and a 2-epoch downsample run."""
    from hiresctl.train import Trainer, load_recipe

    store, _ = planted
    root = tmp_path_factory.mktemp("runs")
    out = []
    for method, epochs in (("patchgd", 8), ("downsample", 2)):
        recipe = load_recipe(None, "cls", method, {**TINY, "epochs": epochs, "warmup": 0.05})
        Trainer(store, root / method, recipe, device="cpu", log=lambda m: None).fit()
        out.append(root / method)
    return out


def test_report_numbers_equal_metrics_json_and_the_best_is_marked(
    planted: tuple[Path, dict[str, np.ndarray]], runs: list[Path], tmp_path: Path, cli: Callable
) -> None:
    store, _ = planted
    result = cli(
        "eval",
        *runs,
        "--data",
        store,
        "--split",
        "val",
        "--report",
        "--out",
        tmp_path / "report",
        "--json",
    )
    assert result.code == 0, result.stderr
    printed = json.loads(result.stdout)
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    printed.pop("report")
    assert json.loads(json.dumps(printed, default=str)) == saved
    html = (tmp_path / "report" / "report.html").read_text()
    markdown = (tmp_path / "report" / "report.md").read_text()
    for section in (
        "Runs side by side",
        "Training",
        "Dataset",
        "Confusion matrix",
        "Per class",
        "ROC",
        "Worst images",
        "The whole resolved recipe",
    ):
        assert section in html, section
    names = [r["name"] for r in saved["runs"]]
    assert names == ["patchgd", "downsample"]
    for name in names:  # every number of the comparison table, as printed, in both twins
        for column, value in saved["table"][name].items():
            if value is None:
                continue
            text = f"{value:.{_digits(column)}f}"
            assert text in html and text in markdown, (name, column, text)
    # Every column's best (highest; lowest for memory), ties shared, starred in both twins.
    for column in saved["table"][names[0]]:
        values = {n: saved["table"][n][column] for n in names}
        if None in values.values():  # a column the runs lack (features: none extracted)
            assert column not in saved["best"], column
            continue
        pick = min if column.endswith(("_gb", "_seconds")) else max
        expected = [n for n in names if values[n] == pick(values.values())]
        assert saved["best"][column] == expected, column
        text = f"{values[expected[0]]:.{_digits(column)}f}"
        assert f"{text} ★" in html and f"**{text} ★**" in markdown, column
    accuracy = {n: saved["table"][n]["accuracy"] for n in names}
    winner = max(names, key=lambda n: accuracy[n])  # the first of a tie, as the verdict says
    assert saved["verdict"].startswith(winner)
    # Figures: embedded in the page (it opens offline), and files for the Markdown twin.
    assert not re.search(r'src="(?!data:)', html), "every image is embedded"
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    shown = re.findall(r"!\[[^\]]*\]\((figures/[^)]+)\)", markdown)
    assert len(shown) >= 4 and all((tmp_path / "report" / f).is_file() for f in shown)
    assert html.count("data:image/png;base64,") >= len(
        saved["runs"][0]["evaluation"]["per_image"][:6]
    )


def _digits(column: str) -> int:
    """The table's rounding: whole seconds, costs to 2 places, metrics to 4."""
    if column.endswith("_seconds"):
        return 0
    return 2 if column.startswith(("train_", "eval_")) else 4


def test_report_counts_feature_extraction_in_a_feature_methods_time(
    planted: tuple[Path, dict[str, np.ndarray]], runs: list[Path], tmp_path: Path, cli: Callable
) -> None:
    """A run on stored features is compared with the extraction it needed counted in: the
    store's extraction seconds are its "Features s", and its total is that plus training."""
    import zarr

    store, _ = planted
    embedded = cli("embed", store, "--backbone", "tiny", "--patch-size", "32", "--name", "rep")
    assert embedded.code == 0, embedded.stderr
    trained = cli(
        "train",
        "--data",
        store,
        "--out",
        tmp_path / "abmil",
        "--method",
        "abmil",
        "--set",
        "epochs=1",
        "--set",
        "features=rep",
    )
    assert trained.code == 0, trained.stderr
    result = cli(
        "eval",
        tmp_path / "abmil",
        runs[1],
        "--data",
        store,
        "--split",
        "val",
        "--report",
        "--out",
        tmp_path / "report",
        "--json",
    )
    assert result.code == 0, result.stderr
    table = json.loads(result.stdout)["table"]
    spent = sum(
        zarr.open_group(store / "images" / e.id / "features" / "rep", mode="r").attrs["hiresctl"][
            "seconds"
        ]
        for e in Dataset(store).entries(complete_only=True)
    )
    features = table["abmil"]
    assert features["prepared_seconds"] == pytest.approx(spent)
    assert features["total_seconds"] == pytest.approx(spent + features["train_seconds"])
    epochs = (tmp_path / "abmil" / "metrics.jsonl").read_text().splitlines()
    assert features["train_seconds"] == pytest.approx(json.loads(epochs[0])["seconds"])
    pixels = table["downsample"]  # nothing extracted: its total is its training
    assert pixels["prepared_seconds"] is None
    assert pixels["total_seconds"] == pytest.approx(pixels["train_seconds"])
    html = (tmp_path / "report" / "report.html").read_text()
    assert "Features s" in html and "Total s" in html
    assert f"{features['total_seconds']:.0f}" in html
    assert "s extracting features" in json.loads(result.stdout)["verdict"]


def test_patchgd_heatmap_points_at_the_planted_square(
    planted: tuple[Path, dict[str, np.ndarray]], runs: list[Path]
) -> None:
    store, images = planted
    dataset = Dataset(store)
    run = load_run(runs[0], dataset, torch.device("cpu"))
    positives = [e.id for e in dataset.entries(split="val") if e.label == "1"]
    maps: list = []
    logits, _, _ = predict_images(run, [LabelledImage(i, 1) for i in positives], 4, heatmaps=maps)
    plain, _, _ = predict_images(run, [LabelledImage(i, 1) for i in positives], 4)
    torch.testing.assert_close(logits, plain)  # explaining does not change the prediction
    hits = 0
    for heat in maps:
        ys, xs = np.nonzero(images[heat.image_id][..., 0] == 255)
        planted_cell = (int(ys.min() // heat.cell), int(xs.min() // heat.cell))
        assert heat.scores.shape == (4, 4) and (heat.scores >= 0).all()
        hits += np.unravel_index(heat.scores.argmax(), heat.scores.shape) == planted_cell
    assert hits >= 0.8 * len(maps), f"{hits} of {len(maps)} heatmaps peak at the planted patch"


def test_ips_heatmap_marks_the_selected_patches(
    planted: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    from hiresctl.train import build_run, load_recipe

    store, _ = planted
    dataset = Dataset(store)
    recipe = load_recipe(
        None,
        "cls",
        "ips",
        {
            "backbone": "tiny",
            "patch_size": 32,
            "latent_dim": 32,
            "memory_size": 3,
            "iter_size": 4,
            "heads": 2,
        },
    )
    run = build_run(recipe, dataset, ["0", "1"], torch.device("cpu"))
    maps: list = []
    predict_images(run, [LabelledImage("im031", 1), LabelledImage("im033", 1)], 2, heatmaps=maps)
    for heat in maps:
        assert (heat.scores > 0).sum() == 3  # M of the 16 patches
        assert heat.scores.sum() == pytest.approx(1.0, abs=1e-4)  # attention over them


def test_segmentation_report_has_overlays_and_crops(tmp_path: Path, cli: Callable) -> None:
    assert cli("synth", "seg-vessels", tmp_path / "syn", "--count", "6", "--size", "128").code == 0
    tiled = cli(
        "tile",
        tmp_path / "syn" / "images",
        "--out",
        tmp_path / "ds.zarr",
        "--labels",
        tmp_path / "syn" / "labels.csv",
        "--masks",
        tmp_path / "syn" / "masks",
        "--chunk",
        "32",
    )
    assert tiled.code == 0, tiled.stderr
    trained = cli(
        "train",
        "--task",
        "seg",
        "--method",
        "patchgd",
        "--data",
        tmp_path / "ds.zarr",
        "--out",
        tmp_path / "run",
        "--set",
        "backbone=unet-tiny",
        "--set",
        "patch_size=32",
        "--set",
        "epochs=1",
    )
    assert trained.code == 0, trained.stderr
    split = Dataset(tmp_path / "ds.zarr").entries()[0].split
    result = cli(
        "eval",
        tmp_path / "run",
        "--data",
        tmp_path / "ds.zarr",
        "--split",
        split,
        "--report",
        "--out",
        tmp_path / "report",
        "--json",
    )
    assert result.code == 0, result.stderr
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    evaluation = saved["runs"][0]["evaluation"]
    html = (tmp_path / "report" / "report.html").read_text()
    for key in ("f1", "iou", "accuracy", "balanced_accuracy"):
        assert f"{evaluation['metrics'][key]:.4f}" in html, key
    assert "false negative" in html and "full resolution at y=" in html
    assert evaluation["confusion_matrix"] and sum(map(sum, evaluation["confusion_matrix"])) == (
        128 * 128 * evaluation["count"]
    )
    overlays = list((tmp_path / "report" / "figures").rglob("*.png"))
    assert len(overlays) >= 2 * evaluation["count"]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium")
def test_report_renders_in_headless_chromium(
    planted: tuple[Path, dict[str, np.ndarray]], runs: list[Path], tmp_path: Path
) -> None:
    import cv2

    from hiresctl.report import build_report

    store, _ = planted
    out = tmp_path / "report"
    build_report(runs, store, "val", out, device="cpu")
    page = (out / "report.html").resolve().as_uri()
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(
        ["chromium", *flags, "--dump-dom", page], capture_output=True, text=True, timeout=120
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "Runs side by side" in dom.stdout and "<svg" in dom.stdout
    shot = tmp_path / "shot.png"
    taken = subprocess.run(
        ["chromium", *flags, "--window-size=1280,1600", f"--screenshot={shot}", page],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert taken.returncode == 0 and shot.is_file(), taken.stderr[-2000:]
    pixels = cv2.imread(str(shot))
    assert pixels is not None and pixels.shape[:2] == (1600, 1280)
    assert pixels.std() > 20, "the screenshot is not blank"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # text, tables, charts, images


def test_detection_report_shows_sizes_classes_curves_and_boxes(
    tmp_path: Path, cli: Callable
) -> None:
    from tests.stores import planted_objects

    images, labels, coco = planted_objects(
        8, 128, seed=5, split_of=lambda i: "test" if i >= 5 else "train"
    )
    store = make_store(tmp_path / "data", images, labels, chunk=64, coco=coco)
    trained = cli(
        "train",
        "--task",
        "det",
        "--data",
        store,
        "--out",
        tmp_path / "run",
        "--set",
        "backbone=tiny",
        "--set",
        "latent_dim=32",
        "--set",
        "head_convs=1",
        "--set",
        "patch_size=64",
        "--set",
        "epochs=3",
        "--set",
        "lr=3e-3",
        "--set",
        "val_split=none",
        "--set",
        "geometric=flip",
    )
    assert trained.code == 0, trained.stderr
    result = cli(
        "eval",
        tmp_path / "run",
        "--data",
        store,
        "--split",
        "test",
        "--report",
        "--out",
        tmp_path / "report",
        "--json",
    )
    assert result.code == 0, result.stderr
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    evaluation = saved["runs"][0]["evaluation"]
    html = (tmp_path / "report" / "report.html").read_text()
    markdown = (tmp_path / "report" / "report.md").read_text()
    for text in ("Precision–recall", "COCO metrics by object size", "Per class", "(FN)"):
        assert text in html and text in markdown, text
    for key, value in evaluation["metrics"].items():
        assert _num_text(value) in html, key
    # sizes: the store's boxes counted by COCO's area ranges
    areas = [a["area"] for a in coco["annotations"] if a["image_id"] > 5]  # type: ignore[index]
    by_size = evaluation["by_size"]
    assert by_size["small"]["objects"] == sum(a < 32**2 for a in areas)
    assert by_size["medium"]["objects"] == sum(32**2 <= a < 96**2 for a in areas)
    assert sum(v["objects"] for v in evaluation["per_class"].values()) == len(areas)
    # AP50 is the area under the IoU-0.5 curve: the mean over its 101 recall points
    curve = evaluation["pr_curve"]
    assert len(curve["recall"]) == 101
    assert np.mean([v or 0.0 for v in curve["iou50"]]) == pytest.approx(
        evaluation["metrics"]["ap50"], abs=1e-6
    )
    assert (tmp_path / "report" / "figures" / "pr-iou50.svg").is_file()
    for row in evaluation["per_image"]:
        assert row["found"] + row["missed"] == row["objects"]
    # every test image is drawn (3 < SHOWN), with a zoomed crop around an object
    drawn = {p.name for p in (tmp_path / "report" / "figures" / "run").glob("*.png")}
    for row in evaluation["per_image"]:
        stem = row["id"]
        assert {f"{stem}.png", f"{stem}-crop.png", f"{stem}-thumbnail.png"} <= drawn
    assert "around a" in html and "false positives" in html


def _num_text(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def test_detection_overlay_colours_matches_misses_and_false_boxes() -> None:
    from hiresctl.report import figures
    from hiresctl.train.detection.coco import match_detections

    truth = np.array([[10, 10, 30, 30], [50, 50, 70, 70]], np.float32)
    truth_labels = np.array([0, 1])
    boxes = np.array(
        [[11, 11, 30, 31], [10, 10, 30, 30], [53, 53, 73, 73], [80, 80, 95, 95]], np.float32
    )
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    labels = np.array([0, 0, 0, 1])  # a match, its duplicate, the wrong class, nothing there
    hits, found = match_detections(truth, truth_labels, boxes, scores, labels)
    assert hits.tolist() == [True, False, False, False] and found.tolist() == [True, False]
    image = np.zeros((100, 100, 3), np.uint8)
    drawn = figures.detection_overlay(image, (1.0, 1.0), (0, 0), truth, found, boxes, hits)
    assert tuple(drawn[80, 88]) == figures.FP  # top edge of the false box
    assert tuple(drawn[50, 60]) == tuple(drawn[70, 60]) == figures.FN  # the missed box
    assert tuple(drawn[53, 60]) == figures.FP  # the wrong-class box over it
    assert tuple(drawn[11, 20]) == figures.TP  # the match (its duplicate drawn below it)
    # drawn from an origin and scale: the same box lands shifted and doubled
    zoomed = figures.detection_overlay(
        np.zeros((100, 100, 3), np.uint8),
        (2.0, 2.0),
        (10, 10),
        truth[:1],
        np.array([False]),
        boxes[:0],
        hits[:0],
    )
    assert tuple(zoomed[0, 20]) == figures.FN and tuple(zoomed[40, 20]) == figures.FN
