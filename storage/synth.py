"""Synthetic benchmark images, built from data that packages ship or that the user gives.

Digits come from real MNIST when the user points ``--mnist DIR`` at its four IDX files
(``storage.mnist``; nothing is downloaded): training images draw MNIST's training digits,
validation and test images its test digits. Without it, the offline default is scikit-learn's
bundled handwritten digits (``sklearn.datasets.load_digits``: 1,797 samples of 8x8, upscaled),
70% of the samples for training images and the rest for the others. Either way no digit sample
appears on both sides of a split.

Each synthesizer writes ``OUT/images/*.tiff`` (tiled, deflate) and ``OUT/labels.csv``
(``source,label,split``) ready for ``hiresctl tile``; segmentation kinds also write
``OUT/masks/*.tiff`` and ``OUT/classes.csv`` for ``--masks`` and ``--mask-classes``; detection
kinds write ``OUT/annotations.json`` (COCO); plus ``OUT/synth.json`` with everything
needed to check the labels (digit positions, values, scales). Output is a function of the seed.
"""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from storage.errors import UsageError

__all__ = ["SYNTHESIZERS", "synthesize"]

MAX_SIDE = 32768
SPLIT_FRACTIONS = (("train", 0.7), ("val", 0.15), ("test", 0.15))


@dataclass(frozen=True, slots=True)
class _Digits:
    images: np.ndarray  # (n, h, w) float in [0, 1]
    labels: np.ndarray
    margin: int = 1  # pixels of background added around a sample before it is resized

    @classmethod
    def load(cls, part: str, mnist: str | Path | None = None) -> _Digits:
        """The digits of one side of the split: ``train`` or the held-out rest.

        Without ``mnist``: scikit-learn's 8×8 digits, 70% for training and 30% held out. With
        ``mnist`` (a folder of MNIST's IDX files): real 28×28 digits, MNIST's training set for
        ``train`` and its test set (t10k) for everything held out, as the papers split them.
        """
        if mnist is not None:
            from storage.mnist import load_mnist

            images, labels = load_mnist(mnist, "train" if part == "train" else "test")
            return cls(images.astype(np.float32) / 255.0, labels.astype(np.int64), margin=0)
        from sklearn.datasets import load_digits

        d = load_digits()
        cut = int(len(d.target) * 0.7)
        sl = slice(0, cut) if part == "train" else slice(cut, None)
        return cls(d.images[sl] / 16.0, d.target[sl])

    @property
    def native(self) -> int:
        """The side of a sample as it comes (28 for MNIST, whose digits carry their margin)."""
        return int(self.images.shape[-1]) + 2 * self.margin

    def sample(self, rng: np.random.Generator, digit: int, side: int) -> np.ndarray:
        """One handwritten ``digit`` as a uint8 image of ``side`` pixels, white on black."""
        from skimage.transform import resize

        choices = np.flatnonzero(self.labels == digit)
        img = self.images[rng.choice(choices)]
        padded = np.pad(img, self.margin)  # a margin so upscaling does not cut strokes
        if padded.shape != (side, side):
            padded = resize(padded, (side, side), order=1, anti_aliasing=side < padded.shape[0])
        return np.clip(padded * 255, 0, 255).astype(np.uint8)


def _digit_pools(mnist: str | Path | None) -> dict[str, _Digits]:
    """{"train": digits of training images, "held-out": digits of validation and test images}."""
    return {part: _Digits.load(part, mnist) for part in ("train", "held-out")}


def _splits(count: int) -> list[str]:
    """Exact proportions, deterministic order: the first 70% train, then val, then test."""
    out: list[str] = []
    for name, frac in SPLIT_FRACTIONS:
        out += [name] * round(count * frac)
    out = out[:count] + ["train"] * max(0, count - len(out))
    if count >= 3 and "test" not in out:
        out[-1] = "test"
    if count >= 3 and "val" not in out:
        out[-2] = "val"
    return out


