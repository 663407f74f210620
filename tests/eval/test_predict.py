"""`hiresctl predict`: GeoJSON that QuPath reads and that round-trips the mask, classification
predictions with heatmaps, sources tiled on the fly, bad sources named."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tifffile
import zarr

from hiresctl.eval.outputs import mask_polygons
from tests.ngff import assert_valid_ngff
from tests.stores import make_store, planted_images


def _check_geojson_structure(collection: dict) -> None:
    """The parts of RFC 7946 a reader relies on: FeatureCollection of Features with Polygon
    geometries whose rings are closed, have ≥ 4 positions of 2 numbers."""
    assert collection["type"] == "FeatureCollection"
    for feature in collection["features"]:
        assert feature["type"] == "Feature"
        assert feature["geometry"]["type"] == "Polygon"
        for ring in feature["geometry"]["coordinates"]:
            assert len(ring) >= 4 and ring[0] == ring[-1]
            assert all(len(p) == 2 and all(isinstance(v, float | int) for v in p) for p in ring)
        props = feature["properties"]
        assert props["objectType"] == "annotation"
        assert {"name", "color"} <= set(props["classification"])


def _inside(rings: list[np.ndarray], points: np.ndarray) -> np.ndarray:
    """Even-odd rule over all rings: which (x, y) points lie inside the polygon."""
    inside = np.zeros(len(points), bool)
    px, py = points[:, 0:1], points[:, 1:2]
    for ring in rings:
        (x0, y0), (x1, y1) = ring[:-1].T[:, None], ring[1:].T[:, None]
        x0, y0, x1, y1 = x0[0], y0[0], x1[0], y1[0]
        crosses = (y0 > py) != (y1 > py)
        with np.errstate(divide="ignore", invalid="ignore"):
            at = x0 + (py - y0) * (x1 - x0) / (y1 - y0)
        inside ^= (crosses & (px < at)).sum(1) % 2 == 1
    return inside


def _rasterise(feature: dict, shape: tuple[int, int], scale: float) -> np.ndarray:
    """The pixels of a grid of ``shape`` at 1/``scale`` whose centres the polygon contains."""
    rings = [np.asarray(r, float) / scale for r in feature["geometry"]["coordinates"]]
    ys, xs = np.mgrid[: shape[0], : shape[1]]
    centres = np.stack([xs.ravel() + 0.5, ys.ravel() + 0.5], 1)
    return _inside(rings, centres).reshape(shape).astype(np.uint8)


def _segments_meet(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, m) whether segment i of ``a`` ((n, 2, 2)) and j of ``b`` intersect or touch."""

    def orient(p: np.ndarray, q: np.ndarray, r: np.ndarray) -> np.ndarray:
        return np.sign(
            (q[..., 0] - p[..., 0]) * (r[..., 1] - p[..., 1])
            - (q[..., 1] - p[..., 1]) * (r[..., 0] - p[..., 0])
        )

    p, q = a[:, None, 0], a[:, None, 1]
    r, t = b[None, :, 0], b[None, :, 1]
    o1, o2, o3, o4 = orient(p, q, r), orient(p, q, t), orient(r, t, p), orient(r, t, q)
    proper = (o1 * o2 <= 0) & (o3 * o4 <= 0)
    # collinear segments meet only when their extents overlap
    collinear = (o1 == 0) & (o2 == 0)
    lo = np.minimum(p, q), np.minimum(r, t)
    hi = np.maximum(p, q), np.maximum(r, t)
    overlap = ((lo[0] <= hi[1]) & (lo[1] <= hi[0])).all(-1)
    return np.where(collinear, overlap, proper)


