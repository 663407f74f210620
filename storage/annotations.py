"""Object annotations for detection: COCO JSON and QuPath/GeoJSON, checked before anything is
tiled and stored per image as boxes in level-0 pixels (``FORMAT.md``, "Boxes").

Every problem names the file and the entry. A problem that belongs to one image (a box outside
it, an unknown category) fails that image alone; a problem that belongs to no image (a file that
is not COCO, an annotation of an image id the file does not list) stops before tiling.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from storage.errors import SourceError, UsageError

__all__ = [
    "BOX_TOLERANCE",
    "Annotations",
    "ImageBoxes",
    "geo_to_pixels",
    "image_stem",
    "outside_problem",
]

BOX_TOLERANCE = 1.0  # pixels a box may reach past the image edge (rounding); clipped
GEOJSON_SUFFIXES = (".geojson", ".json")


@dataclass
class ImageBoxes:
    """The boxes of one image in the annotation file's coordinates (pixels of the source, or a
    CRS for GeoJSON with ``crs``), with what is needed to name each entry in an error."""

    boxes: np.ndarray  # (n, 4) float64 x0, y0, x1, y1
    labels: np.ndarray  # (n,) int64 index into Annotations.categories
    entries: list[str]  # how an error names each box, e.g. "annotations[12] (id 40)"
    size: tuple[float, float] | None = None  # (width, height) the file states, if any
    crs: str | None = None  # set when the coordinates are in a CRS (GeoJSON)
    problem: str | None = None  # a problem of this image's entries (the image fails)
    file_id: Any = None  # the image's id in the annotation file (COCO ``images[].id``)


@dataclass
class Annotations:
    """Boxes per source file name, and the category names (labels index into them)."""

    path: str
    categories: list[str]
    images: dict[str, ImageBoxes] = field(default_factory=dict)  # lower-case key → boxes
    category_ids: list[int] | None = None  # the file's id of each category (COCO), in order
    kind: str = "coco"
    single: bool = False  # one GeoJSON file given: its boxes are the (one) source's

    # ------------------------------------------------------------------ COCO
    @classmethod
    def coco(cls, path: str | os.PathLike[str]) -> Annotations:
        """Read a COCO detection file (``images``, ``annotations`` with ``bbox`` [x, y, w, h],
        ``categories``). Images are matched to sources by ``file_name``."""
        where = str(path)
        data = _load_json(where)
        if not isinstance(data, dict):
            raise UsageError(
                f"{where}: a COCO file is a JSON object with images, annotations, categories"
            )
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise UsageError(f"{where}: COCO key {key!r} is missing or not a list")
        categories: dict[int, int] = {}  # category id → index
        names: list[str] = []
        for i, cat in enumerate(data["categories"]):
            if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or "name" not in cat:
                raise UsageError(f"{where}: categories[{i}] needs an integer 'id' and a 'name'")
            if cat["id"] in categories:
                raise UsageError(f"{where}: categories[{i}]: id {cat['id']} is repeated")
            categories[cat["id"]] = len(names)
            names.append(str(cat["name"]))
        by_id: dict[Any, tuple[str, ImageBoxes]] = {}
        out = cls(where, names, category_ids=list(categories))
        for i, image in enumerate(data["images"]):
            if not isinstance(image, dict) or "id" not in image or not image.get("file_name"):
                raise UsageError(f"{where}: images[{i}] needs an 'id' and a 'file_name'")
            if image["id"] in by_id:
                raise UsageError(f"{where}: images[{i}]: id {image['id']!r} is repeated")
            size = None
            if isinstance(image.get("width"), int | float) and isinstance(
                image.get("height"), int | float
            ):
                size = (float(image["width"]), float(image["height"]))
            boxes = ImageBoxes(
                np.zeros((0, 4)), np.zeros(0, np.int64), [], size, file_id=image["id"]
            )
            key = Path(str(image["file_name"])).name.lower()
            if key in out.images:
                raise UsageError(
                    f"{where}: images[{i}]: file name {image['file_name']!r} is listed twice"
                )
            by_id[image["id"]] = (key, boxes)
            out.images[key] = boxes
        rows: dict[str, list[tuple[list[float], int, str]]] = {k: [] for k in out.images}
        for i, ann in enumerate(data["annotations"]):
            entry = f"annotations[{i}]" + (
                f" (id {ann['id']})" if isinstance(ann, dict) and "id" in ann else ""
            )
            if not isinstance(ann, dict) or "image_id" not in ann:
                raise UsageError(f"{where}: {entry} has no image_id")
            if ann["image_id"] not in by_id:
                raise UsageError(f"{where}: {entry}: image_id {ann['image_id']!r} is not in images")
            key, boxes = by_id[ann["image_id"]]
            if ann.get("iscrowd"):
                continue  # crowd regions are not objects to detect (COCO evaluation ignores them)
            category = ann.get("category_id")
            bbox = ann.get("bbox")
            if category not in categories:
                boxes.problem = boxes.problem or (
                    f"{where}: {entry}: category_id {category!r} is not in categories"
                )
                continue
            if (
                not isinstance(bbox, list)
                or len(bbox) != 4
                or not all(isinstance(v, int | float) and math.isfinite(v) for v in bbox)
            ):
                boxes.problem = (
                    boxes.problem or f"{where}: {entry}: bbox {bbox!r} is not [x, y, w, h]"
                )
                continue
            x, y, w, h = (float(v) for v in bbox)
            if w <= 0 or h <= 0:
                boxes.problem = boxes.problem or (
                    f"{where}: {entry}: bbox {bbox} has no area (width and height must be > 0)"
                )
                continue
            rows[key].append(([x, y, x + w, y + h], categories[category], entry))
        for key, boxes in out.images.items():
            _fill(boxes, rows[key])
            if boxes.problem is None and boxes.size is not None:
                boxes.problem = outside_problem(boxes, *boxes.size, where)
        return out

    # --------------------------------------------------------------- GeoJSON
    @classmethod
    def geojson(cls, path: str | os.PathLike[str]) -> Annotations:
        """QuPath/GeoJSON annotations: a folder of ``<image>.geojson`` files (matched to sources
        by file name like masks), or one file (for a single source or a mosaic). A feature's box
        is the bounds of its geometry; its class is QuPath's ``classification.name`` (else
        ``class``, ``category``, ``label`` or ``name``)."""
        root = Path(path)
        if root.is_dir():
            files = sorted(
                p for p in root.iterdir() if p.is_file() and p.suffix.lower() in GEOJSON_SUFFIXES
            )
            if not files:
                raise UsageError(f"--annotations {root}: no .geojson files in this folder")
        elif root.is_file():
            files = [root]
        else:
            raise UsageError(f"--annotations {root}: no such file or folder")
        out = cls(str(root), [], kind="geojson", single=root.is_file())
        parsed = []
        for file in files:
            data = _load_json(str(file))  # parsed once: features and the CRS member
            parsed.append((file, _features(file, data), _geojson_crs(data)))
        names = sorted({name for _, features, _ in parsed for _, name, _ in features if name})
        out.categories = names
        index = {n: i for i, n in enumerate(names)}
        for file, features, crs in parsed:
            rows = [(box, index[name], entry) for box, name, entry in features if name]
            boxes = ImageBoxes(np.zeros((0, 4)), np.zeros(0, np.int64), [], crs=crs)
            missing = [entry for _, name, entry in features if not name]
            if missing:
                boxes.problem = f"{file}: {missing[0]} has no class (QuPath classification.name)"
            _fill(boxes, rows)
            out.images[file.name.lower()] = boxes
            out.images.setdefault(image_stem(file.name).lower(), boxes)
        return out

    # ---------------------------------------------------------------- lookup
    def lookup(self, name: str) -> ImageBoxes | None:
        """The boxes of the source ``name`` (a path or a mosaic name), by file name; GeoJSON
        also by stem with the mask suffixes (``_annotations``, ``_labels``...)."""
        base = Path(name).name.lower()
        if base in self.images:
            return self.images[base]
        if self.single:
            return next(iter(self.images.values()))
        if self.kind == "geojson":
            stem = image_stem(base)
            for suffix in ("", "_annotations", "-annotations", "_labels", "_boxes", "_gt"):
                if stem + suffix in self.images:
                    return self.images[stem + suffix]
        return None


def image_stem(name: str) -> str:
    lower = name.lower()
    for suffix in (".ome.tiff", ".ome.tif", ".ome.btf"):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _load_json(where: str) -> Any:
    try:
        with open(where) as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise UsageError(f"{where}: annotation file not found") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{where}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except OSError as exc:
        raise UsageError(f"{where}: cannot read: {exc.strerror}") from None


def _fill(boxes: ImageBoxes, rows: list[tuple[list[float], int, str]]) -> None:
    if rows:
        boxes.boxes = np.array([r[0] for r in rows], dtype=np.float64)
        boxes.labels = np.array([r[1] for r in rows], dtype=np.int64)
        boxes.entries = [r[2] for r in rows]


def outside_problem(boxes: ImageBoxes, width: float, height: float, where: str) -> str | None:
    """The first box reaching more than BOX_TOLERANCE past (0, 0, width, height), named."""
    b = boxes.boxes
    if not len(b):
        return None
    bad = (
        (b[:, 0] < -BOX_TOLERANCE)
        | (b[:, 1] < -BOX_TOLERANCE)
        | (b[:, 2] > width + BOX_TOLERANCE)
        | (b[:, 3] > height + BOX_TOLERANCE)
    )
    if not bad.any():
        return None
    i = int(np.argmax(bad))
    x0, y0, x1, y1 = (round(float(v), 2) for v in b[i])
    return (
        f"{where}: {boxes.entries[i]}: box [{x0}, {y0}, {x1}, {y1}] (x0, y0, x1, y1) lies outside "
        f"the image ({width:g}×{height:g} pixels)"
    )


def _class_name(props: Any) -> str | None:
    if not isinstance(props, dict):
        return None
    cls = props.get("classification")
    if isinstance(cls, dict) and cls.get("name"):
        return str(cls["name"])
    if isinstance(cls, str) and cls:
        return cls
    for key in ("class", "category", "label", "name"):
        if props.get(key) not in (None, ""):
            return str(props[key])
    return None


def _coordinates(geometry: Any) -> list[list[float]]:
    """Every position of a GeoJSON geometry (any type, nested collections included).

    A position is a list of two or more finite numbers; anything else where a position belongs
    (a string, a bool, NaN, a lone number) raises ``ValueError`` saying what was found."""
    if not isinstance(geometry, dict):
        return []
    if geometry.get("type") == "GeometryCollection":
        return [p for g in geometry.get("geometries", []) for p in _coordinates(g)]
    out: list[list[float]] = []

    def number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

    def walk(value: Any) -> None:
        if not isinstance(value, list):
            raise ValueError(f"coordinate {value!r} is not a list of numbers")
        if value and not isinstance(value[0], list):
            if len(value) < 2 or not all(number(v) for v in value):
                raise ValueError(f"position {value!r} is not two or more finite numbers")
            out.append([float(value[0]), float(value[1])])
            return
        for v in value:
            walk(v)

    if geometry.get("coordinates") is not None:
        walk(geometry["coordinates"])
    return out


def _features(file: Path, data: Any) -> list[tuple[list[float], str | None, str]]:
    """(x0, y0, x1, y1) bounds, class name, entry name of every feature of a GeoJSON file."""
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, list):  # QuPath exports a bare list of features
        features = data
    else:
        raise UsageError(
            f"{file}: not GeoJSON (expected a FeatureCollection or a list of features)"
        )
    if not isinstance(features, list):
        raise UsageError(f"{file}: 'features' is not a list")
    out = []
    for i, feature in enumerate(features):
        entry = f"features[{i}]"
        if not isinstance(feature, dict):
            raise UsageError(f"{file}: {entry} is not a GeoJSON feature")
        if isinstance(feature.get("id"), str | int):
            entry += f" (id {feature['id']})"
        try:
            points = _coordinates(feature.get("geometry"))
        except ValueError as exc:
            raise UsageError(f"{file}: {entry}: {exc}") from None
        if not points:
            raise UsageError(f"{file}: {entry} has no geometry coordinates")
        xy = np.array(points)
        box = [
            float(xy[:, 0].min()),
            float(xy[:, 1].min()),
            float(xy[:, 0].max()),
            float(xy[:, 1].max()),
        ]
        out.append((box, _class_name(feature.get("properties")), entry))
    return out


def _geojson_crs(data: Any) -> str | None:
    """The CRS a GeoJSON file names (the 2008 ``crs`` member), as "EPSG:n" where possible."""
    crs = data.get("crs") if isinstance(data, dict) else None
    if not isinstance(crs, dict):
        return None
    name = str((crs.get("properties") or {}).get("name", ""))
    # urn:ogc:def:crs:EPSG::32633 and EPSG:32633 both name EPSG 32633
    digits = name.rsplit(":", 1)[-1]
    if "EPSG" in name.upper() and digits.isdigit():
        return f"EPSG:{digits}"
    if name.upper().endswith("CRS84"):
        return "EPSG:4326"
    return name or None


def geotransform(extra: dict[str, Any]) -> tuple[list[float], str | None] | None:
    """(GDAL geotransform, CRS) of a georeferenced image from its reader's or store entry's
    ``extra``: a mosaic's ``geotransform``, or a GeoTIFF's tiepoint and pixel scale."""
    geo = extra.get("geo") or {}
    crs = extra.get("crs") or geo.get("crs")
    if extra.get("geotransform"):
        return [float(v) for v in extra["geotransform"]], crs
    if geo.get("tiepoint") and geo.get("pixel_scale"):
        i, j, _k, x, y, _z = geo["tiepoint"]
        sx, sy = geo["pixel_scale"]
        return [x - i * sx, sx, 0.0, y + j * sy, 0.0, -sy], crs
    return None


def geo_to_pixels(boxes: ImageBoxes, extra: dict[str, Any], source: str, where: str) -> np.ndarray:
    """Boxes in the source's pixels: GeoJSON in a CRS goes through the source's geotransform
    (mosaics: ``geotransform``; single GeoTIFFs: tiepoint and pixel scale)."""
    if boxes.crs is None:
        return boxes.boxes
    found = geotransform(extra)
    transform, crs = found if found is not None else (None, None)
    if transform is None:
        raise SourceError(
            source, f"{where} gives coordinates in {boxes.crs} but the image is not georeferenced"
        )
    if crs and boxes.crs != crs:
        raise SourceError(
            source,
            f"{where} is in {boxes.crs} but the image is in {crs}; reproject the annotations "
            f"first (e.g. ogr2ogr -t_srs {crs})",
        )
    x0, sx, _, y0, _, sy = (float(v) for v in transform)
    b = boxes.boxes
    px = (b[:, [0, 2]] - x0) / sx
    py = (b[:, [1, 3]] - y0) / sy  # sy < 0: north-up rasters flip y
    return np.stack([px.min(1), py.min(1), px.max(1), py.max(1)], axis=1) if len(b) else b
