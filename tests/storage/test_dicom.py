"""DICOM whole-slide images: a series of instances (one per level) written here with pydicom,
JPEG and JPEG 2000 frames, tiles into one image whose level 0 is what OpenSlide, the reading
library, decodes; a folder of series gives one image per slide, not one per instance."""

from __future__ import annotations

import json
from pathlib import Path

import imagecodecs
import numpy as np
import pytest

from storage.store import Dataset
from tests.conftest import coord_pixels
from tests.ngff import assert_valid_ngff

pydicom = pytest.importorskip("pydicom")
openslide = pytest.importorskip("openslide")

WSI = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
CT = "1.2.840.10008.5.1.4.1.1.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_2000_LOSSLESS = "1.2.840.10008.1.2.4.90"


def write_instance(
    path: Path,
    pixels: np.ndarray,
    series: tuple[str, str, str],
    number: int,
    mm_per_pixel: float,
    syntax: str = JPEG_BASELINE,
    tile: int = 128,
    sop_class: str = WSI,
) -> Path:
    """One TILED_FULL instance of ``pixels`` (h, w, 3), frames row by row, white past the edge."""
    from pydicom.dataset import Dataset as DicomDataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import generate_uid

    height, width, _ = pixels.shape
    frames = []
    for r in range(-(-height // tile)):
        for c in range(-(-width // tile)):
            frame = np.full((tile, tile, 3), 255, np.uint8)
            part = pixels[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile]
            frame[: part.shape[0], : part.shape[1]] = part
            if syntax == JPEG_BASELINE:
                frames.append(imagecodecs.jpeg8_encode(frame, level=90))
            else:
                frames.append(imagecodecs.jpeg2k_encode(frame, level=0, codecformat="J2K"))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = DicomDataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = series
    ds.Modality, ds.InstanceNumber = "SM", number
    ds.ImageType = ["ORIGINAL" if number == 1 else "DERIVED", "PRIMARY", "VOLUME", "NONE"]
    ds.Rows = ds.Columns = tile
    ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns = height, width
    ds.NumberOfFrames = len(frames)
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.TotalPixelMatrixFocalPlanes = ds.NumberOfOpticalPaths = 1
    ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
    ds.PhotometricInterpretation = "YBR_FULL_422" if syntax == JPEG_BASELINE else "RGB"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = width * mm_per_pixel, height * mm_per_pixel
    measures = DicomDataset()
    measures.PixelSpacing = [mm_per_pixel, mm_per_pixel]
    measures.SliceThickness = 0.001
    shared = DicomDataset()
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    optical = DicomDataset()
    optical.OpticalPathIdentifier = "1"
    ds.OpticalPathSequence = [optical]
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(folder: Path, pixels: np.ndarray, syntax: str = JPEG_BASELINE) -> list[Path]:
    """A two-level slide (0.25 µm/px, then half that resolution), one instance per level."""
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    uids = (generate_uid(), generate_uid(), generate_uid())
    half = np.ascontiguousarray(pixels[::2, ::2])
    return [
        write_instance(folder / "level-0.dcm", pixels, uids, 1, 0.00025, syntax),
        write_instance(folder / "level-1.dcm", half, uids, 2, 0.0005, syntax),
    ]


def _level0(store: Path, image_id: str) -> np.ndarray:
    return np.asarray(Dataset(store).level(image_id, 0)[...]).transpose(1, 2, 0)


def _openslide_level0(path: Path, height: int, width: int) -> np.ndarray:
    slide = openslide.OpenSlide(str(path))
    rgba = np.asarray(slide.read_region((0, 0), 0, (width, height)))
    slide.close()
    return rgba[..., :3]


@pytest.mark.parametrize("syntax", [JPEG_BASELINE, JPEG_2000_LOSSLESS])
def test_a_dicom_series_folder_tiles_as_one_slide_exact_to_openslide(
    cli, tmp_path: Path, syntax: str
) -> None:
    pixels = coord_pixels(300, 420)
    files = write_series(tmp_path / "slide-7", pixels, syntax)
    store = tmp_path / "ds.zarr"
    result = cli("tile", tmp_path / "slide-7", "--out", store, "--json")
    assert result.code == 0, result.stderr
    [row] = [json.loads(line) for line in result.stdout.splitlines()]
    assert row["id"] == "slide-7" and row["shape"] == [3, 300, 420]
    ours = _level0(store, "slide-7")
    np.testing.assert_array_equal(ours, _openslide_level0(files[0], 300, 420))
    if syntax == JPEG_2000_LOSSLESS:  # lossless: the written pixels themselves
        np.testing.assert_array_equal(ours, pixels)
    assert Dataset(store).entry("slide-7").mpp == pytest.approx(0.25)
    assert_valid_ngff(store)


def test_a_single_instance_file_tiles_and_instances_group_into_their_series(
    cli, tmp_path: Path
) -> None:
    """One instance alone is a slide of one level; a folder of two slides' folders gives two
    images, and their files piped one by one give the same two."""
    pixels = coord_pixels(200, 260)
    from pydicom.uid import generate_uid

    uids = (generate_uid(), generate_uid(), generate_uid())
    single = write_instance(tmp_path / "only.dcm", pixels, uids, 1, 0.0005)
    store = tmp_path / "single.zarr"
    assert cli("tile", single, "--out", store).code == 0
    [image_id] = Dataset(store).image_ids()
    np.testing.assert_array_equal(_level0(store, image_id), _openslide_level0(single, 200, 260))
    assert Dataset(store).entry(image_id).mpp == pytest.approx(0.5)
    write_series(tmp_path / "archive" / "a", pixels)
    write_series(tmp_path / "archive" / "b", pixels[::-1].copy())
    both = cli("tile", tmp_path / "archive", "--out", tmp_path / "both.zarr", "--json")
    assert both.code == 0, both.stderr
    assert sorted(json.loads(line)["id"] for line in both.stdout.splitlines()) == ["a", "b"]


def test_a_dicom_file_that_is_no_slide_fails_alone_in_one_line(cli, tmp_path: Path) -> None:
    from pydicom.uid import generate_uid

    uids = (generate_uid(), generate_uid(), generate_uid())
    scan = write_instance(tmp_path / "ct.dcm", coord_pixels(64, 64), uids, 1, 0.5, sop_class=CT)
    good = write_series(tmp_path / "slide", coord_pixels(128, 128))[0]
    result = cli("tile", scan, good, "--out", tmp_path / "ds.zarr")
    assert result.code == 1
    [failed] = [line for line in result.stderr.splitlines() if line.startswith("failed ")]
    assert f"{scan}: a DICOM CT Image Storage file, not a whole-slide image" in failed
    assert "Traceback" not in result.stderr
    assert Dataset(tmp_path / "ds.zarr").image_ids() == ["slide"]
