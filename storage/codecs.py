"""The JPEG chunk codec of the store (Zarr v3 array→bytes codec ``hiresctl.jpeg``).

Two uses, for 8-bit gray or RGB sources that were JPEG already (storing such a slide
losslessly makes it 5-10x larger for no gain): ``--codec jpeg`` encodes each chunk ``(c, y, x)``
as one baseline JPEG (libjpeg-turbo through imagecodecs); pass-through (``storage.passthrough``)
stores the source's own JPEG tiles as chunks, unchanged but for the tables merged in, and
decodes them exactly as the source's reader does (``colorspace``: the colour space of the JPEG
data where it is not the decoder's default, e.g. ``"RGB"`` for Aperio's tiles).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import imagecodecs
import numpy as np
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.buffer import Buffer, NDBuffer
from zarr.registry import register_codec

if TYPE_CHECKING:
    from zarr.core.array_spec import ArraySpec

__all__ = ["JPEG_CODEC_NAME", "JpegCodec", "decode_jpeg_chunk", "encode_jpeg_chunk"]

JPEG_CODEC_NAME = "hiresctl.jpeg"


def decode_jpeg_chunk(
    data: bytes, shape: tuple[int, ...], colorspace: str | None = None
) -> np.ndarray:
    """One stored JPEG chunk → its (c, y, x) uint8 array (a view on the decoded (y, x, c) pixels:
    callers that stack or convert patches copy anyway, so no copy is made here). ``colorspace``:
    the JPEG data's colour space where it is not libjpeg's guess (decoded to RGB unchanged)."""
    if colorspace is None:
        pixels = imagecodecs.jpeg8_decode(data)
    else:
        pixels = imagecodecs.jpeg8_decode(data, colorspace=colorspace, outcolorspace=colorspace)
    chw = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return chw if chw.shape == tuple(shape) else np.ascontiguousarray(chw).reshape(shape)


def encode_jpeg_chunk(chw: np.ndarray, quality: int, colorspace: str | None = None) -> bytes:
    """One (c, y, x) uint8 chunk, c in {1, 3} → a baseline JPEG. An array whose chunks are
    copied in another colour space (``colorspace``) takes no encoded ones: they would decode
    wrongly."""
    if colorspace is not None:
        raise ValueError(
            f"{JPEG_CODEC_NAME}: this array's chunks are copied JPEG data in colour space "
            f"{colorspace}; writing pixels into it is not supported"
        )
    hwc = chw[0] if chw.shape[0] == 1 else np.ascontiguousarray(chw.transpose(1, 2, 0))
    return bytes(imagecodecs.jpeg8_encode(hwc, level=quality))


@dataclass(frozen=True)
class JpegCodec(ArrayBytesCodec):
    """JPEG-encode each (c, y, x) uint8 chunk, c in {1, 3}."""

    is_fixed_size = False
    quality: int = 90
    colorspace: str | None = None  # the JPEG data's colour space, where not libjpeg's guess

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JpegCodec:
        configuration = data.get("configuration", {})
        colorspace = configuration.get("colorspace")
        return cls(
            quality=int(configuration.get("quality", 90)),
            colorspace=None if colorspace is None else str(colorspace),
        )

    def to_dict(self) -> dict[str, Any]:
        configuration: dict[str, Any] = {"quality": self.quality}
        if self.colorspace is not None:
            configuration["colorspace"] = self.colorspace
        return {"name": JPEG_CODEC_NAME, "configuration": configuration}

    # zarr runs codecs on its one event-loop thread; the (GIL-releasing) JPEG work goes to a
    # worker thread, as zarr's own compressors do, so tasks on several threads run in parallel.

    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        chunk: Any = np.ascontiguousarray(
            decode_jpeg_chunk(chunk_bytes.to_bytes(), chunk_spec.shape, self.colorspace)
        )
        return chunk_spec.prototype.nd_buffer.from_ndarray_like(chunk)

    def _encode_sync(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        encoded = encode_jpeg_chunk(chunk_array.as_numpy_array(), self.quality, self.colorspace)
        return chunk_spec.prototype.buffer.from_bytes(encoded)

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        return await asyncio.to_thread(self._decode_sync, chunk_bytes, chunk_spec)

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        return await asyncio.to_thread(self._encode_sync, chunk_array, chunk_spec)

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: ArraySpec) -> int:
        raise NotImplementedError  # variable size


register_codec(JPEG_CODEC_NAME, JpegCodec)
