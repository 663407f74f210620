"""Detection: stitched FCOS maps, the methods' training, COCO metrics equal to pycocotools'."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hiresctl.data import PatchAugment, PatchReader, PatchStream, detection_images
from hiresctl.eval import evaluate
from hiresctl.train import PatchCost, Trainer, build_run, load_recipe, step_context
from hiresctl.train.detection.patchgd import DetPatchGD
from hiresctl.train.detection.sliced import DetSliced, merge_detections
from storage import Dataset, UsageError
from storage.annotations import Annotations
from tests.stores import make_store, planted_objects

# float32 whatever `auto` picks on this CPU: the tests compare stitched maps and gradients exactly
SMALL = {
    "backbone": "tiny",
    "latent_dim": 32,
    "head_convs": 2,
    "patch_size": 64,
    "batch_size": 4,
    "accumulation_steps": 1,
    "lr": 3e-3,
    "seed": 0,
    "precision": "fp32",
}


def _split(i: int) -> str:
    return "train" if i < 10 else "test"


@pytest.fixture(scope="module")
def objects_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    images, labels, coco = planted_objects(14, 192, seed=3, split_of=_split)
    return make_store(tmp_path_factory.mktemp("det"), images, labels, chunk=64, coco=coco)


def _recipe(**changes: object):  # type: ignore[no-untyped-def]
    return load_recipe(task="det", overrides={**SMALL, **changes})


def test_stitched_maps_put_patch_r_c_at_its_place_in_the_image(tmp_path: Path) -> None:
    # 2 rows × 3 columns of 64-pixel patches, each a different pattern: the stitched map of
    # every level must equal, cell for cell, the maps of the patch read at (r·64, c·64).
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (128, 192, 3), dtype=np.uint8)
    coco = {
        "images": [{"id": 1, "file_name": "a.tif", "width": 192, "height": 128}],
        "annotations": [],
        "categories": [{"id": 1, "name": "x"}],
    }
    store = make_store(tmp_path, {"a": pixels}, chunk=64, coco=coco)
    recipe = _recipe(method="patchgd")
    run = build_run(recipe, Dataset(store), ["x"], torch.device("cpu"))
    method = run.method
    assert isinstance(method, DetPatchGD)
    model = run.model.eval()
    maps = method._maps(model, ["a"], torch.device("cpu"))  # type: ignore[attr-defined]
    ctx = step_context(run, None, None, 1)
    for request, patch_pixels in PatchStream(run.reader)(method.plan(["a"], 0, train=False)):
        method._fill_maps(ctx, model, maps, request, patch_pixels)  # type: ignore[attr-defined]
    reader = PatchReader(Dataset(store))
    grid = reader.grid("a", 64)
    with torch.no_grad():
        for index in range(grid.num_patches):
            r, c = divmod(index, grid.cols)
            alone = model.encode(reader.read_patches("a", grid, [index]))
            for level, stride in enumerate(model.strides):
                side = 64 // stride
                cell = maps[level][0, :, r * side : (r + 1) * side, c * side : (c + 1) * side]
                torch.testing.assert_close(cell, alone[level][0], atol=1e-5, rtol=1e-5)
    assert grid.rows == 2 and grid.cols == 3  # a transposed grid could not pass on 2 × 3


def test_patchgd_global_learns_planted_objects_and_finds_them_in_place(
    objects_store: Path, tmp_path: Path
) -> None:
    untrained = Trainer(
        objects_store, tmp_path / "untrained", _recipe(epochs=1, lr=1e-9, val_split="none")
    )
    untrained.fit()
    before = evaluate(tmp_path / "untrained", objects_store, "test", "cpu")["metrics"]
    Trainer(objects_store, tmp_path / "run", _recipe(epochs=8, val_split="none")).fit()
    result = evaluate(tmp_path / "run", objects_store, "test", "cpu")
    after = result["metrics"]
    assert after["ap50"] > 0.5, after
    assert after["ap50"] > before["ap50"] + 0.3, (before, after)
    # the confident boxes lie on the planted objects (in image coordinates, so in the right patch)
    truth = json.loads(Path(result["files"]["ground_truth"]).read_text())
    found = json.loads(Path(result["files"]["detections"]).read_text())
    hits = 0
    for ann in truth["annotations"]:
        x, y, w, h = ann["bbox"]
        mine = [d for d in found if d["image_id"] == ann["image_id"] and d["score"] > 0.3]
        centres = [(d["bbox"][0] + d["bbox"][2] / 2, d["bbox"][1] + d["bbox"][3] / 2) for d in mine]
        hits += any(x <= cx <= x + w and y <= cy <= y + h for cx, cy in centres)
    assert hits >= 0.7 * len(truth["annotations"])


def test_reported_ap_equals_pycocotools_on_the_written_files(
    objects_store: Path, tmp_path: Path
) -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    Trainer(objects_store, tmp_path / "run", _recipe(epochs=2, val_split="none")).fit()
    result = evaluate(tmp_path / "run", objects_store, "test", "cpu")
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(result["files"]["ground_truth"])
        found = truth.loadRes(result["files"]["detections"])
        evaluation = COCOeval(truth, found, "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    keys = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")
    expected = [None if v < 0 else float(v) for v in evaluation.stats[:6]]
    assert [result["metrics"][k] for k in keys] == expected
    assert result["metrics"]["ap50"] > 0  # a vacuous all-zero comparison would prove nothing
    # per-class AP is pycocotools' precision averaged over IoUs and recall points
    precision = evaluation.eval["precision"][:, :, 0, 0, -1]
    assert result["per_class"]["red"]["ap"] == pytest.approx(
        float(precision[precision > -1].mean())
    )
    assert result["objects"] == len(truth.getAnnIds())


@pytest.mark.parametrize("method", ["patchgd", "downsample", "sliced"])
def test_every_detection_method_trains_all_its_parts_and_evaluates(
    objects_store: Path, tmp_path: Path, method: str
) -> None:
    recipe = _recipe(method=method, epochs=1, input_size=128, val_split="none", geometric="flip")
    trainer = Trainer(objects_store, tmp_path / method, recipe)
    before = {k: v.clone() for k, v in trainer.run.model.state_dict().items()}
    trainer.fit()
    after = trainer.run.model.state_dict()
    changed = {k.split(".")[1] for k in before if not torch.equal(before[k], after[k])}
    # backbone, FPN and both head branches learn (not only the heads)
    assert {"backbone", "head"} <= changed
    assert any(not torch.equal(before[k], after[k]) for k in before if ".fpn." in k)
    result = evaluate(tmp_path / method, objects_store, "test", "cpu")
    assert result["method"] == method and result["count"] == 4
    assert set(result["metrics"]) >= {"ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large"}


@pytest.mark.parametrize("method", ["patchgd-global", "sliced", "downsample"])
def test_training_boxes_follow_the_mirrored_reads(objects_store: Path, method: str) -> None:
    # With geometric=flip every epoch mirrors each image one of four ways; what the training
    # plan reads (patches on the grid, sliced windows, the resized whole image) and the boxes
    # the losses see must still agree: inside every target box is its square's colour.
    run = build_run(
        _recipe(method=method, input_size=128, geometric="flip"),
        Dataset(objects_store),
        ["red", "green"],
        torch.device("cpu"),
    )
    augment = PatchAugment("none", seed=0, geometric="flip")
    run.method.augment = augment
    stream = PatchStream(run.reader, augment=augment)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    seen = set()
    for epoch in range(16):
        augment.epoch = epoch
        image = f"ob{epoch % 3:03d}"
        seen.add(augment.flip(image))
        views: dict[float, torch.Tensor] = {}  # scale → what was read at that scale
        for request, pixels in stream(run.method.plan([image], epoch, train=True)):
            pixels = pixels * std.view(-1, 1, 1) + mean.view(-1, 1, 1)
            if request.kind == "global":  # the letterboxed, resized image
                views[pixels.shape[-1] / 192] = pixels
                continue
            canvas = views.setdefault(1.0, torch.zeros(3, 256, 256))
            for index, patch in zip(request.indices.tolist(), pixels, strict=True):
                y, x = request.grid.origin(index)
                p = request.grid.patch_size
                canvas[:, y : y + p, x : x + p] = patch
        assert len(views) == {"patchgd-global": 2, "sliced": 1, "downsample": 1}[method]
        boxes, labels = run.method.targets(image, train=True)  # type: ignore[attr-defined]
        assert len(boxes) == 3
        for scale, view in views.items():
            for box, label in zip((boxes * scale).tolist(), labels.tolist(), strict=True):
                x0, y0, x1, y1 = box
                dx, dy = (x1 - x0) / 4, (y1 - y0) / 4
                inner = view[:, round(y0 + dy) : round(y1 - dy), round(x0 + dx) : round(x1 - dx)]
                colour = inner.mean((1, 2))
                # red squares are (230, 60, 60), green (60, 230, 60), the background 30–60
                assert colour[label] > 0.7 and colour[1 - label] < 0.4, (epoch, scale, box, colour)
    assert len(seen) == 4


def test_patchgd_global_trains_its_fusion_convs(objects_store: Path, tmp_path: Path) -> None:
    trainer = Trainer(objects_store, tmp_path / "run", _recipe(epochs=1, val_split="none"))
    fusion_before = [c.weight.detach().clone() for c in trainer.run.model.fusion]  # type: ignore[union-attr]
    trainer.fit()
    fusion_after = [c.weight.detach() for c in trainer.run.model.fusion]  # type: ignore[union-attr]
    assert all(not torch.equal(a, b) for a, b in zip(fusion_before, fusion_after, strict=True))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["patches_with_grad"] > 0 and summary["monitor"] == "ap"


def test_sliced_windows_overlap_cut_boxes_and_merge_by_nms(objects_store: Path) -> None:
    run = build_run(
        _recipe(method="sliced", overlap=0.5),
        Dataset(objects_store),
        ["red", "green"],
        torch.device("cpu"),
    )
    method = run.method
    assert isinstance(method, DetSliced)
    grid, kept = method.patches("ob000")
    assert grid.stride == 32 and grid.rows == 5 and len(kept) == 25  # 192 px: 0, 32, …, 128
    method._targets["ob000"] = (torch.tensor([[50.0, 10.0, 90.0, 30.0]]), torch.tensor([1]))
    inside = method.window_targets("ob000", 0, 32, torch.device("cpu"))  # window x 32…96
    torch.testing.assert_close(inside["boxes"], torch.tensor([[18.0, 10.0, 58.0, 30.0]]))
    cut = method.window_targets("ob000", 0, 64, torch.device("cpu"))  # 26 of 40 px inside
    assert len(cut["boxes"]) == 1 and cut["boxes"][0, 0] == 0
    gone = method.window_targets("ob000", 0, 80, torch.device("cpu"))  # 10 of 40 px inside
    assert len(gone["boxes"]) == 0
    # the same object seen by two windows is one detection after merging
    a = {
        "boxes": torch.tensor([[50.0, 10, 90, 30]]),
        "scores": torch.tensor([0.9]),
        "labels": torch.tensor([1]),
    }
    b = {
        "boxes": torch.tensor([[51.0, 10, 90, 31]]),
        "scores": torch.tensor([0.7]),
        "labels": torch.tensor([1]),
    }
    other = {
        "boxes": torch.tensor([[51.0, 10, 90, 31]]),
        "scores": torch.tensor([0.6]),
        "labels": torch.tensor([0]),
    }
    merged = merge_detections([a, b, other], limit=100)
    assert merged["scores"].tolist() == pytest.approx([0.9, 0.6])


def test_detection_sides_must_fit_the_fpn_strides(objects_store: Path) -> None:
    with pytest.raises(UsageError, match="multiple of 32"):
        build_run(_recipe(patch_size=48), Dataset(objects_store), ["red"], torch.device("cpu"))
    with pytest.raises(UsageError, match="stride must equal patch_size"):
        build_run(_recipe(stride=32), Dataset(objects_store), ["red"], torch.device("cpu"))


def test_memory_budget_picks_patches_per_step_for_detection(
    objects_store: Path, tmp_path: Path
) -> None:
    import psutil

    images, _ = detection_images(Dataset(objects_store), "train", ["red", "green"])
    assert len(images) == 10
    # tight: this process's memory (what earlier tests left in it counts) and half a GB
    tight = f"{psutil.Process().memory_info().rss / 1e9 + 0.5:.2f}GB"
    small = Trainer(objects_store, tmp_path / "a", _recipe(memory_budget=tight, batch_size=2))
    large = Trainer(objects_store, tmp_path / "b", _recipe(memory_budget="8GB", batch_size=2))
    assert small.memory_plan is not None and large.memory_plan is not None
    assert small.recipe.patches_per_step is not None
    assert large.recipe.patches_per_step == 3  # ceil(9 patches × ρ 0.25), all it wants
    assert small.recipe.patches_per_step <= large.recipe.patches_per_step


def test_memory_estimate_follows_the_head_recomputation(
    objects_store: Path, tmp_path: Path
) -> None:
    """Recomputed head towers keep each block's input only: the head phase's estimate counts
    the largest level's activations accordingly, and grows back when the towers keep
    everything; the encoder's phase does not hold the head and does not change."""
    from torch import nn

    trainer = Trainer(objects_store, tmp_path / "a", _recipe(method="patchgd", head_convs=3))
    run = trainer.run
    images = trainer.train_images
    cost = PatchCost(1000, 100)
    recomputed = run.method.memory_apart(run.model, images, cost)
    encoder_phase = run.method.memory(run.model, images, cost)
    head = run.model.detector.head  # type: ignore[union-attr]
    for branch in (head.classification_head, head.regression_head):
        branch.conv = nn.Sequential(*branch.conv)  # the same blocks, nothing recomputed
    plain = run.method.memory_apart(run.model, images, cost)
    assert run.method.memory(run.model, images, cost) == encoder_phase
    largest = (192 // run.model.strides[0]) ** 2  # type: ignore[union-attr]
    kept = 3 * 3 - (3 + 3)  # a plain tower keeps conv, norm and ReLU outputs of its 3 blocks
    assert plain - recomputed == largest * SMALL["latent_dim"] * 4 * kept


def test_predict_writes_coco_results_and_qupath_rectangles(
    objects_store: Path, tmp_path: Path
) -> None:
    from hiresctl.eval.predict import predict

    Trainer(objects_store, tmp_path / "run", _recipe(epochs=3, val_split="none")).fit()
    result = predict(
        tmp_path / "run", [str(objects_store)], tmp_path / "out", split="test", device="cpu"
    )
    assert [row["id"] for row in result.rows] == ["ob010", "ob011", "ob012", "ob013"]
    results = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert results and all(r["score"] >= 0.2 for r in results)
    for row in result.rows:
        mine = [r for r in results if r["image_id"] == row["coco_image_id"]]
        assert len(mine) == row["detections"] == row["n_red"] + row["n_green"]
        features = json.loads(Path(row["geojson"]).read_text())["features"]
        assert len(features) == len(mine)
        for feature, found in zip(features, mine, strict=True):
            x, y, w, h = found["bbox"]
            ring = np.array(feature["geometry"]["coordinates"][0])
            assert ring[0].tolist() == ring[-1].tolist() and len(ring) == 5  # closed rectangle
            np.testing.assert_allclose(ring.min(0), [x, y], atol=0.01)
            np.testing.assert_allclose(ring.max(0), [x + w, y + h], atol=0.02)
            assert feature["properties"]["objectType"] == "detection"
            assert (
                feature["properties"]["classification"]["name"]
                == ["red", "green"][found["category_id"] - 1]
            )
        assert (tmp_path / "out" / "overlays" / f"{row['id']}.png").is_file()
        # what predict wrote loads back as `tile --annotations` input: the same boxes, classes
        found = Annotations.geojson(tmp_path / "out" / "geojson").lookup(f"{row['id']}.tif")
        assert found is not None and found.problem is None
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in mine)])
        np.testing.assert_allclose(found.boxes.reshape(-1, 4), boxes.reshape(-1, 4), atol=0.02)
        names = Annotations.geojson(tmp_path / "out" / "geojson").categories
        assert [names[i] for i in found.labels] == [
            ["red", "green"][r["category_id"] - 1] for r in mine
        ]
    only = predict(
        tmp_path / "run",
        [str(objects_store)],
        tmp_path / "only",
        split="test",
        device="cpu",
        formats=["coco"],
    )
    assert sorted(p.name for p in only.out.iterdir()) == ["annotations.json", "detections.json"]
    with pytest.raises(UsageError, match="a det run writes coco, geojson"):
        predict(tmp_path / "run", [str(objects_store)], tmp_path / "bad", formats=["ngff"])


