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


def test_many_inputs_a_line_each_in_a_log_then_one_summary_with_failures_by_reason(
    cli, tmp_path: Path, monkeypatch
) -> None:
    """Not on a terminal (a log, a pipe) every image is one line as it finishes, --json keeps
    one object per image on stdout, and the end is a summary that groups failures by reason with
    every failure in OUT.tile-failures.csv; a later clean run removes that list."""
    import csv

    import hiresctl.cli.data as data

    sources = []
    for i in range(12):
        path = tmp_path / f"good{i:02d}.tif"
        tifffile.imwrite(path, coord_pixels(48, 40 + i))
        sources.append(path)
    for i in range(4):
        (tmp_path / f"junk{i}.tif").write_text("not an image")
        sources.append(tmp_path / f"junk{i}.tif")
    (tmp_path / "empty.png").write_bytes(b"")
    sources.append(tmp_path / "empty.png")
    out = tmp_path / "ds.zarr"
    result = cli("tile", *sources, "--out", out, "--json")
    assert result.code == 1
    objects = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(objects) == 17 and {o["status"] for o in objects} == {"written", "failed"}
    lines = result.stderr.splitlines()
    per_image = [line for line in lines if line.startswith(("written ", "failed "))]
    assert len(per_image) == 17
    summary = lines[lines.index(per_image[-1]) + 1 :]
    assert summary[0].startswith(f"tiled 12 of 17 images into {out} in ")
    assert any(line.startswith("  4 × not a supported image format") for line in summary)
    assert any(line.startswith("  1 × empty file (0 bytes): empty.png") for line in summary)
    listed = out.with_name("ds.zarr.tile-failures.csv")
    assert summary[-1] == f"every failure: {listed}"
    with open(listed, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(Path(r["source"]).name for r in rows) == [
        "empty.png",
        "junk0.tif",
        "junk1.tif",
        "junk2.tif",
        "junk3.tif",
    ]
    again = cli("tile", *sources[:12], "--out", out)
    assert again.code == 0 and not listed.exists()
    assert "12 skipped" in again.stderr.splitlines()[-1]
    # a store over the listing threshold is summed up; --images lists it
    monkeypatch.setattr(data, "LISTED_IMAGES", 5)
    overview = cli("info", out).stdout
    assert "12 images, complete 12" in overview and "good03" not in overview
    assert "good03" in cli("info", out, "--images").stdout


def test_on_a_terminal_one_live_line_and_no_line_per_image() -> None:
    import io

    from rich.console import Console

    from hiresctl.cli.progress import ImagesDisplay

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120)
    with ImagesDisplay("tiled", 3, console) as display:
        display.image("written", "a.tif", "written a.tif → a")
        display.image("failed", "b.tif", "failed b.tif: broken", "broken")
        display.work(10, 20)
    assert "written a.tif" not in screen.getvalue()
    lines = display.summary("into ds.zarr")
    assert lines[0].startswith("tiled 1 of 3 images into ds.zarr in ")
    assert lines[1:] == ["1 failed, by reason:", "  1 × broken: b.tif"]
