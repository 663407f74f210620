"""Tiling writes exact, valid, resumable stores and isolates bad inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from storage.errors import StoreError, UsageError
from storage.inputs import split_for
from storage.pyramid import halve, level_shapes
from storage.store import Dataset
from storage.tiler import LabelTable, SourceSpec, TileOptions, tile
from tests.conftest import coord_pixels

SMALL = TileOptions(chunk=32, block_size=128, thumbnail_size=64)


def _tiff(path: Path, pixels: np.ndarray, **kwargs) -> Path:
    tifffile.imwrite(path, pixels, tile=(64, 64), compression="zlib", **kwargs)
    return path


def _mean2x2(planes: np.ndarray) -> np.ndarray:
    """The definition: each output pixel is the mean of its 2×2 source pixels, rounded half up,
    an odd size's last row/column standing in for the missing one."""
    c, h, w = planes.shape
    out = np.empty((c, (h + 1) // 2, (w + 1) // 2), planes.dtype)
    for y in range(out.shape[1]):
        for x in range(out.shape[2]):
            rows = [min(2 * y, h - 1), min(2 * y + 1, h - 1)]
            cols = [min(2 * x, w - 1), min(2 * x + 1, w - 1)]
            total = planes[:, rows][:, :, cols].astype(np.int64).sum(axis=(1, 2))
            out[:, y, x] = np.floor(total / 4 + 0.5)
    return out


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("channel_last", [True, False])
def test_halve_is_the_rounded_2x2_mean(dtype: str, channels: int, channel_last: bool) -> None:
    rng = np.random.default_rng(channels)
    top = np.iinfo(dtype).max
    for h, w in [(6, 8), (7, 9), (1, 1), (5, 2)]:
        pixels = rng.integers(0, top, (h, w, channels), endpoint=True).astype(dtype)
        pixels[0, 0] = top  # the widest sum must not overflow
        planes = pixels.transpose(2, 0, 1)
        block = planes if channel_last else np.ascontiguousarray(planes)
        got = halve(block)
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got, _mean2x2(planes), err_msg=f"{h}x{w}")


@pytest.mark.parametrize(
    ("layout", "channels", "dtype"),
    [
        ({"tile": (64, 64)}, 3, "uint8"),  # source tiles of 2×2 chunks: read tile by tile
        ({"tile": (32, 32)}, 3, "uint8"),  # one chunk per source tile
        ({"tile": (48, 48)}, 3, "uint8"),  # tiles that do not divide a chunk: whole blocks
        ({"rowsperstrip": 16}, 1, "uint16"),  # strips: whole blocks
    ],
)
def test_level0_is_pixel_identical_and_levels_are_exact_halvings(
    tmp_path: Path, layout: dict, channels: int, dtype: str
) -> None:
    pixels = coord_pixels(301, 467, channels, dtype)  # odd sizes: edge blocks and odd halvings
    src = tmp_path / "coord.tif"
    tifffile.imwrite(src, pixels, compression="zlib", **layout)
    [result] = tile([SourceSpec((str(src),))], tmp_path / "ds.zarr", SMALL)
    assert result.status == "written", result.error
    ds = Dataset(tmp_path / "ds.zarr")
    entry = ds.entry("coord")
    assert entry.complete and entry.shape == (channels, 301, 467)
    expected = pixels.reshape(301, 467, channels).transpose(2, 0, 1)
    shapes = level_shapes(301, 467, 64)
    assert entry.levels == len(shapes) == 4  # 467 → 234 → 117 → 59 ≤ 64
    for level, shape in enumerate(shapes):
        stored = ds.level("coord", level)
        assert stored.shape == (channels, *shape)
        np.testing.assert_array_equal(stored[...], expected, err_msg=f"level {level}")
        expected = _mean2x2(expected)
    assert ds.level("coord", 0).chunks == (channels, 32, 32)
    assert ds.level("coord", 0).shards == (channels, 128, 128)  # one shard per task footprint


def test_layouts_without_direct_writes_go_through_zarr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from storage import blocks

    monkeypatch.setattr(blocks, "_direct", lambda store, path: None)  # as for a remote store
    pixels = coord_pixels(150, 230)
    [result] = tile(
        [SourceSpec((str(_tiff(tmp_path / "c.tif", pixels)),))], tmp_path / "ds.zarr", SMALL
    )
    assert result.status == "written", result.error
    expected = pixels.transpose(2, 0, 1)
    for level, _shape in enumerate(level_shapes(150, 230, 64)):
        stored = Dataset(tmp_path / "ds.zarr").level("c", level)
        np.testing.assert_array_equal(stored[...], expected, err_msg=f"level {level}")
        expected = _mean2x2(expected)


def test_store_is_valid_ome_ngff_read_by_ome_zarr(tmp_path: Path) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    src = _tiff(tmp_path / "coord.tif", coord_pixels(300, 200))
    tile([SourceSpec((str(src),))], tmp_path / "ds.zarr", SMALL)
    group = zarr.open_group(tmp_path / "ds.zarr" / "images" / "coord", mode="r")
    ome = group.attrs["ome"]
    assert ome["version"] == "0.5"
    axes = ome["multiscales"][0]["axes"]
    assert [a["name"] for a in axes] == ["c", "y", "x"]
    nodes = list(Reader(parse_url(str(tmp_path / "ds.zarr" / "images" / "coord")))())
    image = nodes[0]
    assert len(image.data) == len(level_shapes(300, 200, 64))
    np.testing.assert_array_equal(
        np.asarray(image.data[0]), coord_pixels(300, 200).transpose(2, 0, 1)
    )
    scales = [d["coordinateTransformations"][0]["scale"] for d in ome["multiscales"][0]["datasets"]]
    assert scales[1] == [1.0, 2.0, 2.0]


def test_thumbnail_and_foreground_mask(tmp_path: Path) -> None:
    pixels = np.full((256, 512, 3), 240, np.uint8)  # white background
    pixels[64:192, 128:384] = (150, 60, 120)  # a coloured "tissue" block in the middle
    src = _tiff(tmp_path / "tissue.tif", pixels)
    tile([SourceSpec((str(src),))], tmp_path / "ds.zarr", SMALL)
    ds = Dataset(tmp_path / "ds.zarr")
    thumb = ds.thumbnail("tissue")
    assert thumb.shape == (3, 32, 64)
    mask = ds.foreground("tissue")[0]
    assert mask.shape == (32, 64)
    assert mask[8:24, 16:48].all() and not mask[:6].any() and not mask[:, :14].any()
    group = zarr.open_group(tmp_path / "ds.zarr" / "images" / "tissue", mode="r")
    assert group["foreground"].attrs["scale"] == [1.0, 8.0, 8.0]  # thumbnail pixels → level 0
    assert "labels" not in group  # a thumbnail-sized mask is not an NGFF label image


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_jpeg_codec_store_is_close_and_smaller(tmp_path: Path) -> None:
    from skimage.data import astronaut

    photo = astronaut()  # a real photograph: JPEG's use case
    src = _tiff(tmp_path / "rgb.tif", photo)
    for codec in ("jpeg", "zstd"):
        opts = TileOptions(chunk=64, block_size=256, thumbnail_size=64, codec=codec)
        [result] = tile([SourceSpec((str(src),))], tmp_path / f"{codec}.zarr", opts)
        assert result.status == "written", result.error
    stored = Dataset(tmp_path / "jpeg.zarr").level("rgb", 0)[...].astype(int)
    assert np.abs(stored - photo.transpose(2, 0, 1)).mean() < 4
    assert _du(tmp_path / "jpeg.zarr") < _du(tmp_path / "zstd.zarr") / 2


def test_jpeg_codec_refuses_16_bit(tmp_path: Path) -> None:
    src = _tiff(tmp_path / "g16.tif", coord_pixels(64, 64, 1, "uint16")[..., 0])
    [result] = tile(
        [SourceSpec((str(src),))],
        tmp_path / "ds.zarr",
        TileOptions(codec="jpeg", chunk=32, block_size=64),
    )
    assert result.status == "failed" and "8-bit" in (result.error or "")


def test_bad_inputs_fail_alone(tmp_path: Path) -> None:
    good = _tiff(tmp_path / "good.tif", coord_pixels(100, 100))
    empty = tmp_path / "empty.tif"
    empty.write_bytes(b"")
    cut = _tiff(tmp_path / "cut.tif", coord_pixels(200, 200))
    cut.write_bytes(cut.read_bytes()[:300])
    specs = [SourceSpec((str(p),)) for p in (empty, good, tmp_path / "missing.tif", cut)]
    results = tile(specs, tmp_path / "ds.zarr", SMALL)
    assert [r.status for r in results] == ["failed", "written", "failed", "failed"]
    assert "empty" in (results[0].error or "") and "not found" in (results[2].error or "")
    ds = Dataset(tmp_path / "ds.zarr")
    assert [e.id for e in ds.entries(complete_only=True)] == ["good"]
    assert "offsets are missing" in (results[3].error or "")


def test_labels_csv_and_missing_label(tmp_path: Path) -> None:
    a = _tiff(tmp_path / "a.tif", coord_pixels(64, 64))
    b = _tiff(tmp_path / "b.tif", coord_pixels(64, 64))
    csv = tmp_path / "labels.csv"
    csv.write_text("source,label,split\na.tif,tumor,test\n")
    results = tile(
        [SourceSpec((str(a),)), SourceSpec((str(b),))], tmp_path / "ds.zarr", SMALL, LabelTable(csv)
    )
    assert results[0].status == "written"
    assert results[1].status == "failed" and "no label" in (results[1].error or "")
    entry = Dataset(tmp_path / "ds.zarr").entry("a")
    assert (entry.label, entry.split) == ("tumor", "test")


def test_labels_csv_errors_are_usage_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("file,class\nx,1\n")
    with pytest.raises(UsageError, match="needs columns 'source' and 'label'"):
        LabelTable(bad)
    bad.write_text("source,label,split\nx,1,holdout\n")
    with pytest.raises(UsageError, match=r"bad\.csv:2: split 'holdout'"):
        LabelTable(bad)


def test_labels_csv_as_spreadsheets_write_it(tmp_path: Path) -> None:
    excel = tmp_path / "excel.csv"
    excel.write_bytes(b"\xef\xbb\xbfsource , label,split\r\na.tif,1,train\r\nb.tif , 0 ,val\r\n")
    table = LabelTable(excel)
    assert table.rows == {
        "a.tif": {"label": "1", "split": "train"},
        "b.tif": {"label": "0", "split": "val"},
    }
    same = tmp_path / "same.csv"
    same.write_text("source,label\na.tif,1\na.tif,1\n")
    assert LabelTable(same).rows == {"a.tif": {"label": "1", "split": ""}}
    conflict = tmp_path / "conflict.csv"
    conflict.write_text("source,label\na.tif,0\nb.tif,1\na.tif,1\n")
    with pytest.raises(
        UsageError,
        match=r"conflict\.csv:4: 'a\.tif' is listed twice.*line 2: label '0'.*line 4: label '1'",
    ):
        LabelTable(conflict)
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"source,label\nb\xe9.tif,1\n")
    with pytest.raises(UsageError, match="not UTF-8"):
        LabelTable(latin)


