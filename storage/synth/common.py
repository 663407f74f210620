"""What the synthesizers share: the digit pools (real MNIST or scikit-learn's), the split of
each image, placing digits without overlap, and writing images, masks and class tables."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLIT_FRACTIONS = (("train", 0.7), ("val", 0.15), ("test", 0.15))


@dataclass(frozen=True, slots=True)
class Digits:
    images: np.ndarray  # (n, h, w) float in [0, 1]
    labels: np.ndarray
    margin: int = 1  # pixels of background added around a sample before it is resized

    @classmethod
    def load(cls, part: str, mnist: str | Path | None = None) -> Digits:
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


def digit_pools(mnist: str | Path | None) -> dict[str, Digits]:
    """{"train": digits of training images, "held-out": digits of validation and test images}."""
    return {part: Digits.load(part, mnist) for part in ("train", "held-out")}


def splits(count: int) -> list[str]:
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


def place(
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


def write_tiff(path: Path, image: np.ndarray) -> None:
    import tifffile

    tile = 256 if min(image.shape[:2]) >= 256 else None
    tifffile.imwrite(path, image, tile=(tile, tile) if tile else None, compression="zlib")


def write_mask(out: Path, name: str, mask: np.ndarray) -> None:
    """Masks go to ``OUT/masks/<image name>`` (one uint8 channel), matched by ``tile --masks``."""
    (out / "masks").mkdir(exist_ok=True)
    write_tiff(out / "masks" / name, mask)


def write_classes(out: Path, names: list[str]) -> None:
    with open(out / "classes.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["value", "name"])
        writer.writerows(enumerate(names))


def smooth_noise(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Smooth random field in [0, 1] with features about ``scale`` pixels wide."""
    from skimage.transform import resize

    coarse = max(2, round(size / scale))
    field = resize(rng.random((coarse, coarse)), (size, size), order=3, mode="reflect")
    low, high = field.min(), field.max()
    return ((field - low) / max(high - low, 1e-6)).astype(np.float32)


__all__ = [
    "SPLIT_FRACTIONS",
    "Digits",
    "digit_pools",
    "place",
    "smooth_noise",
    "splits",
    "write_classes",
    "write_mask",
    "write_tiff",
]
