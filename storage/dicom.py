"""DICOM whole-slide images (VL Whole Slide Microscopy Image Storage).

A slide is a series of instances: one per pyramid level (and per optical path or focal plane),
with its label, overview and thumbnail images beside them; scanners and archives export one
folder per slide. OpenSlide 4 reads the series from any one of its instances (it finds the others
in the same folder); this module recognises DICOM files by content, groups instances into their
series (so a folder, or ``find | hiresctl tile -``, gives one image per slide, not one per
instance) and names a series' files for the tiler's fingerprint.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from storage.errors import SourceError

MAGIC_OFFSET = 128  # "DICM" follows a 128-byte preamble (PS3.10 §7.1)
SUFFIXES = frozenset({".dcm", ".dicom"})


def is_dicom(path: str | Path, head: bytes | None = None) -> bool:
    """Whether ``path`` (or its first bytes ``head``) is a DICOM file."""
    if head is None:
        try:
            with open(path, "rb") as handle:
                head = handle.read(MAGIC_OFFSET + 4)
        except OSError:
            return False
    return head[MAGIC_OFFSET : MAGIC_OFFSET + 4] == b"DICM"


def series_uid(path: str | Path) -> str | None:
    """The SeriesInstanceUID of a DICOM file (header only), None when it has none or is not
    readable as DICOM."""
    import pydicom

    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
    except Exception:  # not DICOM after all, or truncated: the reader names it when opened
        return None
    uid = getattr(header, "SeriesInstanceUID", None)
    return str(uid) if uid else None


def instances(folder: str | Path) -> list[Path]:
    """The DICOM files directly in ``folder``, sorted by name."""
    return sorted(
        f
        for f in Path(folder).iterdir()
        if f.is_file() and not f.name.startswith(".") and is_dicom(f)
    )


def group_series(paths: Iterable[str]) -> list[str]:
    """``paths`` with every DICOM series standing once: by its folder where the folder holds
    that series alone and the series has several instances (the usual layout, and the image is
    then named after the folder), else by its first instance. Other paths pass through."""
    out: list[str] = []
    series: dict[tuple[str, str], list[str]] = {}
    slots: dict[tuple[str, str], int] = {}
    for path in paths:
        uid = series_uid(path) if Path(path).is_file() and is_dicom(path) else None
        if uid is None:
            out.append(path)
            continue
        key = (str(Path(path).parent), uid)
        if key not in series:
            slots[key] = len(out)
            out.append(path)
            series[key] = []
        series[key].append(path)
    for (folder, uid), members in series.items():
        everything = instances(folder)
        alone = len(everything) > 1 and all(series_uid(f) == uid for f in everything)
        out[slots[folder, uid]] = folder if alone else sorted(members)[0]
    return out


WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage


def check_slide(path: str | Path) -> None:
    """One line naming ``path`` when it is DICOM of another kind than a whole-slide image."""
    import pydicom

    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        sop = str(getattr(header, "SOPClassUID", "") or header.file_meta.MediaStorageSOPClassUID)
    except Exception as exc:
        raise SourceError(path, f"not a readable DICOM file: {exc}") from exc
    if sop != WSI_SOP_CLASS:
        name = getattr(pydicom.uid.UID(sop), "name", sop) or sop
        raise SourceError(
            path, f"a DICOM {name} file, not a whole-slide image (VL Whole Slide Microscopy)"
        )


def series_entry(folder: str | Path) -> Path:
    """The instance OpenSlide opens a folder's series through; one line naming the folder when it
    holds no DICOM file or more than one series."""
    files = instances(folder)
    if not files:
        raise SourceError(folder, "is a folder without DICOM files (give image files)")
    uids = {series_uid(f) for f in files}
    if len(uids) > 1:
        raise SourceError(
            folder,
            f"holds {len(uids)} DICOM series; give one of each series' files (or `hiresctl "
            "tile` the folder's files, which groups them)",
        )
    return files[0]


def source_files(path: str | Path) -> list[Path]:
    """The files a source is read from: a series folder's instances, else the file itself."""
    p = Path(path)
    return instances(p) if p.is_dir() else [p]


__all__ = [
    "SUFFIXES",
    "check_slide",
    "group_series",
    "instances",
    "is_dicom",
    "series_entry",
    "series_uid",
    "source_files",
]
