"""A store's metadata is untrusted input: a declared shape, data type or chunk grid that
disagrees with what the tiler recorded leaves that image out with one line naming the array
and the field, and nothing is sized from it (memory stays bounded)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hiresctl.data import labelled_images
from storage import Dataset
from tests.stores import make_store

HUGE = 1_000_000_000


def _store(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    images = {f"im{i}": rng.integers(0, 255, (96, 80, 3), dtype=np.uint8) for i in range(3)}
    labels = {"im0": ("0", "train"), "im1": ("1", "train"), "im2": ("0", "test")}
    return make_store(tmp_path, images, labels)


def _edit(path: Path, change: Any) -> None:
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def _set_shape(meta: dict[str, Any]) -> None:
    meta["shape"] = [3, HUGE, HUGE]


def _set_dtype(meta: dict[str, Any]) -> None:
    meta["data_type"] = "uint16"


def _set_chunks(meta: dict[str, Any]) -> None:
    """One-pixel chunks: a grid of a million chunks a reader would walk."""
    [sharding] = [c for c in meta["codecs"] if c["name"] == "sharding_indexed"]
    sharding["configuration"]["chunk_shape"] = [3, 1, 1]


@pytest.mark.parametrize(
    "change, field",
    [
        (_set_shape, "shape [3, 1000000000, 1000000000]"),
        (_set_dtype, "data type uint16"),
        (_set_chunks, "chunks [3, 1, 1]"),
    ],
)
def test_a_level_that_disagrees_with_the_record_leaves_its_image_out(
    tmp_path: Path, change: Any, field: str
) -> None:
    store = _store(tmp_path)
    _edit(store / "images" / "im1" / "0" / "zarr.json", change)
    dataset = Dataset(store)
    images, problems = labelled_images(dataset, "train", ["0", "1"])
    assert [im.image_id for im in images] == ["im0"]  # the other image still trains
    [line] = problems
    assert "images/im1/0/zarr.json: unreadable metadata" in line and field in line
    assert any(field in p for p in dataset.check("im1"))
    assert dataset.check("im0") == []


def test_image_attributes_beyond_bounds_or_the_manifest_are_refused(tmp_path: Path) -> None:
    store = _store(tmp_path)
    hostile = [3, HUGE, HUGE]
    _edit(
        store / "images/im1/zarr.json", lambda m: m["attributes"]["hiresctl"].update(shape=hostile)
    )
    moved = [3, 200, 80]
    _edit(store / "images/im0/zarr.json", lambda m: m["attributes"]["hiresctl"].update(shape=moved))
    dataset = Dataset(store)
    assert [e.id for e in dataset.entries()] == ["im2"]
    assert any("beyond what the tiler writes" in p for p in dataset.problems)
    assert any("differs from the store's manifest ([3, 96, 80])" in p for p in dataset.problems)


def _run_capped(command: list[str], limit: int) -> tuple[int, str]:
    """Run ``command`` with its address space capped at ``limit`` bytes: exit code, stderr."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    proc = subprocess.run(command, capture_output=True, text=True, preexec_fn=cap, timeout=300)
    return proc.returncode, proc.stderr


# Runs a module as ``python -m`` would and writes its process's peak resident set (VmHWM, KiB)
# on exit. Not ru_maxrss: Linux carries the parent's peak into a child's across fork and exec,
# so a child of a large test process would report the test process's peak.
_MEASURED = """
import atexit, runpy, sys
def report(path=sys.argv[1]):
    with open("/proc/self/status") as status:
        peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(path, "w") as out:
        out.write(peak)
atexit.register(report)
sys.argv = sys.argv[2:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def _run_measured(module: str, args: list[str], out: Path) -> tuple[int, str, int]:
    """Run ``python -m module args`` to its end: exit code, stderr and its own peak RSS in KiB."""
    peak_file = out / "peak.txt"
    command = [sys.executable, "-c", _MEASURED, str(peak_file), module, *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr, int(peak_file.read_text())


def test_info_check_on_a_hostile_shape_is_one_line_in_bounded_memory(tmp_path: Path) -> None:
    store = _store(tmp_path)
    _edit(store / "images" / "im1" / "0" / "zarr.json", _set_shape)
    code, err = _run_capped(
        [sys.executable, "-m", "hiresctl", "info", str(store), "--check"], limit=2 * 2**30
    )
    assert code == 1, err
    assert err.count("unreadable metadata") == 1 and "Traceback" not in err


def test_eval_on_a_hostile_store_leaves_the_image_out_in_bounded_memory(tmp_path: Path) -> None:
    store = _store(tmp_path)
    run = tmp_path / "run"
    trained = subprocess.run(
        [
            sys.executable,
            "-m",
            "hiresctl",
            "train",
            "--task",
            "cls",
            "--data",
            str(store),
            "--out",
            str(run),
            "--set",
            "epochs=1",
            "--set",
            "patch_size=32",
            "--set",
            "val_split=none",
        ],
        capture_output=True,
        text=True,
    )
    assert trained.returncode == 0, trained.stderr
    for image in ("im1", "im2"):
        _edit(store / "images" / image / "0" / "zarr.json", _set_shape)
    code, err, peak_kib = _run_measured(
        "hiresctl", ["eval", str(run), "--data", str(store), "--split", "train"], tmp_path
    )
    assert code == 1, err  # an input was left out
    assert "im1/0/zarr.json: unreadable metadata" in err
    assert "Traceback" not in err
    # the evaluation's own peak, in KiB: under 2 GiB, whatever the declared shape
    assert peak_kib < 2 * 2**20
    emptied = subprocess.run(
        [sys.executable, "-m", "hiresctl", "eval", str(run), "--data", str(store)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert emptied.returncode != 0
    assert "1 left out, first:" in emptied.stderr and "im2/0/zarr.json" in emptied.stderr
