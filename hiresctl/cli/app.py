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
    collected."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        echo = "never retrieved" in record.getMessage() and exc is not None
        return not (echo and no_space(exc) is not None)


def main() -> None:
    """Console entry point: typed errors become one line and an exit code (usage: 2, input: 1)."""
    # a warning (e.g. a plugin that failed to load) is one line too, not its source line
    warnings.formatwarning = lambda message, category, *_, **__: f"warning: {message}\n"
    logging.getLogger("asyncio").addFilter(FullDiskEchoes())
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
        where = full.filename or "the output"
        err.print(
            f"[bold red]error:[/] {NoSpaceError(where, full)}", highlight=False, soft_wrap=True
        )
        sys.exit(1)
