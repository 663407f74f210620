"""Segmentation: stitching geometry, the loss, the metrics of docs/methods.md §8, learning, predict."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from torch import nn

from hiresctl.data import LabelledImage, PatchAugment, PatchStream
from hiresctl.data.reader import normalize
from hiresctl.eval import evaluate
from hiresctl.models import PatchSegmenter, upsample_region
from hiresctl.train import Trainer, build_run, load_recipe, predict_segmentation
from hiresctl.train.segmentation import IGNORE, segmentation_loss
from hiresctl.train.segmentation.metrics import binary_image_metrics, segmentation_metrics
from storage import Dataset, UsageError
from tests.ngff import assert_labels_have_parents, assert_valid_ngff
from tests.stores import make_store


def _recipe(method: str = "patchgd-global", **changes):
    base = {"backbone": "unet-tiny", "patch_size": 32, "epochs": 1, "batch_size": 2}
    return load_recipe(task="seg", method=method, overrides={**base, **changes})


def test_upsample_region_equals_a_crop_of_the_full_upsampling() -> None:
    maps = torch.randn(2, 3, 8, 8)
    full = F.interpolate(maps, size=(100, 100), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(
        upsample_region(maps, 100, 13, 57, 40, 43), full[..., 13:53, 57:100], atol=1e-5
    )
    beyond = upsample_region(maps, 100, 96, 0, 8, 8)  # rows 100.. are the grid's padding
    np.testing.assert_allclose(beyond[..., :4, :], full[..., 96:, :8], atol=1e-5)
    assert beyond[..., 4:, :].abs().max() == 0


def test_planned_mask_reads_rebuild_the_mask_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 2, (100, 70), dtype=np.uint8) * 7  # values 0 and 7
    pixels = rng.integers(0, 255, (100, 70, 3), dtype=np.uint8)
    store = make_store(tmp_path, {"a": pixels}, masks={"a": mask})
    run = build_run(_recipe(), Dataset(store), ["0", "7"], torch.device("cpu"), mask_values=[0, 7])
    method = run.method
    canvas = torch.full((1, 128, 96), IGNORE, dtype=torch.long)
    seen = []
    for request, tensor in PatchStream(run.reader)(method.plan(["a"], 0, train=True)):
        if request.kind == "mask":
            method._place(canvas, 0, request.grid, request.indices, tensor)
            seen += request.indices.tolist()
    assert sorted(seen) == list(range(4 * 3))  # every patch of the 4×3 grid, once
    np.testing.assert_array_equal(canvas[0, :100, :70].numpy(), (mask == 7).astype(np.int64))
    assert (canvas[0, 100:] == IGNORE).all() and (canvas[0, :, 70:] == IGNORE).all()


def test_an_offset_training_grid_stitches_pixels_and_labels_in_one_frame(tmp_path: Path) -> None:
    """With ``grid_offset: random`` each epoch lays the grid elsewhere; the patches and the
    mask under them land in the canvas at the same places, the image shifted by the offset."""
    rng = np.random.default_rng(1)
    mask = rng.integers(0, 2, (100, 70), dtype=np.uint8)
    pixels = rng.integers(0, 255, (100, 70, 3), dtype=np.uint8)
    store = make_store(tmp_path, {"a": pixels}, masks={"a": mask})
    recipe = _recipe(grid_offset="random", geometric="flip")
    run = build_run(recipe, Dataset(store), ["0", "1"], torch.device("cpu"), mask_values=[0, 1])
    method = run.method
    augment = PatchAugment("none", seed=0, geometric="flip", grid_offset="random")
    method.augment = augment
    offsets = set()
    for epoch in range(6):
        augment.epoch = epoch
        top, left = method.patches("a", train=True)[0].offset
        assert 0 <= top < 32 and 0 <= left < 32
        offsets.add((top, left))
        height, width = method._canvas(["a"])
        assert height >= 100 + top and width >= 70 + left
        labels = torch.full((1, height, width), IGNORE, dtype=torch.long)
        image = torch.zeros(1, 3, height, width)
        for request, tensor in PatchStream(run.reader, augment=augment)(
            method.plan(["a"], epoch, train=True)
        ):
            target = labels if request.kind == "mask" else image
            if request.tag.role in ("mask", "fill"):
                method._place(target, 0, request.grid, request.indices, tensor)
        flip = augment.flip("a")
        seen = flip.pixels(np.moveaxis(pixels, -1, 0))
        expected = normalize(torch.from_numpy(seen).float() / 255)
        torch.testing.assert_close(image[0, :, top : top + 100, left : left + 70], expected)
        np.testing.assert_array_equal(
            labels[0, top : top + 100, left : left + 70].numpy(), flip.pixels(mask)
        )
        assert (labels[0, :top] == IGNORE).all() and (labels[0, :, :left] == IGNORE).all()
        assert method.patches("a")[0].offset == (0, 0)  # evaluation's grid is not moved
    assert len(offsets) > 1


def test_a_fixed_grid_method_refuses_an_offset() -> None:
    with pytest.raises(UsageError, match="lays a fixed patch grid"):
        load_recipe(task="seg", method="downsample", overrides={"grid_offset": "random"})


def _bright_square_store(tmp_path: Path) -> tuple[Path, np.ndarray]:
    pixels = np.zeros((96, 128, 3), dtype=np.uint8)
    truth = np.zeros((96, 128), dtype=np.uint8)
    truth[40:56, 70:90] = 1  # inside patch (row 1, col 2) of a 3×4 grid of 32² patches
    pixels[truth == 1] = 255
    return make_store(tmp_path, {"sq": pixels}, masks={"sq": truth}), truth


def _brightness_model(use_global: bool) -> PatchSegmenter:
    """θ1 = mean brightness in every channel; θ2 reads the patch (or the global) latent."""
    encoder = nn.Conv2d(3, 8, 1)
    head_source = 8 if use_global else 0
    with torch.no_grad():
        encoder.weight.fill_(1 / 3)
        encoder.bias.zero_()
        model = PatchSegmenter(encoder, 1, latent_dim=8, use_global=use_global)
        model.head.weight.zero_()
        model.head.weight[0, head_source] = 1.0
        model.head.bias.zero_()
    return model


@pytest.mark.parametrize("method", ["patchgd", "patchgd-global"])
def test_patch_and_global_outputs_land_in_place(tmp_path: Path, method: str) -> None:
    store, truth = _bright_square_store(tmp_path)
    run = build_run(
        _recipe(method), Dataset(store), ["0", "1"], torch.device("cpu"), mask_values=[0, 1]
    )
    run.model = _brightness_model(use_global=method == "patchgd-global")
    canvas = np.full(truth.shape, -1)

    def on_tile(
        image_id: str, y: int, x: int, logits: torch.Tensor, pred: np.ndarray, tile_truth: Any
    ) -> None:
        canvas[y : y + pred.shape[0], x : x + pred.shape[1]] = pred
        np.testing.assert_array_equal(
            tile_truth, truth[y : y + pred.shape[0], x : x + pred.shape[1]]
        )

    [matrix], _ = predict_segmentation(run, [LabelledImage("sq", 0)], on_tile=on_tile)
    assert (canvas >= 0).all(), "tiles cover the image"
    if method == "patchgd":  # the patch latent: exactly the square, in place (not transposed)
        np.testing.assert_array_equal(canvas, truth)
        assert matrix[1, 1] == truth.sum() and matrix[0, 1] == matrix[1, 0] == 0
    else:  # the global latent is a 32² view upsampled: the square, blurred, in the same place
        ys, xs = np.nonzero(canvas)
        assert abs(ys.mean() - 47.5) < 3 and abs(xs.mean() - 79.5) < 3
        overlap = (canvas & truth).sum() / (canvas | truth).sum()
        assert overlap > 0.5


def test_loss_ignores_padding_and_rewards_the_truth() -> None:
    target = torch.tensor([[[0, 1], [1, IGNORE]]])
    perfect = (target.float() * 2 - 1)[:, None] * 20
    wrong = -perfect
    assert segmentation_loss(perfect, target) < 0.05 < segmentation_loss(wrong, target)
    changed = perfect.clone()
    changed[0, 0, 1, 1] = -100  # an ignored pixel
    assert torch.isclose(segmentation_loss(changed, target), segmentation_loss(perfect, target))
    three = torch.tensor([[[0, 2], [1, IGNORE]]])
    logits = F.one_hot(three.clamp(min=0), 3).permute(0, 3, 1, 2).float() * 20
    assert segmentation_loss(logits, three) < 0.05
    assert segmentation_loss(logits.roll(1, dims=1), three) > 1


def test_metrics_equal_hand_computed_values() -> None:
    first = np.array([[50, 10], [5, 35]])  # rows truth, columns prediction: TN FP / FN TP
    m = binary_image_metrics(first)
    assert m["accuracy"] == pytest.approx(85 / 100)
    assert m["f1"] == pytest.approx(70 / 85)
    assert m["iou"] == pytest.approx(35 / 50)
    assert m["balanced_accuracy"] == pytest.approx((35 / 40 + 50 / 60) / 2)
    assert m["plr"] == pytest.approx((35 / 40) / (10 / 60))
    assert m["nlr"] == pytest.approx((5 / 40) / (50 / 60))
    empty = np.array([[100, 0], [0, 0]])  # no positives, none predicted: F1, IoU undefined
    out = segmentation_metrics([first, empty], ["bg", "fg"])
    assert out["f1"] == pytest.approx((70 / 85 + 0) / 2)
    assert out["accuracy"] == pytest.approx((0.85 + 1.0) / 2)
    assert out["undefined"]["f1"] == 1 and "count as 0" in out["nan_policy"]
    multi = np.array([[5, 1, 0], [0, 3, 1], [0, 0, 0]])
    res = segmentation_metrics([multi], ["a", "b", "c"])
    assert res["mean_iou"] == pytest.approx((5 / 6 + 3 / 5 + 0 / 1) / 3)
    assert res["per_class"]["a"]["iou"] == pytest.approx(5 / 6)
    assert res["pixel_accuracy"] == pytest.approx(8 / 10)


def _vessel_store(tmp_path: Path, count: int, size: int) -> Path:
    from storage.synth import synthesize
    from storage.tiler import LabelTable, MaskSet, SourceSpec, TileOptions, tile

    synthesize("seg-vessels", tmp_path / "syn", count=count, size=size, seed=2)
    specs = [SourceSpec((str(p),)) for p in sorted((tmp_path / "syn" / "images").iterdir())]
    tile(
        specs,
        tmp_path / "ds.zarr",
        TileOptions(chunk=32, thumbnail_size=64, workers=1),
        LabelTable(tmp_path / "syn" / "labels.csv"),
        masks=MaskSet(tmp_path / "syn" / "masks"),
    )
    return tmp_path / "ds.zarr"


def test_tiny_segmenter_learns_thin_vessels(tmp_path: Path) -> None:
    store = _vessel_store(tmp_path, count=14, size=128)
    recipe = _recipe("patchgd-global", epochs=15, lr=3e-3)
    trainer = Trainer(store, tmp_path / "run", recipe, device="cpu", log=lambda m: None)
    matrices, _ = predict_segmentation(trainer.run, trainer.val_images)
    untrained = segmentation_metrics(matrices, trainer.run.classes)["f1"]
    result = trainer.fit()
    assert result.summary["monitor"] == "f1"
    trained = evaluate(tmp_path / "run", store, split="test", device="cpu")
    # all background scores F1 0; the untrained network is no better than chance
    assert trained["metrics"]["f1"] > 0.6 > untrained
    assert trained["metrics"]["iou"] > 0.4


def test_cli_trains_evaluates_and_predicts_multiclass_masks(
    tmp_path: Path, cli, caplog: pytest.LogCaptureFixture
) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    assert cli("synth", "seg-aerial", tmp_path / "syn", "--count", "6", "--size", "128").code == 0
    tiled = cli(
        "tile",
        tmp_path / "syn" / "images",
        "--out",
        tmp_path / "ds.zarr",
        "--labels",
        tmp_path / "syn" / "labels.csv",
        "--masks",
        tmp_path / "syn" / "masks",
        "--mask-classes",
        tmp_path / "syn" / "classes.csv",
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
        "--json",
    )
    assert trained.code == 0, trained.stderr
    summary = json.loads(trained.stdout)
    assert summary["classes"] == ["background", "road", "building"]
    assert summary["monitor"] == "mean_iou"
    evaluated = cli("eval", tmp_path / "run", "--data", tmp_path / "ds.zarr", "--json")
    assert evaluated.code == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    assert set(result["per_class"]) == {"background", "road", "building"}
    assert 0 <= result["metrics"]["mean_iou"] <= 1
    assert sum(map(sum, result["confusion_matrix"])) == 128 * 128 * result["count"]
    predicted = cli(
        "predict",
        tmp_path / "run",
        tmp_path / "ds.zarr",
        "--out",
        tmp_path / "pred",
        "--probabilities",
        "--json",
    )
    assert predicted.code == 0, predicted.stderr
    rows = [json.loads(line) for line in predicted.stdout.splitlines()]
    assert len(rows) == 6
    store = tmp_path / "pred" / "predictions.zarr"
    group = zarr.open_group(store / rows[0]["id"], mode="r")
    assert group.attrs["hiresctl"]["status"] == "complete"
    labels = np.asarray(group["0"][...])
    assert labels.shape == (1, 128, 128) and set(np.unique(labels)) <= {0, 1, 2}
    probs = np.asarray(group["probabilities"][...], dtype=np.float32)
    np.testing.assert_allclose(probs.sum(0), 1, atol=1e-2)
    np.testing.assert_array_equal(probs.argmax(0), labels[0])
    names = [p["class"] for p in group.attrs["ome"]["image-label"]["properties"]]
    assert names == ["background", "road", "building"]
    nodes = list(Reader(parse_url(str(store / rows[0]["id"])))())
    assert nodes and len(nodes[0].data) >= 1
    # every predicted label image (and the store it was tiled into) is valid OME-NGFF 0.5
    assert set(assert_valid_ngff(store).values()) == {"ImageLabel"}
    assert_valid_ngff(tmp_path / "ds.zarr", expect={"Image", "Labels", "ImageLabel"})
    assert_labels_have_parents(tmp_path / "ds.zarr" / "images" / rows[0]["id"], caplog, 1)
    assert sum(rows[0]["pixels"].values()) == 128 * 128  # pixels per predicted class
    for name in (
        "predictions.csv",
        "predictions.json",
        f"geojson/{rows[0]['id']}.geojson",
        f"overlays/{rows[0]['id']}.png",
    ):
        assert (tmp_path / "pred" / name).is_file(), name
    wrong = cli(
        "train",
        "--task",
        "seg",
        "--method",
        "ips",
        "--data",
        tmp_path / "ds.zarr",
        "--out",
        tmp_path / "run2",
    )
    assert wrong.code == 2 and "not a seg method" in wrong.stderr
    assert math.isfinite(summary["peak_memory_gb"])


@pytest.mark.slow
def test_predicting_a_20k_image_holds_tiles_not_the_image(tmp_path: Path) -> None:
    """20000² pixels: the mask alone would be 400 MB as uint8 and the logits 1.6 GB as float32;
    prediction (read, segment, write the label pyramid) must hold only tiles."""
    import tifffile

    from hiresctl.eval.outputs import predict_masks
    from hiresctl.train import atomic_save
    from hiresctl.train.memory import PeakMemory, current_rss_bytes
    from storage.tiler import MaskSet, SourceSpec, TileOptions, tile

    side, step = 20000, 512

    def tiles(value_of_row):  # written tile by tile: the test never holds the image either
        for y in range(0, side, step):
            for _x in range(0, side, step):
                yield np.full((step, step), value_of_row(y), dtype=np.uint8)

    (tmp_path / "src").mkdir()
    (tmp_path / "masks").mkdir()
    for path, value_of_row in (
        (tmp_path / "src" / "big.tif", lambda y: 40 + (y // step) % 2 * 180),
        (tmp_path / "masks" / "big.tif", lambda y: (y // step) % 2),
    ):
        tifffile.imwrite(
            path,
            tiles(value_of_row),
            shape=(side, side),
            dtype=np.uint8,
            tile=(step, step),
            compression="zlib",
        )
    [result] = tile(
        [SourceSpec((str(tmp_path / "src" / "big.tif"),))],
        tmp_path / "ds.zarr",
        TileOptions(chunk=512, thumbnail_size=512),
        masks=MaskSet(tmp_path / "masks"),
    )
    assert result.status == "written", result.error
    recipe = _recipe("downsample", patch_size=512)
    run = build_run(
        recipe, Dataset(tmp_path / "ds.zarr"), ["0", "1"], torch.device("cpu"), mask_values=[0, 1]
    )
    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "recipe.yaml").write_text("task: seg\n")
    atomic_save(
        {
            "recipe": recipe.to_dict(),
            "classes": ["0", "1"],
            "mask_values": [0, 1],
            "model": run.model.state_dict(),
        },
        folder / "checkpoints" / "best.pt",
    )
    del run
    peak = PeakMemory(torch.device("cpu"))
    before = current_rss_bytes()
    peak.reset()
    [row] = predict_masks(folder, tmp_path / "ds.zarr", tmp_path / "pred.zarr", device="cpu")
    grown = peak.peak_bytes() - before
    assert row["shape"] == [side, side] and row["levels"] > 5
    assert grown < 350e6, f"prediction grew resident memory by {grown / 1e6:.0f} MB"
    level0 = zarr.open_array(tmp_path / "pred.zarr" / "big" / "0", mode="r")
    assert level0.shape == (1, side, side)


def test_the_split_head_equals_the_head_over_the_concatenation() -> None:
    """Training applies θ2 as W_z·z + up(W_g·g) + b; prediction as W·[z, up(g)] + b."""
    torch.manual_seed(0)
    model = PatchSegmenter(nn.Identity(), 3, latent_dim=8, use_global=True)
    latent, g = torch.randn(2, 8, 40, 56), torch.randn(2, 8, 16, 16)
    up = upsample_region(g, 64, -5, -3, 40, 56)  # an offset grid: the image starts at (5, 3)
    joint = model.segment(latent, up)
    split = (
        model.local_logits(latent)
        + upsample_region(model.global_logits(g), 64, -5, -3, 40, 56)
        + model.bias()
    )
    torch.testing.assert_close(split, joint, atol=1e-5, rtol=1e-5)