@pytest.mark.parametrize(("fill_batch", "grad_batch"), [(16, None), (2, 1)])
def test_patchgd_inner_step_has_the_gradients_of_one_backward(
    objects_store: Path, fill_batch: int, grad_batch: int | None
) -> None:
    # DetPatchGD's inner step encodes its patches without gradient, runs the staged head, then
    # encodes them again with gradient and carries the maps' gradients back through the
    # encoder, in slices of fill_batch and grad_batch patches: every parameter's gradient must
    # be that of the one-pass step (encode all at once with gradient, stitch in place, losses
    # on the fused maps, one backward), and the stitched maps must hold the patches' fresh
    # values afterwards.
    import copy

    from hiresctl.data import ReadRequest, ReadTag

    recipe = _recipe(method="patchgd-global", fill_batch=fill_batch, grad_batch=grad_batch)
    run = build_run(recipe, Dataset(objects_store), ["red", "green"], torch.device("cpu"))
    method, model = run.method, run.model
    assert isinstance(method, DetPatchGD)
    torch.manual_seed(1)
    for conv in model.fusion:  # type: ignore[union-attr]
        torch.nn.init.normal_(conv.weight, std=0.05)
    reference = copy.deepcopy(model)
    grid = run.reader.grid("ob000", 64)
    members = [ReadRequest("ob000", "patches", grid, np.array([4, 0]), ReadTag("group", 0))]
    pixels = torch.randn(3, 3, 64, 64)  # two patches, then the global patch
    maps = [m.normal_() for m in method._maps(model, ["ob000"], torch.device("cpu"))]
    truth = [method._target_dict("ob000", torch.device("cpu"))]
    sides = [method.side("ob000")]

    expected = [m.clone() for m in maps]
    features = reference.encode(pixels)
    g = method._place(expected, members, features)
    parts = reference.losses(reference.fuse(expected, g, sides), truth)
    sum(parts.values()).backward()

    ctx = step_context(run, None, None, accumulation=10)  # no optimizer step; grads / 10
    loss = method._inner_step(ctx, model, maps, members, pixels, sides, truth)
    assert loss == pytest.approx(float(sum(parts.values()).detach()), rel=1e-5)
    assert ctx.micro_steps == 1 and ctx.patches_with_grad == 2
    for mine, theirs in zip(maps, expected, strict=True):
        torch.testing.assert_close(mine, theirs.detach())
    checked = 0
    for (name, p), q in zip(reference.named_parameters(), model.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad * 10, p.grad, atol=1e-6, rtol=1e-4, msg=name)
            checked += ".body." in name
    assert checked > 0  # the encoder's gradients came through the second phase


