"""Synthesizers: reproducible by seed, labels that match what was drawn."""

from __future__ import annotations

import csv
import gzip
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from storage.errors import SourceError, UsageError
from storage.synth import synthesize


def test_ultramnist_labels_are_digit_sums_and_boxes_do_not_overlap(tmp_path: Path) -> None:
    synthesize("ultramnist", tmp_path, count=8, size=512, seed=3)
    meta = json.loads((tmp_path / "synth.json").read_text())
    for row in meta["images"]:
        digits = [o["digit"] for o in row["objects"]]
        assert 3 <= len(digits) <= 5 and row["label"] == sum(digits) and row["label"] < 28
        boxes = [o["box"] for o in row["objects"]]
        for i, (x, y, w, h) in enumerate(boxes):
            for x2, y2, w2, h2 in boxes[i + 1 :]:
                assert x + w <= x2 or x2 + w2 <= x or y + h <= y2 or y2 + h2 <= y
        image = tifffile.imread(tmp_path / "images" / row["source"])
        assert image.shape == (512, 512)
        x, y, w, h = boxes[0]
        assert image[y : y + h, x : x + w].max() > 100  # the digit is drawn where recorded
    assert [r["split"] for r in meta["images"]].count("test") >= 1


def test_same_seed_same_images(tmp_path: Path) -> None:
    for name in ("a", "b"):
        synthesize("megapixel-mnist", tmp_path / name, count=2, size=300, seed=7)
    for f in ("megapixel_mnist_00000.tiff", "megapixel_mnist_00001.tiff"):
        np.testing.assert_array_equal(
            tifffile.imread(tmp_path / "a" / "images" / f),
            tifffile.imread(tmp_path / "b" / "images" / f),
        )
    synthesize("megapixel-mnist", tmp_path / "c", count=1, size=300, seed=8)
    assert not np.array_equal(
        tifffile.imread(tmp_path / "a/images/megapixel_mnist_00000.tiff"),
        tifffile.imread(tmp_path / "c/images/megapixel_mnist_00000.tiff"),
    )


def test_megapixel_mnist_tasks(tmp_path: Path) -> None:
    synthesize("megapixel-mnist", tmp_path, count=4, size=300, seed=1, task="max")
    meta = json.loads((tmp_path / "synth.json").read_text())
    for row in meta["images"]:
        digits = [o["digit"] for o in row["objects"]]
        values, counts = np.unique(digits, return_counts=True)
        assert row["labels"]["majority"] == values[counts.argmax()] and counts.max() == 3
        assert row["label"] == max(digits)


def test_unknown_kind_lists_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(
        UsageError,
        match="valid: det-mosaic, fine-detail, megapixel-mnist, seg-aerial, seg-vessels, sparse-slide, "
        "ultramnist",
    ):
        synthesize("mnist", tmp_path)


