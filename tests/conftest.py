"""Shared fixtures: tiny sources whose pixels encode their coordinates, and an in-process CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from storage.blocks import forget_cached


def coord_pixels(height: int, width: int, channels: int = 3, dtype: str = "uint8") -> np.ndarray:
    """(height, width, channels): channel 0 = y, 1 = x, 2 = y+x (mod the dtype's range)."""
    yy, xx = np.mgrid[0:height, 0:width]
    modulo = 251 if np.dtype(dtype).itemsize == 1 else 65521
    planes = [yy % modulo, xx % modulo, (yy * 7 + xx * 3) % modulo, (yy ^ xx) % modulo]
    return np.stack(planes[:channels], axis=-1).astype(dtype)


@pytest.fixture
def coord() -> Callable[..., np.ndarray]:
    return coord_pixels


def torchrun(*arguments: str, port: int, ranks: int = 2) -> subprocess.CompletedProcess[str]:
    """``torchrun --nproc_per_node ranks ARGS`` (one thread per rank), its output captured."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(ranks),
        "--master_port",
        str(port),
        *arguments,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., CliResult]:
    """Run ``hiresctl ARGS`` in-process through the real entry point (exit codes included)."""
    from hiresctl.cli import main

    def run(*args: str | Path) -> CliResult:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["hiresctl", *map(str, args)])
        monkeypatch.setenv("COLUMNS", "200")
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        out = capsys.readouterr()
        return CliResult(code, out.out, out.err)

    return run


@pytest.fixture(autouse=True)
def _fresh_caches() -> None:
    forget_cached()
