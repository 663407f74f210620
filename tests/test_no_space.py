"""A full disk mid-write: one line naming what was being written, exit 1, what finished kept and
marked so, and the same command resumes once there is space. The destinations are real small
filesystems (tmpfs mounts), so the writers meet the kernel's own ENOSPC."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile

from storage import Dataset


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """``mount(kib)`` → a folder on a tmpfs of that many KiB; ``mount(kib)`` again resizes it
    (what freeing space does). Skipped where this process may not mount (not root)."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = [False]

    def mount(kib: int) -> Path:
        options = f"size={kib}k" + (",remount" if mounted[0] else "")
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            pytest.skip(f"cannot mount a small filesystem here: {proc.stderr.strip()}")
        mounted[0] = True
        return folder

    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    yield mount
    if mounted[0]:
        subprocess.run(["umount", str(folder)], capture_output=True)


def _hiresctl(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hiresctl", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
    )


def _sources(folder: Path, count: int, side: int = 256) -> Path:
    """``count`` incompressible ``side``² RGB images (256²: about 200 KB each in any store) and
    labels."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    rows = ["source,label,split"]
    for i in range(count):
        tifffile.imwrite(
            folder / "images" / f"im{i:03d}.tif",
            rng.integers(0, 255, (side, side, 3), dtype=np.uint8),
            photometric="rgb",
        )
        rows.append(f"im{i:03d}.tif,{i % 2},{'train' if i < count - 2 else 'val'}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


def _one_line_error(proc: subprocess.CompletedProcess[str], names: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    [line] = [li for li in proc.stderr.splitlines() if li.startswith("error:")]
    assert "no space left on the device (errno 28)" in line and names in line, line


def test_tile_stops_at_a_full_disk_and_resumes_what_was_left(
    tmp_path: Path, small_fs: Callable[[int], Path]
) -> None:
    src = _sources(tmp_path / "src", 12)
    store = small_fs(1024) / "ds.zarr"
    full = _hiresctl("tile", src / "images", "--labels", src / "labels.csv", "--out", store)
    _one_line_error(full, "ds.zarr")
    assert "run the same command again to resume" in full.stderr
    dataset = Dataset(store)
    complete = [e.id for e in dataset.entries() if e.complete]
    for image_id in complete:  # what is marked complete is complete
        assert dataset.check(image_id) == []
    small_fs(8192)  # space freed
    resumed = _hiresctl(
        "tile", src / "images", "--labels", src / "labels.csv", "--out", store, "--json"
    )
    assert resumed.returncode == 0, resumed.stderr
    rows = [json.loads(line) for line in resumed.stdout.splitlines()]
    blocks = sum(r.get("blocks", 0) for r in rows)
    assert 0 < blocks < 12  # the blocks written before the disk filled are not done again
    dataset = Dataset(store)
    assert all(e.complete for e in dataset.entries()) and len(dataset.entries()) == 12
    assert all(dataset.check(e.id) == [] for e in dataset.entries())


def test_a_full_disk_at_checkpoint_embed_predict_and_report_is_one_line(
    tmp_path: Path, small_fs: Callable[[int], Path]
) -> None:
    src = _sources(tmp_path / "src", 8)
    store = tmp_path / "ds.zarr"
    tiled = _hiresctl("tile", src / "images", "--labels", src / "labels.csv", "--out", store)
    assert tiled.returncode == 0, tiled.stderr
    small = small_fs(64)
    train = [
        "train",
        "--task",
        "cls",
        "--data",
        store,
        "--set",
        "epochs=1",
        "--set",
        "patch_size=64",
        "--set",
        "backbone=tiny",
    ]
    checkpoint = _hiresctl(*train, "--out", small / "run")
    _one_line_error(checkpoint, "checkpoints/last.pt")
    assert not list((small / "run" / "checkpoints").glob(".*tmp*"))  # no half-written file
    run = tmp_path / "run"
    assert _hiresctl(*train, "--out", run).returncode == 0
    predicted = _hiresctl("predict", run, store, "--out", small / "pred")
    _one_line_error(predicted, "pred")
    report = _hiresctl(
        "eval", run, "--data", store, "--split", "val", "--report", "--out", small / "report"
    )
    _one_line_error(report, "report.html")
    assert not (small / "report" / "report.html").exists()  # nothing that looks finished
    # embed writes into the store itself: on a disk that fills, then grows
    copy = small_fs(4096) / "ds.zarr"
    subprocess.run(["cp", "-r", str(store), str(copy)], check=True)
    used = sum(p.stat().st_size for p in copy.rglob("*") if p.is_file())
    small_fs(used // 1024 + 300)
    embed = ["embed", copy, "--backbone", "resnet18", "--patch-size", "64", "--json"]
    full = _hiresctl(*embed)
    _one_line_error(full, "features")
    small_fs(65536)
    resumed = _hiresctl(*embed)
    assert resumed.returncode == 0, resumed.stderr
    statuses = [json.loads(line)["status"] for line in resumed.stdout.splitlines()]
    assert "skipped" in statuses and "written" in statuses  # the finished ones are kept


def test_writes_that_failed_beside_the_reported_one_print_no_traceback() -> None:
    """A full disk fails several of zarr's concurrent chunk writes; the first is the command's
    one line, the others must not follow it as asyncio's "never retrieved" tracebacks."""
    import errno
    import logging

    from hiresctl.cli.app import FullDiskEchoes

    def record(message: str, exc: BaseException) -> logging.LogRecord:
        return logging.LogRecord(
            "asyncio", logging.ERROR, __file__, 1, message, None, (type(exc), exc, None)
        )

    full = OSError(errno.ENOSPC, "No space left on device")
    echoes = FullDiskEchoes()
    assert not echoes.filter(record("Task exception was never retrieved", full))
    assert not echoes.filter(record("Future exception was never retrieved", full))
    assert echoes.filter(record("Exception in callback", full))
    # a write racing the failed one to the same key: an echo once the disk was found full
    raced = FileExistsError(errno.EEXIST, "File exists", "zarr.json")
    fresh = FullDiskEchoes()
    assert fresh.filter(record("Task exception was never retrieved", ValueError("a bug")))
    assert fresh.filter(record("Task exception was never retrieved", raced))
    assert not echoes.filter(record("Task exception was never retrieved", raced))
    fresh.reported = True  # the command reported the full disk (hiresctl.cli.app.main)
    assert not fresh.filter(record("Future exception was never retrieved", raced))