def _place(
    rng: np.random.Generator, size: int, sides: list[int], tries: int = 2000
) -> list[tuple[int, int]] | None:
    """Top-left corners for squares of ``sides`` with no overlapping boxes, or None."""
    boxes: list[tuple[int, int, int]] = []
    for side in sides:
        for _ in range(tries):
            y, x = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            if all(
                y + side <= by or by + bs <= y or x + side <= bx or bx + bs <= x
                for by, bx, bs in boxes
            ):
                boxes.append((y, x, side))
                break
        else:
            return None
    return [(y, x) for y, x, _ in boxes]


def _write_tiff(path: Path, image: np.ndarray) -> None:
    import tifffile

    tile = 256 if min(image.shape[:2]) >= 256 else None
    tifffile.imwrite(path, image, tile=(tile, tile) if tile else None, compression="zlib")


def ultramnist(
    out: Path,
    count: int,
    size: int,
    seed: int,
    classes: int = 28,
    mnist: str | Path | None = None,
    **_: Any,
) -> list[dict[str, Any]]:
    """UltraMNIST: 3-5 digits whose sum is the label, each scaled x1-9 (V-shaped), no overlap.

    ``classes`` is 28 (sums 0-27) or 10 (sums 0-9). A scale-1 digit is 56 px on a 4096 canvas
    and shrinks with the canvas; real MNIST digits (``mnist``) never go below 14 px at scale 1
    (half their native 28 px, where strokes are still a pixel wide), so on a 512 canvas they
    run from 14 to 126 px.
    """
    if classes not in (10, 28):
        raise UsageError(f"ultramnist --classes must be 10 or 28, got {classes}")
    rng = np.random.default_rng(seed)
    unit = max(14 if mnist else 4, round(28 * size / 4096 * 2))  # scale-1 digit side
    scales = np.arange(1, 10)
    v_shape = np.abs(scales - 5) + 1.0
    v_shape /= v_shape.sum()
    pools = _digit_pools(mnist)
    rows = []
    for index, split in enumerate(_splits(count)):
        pool = pools["train" if split == "train" else "held-out"]
        while True:
            n = int(rng.integers(3, 6))
            target = int(rng.integers(0, classes))
            digits = _digits_with_sum(rng, n, target)
            if digits is None:
                continue
            sides = [int(min(unit * s, size // 3)) for s in rng.choice(scales, size=n, p=v_shape)]
            corners = _place(rng, size, sides)
            if corners is not None:
                break
        canvas = np.zeros((size, size), dtype=np.uint8)
        objects = []
        for digit, side, (y, x) in zip(digits, sides, corners, strict=True):
            canvas[y : y + side, x : x + side] = np.maximum(
                canvas[y : y + side, x : x + side], pool.sample(rng, digit, side)
            )
            objects.append({"digit": digit, "box": [x, y, side, side]})
        name = f"ultramnist_{index:05d}.tiff"
        _write_tiff(out / "images" / name, canvas)
        rows.append({"source": name, "label": sum(digits), "split": split, "objects": objects})
    return rows


def _digits_with_sum(rng: np.random.Generator, n: int, target: int) -> list[int] | None:
    if target > 9 * n:
        return None
    digits = []
    remaining = target
    for i in range(n):
        left = n - i - 1
        low, high = max(0, remaining - 9 * left), min(9, remaining)
        d = int(rng.integers(low, high + 1))
        digits.append(d)
        remaining -= d
    order = rng.permutation(n)
    return [digits[i] for i in order]


def megapixel_mnist(
    out: Path,
    count: int,
    size: int,
    seed: int,
    task: str = "majority",
    noise: int | None = None,
    mnist: str | Path | None = None,
    **_: Any,
) -> list[dict[str, Any]]:
    """Megapixel MNIST: 5 digits (3 of the target class, 2 others) over line-scribble noise.

    With ``mnist`` (a folder of MNIST's IDX files) the digits are real MNIST digits at their
    native 28×28, as in the IPS paper, whatever the canvas; without it, scikit-learn's digits
    upscaled to ``56 · size / 1500`` px.

    ``noise`` scribbles lie under the digits. With real MNIST they are the IPS paper's:
    digit-sized squares holding two straight strokes as bright as a digit's, 50 on its 1500²
    canvas and at the same density elsewhere (``50 · (size / 1500)²``), so a patch method meets
    as many digit-like decoys per patch as the paper's. Without MNIST they are three joined
    lines across the canvas, in proportion to the side (``50 · size / 1500``).

    Labels for every task are kept in synth.json; ``task`` chooses the CSV label:
    ``majority`` (the class present 3 times), ``max`` (largest digit), ``top`` (the digit
    nearest the top edge) or ``multi-label`` (the digits present, ';'-separated).
    """
    tasks = ("majority", "max", "top", "multi-label")
    if task not in tasks:
        raise UsageError(f"megapixel-mnist --task must be one of {tasks}, got {task!r}")
    from skimage.draw import line_aa

    rng = np.random.default_rng(seed)
    pools = _digit_pools(mnist)
    side = pools["train"].native if mnist else max(8, round(28 * size / 1500 * 2))
    if 5 * side * side > size * size // 2:
        raise UsageError(f"megapixel-mnist: a {size}² canvas is too small for five {side}² digits")
    if noise is None and mnist:
        noise = max(1, round(50 * (size / 1500) ** 2))  # the paper's density of digit-sized noise
    elif noise is None:
        noise = max(1, round(50 * size / 1500))
    rows = []
    for index, split in enumerate(_splits(count)):
        pool = pools["train" if split == "train" else "held-out"]
        target = int(rng.integers(0, 10))
        others = [
            int(d) for d in rng.choice([d for d in range(10) if d != target], 2, replace=False)
        ]
        digits = [target] * 3 + others
        corners = None
        while corners is None:
            corners = _place(rng, size, [side] * 5)
        canvas = np.zeros((size, size), dtype=np.uint8)
        for _scribble in range(noise):  # scribbles under the digits
            if mnist:  # the paper's: a digit-sized pair of bright strokes
                y, x = (int(v) for v in rng.integers(0, size - side + 1, size=2))
                region = canvas[y : y + side, x : x + side]
                np.maximum(region, _stroke_pair(rng, side), out=region)
                continue
            points = rng.integers(0, size, size=(4, 2))
            for (y0, x0), (y1, x1) in itertools.pairwise(points):
                rr, cc, val = line_aa(int(y0), int(x0), int(y1), int(x1))
                canvas[rr, cc] = np.maximum(canvas[rr, cc], (val * 160).astype(np.uint8))
        objects: list[dict[str, Any]] = []
        for digit, (y, x) in zip(digits, corners, strict=True):
            patch = pool.sample(rng, digit, side)
            canvas[y : y + side, x : x + side] = np.maximum(
                canvas[y : y + side, x : x + side], patch
            )
            objects.append({"digit": digit, "box": [x, y, side, side]})
        labels: dict[str, Any] = {
            "majority": target,
            "max": max(digits),
            "top": min(objects, key=lambda o: o["box"][1])["digit"],
            "multi-label": ";".join(str(d) for d in sorted(set(digits))),
        }
        name = f"megapixel_mnist_{index:05d}.tiff"
        _write_tiff(out / "images" / name, canvas)
        rows.append(
            {
                "source": name,
                "label": labels[task],
                "split": split,
                "objects": objects,
                "labels": labels,
            }
        )
    return rows


def _stroke_pair(rng: np.random.Generator, side: int) -> np.ndarray:
    """A ``side``² uint8 square with two straight strokes (each from one edge to another,
    intensity 0.8–1.0 of white): noise that looks like a digit's strokes but is none."""
    from skimage.draw import line_aa

    square = np.zeros((side, side), np.float32)
    last = side - 1
    for _stroke in range(2):
        ends = []
        for edge in rng.choice(4, 2, replace=False):  # top, bottom, left, right
            t = int(rng.integers(0, side))
            ends.append({0: (0, t), 1: (last, t), 2: (t, 0), 3: (t, last)}[int(edge)])
        (y0, x0), (y1, x1) = ends
        rr, cc, val = line_aa(y0, x0, y1, x1)
        np.maximum.at(square, (rr, cc), val * rng.uniform(0.8, 1.0))
    return np.clip(square * 255, 0, 255).astype(np.uint8)


Synthesizer = Callable[..., list[dict[str, Any]]]


#: name → (function, default canvas size)
def fine_detail(
    out: Path, count: int, size: int, seed: int, square: int = 32, **_: Any
) -> list[dict[str, Any]]:
    """Binary task that only full resolution can solve: RGB noise with one ``square``² region,
    a one-pixel checkerboard (0/180) in class 1 and a flat square of the same mean (90) in
    class 0, at a random place. Any downsampling by 2 or more averages the checkerboard into
    the flat square, so a method that sees only a downsampled image stays at chance. Classes
    alternate, so every split is balanced.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:square, 0:square]
    checker = np.where((yy + xx) % 2 == 0, 0, 180).astype(np.uint8)
    rows = []
    for index, split in enumerate(_splits(count)):
        label = index % 2
        pixels = rng.integers(60, 120, (size, size, 3), dtype=np.uint8)
        y, x = (int(v) for v in rng.integers(0, size - square + 1, size=2))
        pixels[y : y + square, x : x + square] = checker[..., None] if label else 90
        name = f"fine_detail_{index:05d}.tiff"
        _write_tiff(out / "images" / name, pixels)
        rows.append(
            {
                "source": name,
                "label": label,
                "split": split,
                "objects": [{"box": [x, y, square, square]}],
            }
        )
    return rows


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
    for index, split in enumerate(_splits(count)):
        label = index % 2
        field = _smooth_noise(rng, size, size / 3) * away  # tissue keeps off the edges
        tissue = field > np.quantile(field, 0.55)
        shade = 0.82 + 0.18 * _smooth_noise(rng, size, max(4.0, 16 * unit))[..., None]
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
        _write_tiff(out / "images" / name, pixels)
        rows.append({"source": name, "label": label, "split": split, "objects": objects})
    return rows


# ------------------------------------------------------------------------------ segmentation


def _write_mask(out: Path, name: str, mask: np.ndarray) -> None:
    """Masks go to ``OUT/masks/<image name>`` (one uint8 channel), matched by ``tile --masks``."""
    (out / "masks").mkdir(exist_ok=True)
    _write_tiff(out / "masks" / name, mask)


def _write_classes(out: Path, names: list[str]) -> None:
    with open(out / "classes.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["value", "name"])
        writer.writerows(enumerate(names))


def _smooth_noise(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Smooth random field in [0, 1] with features about ``scale`` pixels wide."""
    from skimage.transform import resize

    coarse = max(2, round(size / scale))
    field = resize(rng.random((coarse, coarse)), (size, size), order=3, mode="reflect")
    low, high = field.min(), field.max()
    return ((field - low) / max(high - low, 1e-6)).astype(np.float32)


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
    _write_classes(out, ["background", "vessel"])
    for index, split in enumerate(_splits(count)):
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
        texture = 0.75 + 0.25 * _smooth_noise(rng, size, size / 12)
        glow = np.exp(
            -((yy * size - disc[0]) ** 2 + (xx * size - disc[1]) ** 2) / (2 * (size / 25) ** 2)
        )
        base = (vignette * texture + 0.6 * glow)[..., None] * np.array([210, 110, 50], np.float32)
        pixels = base * (1 - contrast[..., None] * np.array([0.5, 0.8, 0.8], np.float32))
        pixels += rng.normal(0, 4, pixels.shape).astype(np.float32)
        pixels = np.clip(pixels, 0, 255).astype(np.uint8)
        name = f"seg_vessels_{index:05d}.tiff"
        _write_tiff(out / "images" / name, pixels)
        _write_mask(out, name, mask)
        rows.append({"source": name, "label": "vessels", "split": split,
                     "vessel_fraction": float(mask.mean())})  # fmt: skip
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
    _write_classes(out, ["background", "road", "building"])
    for index, split in enumerate(_splits(count)):
        ground = _smooth_noise(rng, size, size / 4)[..., None]
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
        _write_tiff(out / "images" / name, pixels)
        _write_mask(out, name, mask)
        rows.append({"source": name, "label": "aerial", "split": split,
                     "class_fractions": np.bincount(mask.ravel(), minlength=3).tolist()})  # fmt: skip
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
    digits = _digit_pools(mnist)
    per_image = objects or max(4, round(150 * (size / 4096) ** 2))
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for index, split in enumerate(_splits(count)):
        ground = _smooth_noise(rng, size, size / 3)[..., None]
        pixels = ground * _texture(rng, "grass", size, (90, 130, 70)) + (1 - ground) * _texture(
            rng, "gravel", size, (140, 125, 105)
        )
        sides = sorted((int(v) for v in np.exp(rng.uniform(np.log(12), np.log(128), per_image))),
                       reverse=True)  # fmt: skip
        corners = _place(rng, size, [s + 4 for s in sides]) or []
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
            box = [x + int(xs.min()), y + int(ys.min()), int(xs.max() - xs.min() + 1),
                   int(ys.max() - ys.min() + 1)]  # fmt: skip
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": category + 1, "bbox": box,
                                "area": float(box[2] * box[3]), "iscrowd": 0})  # fmt: skip
        pixels += rng.normal(0, 3, pixels.shape).astype(np.float32)
        _write_tiff(out / "images" / name, np.clip(pixels, 0, 255).astype(np.uint8))
        images.append({"id": image_id, "file_name": name, "width": size, "height": size})
        placed = sum(a["image_id"] == image_id for a in annotations)
        rows.append({"source": name, "label": "mosaic", "split": split, "objects": placed})
    coco = {
        "info": {"description": f"hiresctl synth det-mosaic, seed {seed}"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "digit" if i < 10 else "shape"}
                       for i, n in enumerate(DET_CLASSES)],
    }  # fmt: skip
    (out / "annotations.json").write_text(json.dumps(coco))
    return rows


