"""What the benchmark scripts share: running the CLI, the inputs they build, and publishing a
table as a section of BENCHMARKS.md. Imported by the scripts beside it (``python
benchmarks/X.py`` puts this folder first on ``sys.path``); it imports none of them."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"  # inputs, stores and runs (ignored by git)
BENCHMARKS_MD = HERE.parent / "BENCHMARKS.md"


def hiresctl(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m hiresctl ARGS`` in a child process; its output captured, a failure raised
    with the end of its stderr."""
    proc = subprocess.run([sys.executable, "-m", "hiresctl", *args], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"hiresctl {' '.join(args[:2])}: {proc.stderr[-2000:]}")
    return proc


def synth_store(
    root: Path, kind: str, count: int, side: int, seed: int, synth: list[str], tile: list[str]
) -> Path:
    """``root/ds.zarr`` of ``count`` images of ``hiresctl synth KIND`` (into ``root/synth``,
    with the ``synth`` options) tiled with the ``tile`` options (``{synth}`` in one stands for
    the synth folder); made once, then reused (an interrupted tiling is resumed)."""
    store, folder = root / "ds.zarr", root / "synth"
    done = root / "ds.tiled"  # written once `tile` finished without an error
    if not done.exists():
        if not (folder / "synth.json").exists():
            size = ["--count", str(count), "--size", str(side), "--seed", str(seed)]
            hiresctl("synth", kind, str(folder), *size, *synth)
        labels = ["--labels", str(folder / "labels.csv")]
        extra = [part.replace("{synth}", str(folder)) for part in tile]
        hiresctl("tile", str(folder / "images"), *labels, *extra, "--out", str(store))
        done.touch()
    return store


def child_json(code: str, *args: str) -> dict:
    """Run ``python -c code args`` in a fresh process (so its peak memory is its own) and return
    the JSON object its last output line prints; a failure raised with the end of its stderr."""
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args[:2])}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def all_in_training(synth: Path) -> Path:
    """A copy of a synth folder's labels.csv with every image in the training split (for
    benchmarks that time or measure training steps alone)."""
    rows = list(csv.DictReader((synth / "labels.csv").open()))
    labels = synth / "labels_train.csv"
    with labels.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["source", "label", "split"])
        writer.writeheader()
        writer.writerows(
            {"source": r["source"], "label": r["label"], "split": "train"} for r in rows
        )
    return labels


def sparse_store(path: Path, sides: list[int]) -> Path:
    """A store of one image per side in which only a 512² corner is written (the rest is the
    fill value): any size costs seconds to write, and reads still go chunk by chunk."""
    import zarr

    from storage import FORMAT_VERSION

    if path.exists():
        return path
    root = zarr.open_group(str(path), mode="w")
    root.attrs["hiresctl"] = {"kind": "dataset", "format_version": FORMAT_VERSION}
    images = root.create_group("images")
    rng = np.random.default_rng(0)
    for side in sides:
        group = images.create_group(f"side{side}")
        level, size = 0, side
        while True:
            array = group.create_array(
                str(level),
                shape=(3, size, size),
                chunks=(3, 256, 256),
                dtype="uint8",
                fill_value=245,
            )
            array[:, :512, :512] = rng.integers(
                0, 255, (3, min(512, size), min(512, size)), dtype=np.uint8
            )
            if size <= 1024:
                break
            level, size = level + 1, size // 2
        thumb = group.create_array(
            "thumbnail", shape=(3, 1024, 1024), chunks=(3, 256, 256), dtype="uint8", fill_value=245
        )
        thumb[:, :64, :64] = 30
        group.create_array(
            "foreground", shape=(1, 1024, 1024), chunks=(1, 256, 256), dtype="uint8", fill_value=1
        )
        group.attrs["hiresctl"] = {
            "status": "complete",
            "shape": [3, side, side],
            "levels": level + 1,
            "label": "1",
            "split": "train",
            "fill_value": 245,
            "dtype": "|u1",
            "tiling": {"chunk": 256},
        }
    return path


def write_section(text: str, name: str) -> None:
    """Replace the ``name`` section of BENCHMARKS.md (between its markers) with ``text``; the
    reading written under the old table (its lines starting "Reading it") stays, unless
    ``text`` brings its own."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    current = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    if start in current and end in current:
        head, rest = current.split(start, 1)
        old, tail = rest.split(end, 1)
        reading = [line for line in old.splitlines() if line.startswith("Reading it")]
        if reading and not any(line.startswith("Reading it") for line in text.splitlines()):
            # paragraphs of their own: a line right under a table would render as its row
            text = text.rstrip() + "\n\n" + "\n\n".join(reading)
        block = f"{start}\n{text.rstrip()}\n{end}\n"
        current = head + block + tail.lstrip("\n")
    else:
        current = current.rstrip() + "\n\n" + f"{start}\n{text.rstrip()}\n{end}\n"
    BENCHMARKS_MD.write_text(current)


def publish(lines: list[str], name: str) -> None:
    """Print a table and make it the ``name`` section of BENCHMARKS.md."""
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    write_section(text, name)
