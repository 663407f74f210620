"""`hiresctl predict`: GeoJSON that QuPath reads and that round-trips the mask, classification
predictions with heatmaps, sources tiled on the fly, bad sources named."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import tifffile
import zarr

from hiresctl.eval.predict import mask_polygons
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


def _rasterise(feature: dict, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Fill a polygon back onto a pixel grid of ``shape`` at 1/``scale``. Rings pass through
    the centres of the region's boundary pixels, so a hole's ring lies on region pixels: cut
    the hole's inside, keep its ring."""
    out = np.zeros(shape, np.uint8)
    rings = [np.round(np.asarray(r) / scale - 0.5).astype(np.int32) for r in
             feature["geometry"]["coordinates"]]  # fmt: skip
    cv2.fillPoly(out, [rings[0]], 1)
    for hole in rings[1:]:
        cv2.fillPoly(out, [hole], 0)
        cv2.polylines(out, [hole], True, 1)
    return out


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
    # Level-0 coordinates: pixel centres of the 1/4 level, times 4.
    assert (min(xs), max(xs), min(ys), max(ys)) == (42.0, 198.0, 34.0, 158.0)
    for value, name in ((1, "road"), (2, "building")):
        back = _rasterise(by_class[name], mask.shape, 4.0)
        np.testing.assert_array_equal(back, (mask == value).astype(np.uint8))


def test_classification_predict_tiles_sources_on_the_fly_and_names_bad_ones(
    tmp_path: Path, cli: Callable
) -> None:
    images, labels = planted_images(
        12, 96, 32, seed=1, split_of=lambda i: "val" if i >= 9 else "train"
    )
    store = make_store(tmp_path / "data", images, labels)
    trained = cli("train", "--data", store, "--out", tmp_path / "run", "--set", "backbone=tiny",
                  "--set", "patch_size=32", "--set", "latent_dim=16", "--set", "head_width=16",
                  "--set", "epochs=1")  # fmt: skip
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
    only_csv = cli("predict", tmp_path / "run", store, "--out", tmp_path / "csv-only",
                   "--format", "csv", "--split", "val")  # fmt: skip
    assert only_csv.code == 0, only_csv.stderr
    assert sorted(p.name for p in (tmp_path / "csv-only").iterdir()) == ["predictions.csv"]
    wrong = cli("predict", tmp_path / "run", store, "--out", tmp_path / "x", "--format", "geojson")
    assert wrong.code == 2 and "geojson" in wrong.stderr