def _assert_valid_polygon(rings: list[list[list[float]]]) -> None:
    """OGC validity as JTS (QuPath 0.6) checks it: closed rings of ≥ 4 positions, each ring
    simple (no segment meets another except its neighbours at their shared end), no two rings
    meeting, every hole inside the exterior; exterior counter-clockwise, holes clockwise."""
    arrays = [np.asarray(r, float) for r in rings]
    for ring in arrays:
        assert len(ring) >= 4 and (ring[0] == ring[-1]).all()
        assert len(np.unique(ring[:-1], axis=0)) == len(ring) - 1, "a repeated vertex"
    segments = [np.stack([r[:-1], r[1:]], 1) for r in arrays]
    for i, si in enumerate(segments):
        meet = _segments_meet(si, si)
        n = len(si)
        idx = np.arange(n)
        neighbours = (np.abs(idx[:, None] - idx[None]) <= 1) | (
            np.abs(idx[:, None] - idx[None]) == n - 1
        )
        assert not (meet & ~neighbours).any(), f"ring {i} intersects itself"
        for j in range(i + 1, len(segments)):
            assert not _segments_meet(si, segments[j]).any(), f"rings {i} and {j} meet"
    areas = [0.5 * np.sum(r[:-1, 0] * r[1:, 1] - r[1:, 0] * r[:-1, 1]) for r in arrays]
    assert areas[0] > 0 and all(a < 0 for a in areas[1:]), "right-hand rule"
    for hole in arrays[1:]:
        assert _inside([arrays[0]], hole[:-1]).all(), "a hole outside its exterior"


def test_geojson_polygons_round_trip_the_mask_with_holes_and_classes() -> None:
    mask = np.zeros((64, 80), np.uint8)
    mask[8:40, 10:50] = 2  # a building with a courtyard
    mask[18:28, 22:36] = 0
    mask[50:60, 60:75] = 1  # a road piece
    names = {0: "background", 1: "road", 2: "building"}
    features = mask_polygons(mask, [0, 1, 2], names, (4.0, 4.0))  # a level of 1/4 resolution
    collection = {"type": "FeatureCollection", "features": features}
    _check_geojson_structure(json.loads(json.dumps(collection)))
    by_class = {f["properties"]["classification"]["name"]: f for f in features}
    assert set(by_class) == {"road", "building"}
    building = by_class["building"]
    assert len(building["geometry"]["coordinates"]) == 2, "the courtyard is a hole"
    xs = [p[0] for p in building["geometry"]["coordinates"][0]]
    ys = [p[1] for p in building["geometry"]["coordinates"][0]]
    # Level-0 coordinates: the ring runs between the edge pixels' centres and the outside ones
    assert (min(xs), max(xs), min(ys), max(ys)) == (40.0, 200.0, 32.0, 160.0)
    for value, name in ((1, "road"), (2, "building")):
        back = _rasterise(by_class[name], mask.shape, 4.0)
        np.testing.assert_array_equal(back, (mask == value).astype(np.uint8))
        _assert_valid_polygon(by_class[name]["geometry"]["coordinates"])


def test_geojson_polygons_are_valid_where_pixel_contours_are_not() -> None:
    """One-pixel lines, diagonal touches, a hole touching its exterior at a corner, a region on
    the border, single pixels: each polygon valid (QuPath 0.6 refuses invalid ones), and the
    pixels whose centres they contain are exactly the mask's."""
    rng = np.random.default_rng(3)
    mask = np.zeros((40, 48), np.uint8)
    mask[5, 3:30] = 1  # a one-pixel line
    mask[10:20, 10] = 1  # a one-pixel column crossing nothing
    for i in range(8):
        mask[25 + i, 5 + i] = 1  # a staircase of diagonal touches
    mask[2:12, 34:46] = 1  # a block with a hole touching it diagonally
    mask[5:8, 38:41] = 0
    mask[4, 37] = 0
    mask[30:40, 40:48] = 1  # on the border
    mask[36, 20] = 1  # a single pixel
    noisy = (rng.random((40, 48)) < 0.35).astype(np.uint8)  # and random speckle
    for labels in (mask, noisy):
        features = mask_polygons(labels, [0, 1], {1: "region"}, (2.0, 2.0), (100.0, 50.0))
        union = np.zeros(labels.shape, np.uint8)
        for feature in features:
            rings = [
                [[x - 50.0, y - 100.0] for x, y in r] for r in feature["geometry"]["coordinates"]
            ]
            _assert_valid_polygon(rings)
            union += _rasterise({"geometry": {"coordinates": rings}}, labels.shape, 2.0)
        np.testing.assert_array_equal(union, labels)  # every pixel in exactly one polygon