SYNTHESIZERS: dict[str, tuple[Synthesizer, int]] = {
    "det-mosaic": (det_mosaic, 4096),
    "ultramnist": (ultramnist, 4096),
    "megapixel-mnist": (megapixel_mnist, 1500),
    "fine-detail": (fine_detail, 512),
    "sparse-slide": (sparse_slide, 2048),
    "seg-vessels": (seg_vessels, 4096),
    "seg-aerial": (seg_aerial, 4096),
}


def synthesize(
    kind: str,
    out: str | Path,
    count: int = 16,
    size: int | None = None,
    seed: int = 0,
    **options: Any,
) -> Path:
    """Write ``count`` images of ``kind`` and their labels into ``out``; returns the labels CSV."""
    if kind not in SYNTHESIZERS:
        raise UsageError(f"unknown synthesizer {kind!r}; valid: {', '.join(sorted(SYNTHESIZERS))}")
    func, default_size = SYNTHESIZERS[kind]
    size = size or default_size
    if not 64 <= size <= MAX_SIDE:
        raise UsageError(f"--size must be between 64 and {MAX_SIDE}, got {size}")
    if count < 1:
        raise UsageError(f"--count must be ≥ 1, got {count}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = func(out, count=count, size=size, seed=seed, **options)
    labels = out / "labels.csv"
    with open(labels, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["source", "label", "split"])
        for row in rows:
            writer.writerow([row["source"], row["label"], row["split"]])
    meta = {
        "kind": kind,
        "count": count,
        "size": size,
        "seed": seed,
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in options.items()},
        "digits": f"MNIST IDX files in {options['mnist']}"
        if options.get("mnist")
        else "scikit-learn load_digits (8x8, upscaled)",
        "images": rows,
    }
    (out / "synth.json").write_text(json.dumps(meta, indent=1))
    return labels
