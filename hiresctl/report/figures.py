"""The report's figures: inline SVG charts (curves, ROC) and PNG images (thumbnails with a
heatmap or a segmentation overlay). Nothing here needs a plotting library or a network."""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np

# Colour-blind-safe series colours (Okabe–Ito).
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
# Segmentation overlay: true positive, false positive, false negative (RGB).
TP, FP, FN = (0, 170, 80), (230, 30, 30), (30, 110, 255)


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if not math.isfinite(low) or not math.isfinite(high):
        return []
    if high <= low:
        return [low]
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * step:
            step *= factor
            break
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 0.01:
        return f"{value:.2g}"
    return f"{value:.3g}"


def line_chart(
    series: Mapping[str, Sequence[tuple[float, float | None]]],
    title: str,
    xlabel: str,
    ylabel: str = "",
    width: int = 420,
    height: int = 260,
    limits: tuple[float, float] | None = None,
    diagonal: bool = False,
) -> str:
    """An inline SVG line chart: one polyline (with points) per named series."""
    left, right, top, bottom = 52, 12, 28, 40
    legend_rows = math.ceil(len(series) / 2)
    height += 14 * legend_rows + 4
    plot_w, plot_h = width - left - right, height - top - bottom - 14 * legend_rows - 4
    points = [(x, y) for values in series.values() for x, y in values
              if y is not None and math.isfinite(y)]  # fmt: skip
    xs = [p[0] for p in points] or [0.0, 1.0]
    ys = [p[1] for p in points] or [0.0, 1.0]
    x0, x1 = min(xs), max(xs)
    y0, y1 = limits if limits is not None else (min(ys), max(ys))
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = 0.0 if limits is not None else (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * plot_h

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
        f'<text x="{left}" y="16" class="chart-title">{html.escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" class="plot"/>',
    ]
    for tick in _ticks(y0, y1):
        y = sy(tick)
        out.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
        )
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(tick)}</text>')
    for tick in _ticks(x0, x1):
        x = sx(tick)
        out.append(
            f'<text x="{x:.1f}" y="{top + plot_h + 16}" text-anchor="middle">{_fmt(tick)}</text>'
        )
    out.append(f'<text x="{left + plot_w / 2:.0f}" y="{top + plot_h + 32}" text-anchor="middle">'
               f"{html.escape(xlabel)}</text>")  # fmt: skip
    if ylabel:
        out.append(f'<text transform="translate(12 {top + plot_h / 2:.0f}) rotate(-90)" '
                   f'text-anchor="middle">{html.escape(ylabel)}</text>')  # fmt: skip
    if diagonal:
        out.append(f'<line x1="{sx(0):.1f}" y1="{sy(0):.1f}" x2="{sx(1):.1f}" y2="{sy(1):.1f}" '
                   'class="diagonal"/>')  # fmt: skip
    for i, (name, values) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        clean = [(x, y) for x, y in values if y is not None and math.isfinite(y)]
        if not clean:
            continue
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in clean)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        if len(clean) <= 60:
            out.extend(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{colour}"/>'
                       for x, y in clean)  # fmt: skip
        lx = left + (i % 2) * (plot_w // 2)
        ly = top + plot_h + 50 + 14 * (i // 2)
        out.append(f'<rect x="{lx}" y="{ly - 9}" width="10" height="10" fill="{colour}"/>'
                   f'<text x="{lx + 14}" y="{ly}">{html.escape(name[:28])}</text>')  # fmt: skip
    out.append("</svg>")
    return "".join(out)


def roc_curve(targets: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """False and true positive rates over every threshold, and the area under the curve."""
    from sklearn import metrics as skm

    fpr, tpr, _ = skm.roc_curve(targets, scores)
    return fpr, tpr, float(skm.auc(fpr, tpr))


# ------------------------------------------------------------------------------ images


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


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def slug(text: str) -> str:
    """A file-name-safe form of a run or image name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "run"


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
    rgb: np.ndarray, box: Sequence[float], scale: tuple[float, float],
    origin: tuple[float, float], colour: Sequence[int], thickness: int = 1,
) -> None:  # fmt: skip
    """Outline level-0 ``box`` (x0, y0, x1, y1) on ``rgb``, which shows level 0 from ``origin``
    (y, x) scaled by ``scale`` (y, x); boxes too small to see become 3-pixel marks."""
    (sy, sx), (oy, ox) = scale, origin
    x0, y0, x1, y1 = box
    a = (int((x0 - ox) * sx), int((y0 - oy) * sy))
    b = (max(a[0] + 2, round((x1 - ox) * sx)), max(a[1] + 2, round((y1 - oy) * sy)))
    cv2.rectangle(rgb, a, b, tuple(int(v) for v in colour), thickness)


def detection_overlay(
    image: np.ndarray, scale: tuple[float, float], origin: tuple[float, float],
    truth: np.ndarray, truth_found: np.ndarray, boxes: np.ndarray, hits: np.ndarray,
    thickness: int = 1,
) -> np.ndarray:  # fmt: skip
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
