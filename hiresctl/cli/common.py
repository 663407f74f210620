"""What every command shares: the Typer application, stderr, one-line failures, the enums."""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from hiresctl import __version__

app = typer.Typer(
    name="hiresctl",
    help="Tile gigapixel images into OME-Zarr stores and train memory-bounded patch models on them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)


class Codec(StrEnum):
    auto = "auto"
    passthrough = "passthrough"
    zstd = "zstd"
    jpeg = "jpeg"


def fail(message: str, code: int = 1) -> NoReturn:
    """One line on stderr, then exit."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"hiresctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """hiresctl: synth → tile → train → eval, memory-bounded at every step."""


class Task(StrEnum):
    cls = "cls"
    det = "det"
    seg = "seg"


class DeviceChoice(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def expand_sources(sources: list[str]) -> list[str]:
    """Files, folders (searched for every source format's suffixes) and ``-`` (stdin); the
    instances of a DICOM series stand once (its folder, or its first file)."""
    from storage.dicom import group_series
    from storage.readers import source_suffixes

    suffixes = source_suffixes()
    paths: list[str] = []
    for src in sources:
        if src == "-":
            paths += [line.strip() for line in sys.stdin if line.strip()]
            continue
        p = Path(src)
        if p.is_dir():
            found = sorted(
                str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in suffixes
            )
            if not found:
                paths.append(src)  # reported as a failed input, not silently ignored
            paths += found
        else:
            paths.append(src)
    return group_series(paths)


# `--verbose` of the commands over many images (tile, embed): see hiresctl/cli/progress.py
Verbose = Annotated[
    bool,
    typer.Option(
        "--verbose", "-v", help="A line per image on a terminal too (always in a log or pipe)."
    ),
]