def test_rerun_skips_complete_images_and_retiles_changed_ones(tmp_path: Path) -> None:
    src = _tiff(tmp_path / "a.tif", coord_pixels(100, 100))
    out = tmp_path / "ds.zarr"
    assert tile([SourceSpec((str(src),))], out, SMALL)[0].status == "written"
    assert tile([SourceSpec((str(src),))], out, SMALL)[0].status == "skipped"
    assert (
        tile(
            [SourceSpec((str(src),))],
            out,
            TileOptions(chunk=32, block_size=128, thumbnail_size=64, overwrite=True),
        )[0].status
        == "written"
    )
    changed = coord_pixels(100, 100)[::-1].copy()
    _tiff(src, changed)
    assert tile([SourceSpec((str(src),))], out, SMALL)[0].status == "written"
    np.testing.assert_array_equal(Dataset(out).level("a", 0)[...], changed.transpose(2, 0, 1))


def test_resample_to_coarser_pixel_size(tmp_path: Path) -> None:
    pixels = coord_pixels(200, 160)
    src = _tiff(tmp_path / "a.tif", pixels, resolution=(40000, 40000), resolutionunit="CENTIMETER")
    opts = TileOptions(chunk=32, block_size=128, thumbnail_size=64, mpp=0.5)  # file: 0.25 µm
    [result] = tile([SourceSpec((str(src),))], tmp_path / "ds.zarr", opts)
    assert result.status == "written", result.error
    entry = Dataset(tmp_path / "ds.zarr").entry("a")
    assert entry.shape == (3, 100, 80) and entry.mpp == pytest.approx(0.5)
    expected = pixels.astype(float).reshape(100, 2, 80, 2, 3).mean(axis=(1, 3))
    stored = Dataset(tmp_path / "ds.zarr").level("a", 0)[...].transpose(1, 2, 0)
    assert np.abs(stored - expected).max() <= 0.5


