"""Scenes: sparse slides (classification, mostly background), segmentation's vessels and aerial
classes, and detection's mosaic of digits and shapes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from storage.synth.common import (
    digit_pools,
    place,
    smooth_noise,
    splits,
    write_classes,
    write_mask,
    write_tiff,
)

# ---------------------------------------------------------------------------- sparse slide

HEMATOXYLIN = ((60, 100), (35, 70), (125, 165))  # RGB ranges of a nucleus


def _nuclei_colours(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.stack([rng.integers(low, high, n) for low, high in HEMATOXYLIN], 1).astype(np.uint8)


def _stamp_discs(
    rng: np.random.Generator, pixels: np.ndarray, centres: np.ndarray, radii: np.ndarray
) -> None:
    """Paint filled discs (``centres`` (n, 2) as y, x; ``radii`` (n,)) into ``pixels`` in
    place, each a random nucleus colour, clipped at the edges."""
    height, width = pixels.shape[:2]
    colours = _nuclei_colours(rng, len(centres))
    for (cy, cx), radius, colour in zip(centres, radii, colours, strict=True):
        r = int(np.ceil(radius))
        y0, y1 = max(0, int(cy) - r), min(height, int(cy) + r + 1)
        x0, x1 = max(0, int(cx) - r), min(width, int(cx) + r + 1)
        if y0 < y1 and x0 < x1:
            yy, xx = np.ogrid[y0:y1, x0:x1]
            pixels[y0:y1, x0:x1][(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = colour


def _cluster(
    rng: np.random.Generator, centre: np.ndarray, radius: float, nucleus: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Nuclei of radii in ``nucleus`` (low, high) thrown into a disc of ``radius`` until their
    areas add up to 60% of it: whatever the nuclei's size, the disc's mean colour is the same."""
    radii = rng.uniform(*nucleus, 4 * round(radius**2 / nucleus[0] ** 2) + 4)
    count = int(np.searchsorted(np.cumsum(radii**2), 0.6 * radius**2)) + 1
    radii = radii[:count]
    angle = rng.uniform(0, 2 * np.pi, count)
    distance = (radius - radii) * np.sqrt(rng.uniform(0, 1, count))
    return centre + np.stack([distance * np.sin(angle), distance * np.cos(angle)], 1), radii


