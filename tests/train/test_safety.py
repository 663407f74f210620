"""Files people download and share never run code: checkpoints and weights load weights-only."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from hiresctl.models import create_backbone
from storage import UsageError
from tests.stores import make_store, planted_images

TINY = [
    "--set",
    "backbone=tiny",
    "--set",
    "patch_size=32",
    "--set",
    "latent_dim=16",
    "--set",
    "head_width=16",
    "--set",
    "epochs=1",
]


class Payload:
    """Unpickling this runs ``touch MARKER``: what a hostile checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path) -> None:
    """Replace a checkpoint by one that keeps its keys but carries the payload."""
    state = torch.load(path, weights_only=True)
    state["best"] = Payload(marker)
    torch.save(state, path)


def train_tiny(root: Path, cli: Callable) -> tuple[Path, Path]:
    images, labels = planted_images(
        8, 64, 32, seed=2, split_of=lambda i: "val" if i >= 6 else "train"
    )
    store = make_store(root / "data", images, labels)
    result = cli("train", "--data", store, "--out", root / "run", *TINY)
    assert result.code == 0, result.stderr
    return store, root / "run"


@pytest.mark.parametrize("command", ["resume", "eval", "predict"])
def test_a_payload_checkpoint_is_refused_and_runs_nothing(
    tmp_path: Path, cli: Callable, command: str
) -> None:
    store, run = train_tiny(tmp_path, cli)
    for name in ("last.pt", "best.pt"):
        plant(run / "checkpoints" / name, tmp_path / "ran")
    args = {
        "resume": ["train", "--data", store, "--out", run, "--resume", *TINY[:2]],
        "eval": ["eval", run, "--data", store, "--split", "val"],
        "predict": ["predict", run, store, "--out", tmp_path / "pred", "--split", "val"],
    }[command]
    result = cli(*args)
    assert not (tmp_path / "ran").exists(), "loading the checkpoint ran its payload"
    assert result.code in (1, 2), result.stderr
    assert "Traceback" not in result.stderr and "weights_only" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "refused" in line]
    assert lines and ".pt" in lines[0] and "Python objects" in lines[0], result.stderr


def test_payload_pretrained_weights_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"body.0.weight": torch.zeros(1), "x": Payload(tmp_path / "ran")}, path)
    with pytest.raises(UsageError, match=r"weights\.pt.*refused") as raised:
        create_backbone("tiny", pretrained=path)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "ran").exists()


def test_out_that_is_a_file_gets_one_line(tmp_path: Path, cli: Callable) -> None:
    images, labels = planted_images(4, 64, 32, seed=3)
    store = make_store(tmp_path / "data", images, labels)
    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    result = cli("train", "--data", store, "--out", out, *TINY)
    assert result.code == 2, result.stderr
    assert "notes.txt: --out is a file" in result.stderr and "Traceback" not in result.stderr
    assert out.read_text() == "keep me"


@pytest.mark.parametrize("damage", ["corrupt zarr.json", "deleted foreground", "deleted shard"])
def test_a_damaged_image_is_named_and_the_others_still_train(
    tmp_path: Path, cli: Callable, damage: str
) -> None:
    images, labels = planted_images(
        6, 64, 32, seed=4, split_of=lambda i: "val" if i >= 4 else "train"
    )
    store = make_store(tmp_path / "data", images, labels)
    group = store / "images" / "im001"
    if damage == "corrupt zarr.json":
        (group / "zarr.json").write_text('{"zarr_format": 3, "node_type": "gro')
    elif damage == "deleted foreground":
        import shutil

        shutil.rmtree(group / "foreground")
    else:  # a shard with pixels: without the tiler's record it would read as fill (background)
        shard = sorted(p for p in (group / "0").rglob("*") if p.is_file() and p.name != "zarr.json")
        shard[0].unlink()
    info = cli("info", store)
    if damage == "corrupt zarr.json":
        assert info.code == 1 and "im001/zarr.json" in info.stderr and "damaged" in info.stderr
    assert "Traceback" not in info.stderr
    if damage == "deleted shard":
        checked = cli("info", store, "--check")
        assert checked.code == 1 and "Traceback" not in checked.stderr
        assert "im001/0: 1 of" in checked.stderr and "missing" in checked.stderr
    args = ["--set", "foreground_threshold=0.5"] if damage == "deleted foreground" else []
    result = cli("train", "--data", store, "--out", tmp_path / "run", *TINY, *args)
    assert "Traceback" not in result.stderr
    assert result.code == 1 and "im001" in result.stderr, result.stderr
    if damage == "corrupt zarr.json":  # skipped; the other images trained
        assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    else:  # found mid-training: one line naming the array, the last good checkpoint kept
        array = "im001/foreground" if damage == "deleted foreground" else "im001/0"
        assert array in result.stderr and "missing" in result.stderr