def test_fine_detail_differs_only_at_full_resolution(tmp_path: Path) -> None:
    labels = synthesize("fine-detail", tmp_path / "fd", count=10, size=128, seed=1)
    rows = list(csv.DictReader(labels.open()))
    assert [r["label"] for r in rows] == ["0", "1"] * 5
    meta = json.loads((tmp_path / "fd" / "synth.json").read_text())
    for row, image in zip(rows, meta["images"], strict=True):
        x, y, side, _ = image["objects"][0]["box"]
        pixels = tifffile.imread(tmp_path / "fd" / "images" / row["source"])
        region = pixels[y : y + side, x : x + side, 0].astype(float)
        halved = region.reshape(side // 2, 2, side // 2, 2).mean(axis=(1, 3))
        assert np.all(halved == 90.0)  # identical for both classes after 2× downsampling
        assert (region.std() > 80) == (row["label"] == "1")  # different at full resolution


def test_sparse_slide_lesions_differ_from_decoys_only_in_nuclear_size(tmp_path: Path) -> None:
    from scipy import ndimage

    labels = synthesize("sparse-slide", tmp_path / "ss", count=8, size=512, seed=3)
    rows = list(csv.DictReader(labels.open()))
    assert [r["label"] for r in rows] == ["0", "1"] * 4
    meta = json.loads((tmp_path / "ss" / "synth.json").read_text())
    darkness: dict[str, list[float]] = {"lesion": [], "decoy": []}
    solidity: dict[str, list[float]] = {"lesion": [], "decoy": []}
    for row, image in zip(rows, meta["images"], strict=True):
        kinds = [o["kind"] for o in image["objects"]]
        assert 2 <= len(kinds) <= 4
        assert ("lesion" in kinds) == (row["label"] == "1")  # a lesion is what makes class 1
        pixels = tifffile.imread(tmp_path / "ss" / "images" / row["source"])
        tissue = (pixels[..., 1] < 200).mean()
        assert 0.25 < tissue < 0.7  # a large tissue area with background around it
        for obj in image["objects"]:
            x, y, w, h = obj["box"]
            region = pixels[y : y + h, x : x + w].astype(float)
            dark = region[..., 1] < 90
            darkness[obj["kind"]].append(region[..., 1].mean())
            # the share of nuclear pixels whose neighbours are all nuclear: large nuclei only
            solidity[obj["kind"]].append(ndimage.binary_erosion(dark).sum() / max(1, dark.sum()))
    # downsampled to a spot, a lesion and a decoy have the same mean colour ...
    assert abs(np.mean(darkness["lesion"]) - np.mean(darkness["decoy"])) < 5
    # ... and at full resolution every lesion's nuclei are larger than every decoy's
    assert min(solidity["lesion"]) > 2 * max(solidity["decoy"])


@pytest.mark.parametrize("kind", ["seg-vessels", "seg-aerial"])
def test_segmentation_synth_writes_matching_masks_reproducibly(tmp_path: Path, kind: str) -> None:
    import tifffile

    from storage.store import Dataset
    from storage.tiler import MaskSet, SourceSpec, TileOptions, tile

    synthesize(kind, tmp_path / "a", count=2, size=256, seed=3)
    synthesize(kind, tmp_path / "b", count=2, size=256, seed=3)
    names = sorted(p.name for p in (tmp_path / "a" / "images").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "a" / "masks").iterdir())
    for name in names:
        for part in ("images", "masks"):
            np.testing.assert_array_equal(
                tifffile.imread(tmp_path / "a" / part / name),
                tifffile.imread(tmp_path / "b" / part / name),
            )
    mask = tifffile.imread(tmp_path / "a" / "masks" / names[0])
    classes = (tmp_path / "a" / "classes.csv").read_text().splitlines()
    assert set(np.unique(mask)) == set(range(len(classes) - 1))  # every class appears
    specs = [SourceSpec((str(tmp_path / "a" / "images" / n),)) for n in names]
    results = tile(
        specs,
        tmp_path / "ds.zarr",
        TileOptions(chunk=64, thumbnail_size=64),
        masks=MaskSet(tmp_path / "a" / "masks", tmp_path / "a" / "classes.csv"),
    )
    assert all(r.status == "written" for r in results)
    assert len(Dataset(tmp_path / "ds.zarr").mask_classes()) == len(classes) - 1


def test_vessels_are_thin_enough_that_downsampling_loses_them(tmp_path: Path) -> None:
    import tifffile

    synthesize("seg-vessels", tmp_path, count=1, size=512, seed=0)
    mask = tifffile.imread(next((tmp_path / "masks").iterdir())).astype(bool)
    coarse = mask.reshape(128, 4, 128, 4).mean(axis=(1, 3)) >= 0.5  # 4x down, majority
    recovered = np.repeat(np.repeat(coarse, 4, 0), 4, 1)
    lost = (mask & ~recovered).sum() / mask.sum()
    assert lost > 0.3, f"only {lost:.0%} of vessel pixels vanish at 4x downsampling"


def test_det_mosaic_writes_coco_boxes_around_small_separate_objects(tmp_path: Path) -> None:
    from pycocotools.coco import COCO

    synthesize("det-mosaic", tmp_path / "a", count=3, size=512, seed=5, objects=12)
    synthesize("det-mosaic", tmp_path / "b", count=3, size=512, seed=5, objects=12)
    first = (tmp_path / "a" / "annotations.json").read_text()
    assert first == (tmp_path / "b" / "annotations.json").read_text()  # a function of the seed
    coco = COCO(str(tmp_path / "a" / "annotations.json"))  # the reference reader accepts it
    assert len(coco.getCatIds()) == 13 and len(coco.getImgIds()) == 3
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        pixels = tifffile.imread(tmp_path / "a" / "images" / info["file_name"]).astype(int)
        boxes = [a["bbox"] for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))]
        assert len(boxes) >= 8
        for x, y, w, h in boxes:
            assert x >= 0 and y >= 0 and x + w <= 512 and y + h <= 512
            assert 4 <= max(w, h) <= 128
            inside = pixels[y : y + h, x : x + w]
            ring = np.concatenate(
                [
                    pixels[y - 2 : y - 1, x : x + w].reshape(-1, 3),
                    pixels[y + h + 1 : y + h + 2, x : x + w].reshape(-1, 3),
                ]
            )
            # The object (bright colours) is inside its box, the background hugs it outside.
            assert inside.max(axis=(0, 1)).max() > ring.max(axis=0).max() + 20
        for (ax, ay, aw, ah), (bx, by, bw, bh) in itertools.combinations(boxes, 2):
            assert ax + aw <= bx or bx + bw <= ax or ay + ah <= by or by + bh <= ay