def test_coco_round_trip_in_the_users_own_ids(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    """The user's COCO file has image ids 101, 108, … and category ids 7 (red) and 3 (green):
    predict writes detections.json in those ids, and pycocotools scores it against the user's
    own file with the AP `hiresctl eval` reports for the same images."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, labels, coco = planted_objects(
        12, 192, seed=5, split_of=lambda i: "train" if i < 8 else "test"
    )
    remap = {1: 7, 2: 3}
    for image in coco["images"]:  # type: ignore[union-attr]
        image["id"] = 101 + 7 * (image["id"] - 1)
    for ann in coco["annotations"]:  # type: ignore[union-attr]
        ann["image_id"] = 101 + 7 * (ann["image_id"] - 1)
        ann["category_id"] = remap[ann["category_id"]]
    coco["categories"] = [{"id": 3, "name": "green"}, {"id": 7, "name": "red"}]
    store = make_store(tmp_path, images, labels, chunk=64, coco=coco)
    user_file = tmp_path / "user.json"
    user_file.write_text(json.dumps(coco))
    Trainer(store, tmp_path / "run", _recipe(epochs=4, val_split="none")).fit()
    reported = evaluate(tmp_path / "run", store, "test", "cpu")["metrics"]
    result = cli(
        "predict",
        tmp_path / "run",
        store,
        "--out",
        tmp_path / "pred",
        "--split",
        "test",
        "--score-threshold",
        "0.05",
        "--format",
        "coco",
    )
    assert result.code == 0, result.stderr
    found = json.loads((tmp_path / "pred" / "detections.json").read_text())
    test_ids = {101 + 7 * i for i in range(8, 12)}
    assert found and {d["image_id"] for d in found} <= test_ids
    assert {d["category_id"] for d in found} <= {3, 7}
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(user_file))
        evaluation = COCOeval(truth, truth.loadRes(found), "bbox")
        evaluation.params.imgIds = sorted(test_ids)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    assert reported["ap50"] > 0  # a vacuous all-zero agreement would prove nothing
    assert abs(evaluation.stats[0] - reported["ap"]) <= 0.01
    assert abs(evaluation.stats[1] - reported["ap50"]) <= 0.01
    # the matching ground truth, in the same ids, scores the pair the same way
    own = json.loads((tmp_path / "pred" / "annotations.json").read_text())
    assert {im["id"] for im in own["images"]} == test_ids
    assert {c["id"]: c["name"] for c in own["categories"]} == {7: "red", 3: "green"}
