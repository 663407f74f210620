"""The report's figures: inline SVG charts (curves, ROC), and the PNG images of
``hiresctl.eval.overlays`` (thumbnails with a heatmap, boxes or a segmentation overlay) embedded
as data URIs. Nothing here needs a plotting library or a network."""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

from hiresctl.eval.overlays import (  # noqa: F401  (the report draws with them too)
    FN,
    FP,
    TP,
    boxes_overlay,
    detection_overlay,
    encode_png,
    fit,
    heatmap_overlay,
    resize,
    save_png,
    segmentation_overlay,
    to_rgb8,
)

# Colour-blind-safe series colours (Okabe–Ito).
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")


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
    # Legend: two entries a row when every name fits half the plot's width, else one a row,
    # so that no name runs into its neighbour's swatch (11 px text: about 6.5 px a character).
    half = (width - left - right) // 2
    per_row = 2 if all(len(name) * 6.5 + 18 <= half for name in series) else 1
    longest = int((width - left - right - 18) / 6.5)
    legend_rows = math.ceil(len(series) / per_row)
    height += 14 * legend_rows + 4
    plot_w, plot_h = width - left - right, height - top - bottom - 14 * legend_rows - 4
    points = [
        (x, y)
        for values in series.values()
        for x, y in values
        if y is not None and math.isfinite(y)
    ]
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
    out.append(
        f'<text x="{left + plot_w / 2:.0f}" y="{top + plot_h + 32}" text-anchor="middle">'
        f"{html.escape(xlabel)}</text>"
    )
    if ylabel:
        out.append(
            f'<text transform="translate(12 {top + plot_h / 2:.0f}) rotate(-90)" '
            f'text-anchor="middle">{html.escape(ylabel)}</text>'
        )
    if diagonal:
        out.append(
            f'<line x1="{sx(0):.1f}" y1="{sy(0):.1f}" x2="{sx(1):.1f}" y2="{sy(1):.1f}" '
            'class="diagonal"/>'
        )
    for i, (name, values) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        clean = [(x, y) for x, y in values if y is not None and math.isfinite(y)]
        if not clean:
            continue
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in clean)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        if len(clean) <= 60:
            out.extend(
                f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{colour}"/>'
                for x, y in clean
            )
        lx = left + (i % per_row) * half
        ly = top + plot_h + 50 + 14 * (i // per_row)
        label = name if len(name) <= longest else name[: longest - 1] + "…"
        out.append(
            f'<rect x="{lx}" y="{ly - 9}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{lx + 14}" y="{ly}">{html.escape(label)}</text>'
        )
    out.append("</svg>")
    return "".join(out)


def roc_curve(targets: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """False and true positive rates over every threshold, and the area under the curve."""
    from sklearn import metrics as skm

    fpr, tpr, _ = skm.roc_curve(targets, scores)
    return fpr, tpr, float(skm.auc(fpr, tpr))


# ------------------------------------------------------------------------------ images


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def slug(text: str) -> str:
    """A file-name-safe form of a run or image name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "run"
