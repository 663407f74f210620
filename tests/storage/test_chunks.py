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
        str(tmp_path / "a.zarr"),
        shape=(3, 512, 512),
        chunks=(3, 128, 128),
        shards=(3, 256, 256),
        dtype="uint8",
        fill_value=7,
    )
    array[:, :128, :128] = 1
    direct = DirectChunks.open(array)
    assert direct is not None
    assert (direct.read_region(0, 0, 128, 128) == 1).all()
    assert (direct.read_region(0, 128, 128, 128) == 7).all()  # same shard, missing chunk
    assert (direct.read_region(256, 256, 256, 256) == 7).all()  # shard file never written


def test_unknown_layouts_fall_back(tmp_path: Path) -> None:
    array = zarr.create_array(
        str(tmp_path / "b.zarr"),
        shape=(3, 64, 64),
        chunks=(3, 32, 32),
        dtype="uint8",
        compressors=[zarr.codecs.BloscCodec()],
    )
    assert DirectChunks.open(array) is None


@pytest.mark.parametrize("codec", ["zstd", "jpeg"])
def test_whole_shard_writes_read_back_through_zarr(tmp_path: Path, codec: str) -> None:
    from storage.codecs import JpegCodec

    codecs = (
        {"serializer": JpegCodec(quality=95), "compressors": None}
        if codec == "jpeg"
        else {"compressors": [zarr.codecs.ZstdCodec(level=3)]}
    )
    layout = {"chunks": (3, 64, 64), "shards": (3, 128, 128), "fill_value": 9, **codecs}
    array, through_zarr = (
        zarr.create_array(str(tmp_path / name), shape=(3, 200, 300), dtype="uint8", **layout)
        for name in ("a.zarr", "b.zarr")
    )
    direct = DirectChunks.open(array)
    assert direct is not None and direct.object_shape == (3, 128, 128)
    pixels = coord_pixels(200, 300).transpose(2, 0, 1)
    pixels[:, :64, 64:128] = 9  # one chunk all fill: not stored
    for sy in range(2):
        for sx in range(3):
            encoded = {}
            for row in (2 * sy, 2 * sy + 1):
                for col in (2 * sx, 2 * sx + 1):
                    part = np.full((3, 64, 64), 0, np.uint8)  # past the edge: not stored
                    inside = pixels[:, row * 64 : row * 64 + 64, col * 64 : col * 64 + 64]
                    part[:, : inside.shape[1], : inside.shape[2]] = inside
                    data = direct.encode_chunk(part, inside.shape[1], inside.shape[2])
                    if data is not None:
                        encoded[(row, col)] = data
            direct.write_object((sy, sx), encoded)
    assert direct.encode_chunk(np.full((3, 64, 64), 9, np.uint8), 64, 64) is None
    edge = np.full((3, 64, 64), 9, np.uint8)
    edge[:, 40:] = 0  # past the array's edge: not part of the chunk's content
    assert direct.encode_chunk(edge, 40, 64) is None
    through_zarr[...] = pixels
    back = zarr.open_array(str(tmp_path / "a.zarr"), mode="r")[...]
    np.testing.assert_array_equal(back, through_zarr[...])  # what zarr's own writes decode to
    if codec == "zstd":
        np.testing.assert_array_equal(back, pixels)
    with pytest.raises(ValueError, match="not in shard"):
        direct.write_object((0, 0), {(5, 5): b""})
    # the all-fill chunk has no bytes in its shard's index; the shard's file was written whole
    index = direct._index((0, 0, 0))
    assert index is not None and int(index[1, 0]) == 2**64 - 1  # (row 0, col 1) of shard (0, 0)
    assert not list((tmp_path / "a.zarr").rglob("*.tmp"))
    # an object with no chunks left is removed, and reads as fill
    direct.write_object((1, 2), {})
    assert (zarr.open_array(str(tmp_path / "a.zarr"), mode="r")[:, 128:, 256:] == 9).all()