# ------------------------------------------------------------------- the open-file limit


def _tile_with_open_files(limit: int, src: Path, store: Path) -> subprocess.CompletedProcess[str]:
    """``hiresctl tile`` in a process that may have ``limit`` files open at once."""

    def lower() -> None:
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
        )

    return subprocess.run(
        [
            sys.executable,
            "-m",
            "hiresctl",
            "tile",
            str(src / "images"),
            "--labels",
            str(src / "labels.csv"),
            "--out",
            str(store),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=lower,
    )


def test_tiling_many_files_keeps_few_open(tmp_path: Path) -> None:
    """Sources are opened as their blocks need them and closed again: 150 files tile in a
    process that may hold 24 open (one open source per file would need hundreds)."""
    src = _sources(tmp_path / "src", 150, side=16)
    proc = _tile_with_open_files(24, src, tmp_path / "ds.zarr")
    assert proc.returncode == 0, proc.stderr[-2000:]
    entries = Dataset(tmp_path / "ds.zarr").entries()
    assert len(entries) == 150 and all(e.complete for e in entries)


def test_too_few_open_files_is_one_line_and_the_same_command_resumes(tmp_path: Path) -> None:
    src = _sources(tmp_path / "src", 20, side=16)
    store = tmp_path / "ds.zarr"
    stopped = _tile_with_open_files(8, src, store)
    assert stopped.returncode == 1, stopped.stderr
    assert "Traceback" not in stopped.stderr
    [line] = [li for li in stopped.stderr.splitlines() if li.startswith("error:")]
    assert "too many open files (this process may open 8;" in line and "(errno 24)" in line, line
    assert not [li for li in stopped.stdout.splitlines() if li.startswith("failed")]
    resumed = _tile_with_open_files(1024, src, store)
    assert resumed.returncode == 0, resumed.stderr
    entries = Dataset(store).entries()
    assert len(entries) == 20 and all(e.complete for e in entries)
