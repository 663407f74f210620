"""OME-NGFF conformance as the ecosystem's own tools judge it: ome-zarr-models validates every
group the project writes, ome-zarr-py's reader must find each label image's parent image."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import pytest
import zarr


def ngff_groups(root: Path) -> dict[str, dict[str, Any]]:
    """Every group under ``root`` (itself included) that carries an ``ome`` attribute."""
    top = zarr.open_group(root, mode="r")
    found = {"": dict(top.attrs["ome"])} if "ome" in top.attrs else {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an object outside the hierarchy is a defect too
        for path, node in top.members(max_depth=None):
            if isinstance(node, zarr.Group) and "ome" in node.attrs:
                found[path] = dict(node.attrs["ome"])
    return found


def assert_valid_ngff(root: Path, expect: set[str] | None = None) -> dict[str, str]:
    """Validate every NGFF group under ``root`` with ome-zarr-models (v0.5), by the kind its
    metadata declares; returns {group path: kind}. ``expect``: kinds that must be present."""
    from ome_zarr_models.v05 import Image, ImageLabel, Labels

    kinds = {}
    for path, ome in ngff_groups(root).items():
        assert ome.get("version") == "0.5", f"{path}: NGFF version {ome.get('version')}"
        if "image-label" in ome:
            model: Any = ImageLabel
        elif "multiscales" in ome:
            model = Image
        elif "labels" in ome:
            model = Labels
        else:
            pytest.fail(f"{root}/{path}: an ome attribute of no NGFF kind: {sorted(ome)}")
        try:
            model.from_zarr(zarr.open_group(root / path if path else root, mode="r"))
        except Exception as exc:  # pydantic's ValidationError and the models' own checks
            pytest.fail(f"{root}/{path} is not valid OME-NGFF 0.5 {model.__name__}: {exc}")
        kinds[path] = model.__name__
    missing = (expect or set()) - set(kinds.values())
    assert not missing, f"{root}: no group of kind {missing} among {kinds}"
    return kinds


def assert_labels_have_parents(
    image_group: Path, caplog: pytest.LogCaptureFixture, count: int
) -> None:
    """ome-zarr-py reads ``image_group`` and finds ``count`` label images, each with its parent
    image (the reader logs "no parent found" for a label it cannot place)."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="ome_zarr"):
        nodes = list(Reader(parse_url(str(image_group)))())
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "no parent" in m.lower()], image_group
    labels = [n for n in nodes if any(type(s).__name__ == "Label" for s in n.specs)]
    assert len(labels) == count, f"{image_group}: {len(labels)} label images, expected {count}"
    assert sum("delegating to parent image" in m for m in messages) == count
