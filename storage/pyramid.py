"""Pyramid maths: the levels of an image, halving a block (mean for pixels, mode for labels),
resizing a thumbnail, and the foreground mask computed from it."""

from __future__ import annotations

import math

import numpy as np


def level_shapes(height: int, width: int, thumbnail: int) -> list[tuple[int, int]]:
    """Halve until the longest side is ≤ the thumbnail size."""
    shapes = [(height, width)]
    while max(shapes[-1]) > thumbnail:
        h, w = shapes[-1]
        shapes.append((math.ceil(h / 2), math.ceil(w / 2)))
    return shapes


def halve(block: np.ndarray) -> np.ndarray:
    """2x2 mean (rounded), replicating the last row/column of odd sizes.

    Works in the block's memory order: a channel-last block (as readers return them) is halved
    channel-last and the result is again a channel-first view of channel-last memory."""
    _c, h, w = block.shape
    if h % 2:
        block = np.concatenate([block, block[:, -1:]], axis=1)
    if w % 2:
        block = np.concatenate([block, block[:, :, -1:]], axis=2)
    wide = np.uint16 if block.dtype == np.uint8 else np.uint32  # 4 × max + 2 must fit
    channel_last = block.transpose(1, 2, 0)
    if channel_last.flags.c_contiguous:
        # rows pairwise, then columns one channel at a time (long strided loops: numpy is slow
        # on an innermost axis of 3)
        rows = np.add(channel_last[0::2], channel_last[1::2], dtype=wide)
        ph, pw, c = rows.shape
        out = np.empty((ph, pw // 2, c), block.dtype)
        acc = np.empty((ph, pw // 2), wide)
        for k in range(c):
            np.add(rows[:, 0::2, k], rows[:, 1::2, k], out=acc)
            acc += 2
            acc >>= 2
            out[..., k] = acc
        return out.transpose(2, 0, 1)
    planes = np.ascontiguousarray(block)
    rows = np.add(planes[:, 0::2], planes[:, 1::2], dtype=wide)
    c, ph, pw = rows.shape
    pairs = rows.reshape(c, ph, pw // 2, 2)
    total = pairs[..., 0] + pairs[..., 1]
    total += 2
    total >>= 2
    return total.astype(block.dtype)


def halve_mode(block: np.ndarray) -> np.ndarray:
    """2x2 mode for label images (values never mix; a tie goes to the earliest of top-left,
    top-right, bottom-left, bottom-right), replicating the last row/column of odd sizes."""
    _c, h, w = block.shape
    if h % 2:
        block = np.concatenate([block, block[:, -1:]], axis=1)
    if w % 2:
        block = np.concatenate([block, block[:, :, -1:]], axis=2)
    quad = [
        block[:, 0::2, 0::2],
        block[:, 0::2, 1::2],
        block[:, 1::2, 0::2],
        block[:, 1::2, 1::2],
    ]
    votes = [sum((q == other).astype(np.uint8) for other in quad) for q in quad]
    out = quad[0].copy()
    best = votes[0]
    for q, v in zip(quad[1:], votes[1:], strict=True):
        better = v > best
        out[better] = q[better]
        best = np.maximum(best, v)
    return out


def resize_thumbnail(src: np.ndarray, height: int, width: int) -> np.ndarray:
    if src.shape[1:] == (height, width):
        return src
    from skimage.transform import resize

    # float32: half the memory of skimage's default float64 (the source level is up to 2× the
    # thumbnail's side, so this is the largest allocation of a run)
    out = resize(
        src.transpose(1, 2, 0).astype(np.float32),
        (height, width),
        order=1,
        anti_aliasing=True,
        preserve_range=True,
    )
    return np.rint(out).astype(src.dtype).transpose(2, 0, 1)


def threshold_otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of float ``values`` over ``bins`` equal bins between their minimum and
    maximum: the bin centre that maximises the between-class variance (the computation of
    scikit-image's ``threshold_otsu``, without importing ``skimage.filters``, a third of a
    second, which is most of a small tiling run's work)."""
    hist, edges = np.histogram(values.ravel(), bins=bins)  # the first and last bins are filled
    centers = (edges[:-1] + edges[1:]) / 2.0
    counts = hist.astype(np.float32)
    weight1 = np.cumsum(counts)
    weight2 = np.cumsum(counts[::-1])[::-1]
    mean1 = np.cumsum(counts * centers) / weight1
    mean2 = (np.cumsum((counts * centers)[::-1]) / weight2[::-1])[::-1]
    variance = weight1[:-1] * weight2[1:] * (mean1[:-1] - mean2[1:]) ** 2
    return float(centers[np.argmax(variance)])


def foreground_mask(thumb: np.ndarray, fill_value: int) -> np.ndarray:
    """Otsu on the thumbnail's intensity (and saturation for colour); the side that differs from
    the image border is foreground. Returns (1, h, w) uint8 in {0, 1}."""
    img = thumb.astype(np.float32)
    gray = img.mean(axis=0)
    signal = gray
    if thumb.shape[0] >= 3:
        sat = img[:3].max(axis=0) - img[:3].min(axis=0)
        # tissue is coloured; a white or black background is not
        if sat.std() > gray.std() * 0.5:
            signal = sat
    if float(signal.max() - signal.min()) < 1e-6:
        return np.ones((1, *gray.shape), dtype=np.uint8)
    threshold = threshold_otsu(signal)
    above = signal > threshold
    border = np.concatenate([above[0], above[-1], above[:, 0], above[:, -1]])
    fg = ~above if border.mean() > 0.5 else above
    return fg[None].astype(np.uint8)
