"""Turn patch locations into pixels with chunk-aligned reads from a dataset store."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hiresctl.data.grid import NO_FLIP, Flip, PatchGrid
from storage import Dataset, ImageEntry, StoreError
from storage.chunks import DirectChunks

# Backbones expect ImageNet-normalised RGB; stores hold 1, 3 or 4 channels of uint8/uint16.
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # every patch is read normalised with these; encoders
IMAGENET_STD = (0.229, 0.224, 0.225)  # with other statistics renormalise (models/encoders.py)
_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def to_unit_rgb(pixels: np.ndarray) -> torch.Tensor:
    """(…, c, h, w) store pixels → float32 RGB in [0, 1] (grey repeated, alpha dropped)."""
    return as_rgb(to_unit(pixels))


def to_unit(pixels: np.ndarray) -> torch.Tensor:
    """(…, c, h, w) store pixels → float32 in [0, 1], only the channels RGB is made of: the
    grey channel (alpha dropped) or the first three (alpha and extra bands dropped)."""
    if pixels.dtype == np.uint8:
        scale = 255.0
    elif pixels.dtype == np.uint16:
        scale = 65535.0
    else:
        scale = 1.0
    kept = pixels[..., :1, :, :] if pixels.shape[-3] <= 2 else pixels[..., :3, :, :]
    return torch.from_numpy(np.ascontiguousarray(kept)).float().div_(scale)


def as_rgb(tensor: torch.Tensor) -> torch.Tensor:
    """(…, 1 or 3, h, w) of :func:`to_unit` → (…, 3, h, w), grey repeated."""
    if tensor.shape[-3] == 1:
        tensor = tensor.expand(*tensor.shape[:-3], 3, *tensor.shape[-2:])
    return tensor.contiguous()


def normalize(tensor: torch.Tensor) -> torch.Tensor:
    """[0, 1] RGB → ImageNet-normalised (what the backbones expect)."""
    return (tensor - _MEAN) / _STD


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(…, c, h, w) store pixels → float32 RGB, ImageNet-normalised."""
    return normalize(to_unit_rgb(pixels))