def sparse_slide(out: Path, count: int, size: int, seed: int, **_: Any) -> list[dict[str, Any]]:
    """A slide-like binary task whose signal is sparse (CAMELYON16's setting in miniature).

    Every image is pink tissue (irregular blobs over about 45% of a near-white background, so
    the foreground mask matters) with scattered small nuclei and 2–4 round aggregates about
    2% of the side across, each packed with nuclei covering 60% of it. In class 0 every
    aggregate is a *decoy* of small nuclei; in class 1 ("lesion") 1–3 of them are *lesions* of
    nuclei 2.5× as large. Both classes have as many aggregates, of the same size, colour and
    nuclear coverage, so at any downsampling that merges nuclei a lesion and a decoy are the
    same dark spot: only the nuclei's size at full resolution tells the classes apart, and a
    lesion covers well under 1% of the tissue. Classes alternate, so every split is balanced;
    aggregate boxes and kinds are kept in synth.json.
    """
    rng = np.random.default_rng(seed)
    unit = size / 2048  # lengths are set at 2048² and scale with the side
    blob = max(6.0, 22 * unit)  # aggregate radius
    small = (max(0.8, 1.5 * unit), max(1.0, 2.0 * unit))
    large = (2.5 * small[0], 2.5 * small[1])
    step = max(1, size // 256)  # where aggregate centres may go: a coarse grid of tissue
    edge = np.minimum(np.arange(size), np.arange(size)[::-1])
    away = np.clip(np.minimum.outer(edge, edge) / (0.1 * size), 0, 1)
    rows = []
    for index, split in enumerate(splits(count)):
        label = index % 2
        field = smooth_noise(rng, size, size / 3) * away  # tissue keeps off the edges
        tissue = field > np.quantile(field, 0.55)
        shade = 0.82 + 0.18 * smooth_noise(rng, size, max(4.0, 16 * unit))[..., None]
        background = 238 + rng.normal(0, 3, (size, size, 1)).astype(np.float32)
        pink = np.array([232, 158, 196], np.float32) * shade
        pixels = np.clip(np.where(tissue[..., None], pink, background), 0, 255).astype(np.uint8)
        del shade, background, pink
        # scattered nuclei, one per (40 px)² of tissue at 2048²
        spots = np.argwhere(tissue)
        n = max(1, round(len(spots) / (40 * unit) ** 2))
        spots = spots[rng.integers(0, len(spots), n)].astype(np.float64)
        _stamp_discs(rng, pixels, spots, rng.uniform(*small, n))
        # aggregate centres: inside tissue a radius deep, three radii apart
        coarse = np.argwhere(tissue[::step, ::step]) * step
        deep = np.ones(len(coarse), bool)
        for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            ys = np.clip(coarse[:, 0] + int(dy * blob), 0, size - 1)
            xs = np.clip(coarse[:, 1] + int(dx * blob), 0, size - 1)
            deep &= tissue[ys, xs]
        candidates = coarse[deep] if deep.any() else coarse
        wanted = int(rng.integers(2, 5))
        lesions = int(rng.integers(1, min(3, wanted) + 1)) if label else 0
        centres: list[np.ndarray] = []
        for _attempt in range(200 * wanted):
            if len(centres) == wanted:
                break
            c = candidates[rng.integers(len(candidates))].astype(np.float64)
            if all(np.hypot(*(c - o)) >= 3 * blob for o in centres):
                centres.append(c)
        objects = []
        for i, centre in enumerate(centres):
            kind = "lesion" if i < lesions else "decoy"
            nuclei, radii = _cluster(rng, centre, blob, large if kind == "lesion" else small)
            _stamp_discs(rng, pixels, nuclei, radii)
            top, left = (int(v - blob) for v in centre)
            objects.append({"kind": kind, "box": [left, top, int(2 * blob), int(2 * blob)]})
        name = f"sparse_slide_{index:05d}.tiff"
        write_tiff(out / "images" / name, pixels)
        rows.append({"source": name, "label": label, "split": split, "objects": objects})
    return rows


# ------------------------------------------------------------------------------ segmentation


def _draw_paths(
    size: int, paths: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise thick paths at once: each path is (points (n, 2) as y, x one pixel apart,
    widths (n,), values (n,)). Returns (covered bool mask, value of the nearest centre pixel):
    a pixel is covered when it lies within half the width of its nearest centre pixel."""
    from scipy.ndimage import distance_transform_edt

    width = np.zeros((size, size), dtype=np.float32)
    value = np.zeros((size, size), dtype=np.float32)
    for points, widths, values in paths:
        rows = np.clip(np.rint(points[:, 0]).astype(int), 0, size - 1)
        cols = np.clip(np.rint(points[:, 1]).astype(int), 0, size - 1)
        wider = widths > width[rows, cols]
        width[rows[wider], cols[wider]] = widths[wider]
        value[rows[wider], cols[wider]] = values[wider]
    distance, (ny, nx) = distance_transform_edt(width == 0, return_indices=True)
    covered = distance <= np.maximum(width[ny, nx] / 2, 0.5)
    return covered, np.where(covered, value[ny, nx], 0)


def seg_vessels(out: Path, count: int, size: int, seed: int) -> list[dict[str, Any]]:
    """DRIVE-like retinal images: a tree of thin, branching, tapering dark vessels (1 px at the
    finest, about size/90 at the root) over a textured orange fundus with vignetting and an
    optic disc. Mask: 1 = vessel, 0 = background. Thin vessels vanish when the image is
    downsampled, so a model must look at full resolution to find them."""
    rng = np.random.default_rng(seed)
    rows = []
    write_classes(out, ["background", "vessel"])
    for index, split in enumerate(splits(count)):
        disc = np.array([rng.uniform(0.3, 0.7) * size, rng.uniform(0.25, 0.75) * size])
        root_width = max(2.0, size / 90)
        first = rng.uniform(0, 2 * np.pi)
        stack = [(disc.copy(), first + k * np.pi / 2, root_width, 0) for k in range(4)]
        paths = []
        while stack:
            start, angle, width, generation = stack.pop()
            n = max(2, int(rng.uniform(0.15, 0.35) * size / (1 + 0.5 * generation)))
            turns = np.cumsum(rng.normal(0, 0.03, n)) + angle
            points = start + np.cumsum(np.stack([np.sin(turns), np.cos(turns)], axis=1), axis=0)
            inside = (points >= 0).all(1) & (points < size).all(1)
            if not inside.any():
                continue
            last = int(np.flatnonzero(inside)[-1]) + 1
            points, turns = points[:last], turns[:last]
            taper = np.linspace(width, max(1.0, width * 0.75), len(points))
            strength = 0.35 + 0.35 * np.minimum(1.0, taper / root_width)
            paths.append((points, taper, strength))
            if width * 0.65 >= 1.0 and generation < 12:
                for cut in rng.choice(len(points), size=min(2, len(points)), replace=False):
                    bend = rng.choice([-1, 1]) * rng.uniform(0.4, 1.1)
                    stack.append((points[cut], turns[cut] + bend, width * 0.65, generation + 1))
        covered, contrast = _draw_paths(size, paths)
        mask = covered.astype(np.uint8)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
        vignette = np.clip(1.15 - 1.6 * ((yy - 0.5) ** 2 + (xx - 0.5) ** 2), 0, 1)
        texture = 0.75 + 0.25 * smooth_noise(rng, size, size / 12)
        glow = np.exp(
            -((yy * size - disc[0]) ** 2 + (xx * size - disc[1]) ** 2) / (2 * (size / 25) ** 2)
        )
        base = (vignette * texture + 0.6 * glow)[..., None] * np.array([210, 110, 50], np.float32)
        pixels = base * (1 - contrast[..., None] * np.array([0.5, 0.8, 0.8], np.float32))
        pixels += rng.normal(0, 4, pixels.shape).astype(np.float32)
        pixels = np.clip(pixels, 0, 255).astype(np.uint8)
        name = f"seg_vessels_{index:05d}.tiff"
        write_tiff(out / "images" / name, pixels)
        write_mask(out, name, mask)
        rows.append(
            {
                "source": name,
                "label": "vessels",
                "split": split,
                "vessel_fraction": float(mask.mean()),
            }
        )
    return rows


def _texture(
    rng: np.random.Generator, name: str, size: int, tint: tuple[int, int, int]
) -> np.ndarray:
    """A (size, size, 3) float texture: random flips of a scikit-image sample photo, tinted."""
    from skimage import data

    photo = getattr(data, name)().astype(np.float32) / 255.0
    tiles = -(-size // photo.shape[0])
    rows = []
    for _ in range(tiles):
        row = [photo[:: rng.choice([-1, 1]), :: rng.choice([-1, 1])] for _ in range(tiles)]
        rows.append(np.concatenate(row, axis=1))
    gray = np.concatenate(rows, axis=0)[:size, :size]
    return (0.55 + 0.45 * gray)[..., None] * np.array(tint, np.float32)


def seg_aerial(out: Path, count: int, size: int, seed: int) -> list[dict[str, Any]]:
    """Aerial-like scenes: a road network (curved, 0.6–1.6% of the side wide) and buildings
    (rectangles of 1.5–7% of the side with shadows) over vegetation and bare-ground textures from
    scikit-image's sample photographs (grass, gravel, brick). Mask: 0 background, 1 road,
    2 building (``classes.csv`` names them)."""
    rng = np.random.default_rng(seed)
    rows = []
    write_classes(out, ["background", "road", "building"])
    for index, split in enumerate(splits(count)):
        ground = smooth_noise(rng, size, size / 4)[..., None]
        pixels = ground * _texture(rng, "grass", size, (90, 140, 70)) + (1 - ground) * _texture(
            rng, "gravel", size, (150, 135, 110)
        )
        mask = np.zeros((size, size), dtype=np.uint8)
        roads = []
        for _ in range(int(rng.integers(2, 5))):
            width = rng.uniform(0.006, 0.016) * size
            horizontal = rng.random() < 0.5
            t = np.arange(size, dtype=np.float64)
            offset = rng.uniform(0.1, 0.9) * size
            bend = rng.uniform(-0.15, 0.15) * size * np.sin(t / size * np.pi * rng.uniform(0.5, 2))
            line = (
                np.stack([offset + bend, t], 1) if horizontal else np.stack([t, offset + bend], 1)
            )
            roads.append((line, np.full(size, width), np.ones(size)))
        covered, _ = _draw_paths(size, roads)
        road = covered.astype(np.uint8)
        pixels[road == 1] = np.array([95, 95, 100], np.float32) * (
            0.9 + 0.2 * rng.random((int(road.sum()), 1))
        )
        mask[road == 1] = 1
        roof = _texture(rng, "brick", size, (170, 90, 70))
        for _ in range(int(rng.integers(6, 16))):
            h, w = (int(v) for v in rng.uniform(0.015, 0.07, 2) * size)
            y, x = (int(v) for v in rng.integers(0, size - max(h, w) - 1, 2))
            if road[y : y + h, x : x + w].any():
                continue
            shadow = max(1, h // 6)
            pixels[y + shadow : y + h + shadow, x + shadow : x + w + shadow] *= 0.55
            pixels[y : y + h, x : x + w] = roof[y : y + h, x : x + w] * rng.uniform(0.7, 1.2)
            mask[y : y + h, x : x + w] = 2
        pixels += rng.normal(0, 3, pixels.shape).astype(np.float32)
        pixels = np.clip(pixels, 0, 255).astype(np.uint8)
        name = f"seg_aerial_{index:05d}.tiff"
        write_tiff(out / "images" / name, pixels)
        write_mask(out, name, mask)
        rows.append(
            {
                "source": name,
                "label": "aerial",
                "split": split,
                "class_fractions": np.bincount(mask.ravel(), minlength=3).tolist(),
            }
        )
    return rows


DET_SHAPES = ("circle", "triangle", "square")
DET_CLASSES = [*(f"digit-{d}" for d in range(10)), *DET_SHAPES]


def _shape_alpha(kind: str, side: int) -> np.ndarray:
    """(side, side) coverage in [0, 1] of a filled shape touching all four sides."""
    from skimage.draw import disk, polygon

    alpha = np.zeros((side, side), np.float32)
    if kind == "circle":
        rr, cc = disk(((side - 1) / 2, (side - 1) / 2), side / 2, shape=alpha.shape)
    elif kind == "triangle":
        rr, cc = polygon([side - 1, side - 1, 0], [0, side - 1, (side - 1) / 2], alpha.shape)
    else:
        rr, cc = np.mgrid[0:side, 0:side].reshape(2, -1)
    alpha[rr, cc] = 1.0
    return alpha


def det_mosaic(
    out: Path,
    count: int,
    size: int,
    seed: int,
    objects: int | None = None,
    mnist: str | Path | None = None,
    **_: Any,
) -> list[dict[str, Any]]:
    """Small objects in large scenes, in the spirit of the seed paper's COCO-4096 mosaic:
    handwritten digits (10 classes; real MNIST digits with ``mnist``, else scikit-learn's
    samples) and filled shapes (circle, triangle,
    square) of 12–128 px, mostly small (log-uniform sides), in bright colours over grass,
    gravel and brick textures from scikit-image's photographs; never overlapping. Boxes are the
    tight bounds of each object's drawn pixels. Writes ``OUT/annotations.json`` (COCO: images,
    annotations with ``bbox`` [x, y, w, h] in pixels, categories) beside the images."""
    rng = np.random.default_rng(seed)
    digits = digit_pools(mnist)
    per_image = objects or max(4, round(150 * (size / 4096) ** 2))
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for index, split in enumerate(splits(count)):
        ground = smooth_noise(rng, size, size / 3)[..., None]
        pixels = ground * _texture(rng, "grass", size, (90, 130, 70)) + (1 - ground) * _texture(
            rng, "gravel", size, (140, 125, 105)
        )
        sides = sorted(
            (int(v) for v in np.exp(rng.uniform(np.log(12), np.log(128), per_image))), reverse=True
        )
        corners = place(rng, size, [s + 4 for s in sides]) or []
        name = f"det_mosaic_{index:05d}.tiff"
        image_id = index + 1
        for side, (y, x) in zip(sides, corners, strict=False):
            y, x = y + 2, x + 2  # a 2-pixel margin around each object
            category = int(rng.integers(0, len(DET_CLASSES)))
            label = DET_CLASSES[category]
            if category < 10:
                part = "train" if split == "train" else "held-out"
                alpha = digits[part].sample(rng, category, side).astype(np.float32) / 255.0
            else:
                alpha = _shape_alpha(label, side)
            colour = rng.uniform(170, 255, 3).astype(np.float32) * rng.permutation(
                [1.0, 0.85, 0.35]
            )
            region = pixels[y : y + side, x : x + side]
            region[:] = region * (1 - alpha[..., None]) + colour * alpha[..., None]
            ys, xs = np.nonzero(alpha > 0.25)
            if not len(ys):
                continue
            box = [
                x + int(xs.min()),
                y + int(ys.min()),
                int(xs.max() - xs.min() + 1),
                int(ys.max() - ys.min() + 1),
            ]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category + 1,
                    "bbox": box,
                    "area": float(box[2] * box[3]),
                    "iscrowd": 0,
                }
            )
        pixels += rng.normal(0, 3, pixels.shape).astype(np.float32)
        write_tiff(out / "images" / name, np.clip(pixels, 0, 255).astype(np.uint8))
        images.append({"id": image_id, "file_name": name, "width": size, "height": size})
        placed = sum(a["image_id"] == image_id for a in annotations)
        rows.append({"source": name, "label": "mosaic", "split": split, "objects": placed})
    coco = {
        "info": {"description": f"hiresctl synth det-mosaic, seed {seed}"},
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": n, "supercategory": "digit" if i < 10 else "shape"}
            for i, n in enumerate(DET_CLASSES)
        ],
    }
    (out / "annotations.json").write_text(json.dumps(coco))
    return rows


__all__ = ["det_mosaic", "seg_aerial", "seg_vessels", "sparse_slide"]
