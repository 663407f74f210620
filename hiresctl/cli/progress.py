"""What a command over many images shows while it runs and when it ends.

On a terminal: one live line (a bar of the work, images done by status, what is left, images/s and
the time left) and, at the end, a summary that fits one screen: the totals and the failures
grouped by reason, a few names each, with the full list in a CSV beside the output. Elsewhere (a
log, a pipe) or with ``--verbose``: one line per image as it finishes, then the same summary, so
a log of 10,000 slides is 10,000 lines plus the summary. ``--json`` output on stdout is separate
and unchanged.
"""

from __future__ import annotations

import csv
import time
from collections import Counter
from pathlib import Path
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

SHOWN_REASONS = 8  # failure reasons in the summary
SHOWN_NAMES = 3  # names per reason


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 12 s``, ``2 h 05 min``."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


class ImagesDisplay:
    """Progress and summary of ``verb`` (e.g. "tiled") over ``total`` images; ``done`` names the
    statuses that count as done (the others, but "failed", are reported as they are)."""

    def __init__(
        self, verb: str, total: int, console: Console, verbose: bool = False, unit: str = "blocks"
    ) -> None:
        self.verb, self.total, self.console, self.unit = verb, total, console, unit
        self.live = console.is_terminal and not verbose
        self.counts: Counter[str] = Counter()
        self.failures: list[tuple[str, str]] = []  # (source, reason)
        self.notes: list[tuple[str, str]] = []  # (source, note): done, with something to know
        self.start = time.perf_counter()
        self._progress: Progress | None = None
        self._bar: TaskID | None = None

    def __enter__(self) -> ImagesDisplay:
        if self.live:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[counts]}"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self._progress.start()
            self._bar = self._progress.add_task(self.verb, total=None, counts=self._counts_text())
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def _counts_text(self) -> str:
        finished = sum(self.counts.values())
        seconds = time.perf_counter() - self.start
        parts = [f"{n} {status}" for status, n in sorted(self.counts.items())]
        parts.append(f"{self.total - finished} left")
        if finished and seconds > 0:
            parts.append(f"{finished / seconds:.2f} images/s")
        return " · ".join(parts)

    def work(self, done: int, total: int) -> None:
        """Units of work (tiling: blocks) done of ``total`` so far, for the bar."""
        if self._progress is not None and self._bar is not None:
            self._progress.update(self._bar, completed=done, total=total or None)

    def image(
        self,
        status: str,
        source: str,
        line: str,
        reason: str | None = None,
        note: str | None = None,
    ) -> None:
        """One image finished with ``status``; ``line`` is what a log shows for it; a failure's
        ``reason`` (the message, without the file's name) groups it in the summary, and so does
        a ``note`` on an image that did not fail."""
        self.counts[status] += 1
        if status == "failed":
            self.failures.append((source, reason or line))
        elif note:
            self.notes.append((source, note))
        if self._progress is not None and self._bar is not None:
            self._progress.update(self._bar, counts=self._counts_text())
        else:
            self.console.print(line, highlight=False, soft_wrap=True)

    def write_failures(self, path: Path) -> Path | None:
        """Every failure as ``source,reason`` rows in ``path``; None (and no file) when none."""
        if not self.failures:
            path.unlink(missing_ok=True)  # an earlier run's list would mislead
            return None
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["source", "reason"])
            writer.writerows(self.failures)
        return path

    def summary(
        self, where: str, failures_file: Path | None = None, totals: bool = True
    ) -> list[str]:
        """The closing lines, printed and returned: totals, time and rate (unless the command
        prints its own), then the failures by reason."""
        seconds = time.perf_counter() - self.start
        finished = sum(self.counts.values())
        good = finished - self.counts["failed"]
        statuses = ", ".join(f"{n} {status}" for status, n in sorted(self.counts.items()))
        rate = f", {finished / seconds:.2f} images/s" if seconds > 0 and finished else ""
        lines = [
            f"{self.verb} {good} of {self.total} images {where} in {duration(seconds)}{rate}"
            + (f" ({statuses})" if statuses else "")
        ][: 1 if totals else 0]
        if self.notes:
            lines.append(f"{len(self.notes)} with a note, by note:")
            lines += _grouped(self.notes)
        if self.failures:
            lines.append(f"{len(self.failures)} failed, by reason:")
            lines += _grouped(self.failures)
            if failures_file is not None:
                lines.append(f"every failure: {failures_file}")
        for line in lines:
            self.console.print(line, highlight=False, soft_wrap=True)
        return lines


def _grouped(items: list[tuple[str, str]]) -> list[str]:
    """``(source, reason)`` pairs as one line per reason, the commonest first, a few names each."""
    grouped: dict[str, list[str]] = {}
    for source, reason in items:
        grouped.setdefault(reason, []).append(source)
    ranked = sorted(grouped.items(), key=lambda item: -len(item[1]))
    lines = []
    for reason, sources in ranked[:SHOWN_REASONS]:
        names = ", ".join(Path(s).name for s in sources[:SHOWN_NAMES])
        more = f" and {len(sources) - SHOWN_NAMES} more" if len(sources) > SHOWN_NAMES else ""
        lines.append(f"  {len(sources)} × {reason}: {names}{more}")
    if len(ranked) > SHOWN_REASONS:
        lines.append(f"  … and {len(ranked) - SHOWN_REASONS} other reasons")
    return lines


def failures_path(out: Path, command: str) -> Path:
    """Where ``command`` over the images of ``out`` lists its failures, beside it:
    ``<out>.<command>-failures.csv``."""
    return out.with_name(f"{out.name}.{command}-failures.csv")


__all__ = ["ImagesDisplay", "duration", "failures_path"]