class PatchReader:
    """Reads patches and global patches of the images of one dataset store.

    Reads are aligned to the store's chunks when ``patch_size`` is a multiple of the chunk and
    the stride equals the patch size, so one patch costs whole-chunk decodes only, and such
    reads go straight to the chunk bytes (:class:`storage.chunks.DirectChunks`). Patches that
    reach past the image edge are padded with the store's fill value. Thread-safe; counts what
    it reads (``patches_read``, ``pixels_read``) so tests and benchmarks can check that a step
    reads only what it needs.
    """

    def __init__(
        self,
        dataset: Dataset | str,
        level: int = 0,
        threads: int = 4,
        mask_values: Sequence[int] | None = None,
        box_classes: Sequence[str] | None = None,
    ) -> None:
        self.dataset = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
        self.level = level
        self.mask_values = list(mask_values) if mask_values is not None else None
        self.box_classes = list(box_classes) if box_classes is not None else None
        self._lut: np.ndarray | None = None
        if self.mask_values is not None:
            # mask value → class index; values outside the run's classes are ignored (-1)
            self._lut = np.full(max(self.mask_values, default=0) + 1, -1, dtype=np.int64)
            self._lut[self.mask_values] = np.arange(len(self.mask_values))
        self._entries: dict[str, ImageEntry] = {}
        self._arrays: dict[tuple[str, int], Any] = {}
        self._direct: dict[tuple[str, int], DirectChunks | None] = {}
        self._global_source: dict[tuple[str, int], tuple[Any, DirectChunks | None]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max(1, threads)) if threads > 1 else None
        self.patches_read = 0
        self.pixels_read = 0

    # Pickled into DataLoader workers: each worker reopens the store lazily.
    def __getstate__(self) -> dict[str, Any]:
        return {
            "path": self.dataset.path,
            "level": self.level,
            "threads": 1,
            "mask_values": self.mask_values,
            "box_classes": self.box_classes,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(  # type: ignore[misc]
            state["path"],
            state["level"],
            state["threads"],
            state["mask_values"],
            state["box_classes"],
        )

    def entry(self, image_id: str) -> ImageEntry:
        with self._lock:
            if image_id not in self._entries:
                self._entries[image_id] = self.dataset.entry(image_id)
            return self._entries[image_id]

    def array(self, image_id: str, level: int | None = None) -> Any:
        key = (image_id, self.level if level is None else level)
        with self._lock:
            if key not in self._arrays:
                try:
                    self._arrays[key] = self.dataset.level(*key)
                except KeyError as exc:
                    raise StoreError(
                        f"{self.dataset.path}/images/{image_id}",
                        f"has no pyramid level {key[1]}",
                    ) from exc
            return self._arrays[key]

    def mask_array(self, image_id: str, level: int | None = None) -> Any:
        """The segmentation mask of one level (``labels/mask``)."""
        return self._label_array(image_id, "mask", level)

    def roi_array(self, image_id: str, level: int | None = None) -> Any:
        """The region-of-interest mask of one level (``labels/roi``), or None without one."""
        return self._label_array(image_id, "roi", level)

    def _label_array(self, image_id: str, label: str, level: int | None) -> Any:
        """A label image's array of one level, opened once (``Dataset.mask`` or ``.roi``)."""
        key = (f"{image_id}\0{label}", self.level if level is None else level)
        with self._lock:
            if key not in self._arrays:
                self._arrays[key] = getattr(self.dataset, label)(image_id, key[1])
            return self._arrays[key]

    def direct(self, image_id: str, mask: bool = False) -> DirectChunks | None:
        """The fast whole-chunk reader of the read level, when the store's layout allows one."""
        key = (f"{image_id}\0mask" if mask else image_id, self.level)
        if key not in self._direct:
            array = self.mask_array(image_id) if mask else self.array(image_id)
            found = DirectChunks.open(array)
            with self._lock:
                self._direct[key] = found
        return self._direct[key]

    def shape(self, image_id: str) -> tuple[int, int, int]:
        """(c, h, w) of the level patches are read from."""
        return tuple(self.array(image_id).shape)

    def grid(
        self,
        image_id: str,
        patch_size: int,
        stride: int | None = None,
        offset: tuple[int, int] = (0, 0),
    ) -> PatchGrid:
        _, height, width = self.shape(image_id)
        return PatchGrid.of(height, width, patch_size, stride, offset)

    def read_region(
        self, image_id: str, y: int, x: int, size: int, height: int | None = None
    ) -> np.ndarray:
        """(c, size, size) pixels at (y, x) of the read level, padded past the edges with the
        store's fill value (``height`` rows instead of ``size`` when given)."""
        out = _padded_region(
            self.array(image_id),
            self.direct(image_id),
            y,
            x,
            height or size,
            size,
            self.entry(image_id).fill_value,
        )
        with self._lock:
            self.patches_read += 1
            self.pixels_read += size * (height or size)
        return out

    def read_mask_region(
        self, image_id: str, y: int, x: int, size: int, height: int | None = None
    ) -> np.ndarray:
        """(height, size) class indices of the mask at (y, x); -1 past the edges, outside the
        image's region of interest and for mask values that are not classes of the run."""
        if self._lut is None:
            raise RuntimeError("this reader was built without mask classes (mask_values)")
        values = _padded_region(
            self.mask_array(image_id),
            self.direct(image_id, mask=True),
            y,
            x,
            height or size,
            size,
            -1,
        )[0]
        classes = self._classes(values)
        roi = self.roi_array(image_id)
        if roi is not None:
            inside = _padded_region(roi, None, y, x, height or size, size, 0)[0]
            classes[inside == 0] = -1
        return classes

    def _classes(self, values: np.ndarray) -> np.ndarray:
        """Mask values → class indices (-1 for padding and values that are not classes)."""
        assert self._lut is not None
        out = np.full(values.shape, -1, dtype=np.int64)
        known = (values >= 0) & (values < len(self._lut))
        out[known] = self._lut[values[known]]
        return out

    def _source(self, image_id: str, grid: PatchGrid, index: int, flip: Flip) -> tuple[int, int]:
        """Where patch ``index`` of the (flipped) image lies in the stored image."""
        y, x = grid.origin(index)
        if not flip:
            return y, x
        _, height, width = self.shape(image_id)
        p = grid.patch_size
        return flip.source(y, x, p, p, height, width)

    def read_mask_patches(
        self,
        image_id: str,
        grid: PatchGrid,
        indices: Sequence[int] | np.ndarray,
        flip: Flip = NO_FLIP,
    ) -> torch.Tensor:
        """(n, p, p) int64 class indices of the mask under the given patches (-1: ignore), of
        the image mirrored by ``flip``."""
        p = grid.patch_size
        masks = [
            flip.pixels(
                self.read_mask_region(image_id, *self._source(image_id, grid, int(i), flip), p)
            )
            for i in indices
        ]
        return (
            torch.from_numpy(np.stack(masks)) if masks else torch.empty(0, p, p, dtype=torch.long)
        )

    def read_mask_global(self, image_id: str, size: int, flip: Flip = NO_FLIP) -> torch.Tensor:
        """(size, size) class indices: the whole mask (mirrored by ``flip``) letterboxed like
        :meth:`read_global_unit` and resized by nearest label, from the coarsest mask level
        still ≥ ``size``."""
        entry = self.entry(image_id)
        chosen = 0
        for level in range(entry.levels):
            if max(self.mask_array(image_id, level).shape[1:]) >= size:
                chosen = level
        array = self.mask_array(image_id, chosen)
        _, height, width = array.shape
        classes = self._classes(np.asarray(array[0]))
        roi = self.roi_array(image_id, chosen)
        if roi is not None:
            classes[np.asarray(roi[0]) == 0] = -1
        labels = flip.pixels(classes)
        side = max(height, width)
        square = torch.full((1, 1, side, side), -1.0)
        square[0, 0, :height, :width] = torch.from_numpy(labels).float()
        return F.interpolate(square, size=(size, size), mode="nearest")[0, 0].long()

    def boxes(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(n, 4) float32 boxes x0, y0, x1, y1 in pixels of the read level and (n,) int64 class
        indices into ``box_classes``; boxes of other categories and boxes without area are
        left out."""
        xyxy, names = self.dataset.boxes(image_id)
        index = {name: i for i, name in enumerate(self.box_classes or [])}
        _, height, width = self.shape(image_id)
        _, height0, width0 = self.entry(image_id).shape
        scale = np.array([width / width0, height / height0] * 2, dtype=np.float32)
        boxes = xyxy * scale
        labels = np.array([index.get(n, -1) for n in names], dtype=np.int64)
        keep = (labels >= 0) & (boxes[:, 2] - boxes[:, 0] > 0) & (boxes[:, 3] - boxes[:, 1] > 0)
        return boxes[keep].astype(np.float32), labels[keep]

    def read_patches(
        self,
        image_id: str,
        grid: PatchGrid,
        indices: Sequence[int] | np.ndarray,
        flip: Flip = NO_FLIP,
    ) -> torch.Tensor:
        """(n, 3, p, p) normalised float patches at the given row-major grid indices."""
        return normalize(self.read_patches_unit(image_id, grid, indices, flip))

    def read_patches_unit(
        self,
        image_id: str,
        grid: PatchGrid,
        indices: Sequence[int] | np.ndarray,
        flip: Flip = NO_FLIP,
    ) -> torch.Tensor:
        """(n, 3, p, p) RGB patches in [0, 1] (before normalisation, for augmentation) of the
        image mirrored by ``flip`` (the grid is laid over the mirrored image)."""
        origins = [self._source(image_id, grid, int(i), flip) for i in indices]
        if not origins:
            return torch.empty(0, 3, grid.patch_size, grid.patch_size)

        def one(origin: tuple[int, int]) -> np.ndarray:
            return flip.pixels(self.read_region(image_id, origin[0], origin[1], grid.patch_size))

        if self._pool is not None and len(origins) > 1:
            pixels = list(self._pool.map(one, origins))
        else:
            pixels = [one(o) for o in origins]
        return to_unit_rgb(np.stack(pixels))

    def read_features(self, image_id: str, name: str) -> torch.Tensor:
        """(N, D) float32: the image's feature set ``name`` (``hiresctl embed``)."""
        found = self.dataset.feature_set(image_id, name)
        if found is None:
            raise StoreError(
                f"{self.dataset.path}/images/{image_id}",
                f"has no complete feature set {name!r} (run `hiresctl embed` first)",
            )
        features = torch.from_numpy(np.asarray(found[0][...], dtype=np.float32))
        self.patches_read += len(features)
        return features

    def read_global(self, image_id: str, size: int, flip: Flip = NO_FLIP) -> torch.Tensor:
        """(3, size, size) normalised global patch; see :meth:`read_global_unit`."""
        return normalize(self.read_global_unit(image_id, size, flip))

    def read_global_unit(self, image_id: str, size: int, flip: Flip = NO_FLIP) -> torch.Tensor:
        """(3, size, size): the whole image (mirrored by ``flip``), letterboxed to a square and
        resized to ``size``.

        The padding goes right and below, like the patch grid's, so the global patch and the
        grid see the same geometry.

        Read from the coarsest pyramid level (or the thumbnail) that is still at least ``size``
        on its longest side, so level 0 is never loaded.
        """
        entry = self.entry(image_id)
        pixels = flip.pixels(self._global_source_pixels(image_id, size))
        channels, height, width = pixels.shape
        side = max(height, width)
        square = np.full((channels, side, side), entry.fill_value, pixels.dtype)
        square[:, :height, :width] = pixels
        # resized before grey becomes RGB: a third of the work for a grey image (this runs in
        # the read-ahead thread, beside the step's computation)
        resized = F.interpolate(
            to_unit(square).unsqueeze(0),
            size=(size, size),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
        return as_rgb(resized[0].clamp_(0.0, 1.0))

    def _global_source_pixels(self, image_id: str, size: int) -> np.ndarray:
        """All of the coarsest pyramid level (or the thumbnail) of ``image_id`` that is still at
        least ``size`` on its longest side. The choice is made once per image and size, and the
        pixels are read by whole chunks where the layout allows: zarr's pipeline (Python, in
        the read-ahead thread, beside the step) stays out of every later read."""
        key = (image_id, size)
        if key not in self._global_source:
            levels = self.entry(image_id).levels
            group = self.dataset.image_group(image_id)
            candidates: list[Any] = [group[str(level)] for level in range(levels)]
            if "thumbnail" in group:
                candidates.append(group["thumbnail"])
            chosen = candidates[0]
            for candidate in candidates:
                if max(candidate.shape[1:]) >= size and candidate.size < chosen.size:
                    chosen = candidate
            found = (chosen, DirectChunks.open(chosen))
            with self._lock:
                self._global_source[key] = found
        array, direct = self._global_source[key]
        _, height, width = array.shape
        whole = direct.read_region(0, 0, height, width) if direct is not None else None
        return whole if whole is not None else np.asarray(array[...])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)


def _padded_region(
    array: Any, direct: DirectChunks | None, y: int, x: int, height: int, width: int, fill: int
) -> np.ndarray:
    """(c, height, width) of ``array`` at (y, x), ``fill`` past the edges (fill may be -1 for
    labels: the result is then widened to int64 only where padding is needed)."""
    channels, full_h, full_w = array.shape
    y0, x0 = max(y, 0), max(x, 0)
    y1, x1 = min(y + height, full_h), min(x + width, full_w)
    dtype = array.dtype if fill >= 0 else np.int64
    if y1 <= y0 or x1 <= x0:  # wholly outside the image
        return np.full((channels, height, width), fill, dtype)
    inside = direct.read_region(y0, x0, y1 - y0, x1 - x0) if direct is not None else None
    if inside is None:
        inside = np.asarray(array[:, y0:y1, x0:x1])
    if inside.shape[1:] == (height, width):
        return inside
    out = np.full((channels, height, width), fill, dtype)
    out[:, y0 - y : y1 - y, x0 - x : x1 - x] = inside
    return out