def test_mpp_without_pixel_size_names_the_fix(tmp_path: Path) -> None:
    src = _tiff(tmp_path / "a.tif", coord_pixels(64, 64))
    [result] = tile(
        [SourceSpec((str(src),))],
        tmp_path / "ds.zarr",
        TileOptions(mpp=1.0, chunk=32, block_size=64),
    )
    assert result.status == "failed" and "--source-mpp" in (result.error or "")


def test_splits_are_stable_and_seeded() -> None:
    ids = [f"img{i}" for i in range(400)]
    splits = [split_for(i, 0, (0.7, 0.15, 0.15)) for i in ids]
    assert 0.6 < splits.count("train") / 400 < 0.8
    assert splits == [split_for(i, 0, (0.7, 0.15, 0.15)) for i in ids]
    assert splits != [split_for(i, 1, (0.7, 0.15, 0.15)) for i in ids]


def test_refuses_foreign_zarr_group(tmp_path: Path) -> None:
    zarr.open_group(tmp_path / "other.zarr", mode="w").create_array("x", shape=(2,), dtype="u1")
    src = _tiff(tmp_path / "a.tif", coord_pixels(64, 64))
    with pytest.raises(StoreError, match="not a hiresctl dataset"):
        tile([SourceSpec((str(src),))], tmp_path / "other.zarr", SMALL)


