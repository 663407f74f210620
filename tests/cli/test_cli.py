"""The command line as a user meets it: exit codes, one-line errors, JSON on stdout."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import tifffile
import zarr

from tests.conftest import coord_pixels


def test_version(cli) -> None:
    result = cli("--version")
    assert result.code == 0 and result.stdout.startswith("hiresctl 0.")


def test_synth_tile_info_pipeline(cli, tmp_path: Path) -> None:
    synth = cli(
        "synth", "ultramnist", tmp_path / "s", "--count", "4", "--size", "256", "--classes", "10"
    )
    assert synth.code == 0, synth.stderr
    tiled = cli(
        "tile",
        tmp_path / "s" / "images",
        "--labels",
        tmp_path / "s" / "labels.csv",
        "--out",
        tmp_path / "ds.zarr",
        "--json",
        "--chunk",
        "64",
    )
    assert tiled.code == 0, tiled.stderr
    lines = [json.loads(line) for line in tiled.stdout.splitlines()]
    assert [r["status"] for r in lines] == ["written"] * 4
    info = json.loads(cli("info", tmp_path / "ds.zarr", "--json").stdout)
    assert info["format_version"] == "1.1"
    rows = {r["id"]: r for r in info["images"]}
    csv_rows = (tmp_path / "s" / "labels.csv").read_text().splitlines()[1:]
    for line in csv_rows:
        source, label, split = line.split(",")
        row = rows[Path(source).stem]
        assert (row["label"], row["split"], row["status"]) == (label, split, "complete")
        assert row["group"] == f"images/{Path(source).stem}" and row["shape"] == [1, 256, 256]


def test_bad_inputs_exit_1_and_name_each_file(cli, tmp_path: Path) -> None:
    good = tmp_path / "good.tif"
    tifffile.imwrite(good, coord_pixels(64, 64))
    (tmp_path / "junk.tif").write_text("junk")
    result = cli(
        "tile", good, tmp_path / "junk.tif", tmp_path / "gone.svs", "--out", tmp_path / "ds.zarr"
    )
    assert result.code == 1
    assert "Traceback" not in result.stderr
    assert (
        f"{tmp_path / 'junk.tif'}: not a readable TIFF" in result.stderr.replace("\n", "")
        or "junk.tif" in result.stderr
    )
    assert "gone.svs: file not found" in result.stderr
    info = json.loads(cli("info", tmp_path / "ds.zarr", "--json").stdout)
    assert [r["id"] for r in info["images"]] == ["good"]


def test_usage_errors_exit_2(cli, tmp_path: Path) -> None:
    for args in (
        ["--chunk", "100"],
        ["--codec", "png"],
        ["--mpp", "0.5", "--mag", "20"],
        ["--workers", "0"],
    ):
        result = cli("tile", tmp_path / "x.tif", "--out", tmp_path / "ds.zarr", *args)
        assert result.code == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_info_on_missing_store_is_one_line(cli, tmp_path: Path) -> None:
    result = cli("info", tmp_path / "nothing.zarr")
    assert result.code == 1
    assert result.stderr.strip().count("\n") == 0 and "no dataset store here" in result.stderr


def test_sources_from_stdin(cli, tmp_path: Path, monkeypatch) -> None:
    import io
    import sys

    paths = []
    for i in range(2):
        p = tmp_path / f"s{i}.tif"
        tifffile.imwrite(p, np.full((32, 32), i, np.uint8))
        paths.append(str(p))
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(paths) + "\n"))
    result = cli("tile", "-", "--out", tmp_path / "ds.zarr", "--json", "--chunk", "16")
    assert result.code == 0, result.stderr
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == ["s0", "s1"]


def test_detection_from_synth_to_coco_metrics(cli, tmp_path: Path) -> None:
    synth = cli("synth", "det-mosaic", tmp_path / "s", "--count", "4", "--size", "256")
    assert synth.code == 0, synth.stderr
    tiled = cli(
        "tile",
        tmp_path / "s" / "images",
        "--coco",
        tmp_path / "s" / "annotations.json",
        "--labels",
        tmp_path / "s" / "labels.csv",
        "--out",
        tmp_path / "ds.zarr",
        "--chunk",
        "64",
    )
    assert tiled.code == 0, tiled.stderr
    run = tmp_path / "run"
    trained = cli(
        "train",
        "--task",
        "det",
        "--data",
        tmp_path / "ds.zarr",
        "--out",
        run,
        "--set",
        "backbone=tiny",
        "--set",
        "latent_dim=32",
        "--set",
        "head_convs=1",
        "--set",
        "patch_size=128",
        "--set",
        "epochs=1",
        "--json",
    )
    assert trained.code == 0, trained.stderr
    assert json.loads(trained.stdout)["task"] == "det"
    split = json.loads(cli("info", tmp_path / "ds.zarr", "--json").stdout)["images"][-1]["split"]
    result = cli("eval", run, "--data", tmp_path / "ds.zarr", "--split", split, "--json")
    assert result.code == 0, result.stderr
    metrics = json.loads(result.stdout)["metrics"]
    assert set(metrics) >= {"ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large"}
    assert (run / f"detections-{split}.json").is_file()


def test_bad_coco_file_is_one_line_and_exit_2(cli, tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "a.tif", coord_pixels(32, 32))
    (tmp_path / "ann.json").write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.tif"}],
                "categories": [{"id": 1, "name": "x"}],
                "annotations": [{"id": 5, "image_id": 2, "category_id": 1, "bbox": [0, 0, 1, 1]}],
            }
        )
    )
    result = cli(
        "tile", tmp_path / "a.tif", "--coco", tmp_path / "ann.json", "--out", tmp_path / "d"
    )
    assert result.code == 2
    assert "annotations[0] (id 5): image_id 2 is not in images" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists()


def test_a_second_writer_is_told_who_holds_the_store(cli, tmp_path: Path) -> None:
    from storage import Dataset
    from storage.lock import WriterLock

    tifffile.imwrite(tmp_path / "a.tif", coord_pixels(64, 64), photometric="rgb")
    store = tmp_path / "ds.zarr"
    with WriterLock(store):  # another `hiresctl tile` is writing this store
        busy = cli("tile", tmp_path / "a.tif", "--out", store)
        assert busy.code == 1, busy.stderr
        assert (
            "another writer is active" in busy.stderr
            and f"pid {__import__('os').getpid()}" in busy.stderr
        )
        assert "Traceback" not in busy.stderr and len(busy.stderr.strip().splitlines()) == 1
        assert not (store / "images").exists()  # nothing half-written
    done = cli("tile", tmp_path / "a.tif", "--out", store)  # released: the next writer takes it
    assert done.code == 0, done.stderr
    assert [e.id for e in Dataset(store).entries(complete_only=True)] == ["a"]
    # the lock adds nothing to the store: Zarr warns about any object outside its hierarchy
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        members = dict(zarr.open_group(store, mode="r").members(max_depth=None))
    assert "images/a" in members
