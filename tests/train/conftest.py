"""Fixtures the training tests share."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.stores import make_store, planted_images


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 planted-square images of 128² (30 train, 10 val), tiled once per module."""
    root = tmp_path_factory.mktemp("planted")
    images, labels = planted_images(
        40, 128, 32, seed=0, split_of=lambda i: "val" if i >= 30 else "train"
    )
    return make_store(root, images, labels)
