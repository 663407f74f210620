"""Typer application: ``hiresctl synth | tile | info | embed | methods | train | eval | predict``.

The commands live in ``data.py`` and ``training.py``; importing them registers them on ``app``."""

from __future__ import annotations

import logging
import sys
import warnings

from hiresctl.cli import data, training  # noqa: F401  (registers the commands)
from hiresctl.cli.common import app, err
from storage.errors import HiresError, NoSpaceError, UsageError, no_space


class FullDiskEchoes(logging.Filter):
    """Drops asyncio's "exception was never retrieved" of a write that found the disk full.
    Zarr writes chunks concurrently; on a full disk several writes fail, the first is reported
    as the command's one line, and the others would follow it as tracebacks when their tasks are
    collected. Once the disk was found full (``reported``), every such leftover is an echo of
    it, whatever it raised: a write racing the failed one to the same key can end in
    ``FileExistsError`` rather than the full disk's own error."""

    def __init__(self) -> None:
        super().__init__()
        self.reported = False

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if "never retrieved" not in record.getMessage() or exc is None:
            return True
        if no_space(exc) is not None:
            self.reported = True
            return False
        return not self.reported


ECHOES = FullDiskEchoes()


def main() -> None:
    """Console entry point: typed errors become one line and an exit code (usage: 2, input: 1)."""
    # a warning (e.g. a plugin that failed to load) is one line too, not its source line
    warnings.formatwarning = lambda message, category, *_, **__: f"warning: {message}\n"
    ECHOES.reported = False  # a second command in the same process starts unreported
    logging.getLogger("asyncio").addFilter(ECHOES)
    try:
        app()  # standalone: click reports its own usage errors and exits with 2
    except UsageError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except HiresError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except Exception as exc:  # a full, over-quota or read-only destination, wherever it is met
        full = no_space(exc)
        if full is None:
            raise
        ECHOES.reported = True  # the writes still pending are echoes of this one line
        where = full.filename or "the output"
        err.print(
            f"[bold red]error:[/] {NoSpaceError(where, full)}", highlight=False, soft_wrap=True
        )
        sys.exit(1)