@pytest.mark.parametrize("damage", ["truncated", "short", "overwritten"])
def test_a_damaged_shard_is_named_before_anything_is_sized_by_it(
    tmp_path: Path, damage: str
) -> None:
    import tifffile

    from storage import StoreError

    source = tmp_path / "a.tif"
    tifffile.imwrite(source, coord_pixels(512, 512), photometric="rgb")
    out = tmp_path / "ds.zarr"
    tile([SourceSpec((str(source),))], out, TileOptions(chunk=128, block_size=512, workers=1))
    array = Dataset(out).level("a", 0)
    shard = next(p for p in (out / "images" / "a" / "0" / "c").rglob("*") if p.is_file())
    data = shard.read_bytes()
    if damage == "truncated":  # cut mid-file: the trailing bytes are no longer the index
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "short":  # shorter than the index itself
        shard.write_bytes(data[:10])
    else:  # the index overwritten with offsets far past the file (would size a huge read)
        count = 16 * 16 + 4
        bogus = np.full((16, 2), 2**62, "<u8").tobytes()
        shard.write_bytes(data[: len(data) - count] + bogus + data[-4:])
    direct = DirectChunks.open(array)
    assert direct is not None
    with pytest.raises(StoreError, match=r"images/a/0/c/.*damaged shard") as raised:
        direct.read_region(0, 0, 128, 128)
    assert "\n" not in str(raised.value)
    # `hiresctl info --check` finds it without reading pixels, and so does Dataset.check
    assert [p for p in Dataset(out).check("a") if "damaged shard" in p and "/0/c/" in p]


def test_the_store_records_which_shards_it_wrote(tmp_path: Path) -> None:
    """An all-fill shard is never written, so only the tiler's record tells a shard deleted later
    from one that was never there: the deleted one is named, the never-written one is not."""
    import tifffile

    from storage import StoreError

    pixels = np.zeros((512, 512, 3), np.uint8)  # fill (0) except the top-left shard's area
    pixels[:200, :200] = coord_pixels(200, 200)
    tifffile.imwrite(tmp_path / "a.tif", pixels, photometric="rgb")
    out = tmp_path / "ds.zarr"
    tile(
        [SourceSpec((str(tmp_path / "a.tif"),))],
        out,
        TileOptions(chunk=128, block_size=256, workers=1),
    )
    shards = sorted(p for p in (out / "images" / "a" / "0" / "c").rglob("*") if p.is_file())
    assert len(shards) == 1  # three of the four 256² shards are all fill: not written
    assert Dataset(out).check("a") == []
    np.testing.assert_array_equal(Dataset(out).level("a", 0)[:, 300:, 300:], 0)
    shards[0].unlink()
    with pytest.raises(
        StoreError, match=r"images/a/0: 1 of 1 stored shards are missing \(c/0/0/0\)"
    ):
        Dataset(out).level("a", 0)
    assert [p for p in Dataset(out).check("a") if "/0: 1 of 1 stored shards" in p]


def test_caches_are_bounded_for_the_process_not_per_array(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A training epoch opens every image of the store: what readers keep (decoded chunks,
    open shard files) is capped over all of them together, and reads stay exact."""
    import threading

    from storage import chunks

    cache = chunks._DecodedChunks(3 * 3 * 128 * 128)  # three 128² RGB chunks
    monkeypatch.setattr(chunks, "_DECODED", cache)
    monkeypatch.setattr(chunks, "_OPEN", threading.Semaphore(2))
    arrays, readers = [], []
    for i in range(4):
        array = zarr.create_array(
            str(tmp_path / f"{i}.zarr"),
            shape=(3, 256, 256),
            chunks=(3, 128, 128),
            shards=(3, 128, 128),
            dtype="uint8",
        )
        array[...] = np.random.default_rng(i).integers(0, 255, (3, 256, 256), dtype=np.uint8)
        direct = DirectChunks.open(array)
        assert direct is not None
        arrays.append(array)
        readers.append(direct)
    for array, direct in zip(arrays, readers, strict=True):
        for y, x in [(10, 20), (140, 30), (5, 150), (130, 130)]:  # sub-chunk: through the cache
            got = direct.read_region(y, x, 100, 100)
            assert got is not None and np.array_equal(got, array[:, y : y + 100, x : x + 100])
        assert cache.nbytes <= cache.capacity
    held = sum(len(r._fds) for r in readers)
    assert held == 2  # 16 shards read, two files kept open across all four arrays
    for direct in readers:
        direct.close()
    assert sum(len(r._fds) for r in readers) == 0 and cache.nbytes == 0
    assert chunks._OPEN.acquire(blocking=False) and chunks._OPEN.acquire(blocking=False)
