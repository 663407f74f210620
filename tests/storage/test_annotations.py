"""Object annotations: COCO and GeoJSON into the store, checked, following resampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from storage import Dataset, UsageError
from storage.annotations import Annotations
from storage.tiler import SourceSpec, TileOptions, tile


def _image(path: Path, height: int = 200, width: int = 300) -> None:
    tifffile.imwrite(path, np.full((height, width, 3), 40, np.uint8), photometric="rgb")


def _coco(
    images: list[tuple[str, int, int]], annotations: list[dict[str, object]]
) -> dict[str, object]:
    return {
        "images": [
            {"id": i + 1, "file_name": n, "width": w, "height": h}
            for i, (n, h, w) in enumerate(images)
        ],
        "annotations": [{"id": i + 1, "iscrowd": 0, **a} for i, a in enumerate(annotations)],
        "categories": [{"id": 1, "name": "cell"}, {"id": 7, "name": "vessel"}],
    }


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_coco_boxes_round_trip_through_tiling_and_resampling(tmp_path: Path) -> None:
    _image(tmp_path / "a.tif")
    ann = _write(
        tmp_path / "ann.json",
        _coco(
            [("a.tif", 200, 300)],
            [
                {"image_id": 1, "category_id": 7, "bbox": [10, 20, 30, 40]},
                {
                    "image_id": 1,
                    "category_id": 1,
                    "bbox": [250.5, 150, 49.5, 50],
                },  # touches the corner
            ],
        ),
    )
    spec = [SourceSpec((str(tmp_path / "a.tif"),))]
    tile(
        spec,
        tmp_path / "same.zarr",
        TileOptions(chunk=64, workers=1),
        annotations=Annotations.coco(ann),
    )
    boxes, names = Dataset(tmp_path / "same.zarr").boxes("a")
    np.testing.assert_allclose(boxes, [[10, 20, 40, 60], [250.5, 150, 300, 200]])
    assert names == ["vessel", "cell"]
    assert Dataset(tmp_path / "same.zarr").box_classes() == ["cell", "vessel"]
    # 0.5 µm sources resampled to 1 µm: the image halves and so do the boxes
    options = TileOptions(chunk=64, workers=1, mpp=1.0, source_mpp=0.5)
    tile(spec, tmp_path / "half.zarr", options, annotations=Annotations.coco(ann))
    ds = Dataset(tmp_path / "half.zarr")
    assert ds.entry("a").shape == (3, 100, 150)
    np.testing.assert_allclose(ds.boxes("a")[0], [[5, 10, 20, 30], [125.25, 75, 150, 100]])


def test_bad_coco_entries_are_named_and_other_images_still_tile(tmp_path: Path) -> None:
    for name in ("good.tif", "outside.tif", "unknown.tif", "missing.tif"):
        _image(tmp_path / name)
    ann = _write(
        tmp_path / "ann.json",
        _coco(
            [("good.tif", 200, 300), ("outside.tif", 200, 300), ("unknown.tif", 200, 300)],
            [
                {"image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]},
                {
                    "image_id": 2,
                    "category_id": 1,
                    "bbox": [280, 10, 40, 10],
                },  # reaches x = 320 > 300
                {"image_id": 3, "category_id": 3, "bbox": [1, 1, 5, 5]},
            ],  # no category 3
        ),
    )
    specs = [
        SourceSpec((str(tmp_path / n),))
        for n in ("good.tif", "outside.tif", "unknown.tif", "missing.tif")
    ]
    results = tile(
        specs,
        tmp_path / "ds.zarr",
        TileOptions(chunk=64, workers=1),
        annotations=Annotations.coco(ann),
    )
    by_name = {Path(r.source).name: r for r in results}
    assert by_name["good.tif"].status == "written"
    assert "annotations[1] (id 2)" in by_name["outside.tif"].error
    assert "outside the image (300×200" in by_name["outside.tif"].error
    assert (
        "annotations[2] (id 3): category_id 3 is not in categories" in by_name["unknown.tif"].error
    )
    assert "no entry for this image in" in by_name["missing.tif"].error
    ds = Dataset(tmp_path / "ds.zarr")
    assert [e.id for e in ds.entries(complete_only=True)] == ["good"]


def test_coco_that_cannot_be_matched_to_images_stops_before_tiling(tmp_path: Path) -> None:
    ann = _write(
        tmp_path / "ann.json",
        _coco(
            [("a.tif", 10, 10)],
            [
                {"image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2]},
                {"image_id": 99, "category_id": 1, "bbox": [1, 1, 2, 2]},
            ],
        ),
    )
    with pytest.raises(
        UsageError, match=r"ann\.json: annotations\[1\] \(id 2\): image_id 99 is not in images"
    ):
        Annotations.coco(ann)
    with pytest.raises(UsageError, match=r"'annotations' is missing"):
        Annotations.coco(_write(tmp_path / "b.json", {"images": [], "categories": []}))
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(UsageError, match=r"c\.json: not valid JSON"):
        Annotations.coco(tmp_path / "c.json")


def test_qupath_geojson_boxes_are_geometry_bounds_with_classes(tmp_path: Path) -> None:
    _image(tmp_path / "slide.tif")
    folder = tmp_path / "geojson"
    folder.mkdir()
    features = [
        {
            "type": "Feature",
            "geometry": {
                "type": "Polygon",
                "coordinates": [[[10, 20], [50, 25], [30, 60], [10, 20]]],
            },
            "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}},
        },
        {
            "type": "Feature",
            "geometry": {
                "type": "MultiPolygon",
                "coordinates": [
                    [[[100, 100], [110, 100], [110, 120], [100, 100]]],
                    [[[150, 90], [160, 90], [160, 95], [150, 90]]],
                ],
            },
            "properties": {"classification": {"name": "Stroma"}},
        },
    ]
    _write(folder / "slide.geojson", features)  # QuPath's bare list of features
    tile(
        [SourceSpec((str(tmp_path / "slide.tif"),))],
        tmp_path / "ds.zarr",
        TileOptions(chunk=64, workers=1),
        annotations=Annotations.geojson(folder),
    )
    boxes, names = Dataset(tmp_path / "ds.zarr").boxes("slide")
    np.testing.assert_allclose(boxes, [[10, 20, 50, 60], [100, 90, 160, 120]])
    assert names == ["Tumor", "Stroma"]


def test_geojson_in_a_crs_goes_through_the_geotransform(tmp_path: Path) -> None:
    tags = [
        (33550, "d", 3, (0.5, 0.5, 0.0), False),  # 0.5 m pixels
        (33922, "d", 6, (0.0, 0.0, 0.0, 500000.0, 4000000.0, 0.0), False),  # top-left corner
        (34735, "H", 8, (1, 1, 0, 1, 3072, 0, 1, 32633), False),  # EPSG:32633
    ]
    pixels = np.full((128, 192, 3), 90, np.uint8)
    tifffile.imwrite(tmp_path / "scene.tif", pixels, tile=(64, 64), extratags=tags)
    crs = {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32633"}}
    car = {
        "type": "Feature",
        "properties": {"class": "car"},
        "geometry": {
            "type": "Polygon",
            "coordinates": [
                [
                    [500010.0, 3999990.0],
                    [500020.0, 3999990.0],
                    [500020.0, 3999995.0],
                    [500010.0, 3999990.0],
                ]
            ],
        },
    }
    path = _write(
        tmp_path / "cars.geojson", {"type": "FeatureCollection", "crs": crs, "features": [car]}
    )
    tile(
        [SourceSpec((str(tmp_path / "scene.tif"),))],
        tmp_path / "ds.zarr",
        TileOptions(chunk=64, workers=1),
        annotations=Annotations.geojson(path),
    )
    boxes, names = Dataset(tmp_path / "ds.zarr").boxes("scene")
    # x: (500010 - 500000) / 0.5 = 20 … 40; y: (4000000 - 3999995) / 0.5 = 10 … 20
    np.testing.assert_allclose(boxes, [[20, 10, 40, 20]])
    assert names == ["car"]
    # a CRS other than the image's is refused, naming both
    crs["properties"]["name"] = "EPSG:4326"  # type: ignore[index]
    _write(path, {"type": "FeatureCollection", "crs": crs, "features": [car]})
    results = tile(
        [SourceSpec((str(tmp_path / "scene.tif"),))],
        tmp_path / "other.zarr",
        TileOptions(chunk=64, workers=1),
        annotations=Annotations.geojson(path),
    )
    assert results[0].status == "failed"
    assert "EPSG:4326" in results[0].error and "EPSG:32633" in results[0].error


@pytest.mark.parametrize(
    ("coordinates", "found"),
    [
        ([[["10", "20"], [50, 25], [30, 60], ["10", "20"]]], "'10'"),
        ([[[10, 20], [50, float("nan")], [30, 60], [10, 20]]], "nan"),
        ([[[10, 20], [50], [30, 60], [10, 20]]], "[50]"),
        ([[[10, 20], [True, 25], [30, 60], [10, 20]]], "True"),
        ("10,20", "'10,20'"),
    ],
)
def test_geojson_coordinates_must_be_finite_numbers(
    tmp_path: Path, coordinates: object, found: str
) -> None:
    folder = tmp_path / "geojson"
    folder.mkdir()
    feature = {
        "type": "Feature",
        "id": "a1",
        "properties": {},
        "geometry": {"type": "Polygon", "coordinates": coordinates},
    }
    (folder / "slide.geojson").write_text(json.dumps([feature]))
    with pytest.raises(UsageError, match=r"slide\.geojson: features\[0\] \(id a1\): ") as raised:
        Annotations.geojson(folder)
    assert found in str(raised.value)
