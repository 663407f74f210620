"""What a run was trained on (channels, data type, pixel size, level), recorded in every
checkpoint, and the check ``eval`` and ``predict`` make of each input image against it.

An input the run was not trained on is converted where the conversion is standard and keeps the
meaning of the pixels (grey to RGB by repetition, grey + alpha to RGB), said once per kind, or
refused with one line naming the image and what differs where it is not: another bit depth
(without ``--rescale``), more channels than the run saw (without ``--drop-channels``: an RGBA
image's alpha, or a fourth fluorescence channel, is not one of the run's), or a pixel size more
than ``MPP_TOLERANCE`` away (tile the store again with ``--mpp``).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MPP_TOLERANCE = 0.25  # relative: 0.25 µm/px against 0.30 passes, against 0.5 is refused


def input_record(entries: Iterable[Any], level: int) -> dict[str, Any]:
    """What the training images were: their channel counts, data types, pixel sizes (µm at
    level 0: the median, and the range) and the level patches were read from."""
    rows = list(entries)
    mpps = [float(e.mpp) for e in rows if e.mpp]
    return {
        "channels": sorted({int(e.shape[0]) for e in rows}),
        "dtypes": sorted({np.dtype(e.dtype).name for e in rows}),
        "mpp": statistics.median(mpps) if mpps else None,
        "mpp_range": [min(mpps), max(mpps)] if mpps else None,
        "level": level,
        "images": len(rows),
    }


@dataclass
class InputScreen:
    """The images of a split screened against a run's record: the usable ones, one line per
    refused image, and one note per kind of conversion made."""

    kept: list[Any] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=dict)  # note → image ids

    def note_lines(self) -> list[str]:
        return [
            f"{note} ({len(ids)} image(s): {', '.join(ids[:3])}{', …' if len(ids) > 3 else ''})"
            for note, ids in self.notes.items()
        ]


def _differs(
    entry: Any, record: dict[str, Any], rescale: bool, drop: bool
) -> tuple[str | None, str | None]:
    """(why ``entry`` is refused, or None; the conversion it gets, or None)."""
    channels, dtype = int(entry.shape[0]), np.dtype(entry.dtype).name
    trained = record.get("channels") or []
    note = None
    if trained and channels not in trained:
        want = max(trained)
        if want == 3 and channels in (1, 2):
            note = (
                "grey repeated to RGB"
                if channels == 1
                else "grey + alpha: alpha dropped, grey repeated to RGB"
            )
        elif channels > want and drop:
            note = f"{channels} channels: the first {want} used, the rest dropped (--drop-channels)"
        else:
            return (
                f"has {channels} channel(s), the run was trained on {'/'.join(map(str, trained))}"
                + (
                    "; pass --drop-channels to use the first ones (an RGBA image's alpha)"
                    if channels > want
                    else ""
                ),
                None,
            )
    dtypes = record.get("dtypes") or []
    if dtypes and dtype not in dtypes:
        if not rescale:
            return (
                f"is {dtype}, the run was trained on {'/'.join(dtypes)}; pass --rescale to read it "
                "as a fraction of its type's range, as training read its own",
                None,
            )
        note = (
            note + "; " if note else ""
        ) + f"{dtype} read as a fraction of its range (--rescale)"
    trained_mpp, mpp = record.get("mpp"), entry.mpp
    if trained_mpp and mpp and abs(float(mpp) / float(trained_mpp) - 1) > MPP_TOLERANCE:
        return (
            f"is {float(mpp):.3g} µm/px, the run was trained at {float(trained_mpp):.3g} µm/px; "
            f"tile it again with --mpp {float(trained_mpp):.3g}",
            None,
        )
    return None, note


def screen_inputs(
    record: dict[str, Any] | None,
    entries: Iterable[Any],
    where: str,
    rescale: bool = False,
    drop_channels: bool = False,
) -> InputScreen:
    """Sort ``entries`` (store image entries) into usable and refused against ``record`` (a
    checkpoint's; None, for a checkpoint that predates the record, keeps every image)."""
    screen = InputScreen()
    for entry in entries:
        if record is None:
            screen.kept.append(entry)
            continue
        refused, note = _differs(entry, record, rescale, drop_channels)
        if refused:
            screen.refused.append(f"{where}/images/{entry.id}: {refused}")
            continue
        if note:
            screen.notes.setdefault(note, []).append(entry.id)
        screen.kept.append(entry)
    return screen


__all__ = ["MPP_TOLERANCE", "InputScreen", "input_record", "screen_inputs"]
