"""The papers' digit tasks: UltraMNIST (the seed paper's sums of 3–5 digits of very different
sizes), Megapixel MNIST (the IPS paper's majority, max, top and multi-label tasks) and
fine-detail (a label only full resolution shows)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np

from storage.errors import UsageError
from storage.synth.common import digit_pools, place, splits, write_tiff


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
    pools = digit_pools(mnist)
    rows = []
    for index, split in enumerate(splits(count)):
        pool = pools["train" if split == "train" else "held-out"]
        while True:
            n = int(rng.integers(3, 6))
            target = int(rng.integers(0, classes))
            digits = _digits_with_sum(rng, n, target)
            if digits is None:
                continue
            sides = [int(min(unit * s, size // 3)) for s in rng.choice(scales, size=n, p=v_shape)]
            corners = place(rng, size, sides)
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
        write_tiff(out / "images" / name, canvas)
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
    pools = digit_pools(mnist)
    side = pools["train"].native if mnist else max(8, round(28 * size / 1500 * 2))
    if 5 * side * side > size * size // 2:
        raise UsageError(f"megapixel-mnist: a {size}² canvas is too small for five {side}² digits")
    if noise is None and mnist:
        noise = max(1, round(50 * (size / 1500) ** 2))  # the paper's density of digit-sized noise
    elif noise is None:
        noise = max(1, round(50 * size / 1500))
    rows = []
    for index, split in enumerate(splits(count)):
        pool = pools["train" if split == "train" else "held-out"]
        target = int(rng.integers(0, 10))
        others = [
            int(d) for d in rng.choice([d for d in range(10) if d != target], 2, replace=False)
        ]
        digits = [target] * 3 + others
        corners = None
        while corners is None:
            corners = place(rng, size, [side] * 5)
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
        write_tiff(out / "images" / name, canvas)
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
    for index, split in enumerate(splits(count)):
        label = index % 2
        pixels = rng.integers(60, 120, (size, size, 3), dtype=np.uint8)
        y, x = (int(v) for v in rng.integers(0, size - square + 1, size=2))
        pixels[y : y + square, x : x + square] = checker[..., None] if label else 90
        name = f"fine_detail_{index:05d}.tiff"
        write_tiff(out / "images" / name, pixels)
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


__all__ = ["fine_detail", "megapixel_mnist", "ultramnist"]