# ----------------------------------------------------------------------------- real MNIST


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    """An IDX file of unsigned bytes, as MNIST ships them (gzip or raw)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    data = header + np.ascontiguousarray(array, np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def _fake_mnist(folder: Path, per_digit: int = 3) -> dict[str, np.ndarray]:
    """MNIST-shaped IDX files whose every sample is unique and says which part it came from:
    training samples are bright squares of one size, test (t10k) samples of another."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    parts = {}
    for part, (images_name, labels_name), edge in (
        ("train", ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"), 4),
        ("test", ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"), 8),
    ):
        labels = np.repeat(np.arange(10), per_digit).astype(np.uint8)
        images = np.zeros((len(labels), 28, 28), np.uint8)
        images[:, edge:-edge, edge:-edge] = rng.integers(100, 256, (len(labels), 1, 1))
        images[:, 14, :] = np.arange(len(labels))[:, None]  # a row that tells samples apart
        _write_idx(folder / images_name, images, compress=part == "train")
        _write_idx(folder / labels_name, labels, compress=False)
        parts[part] = images
    return parts


def test_megapixel_mnist_draws_real_digits_from_the_part_of_each_split(tmp_path: Path) -> None:
    parts = _fake_mnist(tmp_path / "mnist")
    synthesize(
        "megapixel-mnist", tmp_path / "out", count=8, size=256, seed=2, mnist=tmp_path / "mnist"
    )
    meta = json.loads((tmp_path / "out" / "synth.json").read_text())
    assert "MNIST" in meta["digits"]
    for row in meta["images"]:
        image = tifffile.imread(tmp_path / "out" / "images" / row["source"])
        pool = parts["train" if row["split"] == "train" else "test"]
        for obj in row["objects"]:
            x, y, w, h = obj["box"]
            assert (w, h) == (28, 28)  # native size, as in the IPS paper
            drawn = image[y : y + h, x : x + w]
            # the sample's own pixels (noise may only brighten background around them)
            matches = [
                i
                for i, sample in enumerate(pool)
                if np.all(drawn >= sample) and np.array_equal(drawn[sample > 0], sample[sample > 0])
            ]
            assert matches, f"no {row['split']} sample drawn at {obj['box']}"
            assert obj["digit"] in {i // 3 for i in matches}


def test_ultramnist_and_det_mosaic_take_real_digits(tmp_path: Path) -> None:
    _fake_mnist(tmp_path / "mnist")
    synthesize(
        "ultramnist",
        tmp_path / "u",
        count=4,
        size=512,
        seed=1,
        classes=10,
        mnist=tmp_path / "mnist",
    )
    meta = json.loads((tmp_path / "u" / "synth.json").read_text())
    sides = [o["box"][2] for row in meta["images"] for o in row["objects"]]
    assert min(sides) >= 14  # a real digit is never shrunk below half its size
    synthesize("det-mosaic", tmp_path / "d", count=2, size=256, seed=1, mnist=tmp_path / "mnist")
    assert json.loads((tmp_path / "d" / "annotations.json").read_text())["annotations"]


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda raw: raw[: len(raw) // 2], "truncated: its header declares"),
        (lambda raw: b"\x01\x02" + raw[2:], "not an IDX file"),
        (lambda raw: raw[:2] + b"\x0d" + raw[3:], "element type 0x0d"),
    ],
)
def test_a_damaged_idx_file_is_named_with_its_problem(tmp_path: Path, damage, problem) -> None:
    _fake_mnist(tmp_path / "mnist")
    path = tmp_path / "mnist" / "t10k-images-idx3-ubyte"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(SourceError, match=problem) as caught:
        synthesize("megapixel-mnist", tmp_path / "out", count=4, size=256, mnist=tmp_path / "mnist")
    assert str(path) in str(caught.value)


def test_a_cut_gzip_and_a_missing_file_are_named(tmp_path: Path) -> None:
    _fake_mnist(tmp_path / "mnist")
    gz = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:-20])
    with pytest.raises(SourceError, match=r"train-images-idx3-ubyte\.gz: the gzip stream"):
        synthesize("megapixel-mnist", tmp_path / "out", count=4, size=256, mnist=tmp_path / "mnist")
    gz.unlink()
    with pytest.raises(UsageError, match="no train-images-idx3-ubyte"):
        synthesize("megapixel-mnist", tmp_path / "out", count=4, size=256, mnist=tmp_path / "mnist")
