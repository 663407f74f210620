"""Every runnable example in examples/ runs end to end (slow: a minute or two each)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _example(name: str, folder: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    assert shutil.which("hiresctl", path=env["PATH"])
    proc = subprocess.run(
        ["bash", str(ROOT / "examples" / name), str(folder)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_segmentation_example_reports_and_predicts(tmp_path: Path) -> None:
    _example("segmentation.sh", tmp_path / "seg")
    metrics = json.loads((tmp_path / "seg" / "report" / "metrics.json").read_text())
    assert [r["method"] for r in metrics["runs"]] == ["patchgd-global", "downsample"]
    rows = json.loads((tmp_path / "seg" / "predictions" / "predictions.json").read_text())
    assert rows and all(Path(r["geojson"]).is_file() for r in rows)


@pytest.mark.slow
def test_quickstart_runs_synth_tile_train_eval_report(tmp_path: Path) -> None:
    proc = _example("quickstart.sh", tmp_path / "demo")
    summary = json.loads((tmp_path / "demo" / "run-patchgd-global" / "summary.json").read_text())
    assert summary["method"] == "patchgd-global" and summary["steps"] > 0
    metrics = json.loads((tmp_path / "demo" / "report" / "metrics.json").read_text())
    assert [r["method"] for r in metrics["runs"]] == ["patchgd-global", "downsample"]
    assert (tmp_path / "demo" / "report" / "report.html").is_file()
    assert "Accuracy" in proc.stdout  # the side-by-side table


@pytest.mark.slow
def test_mil_example_embeds_trains_both_mil_methods_and_reports(tmp_path: Path) -> None:
    _example("mil.sh", tmp_path / "mil")
    metrics = json.loads((tmp_path / "mil" / "report-mil" / "metrics.json").read_text())
    assert [r["method"] for r in metrics["runs"]] == ["abmil", "e2e-mil"]
    table = metrics["table"]
    assert table["run-abmil"]["prepared_seconds"] > 0  # the extraction, counted in
    assert table["run-e2e-mil"]["prepared_seconds"] is None
    # a binary task (chance is 0.5): the end-to-end run learns it; the random-weight features
    # abmil trains on need not separate it
    assert table["run-e2e-mil"]["accuracy"] >= 0.7, table
