"""The patch grid of one image: row-major, padded (never cropped) to whole patches."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class PatchGrid:
    """Square patches of side ``patch_size`` (p) every ``stride`` (s) pixels of one level.

    ``rows = ceil((height - p) / s) + 1`` (at least 1): the image is padded with the store's
    fill value up to whole patches, so no pixel is dropped. Patch ``idx = row * cols + col``
    covers ``[row*s, row*s + p) × [col*s, col*s + p)`` and its feature lives at
    ``latent[b, :, row, col]``.

    A grid may be laid with an offset (training's ``grid_offset: random``): it then starts
    ``offset_y`` rows above and ``offset_x`` columns left of the image (both below the patch
    size), the padding shared between the top/left and bottom/right edges, so that epoch after
    epoch the patch borders fall elsewhere and no object is always cut the same way. Patch
    ``idx`` then covers ``[row*s - offset_y, ...)`` of the image (:meth:`origin`) and
    ``[row*s, ...)`` of the grid's own frame (:meth:`frame_origin`, where stitched outputs go).
    """

    height: int
    width: int
    patch_size: int
    stride: int
    offset_y: int = 0
    offset_x: int = 0

    @classmethod
    def of(
        cls,
        height: int,
        width: int,
        patch_size: int,
        stride: int | None = None,
        offset: tuple[int, int] = (0, 0),
    ) -> PatchGrid:
        return cls(height, width, patch_size, stride or patch_size, *offset)

    @property
    def rows(self) -> int:
        return _count(self.height + self.offset_y, self.patch_size, self.stride)

    @property
    def cols(self) -> int:
        return _count(self.width + self.offset_x, self.patch_size, self.stride)

    @property
    def offset(self) -> tuple[int, int]:
        """(offset_y, offset_x): where the image's top-left pixel lies in the grid's frame."""
        return self.offset_y, self.offset_x

    @property
    def num_patches(self) -> int:
        """N: patches in the image."""
        return self.rows * self.cols

    def position(self, index: int | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, col) of patch indices (row-major)."""
        index = np.asarray(index)
        return index // self.cols, index % self.cols

    def index(self, row: int | np.ndarray, col: int | np.ndarray) -> np.ndarray:
        return np.asarray(row) * self.cols + np.asarray(col)

    def origin(self, index: int) -> tuple[int, int]:
        """Top-left pixel (y, x) of patch ``index`` in the image (negative above or left of
        it when the grid is offset)."""
        y, x = self.frame_origin(index)
        return y - self.offset_y, x - self.offset_x

    def frame_origin(self, index: int) -> tuple[int, int]:
        """Top-left pixel (y, x) of patch ``index`` in the grid's frame (row·s, col·s): where
        its output goes in a stitched canvas."""
        row, col = divmod(int(index), self.cols)
        return row * self.stride, col * self.stride


@dataclass(frozen=True, slots=True)
class Flip:
    """A mirror of a whole image (of one level): ``vertical`` maps row y to H − 1 − y,
    ``horizontal`` column x to W − 1 − x. Training reads the mirrored image through it, so
    every patch, global patch, mask and box of one image agrees on it (it is drawn per image,
    not per patch)."""

    vertical: bool = False
    horizontal: bool = False

    def __bool__(self) -> bool:
        return self.vertical or self.horizontal

    def source(
        self, y: int, x: int, height: int, width: int, image_height: int, image_width: int
    ) -> tuple[int, int]:
        """Top-left (y, x) in the unflipped image of the region (``height`` × ``width``) at
        (y, x) of the flipped one: read there, then :meth:`pixels`."""
        return (
            image_height - y - height if self.vertical else y,
            image_width - x - width if self.horizontal else x,
        )

    def pixels(self, array: np.ndarray) -> np.ndarray:
        """Mirror the last two axes (rows, columns) of ``array`` as this flip says."""
        axes = tuple(a for a, on in ((-2, self.vertical), (-1, self.horizontal)) if on)
        return np.ascontiguousarray(np.flip(array, axes)) if axes else array


NO_FLIP = Flip()


def _count(side: int, patch_size: int, stride: int) -> int:
    if side <= patch_size:
        return 1
    return math.ceil((side - patch_size) / stride) + 1
