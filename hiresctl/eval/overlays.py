"""Images the product draws: 8-bit RGB from any pixels, PNG files, resizing, and overlays of a
heatmap, boxes or a segmentation on a thumbnail (``predict`` writes them; the report shows
them). Nothing here needs a plotting library."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np

# Overlays: true positive, false positive, false negative (RGB).
TP, FP, FN = (0, 170, 80), (230, 30, 30), (30, 110, 255)


def to_rgb8(pixels: np.ndarray) -> np.ndarray:
    """A store array (c, y, x) of any integer depth → (y, x, 3) uint8 RGB."""
    image = np.asarray(pixels)
    if image.ndim == 3 and image.shape[0] <= 4:
        image = np.moveaxis(image, 0, -1)
    if image.ndim == 2:
        image = image[..., None]
    if image.dtype != np.uint8:
        top = (
            float(np.iinfo(image.dtype).max)
            if image.dtype.kind in "ui"
            else float(image.max() or 1)
        )
        image = (image.astype(np.float32) / top * 255).clip(0, 255).astype(np.uint8)
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, -1)
    return np.ascontiguousarray(image[..., :3])


def encode_png(rgb: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return bytes(buffer)


def save_png(path: Path, rgb: np.ndarray) -> bytes:
    data = encode_png(rgb)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def resize(rgb: np.ndarray, shape: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """``rgb`` resized to (height, width): area filter, or nearest neighbour (labels, zooms)."""
    mode = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
    return cv2.resize(rgb, (shape[1], shape[0]), interpolation=mode)


def fit(rgb: np.ndarray, longest: int) -> np.ndarray:
    """Resize so the longest side is ``longest`` (area filter down, nearest up)."""
    height, width = rgb.shape[:2]
    scale = longest / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_NEAREST)


def heatmap_overlay(
    thumb: np.ndarray, scores: np.ndarray, cell: float, level_shape: tuple[int, int]
) -> np.ndarray:
    """``thumb`` (y, x, 3) with a score grid of ``cell``-pixel cells of a level of
    ``level_shape`` drawn over it (inferno colours, transparent where the score is 0)."""
    height, width = thumb.shape[:2]
    top = float(scores.max()) if scores.size else 0.0
    if top <= 0:
        return thumb.copy()
    norm = (scores / top * 255).astype(np.uint8)
    grid_h = round(scores.shape[0] * cell * height / level_shape[0])
    grid_w = round(scores.shape[1] * cell * width / level_shape[1])
    up = cv2.resize(norm, (max(1, grid_w), max(1, grid_h)), interpolation=cv2.INTER_NEAREST)
    canvas = np.zeros((height, width), np.uint8)
    h, w = min(height, up.shape[0]), min(width, up.shape[1])
    canvas[:h, :w] = up[:h, :w]
    colours = cv2.cvtColor(cv2.applyColorMap(canvas, cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)
    alpha = (canvas.astype(np.float32) / 255 * 0.7)[..., None]
    dimmed = thumb.astype(np.float32) * 0.55
    return (dimmed * (1 - alpha) + colours.astype(np.float32) * alpha).clip(0, 255).astype(np.uint8)


def boxes_overlay(
    thumbnail: np.ndarray,
    level_shape: tuple[int, int],
    boxes: np.ndarray,
    labels: np.ndarray,
    colour: Callable[[int], list[int]],
    longest: int = 1024,
) -> np.ndarray:
    """The thumbnail (fitted to ``longest``) with level-0 ``boxes`` (x0, y0, x1, y1) outlined
    in each label's ``colour(label + 1)``; boxes too small to see are drawn as 3-pixel marks."""
    rgb = fit(to_rgb8(thumbnail), longest).copy()
    scale = (rgb.shape[0] / level_shape[0], rgb.shape[1] / level_shape[1])
    for box, label in zip(boxes.tolist(), labels.tolist(), strict=True):
        _rectangle(rgb, box, scale, (0, 0), colour(int(label) + 1))
    return rgb


def _rectangle(
    rgb: np.ndarray,
    box: Sequence[float],
    scale: tuple[float, float],
    origin: tuple[float, float],
    colour: Sequence[int],
    thickness: int = 1,
) -> None:
    """Outline level-0 ``box`` (x0, y0, x1, y1) on ``rgb``, which shows level 0 from ``origin``
    (y, x) scaled by ``scale`` (y, x); boxes too small to see become 3-pixel marks."""
    (sy, sx), (oy, ox) = scale, origin
    x0, y0, x1, y1 = box
    a = (int((x0 - ox) * sx), int((y0 - oy) * sy))
    b = (max(a[0] + 2, round((x1 - ox) * sx)), max(a[1] + 2, round((y1 - oy) * sy)))
    cv2.rectangle(rgb, a, b, tuple(int(v) for v in colour), thickness)


def detection_overlay(
    image: np.ndarray,
    scale: tuple[float, float],
    origin: tuple[float, float],
    truth: np.ndarray,
    truth_found: np.ndarray,
    boxes: np.ndarray,
    hits: np.ndarray,
    thickness: int = 1,
) -> np.ndarray:
    """``image`` (showing level 0 from ``origin`` (y, x) at ``scale``) with detections that
    match a true box in green (TP), the others in red (FP), and true boxes no detection found
    in blue (FN)."""
    out = image.copy()
    for box in truth[~truth_found].tolist():
        _rectangle(out, box, scale, origin, FN, thickness)
    for box, hit in zip(boxes.tolist(), hits.tolist(), strict=True):
        _rectangle(out, box, scale, origin, TP if hit else FP, thickness)
    return out


def segmentation_overlay(
    image: np.ndarray, pred: np.ndarray, truth: np.ndarray, background: int = 0
) -> np.ndarray:
    """``image`` with true positives, false positives and false negatives coloured (class
    indices; ``background`` is the negative class; -1 in ``truth`` is unknown, left bare)."""
    out = image.astype(np.float32).copy()
    known = truth >= 0
    tp = known & (pred == truth) & (truth != background)
    fp = known & (pred != background) & (pred != truth)
    fn = known & (truth != background) & (pred == background)
    for where, colour in ((tp, TP), (fp, FP), (fn, FN)):
        out[where] = out[where] * 0.35 + np.asarray(colour, np.float32) * 0.65
    return out.clip(0, 255).astype(np.uint8)
