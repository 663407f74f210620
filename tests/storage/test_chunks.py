"""Direct chunk reads return exactly what zarr returns, for every layout the tiler writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from storage import Dataset
from storage.chunks import DirectChunks
from storage.tiler import SourceSpec, TileOptions, tile
from tests.conftest import coord_pixels


@pytest.mark.parametrize("codec", ["zstd", "jpeg"])
def test_direct_reads_equal_zarr_reads(tmp_path: Path, codec: str) -> None:
    import tifffile

    source = tmp_path / "a.tif"
    tifffile.imwrite(source, coord_pixels(1000, 1300), photometric="rgb")
    out = tmp_path / "ds.zarr"
    # block 512 → level 0 sharded (512² shards of 128² chunks), deeper levels unsharded
    tile(
        [SourceSpec((str(source),))],
        out,
        TileOptions(chunk=128, block_size=512, codec=codec, workers=1),
    )
    ds = Dataset(out)
    image = ds.image_ids()[0]
    for level in range(2):
        array = ds.level(image, level)
        direct = DirectChunks.open(array)
        assert direct is not None
        _, height, width = array.shape
        for y in range(0, height - 127, 128):
            for x in range(0, width - 127, 128):
                got = direct.read_region(y, x, 128, 128)
                assert got is not None and np.array_equal(
                    got, array[:, y : y + 128, x : x + 128]
                ), (level, y, x)
        two = direct.read_region(128, 256, 256, 256)
        assert two is not None and np.array_equal(two, array[:, 128:384, 256:512])
        # unaligned and smaller than a chunk: assembled from the chunks it touches
        for y, x, size in [(5, 0, 128), (100, 77, 50), (130, 250, 300)]:
            got = direct.read_region(y, x, size, size)
            assert got is not None and np.array_equal(got, array[:, y : y + size, x : x + size])
        # past the edge: not for the direct path (the caller pads with the fill value)
        assert direct.read_region(height - 100, 0, 128, 128) is None


def test_unwritten_chunks_read_as_fill(tmp_path: Path) -> None:
    array = zarr.create_array(
        str(tmp_path / "a.zarr"), shape=(3, 512, 512), chunks=(3, 128, 128), shards=(3, 256, 256),
        dtype="uint8", fill_value=7,
    )  # fmt: skip
    array[:, :128, :128] = 1
    direct = DirectChunks.open(array)
    assert direct is not None
    assert (direct.read_region(0, 0, 128, 128) == 1).all()
    assert (direct.read_region(0, 128, 128, 128) == 7).all()  # same shard, missing chunk
    assert (direct.read_region(256, 256, 256, 256) == 7).all()  # shard file never written


def test_unknown_layouts_fall_back(tmp_path: Path) -> None:
    array = zarr.create_array(
        str(tmp_path / "b.zarr"), shape=(3, 64, 64), chunks=(3, 32, 32), dtype="uint8",
        compressors=[zarr.codecs.BloscCodec()],
    )  # fmt: skip
    assert DirectChunks.open(array) is None