def test_resume_after_sigkill_redoes_only_missing_blocks(tmp_path: Path) -> None:
    pixels = coord_pixels(2048, 2048)
    src = _tiff(tmp_path / "big.tif", pixels)
    out = tmp_path / "ds.zarr"
    args = [
        sys.executable,
        "-m",
        "hiresctl",
        "tile",
        str(src),
        "--out",
        str(out),
        "--chunk",
        "32",
        "--block-size",
        "64",
        "--thumbnail-size",
        "64",
        "--workers",
        "1",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = out / "images" / "big" / "_progress_0"
    deadline = time.time() + 120
    while time.time() < deadline:
        done = len(list(progress.glob("c/*/*"))) if progress.exists() else 0
        if done >= 50:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 50 <= done < 32 * 32, "the kill must land mid-tiling"
    entry = Dataset(out).entry("big")
    assert entry.status == "incomplete"
    assert (
        "ome" not in zarr.open_group(out / "images" / "big", mode="r").attrs
    )  # not an NGFF image yet
    # what a kill during a shard's write leaves: its temporary file beside the shard
    stray = out / "images" / "big" / "0" / "c" / "0" / "0" / ".0.123.456.tmp"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"half a shard")
    rerun = subprocess.run([*args, "--json"], capture_output=True, text=True, check=True)
    result = json.loads(rerun.stdout.splitlines()[0])
    assert result["status"] == "resumed"
    assert not stray.exists()
    # chunk 32, block 64: each pass halves once, so every level but the last is a pass base
    shapes = level_shapes(2048, 2048, 64)
    total_blocks = sum((-(-h // 64)) * (-(-w // 64)) for h, w in shapes[:-1])
    assert result["blocks"] <= total_blocks - done
    ds = Dataset(out)
    assert ds.entry("big").complete
    np.testing.assert_array_equal(ds.level("big", 0)[...], pixels.transpose(2, 0, 1))
    np.testing.assert_array_equal(ds.level("big", 1)[...], halve(pixels.transpose(2, 0, 1)))


def test_dask_distributed_local_cluster(tmp_path: Path) -> None:
    from distributed import LocalCluster

    pixels = coord_pixels(300, 260)
    src = _tiff(tmp_path / "a.tif", pixels)
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tcp://127.0.0.1")
        opts = TileOptions(chunk=32, block_size=64, thumbnail_size=64, scheduler=address)
        [result] = tile([SourceSpec((str(src),))], tmp_path / "ds.zarr", opts)
    assert result.status == "written", result.error
    np.testing.assert_array_equal(
        Dataset(tmp_path / "ds.zarr").level("a", 0)[...], pixels.transpose(2, 0, 1)
    )


def test_storage_never_imports_torch() -> None:
    code = (
        "import sys, storage, storage.tiler, storage.synth, storage.readers, storage.store\n"
        "bad = [m for m in ('torch', 'hiresctl') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": os.getcwd()}
    )


def test_tasks_free_their_chunks_without_the_garbage_collector(tmp_path: Path) -> None:
    """Memory stays flat however many blocks an image has: a finished task's encoded chunks are
    freed at once, not left in reference cycles for a garbage collection that may not come."""
    import gc

    from storage import blocks

    src = _tiff(tmp_path / "coord.tif", coord_pixels(300, 400))
    gc.collect()
    gc.disable()
    try:
        [result] = tile([SourceSpec((str(src),))], tmp_path / "ds.zarr", SMALL)
        assert result.status == "written" and result.blocks and result.blocks > 4
        alive = [o for o in gc.get_objects() if type(o) is blocks._LevelSink]
    finally:
        gc.enable()
    assert alive == []


@pytest.mark.parametrize("seed", range(6))
def test_the_foreground_threshold_is_scikit_images_otsu(seed: int) -> None:
    """The tiler's own Otsu (it spares importing skimage.filters) picks scikit-image's bin."""
    from skimage.filters import threshold_otsu as theirs

    from storage.pyramid import threshold_otsu

    rng = np.random.default_rng(seed)
    values = [
        rng.random((64, 80)) * 255,
        np.concatenate([rng.normal(50, 10, 3000), rng.normal(200, 30, 1000)]),
        rng.integers(0, 3, (50, 50)),
        rng.random((300, 200)) ** 3 * 100,
    ]
    for image in values:
        image = image.astype(np.float32)
        assert threshold_otsu(image) == theirs(image)