def test_classification_predict_tiles_sources_on_the_fly_and_names_bad_ones(
    tmp_path: Path, cli: Callable
) -> None:
    images, labels = planted_images(
        12, 96, 32, seed=1, split_of=lambda i: "val" if i >= 9 else "train"
    )
    store = make_store(tmp_path / "data", images, labels)
    trained = cli(
        "train",
        "--data",
        store,
        "--out",
        tmp_path / "run",
        "--set",
        "backbone=tiny",
        "--set",
        "patch_size=32",
        "--set",
        "latent_dim=16",
        "--set",
        "head_width=16",
        "--set",
        "epochs=1",
    )
    assert trained.code == 0, trained.stderr
    new = tmp_path / "new"
    new.mkdir()
    for name in ("a", "b"):
        tifffile.imwrite(new / f"{name}.tif", images[f"im00{ord(name) - 97}"], photometric="rgb")
    (new / "broken.tif").write_bytes(b"II*\x00 not really a tiff")
    result = cli("predict", tmp_path / "run", new, "--out", tmp_path / "pred", "--json")
    assert result.code == 1, result.stderr  # one input failed …
    assert "broken.tif" in result.stderr and "Traceback" not in result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(r["id"] for r in rows) == ["a", "b"]  # … the others were predicted
    for row in rows:
        probabilities = [row["p_0"], row["p_1"]]
        assert abs(sum(probabilities) - 1) < 1e-4
        assert row["predicted"] == str(int(np.argmax(probabilities)))
        heat = zarr.open_group(tmp_path / "pred" / "predictions.zarr" / row["id"], mode="r")
        assert heat.attrs["hiresctl"]["status"] == "complete"
        assert heat["0"].shape == (1, 3, 3)  # a 96² image in 32² patches
        scale = heat.attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"]
        assert scale[0]["scale"][1:] == [32.0, 32.0]  # cells map onto level-0 pixels
        assert (tmp_path / "pred" / "overlays" / f"{row['id']}.png").is_file()
    # the heatmaps are valid OME-NGFF 0.5 images
    assert set(assert_valid_ngff(tmp_path / "pred" / "predictions.zarr").values()) == {"Image"}
    with open(tmp_path / "pred" / "predictions.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [r["id"] for r in table] == [r["id"] for r in rows]
    assert json.loads((tmp_path / "pred" / "predictions.json").read_text()) == rows
    only_csv = cli(
        "predict",
        tmp_path / "run",
        store,
        "--out",
        tmp_path / "csv-only",
        "--format",
        "csv",
        "--split",
        "val",
    )
    assert only_csv.code == 0, only_csv.stderr
    assert sorted(p.name for p in (tmp_path / "csv-only").iterdir()) == ["predictions.csv"]
    wrong = cli("predict", tmp_path / "run", store, "--out", tmp_path / "x", "--format", "geojson")
    assert wrong.code == 2 and "geojson" in wrong.stderr


def test_inputs_unlike_the_training_images_are_converted_or_refused(
    tmp_path: Path, cli: Callable
) -> None:
    """A run trained on RGB uint8: a grey image is converted (said once, and in the output);
    a 16-bit RGBA image is refused, naming what differs, until the flags that accept it."""
    images, labels = planted_images(8, 64, 32, seed=2, split_of=lambda i: "train")
    store = make_store(tmp_path / "data", images, labels)
    trained = cli(
        "train",
        "--data",
        store,
        "--out",
        tmp_path / "run",
        "--set",
        "backbone=tiny",
        "--set",
        "patch_size=32",
        "--set",
        "epochs=1",
        "--set",
        "val_split=none",
    )
    assert trained.code == 0, trained.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["trained_on"]["channels"] == [3] and summary["trained_on"]["dtypes"] == ["uint8"]
    new = tmp_path / "new"
    new.mkdir()
    grey = images["im000"].mean(-1).astype(np.uint8)
    tifffile.imwrite(new / "grey.tif", grey)
    rgba16 = np.concatenate([images["im001"], np.full((64, 64, 1), 255, np.uint8)], -1)
    tifffile.imwrite(
        new / "rgba16.tif",
        rgba16.astype(np.uint16) * 257,
        photometric="rgb",
        extrasamples=["unassalpha"],
    )
    result = cli("predict", tmp_path / "run", new, "--out", tmp_path / "pred", "--json")
    assert result.code == 1, result.stderr
    assert "rgba16: has 4 channel(s), the run was trained on 3" in result.stderr
    assert "--drop-channels" in result.stderr and "Traceback" not in result.stderr
    assert "1 failed, by reason:" in result.stderr  # the closing summary groups failures
    failures = (tmp_path / "pred" / "predict-failures.csv").read_text().splitlines()
    assert len(failures) == 2 and "rgba16" in failures[1]
    [row] = [json.loads(line) for line in result.stdout.splitlines()]
    assert row["id"] == "grey" and row["input_conversion"] == "grey repeated to RGB"
    assert result.stderr.count("grey repeated to RGB") == 1
    written = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert written[0]["input_conversion"] == "grey repeated to RGB"
    dropped = cli(
        "predict", tmp_path / "run", new / "rgba16.tif", "--out", tmp_path / "p2", "--drop-channels"
    )
    assert dropped.code == 1 and "is uint16, the run was trained on uint8" in dropped.stderr
    accepted = cli(
        "predict",
        tmp_path / "run",
        new / "rgba16.tif",
        "--out",
        tmp_path / "p3",
        "--drop-channels",
        "--rescale",
        "--json",
    )
    assert accepted.code == 0, accepted.stderr
    [row] = [json.loads(line) for line in accepted.stdout.splitlines()]
    assert "first 3 used" in row["input_conversion"] and "uint16" in row["input_conversion"]


def test_a_pixel_size_far_from_training_is_refused_until_resampled(
    tmp_path: Path, cli: Callable
) -> None:
    images, labels = planted_images(6, 64, 32, seed=3, split_of=lambda i: "train")
    sources = tmp_path / "src"
    sources.mkdir()
    rows = ["source,label,split"]
    for name, pixels in images.items():
        tifffile.imwrite(sources / f"{name}.tif", pixels, photometric="rgb")
        rows.append(f"{name}.tif,{labels[name][0]},train")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    tiled = cli(
        "tile",
        sources,
        "--out",
        tmp_path / "ds.zarr",
        "--labels",
        tmp_path / "labels.csv",
        "--source-mpp",
        "0.5",
    )
    assert tiled.code == 0, tiled.stderr
    trained = cli(
        "train",
        "--data",
        tmp_path / "ds.zarr",
        "--out",
        tmp_path / "run",
        "--set",
        "backbone=tiny",
        "--set",
        "patch_size=32",
        "--set",
        "epochs=1",
        "--set",
        "val_split=none",
    )
    assert trained.code == 0, trained.stderr
    source = sources / "im000.tif"
    far = cli("predict", tmp_path / "run", source, "--out", tmp_path / "p", "--source-mpp", "1.0")
    assert far.code != 0 and "is 1 µm/px, the run was trained at 0.5 µm/px" in far.stderr
    assert "--mpp 0.5" in far.stderr
    resampled = cli(
        "predict",
        tmp_path / "run",
        source,
        "--out",
        tmp_path / "q",
        "--source-mpp",
        "1.0",
        "--mpp",
        "0.5",
    )
    assert resampled.code == 0, resampled.stderr


def test_torchrun_predicts_every_image_once_across_two_ranks(tmp_path: Path, cli: Callable) -> None:
    """``torchrun --nproc_per_node 2 hiresctl predict RUN STORE``: each image predicted by one
    rank into the one predictions store, rank 0 writes every row once; the same as one
    process predicts."""
    from tests.conftest import torchrun

    images, labels = planted_images(6, 64, 32, seed=4)
    store = make_store(tmp_path / "s", images, labels)
    run = tmp_path / "run"
    trained = cli(
        "train",
        "--data",
        store,
        "--out",
        run,
        "--method",
        "downsample",
        "--set",
        "epochs=1",
        "--set",
        "backbone=tiny",
        "--set",
        "patch_size=32",
        "--set",
        "val_split=none",
    )
    assert trained.code == 0, trained.stderr
    alone = cli("predict", run, store, "--out", tmp_path / "alone", "--format", "json,ngff")
    assert alone.code == 0, alone.stderr
    both = torchrun(
        "-m",
        "hiresctl",
        "predict",
        str(run),
        str(store),
        "--out",
        str(tmp_path / "both"),
        "--format",
        "json,ngff",
        "--device",
        "cpu",
        port=29547,
    )
    assert both.returncode == 0, both.stderr[-3000:]
    rows = json.loads((tmp_path / "both" / "predictions.json").read_text())
    expected = json.loads((tmp_path / "alone" / "predictions.json").read_text())
    assert sorted(r["id"] for r in rows) == sorted(images)  # each image once
    by_id = {r["id"]: r["predicted"] for r in expected}
    assert {r["id"]: r["predicted"] for r in rows} == by_id
    root = zarr.open_group(tmp_path / "both" / "predictions.zarr", mode="r")
    assert sorted(root.group_keys()) == sorted(images)
    assert "6 images predicted" in both.stderr
