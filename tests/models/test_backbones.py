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


def test_weights_of_another_architecture_are_refused_not_half_loaded(tmp_path: Path) -> None:
    """The detection backbone keeps torchvision's names, so resnet50's file shares resnet18's
    stem by name and resnet34's all of its tensors: loading what fits would leave layers
    random, or a deeper network's cut short, without a word."""
    from hiresctl.models.detection import create_fpn_backbone

    path = tmp_path / "resnet50.pth"  # the same stem, other blocks
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    with pytest.raises(UsageError, match=r"resnet50\.pth: fits \d+ of \d+ tensors"):
        create_fpn_backbone("resnet18", pretrained=path)
    deeper = tmp_path / "resnet34.pth"  # every name and shape of resnet18, and more blocks
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), deeper)
    with pytest.raises(UsageError, match=r"resnet34\.pth: holds \d+ tensors the network lacks"):
        create_fpn_backbone("resnet18", pretrained=deeper)
    with pytest.raises(UsageError, match=r"resnet34\.pth: no tensor matches"):
        create_backbone("resnet18", pretrained=deeper)  # the headless body: nothing fits in order
    headless = tmp_path / "resnet18-headless.pth"  # no ImageNet classifier: still complete
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save({k: v for k, v in state.items() if not k.startswith("fc.")}, headless)
    fpn = create_fpn_backbone("resnet18", pretrained=headless)
    assert torch.equal(fpn.body.conv1.weight, state["conv1.weight"])
    assert torch.equal(
        create_backbone("resnet18", pretrained=headless).body[0].weight, state["conv1.weight"]
    )


def test_embed_with_mismatched_weights_is_one_line(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    from tests.stores import make_store, planted_images

    images, labels = planted_images(2, 64, 32, seed=1)
    store = make_store(tmp_path / "s", images, labels)
    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    result = cli(
        "embed", store, "--backbone", "resnet18", "--pretrained", path, "--patch-size", "32"
    )
    assert result.code == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "resnet34.pth: no tensor matches" in result.stderr
    assert not list((store / "images").glob("*/features/*"))  # nothing half-written
