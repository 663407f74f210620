"""Backbone registry: names, local pretrained weights (never a download), feature shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from hiresctl.models import BACKBONES, create_backbone
from storage import UsageError


def test_unknown_backbone_lists_the_valid_names() -> None:
    with pytest.raises(UsageError, match="valid: tiny, resnet18"):
        create_backbone("resnet19")


@pytest.mark.parametrize("name", ["tiny", "resnet18", "mobilenet_v2"])
def test_backbones_pool_features(name: str) -> None:
    backbone = create_backbone(name).eval()
    with torch.no_grad():
        features = backbone.forward_features(torch.zeros(2, 3, 64, 64))
    assert features.shape == (2, backbone.num_features)
    assert name in BACKBONES


def test_pretrained_loads_a_torchvision_state_dict(tmp_path: Path) -> None:
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)  # torchvision names: conv1.weight, layer1.0...
    backbone = create_backbone("resnet18", pretrained=path)
    assert torch.equal(backbone.body[0].weight, reference.conv1.weight)
    assert torch.equal(backbone.body[7][1].conv2.weight, reference.layer4[1].conv2.weight)


def test_pretrained_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"missing\.pt: pretrained weights not found"):
        create_backbone("tiny", pretrained=tmp_path / "missing.pt")
    wrong = tmp_path / "wrong.pt"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(UsageError, match=r"wrong\.pt: no tensor matches"):
        create_backbone("tiny", pretrained=wrong)
