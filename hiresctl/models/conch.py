"""CONCH's image encoder through CONCH's own package (``conch``, installed from its repository,
github.com/mahmoodlab/CONCH; it is not on the package index): the network is CONCH's
``CoCa``, built from its package's configuration, and the feature is what its authors and
TRIDENT take for patches, ``encode_image(x, proj_contrast=False, normalize=False)``: the
attention-pooled, layer-normed 512 values before the contrastive projection."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from storage import UsageError

CONFIG = "conch_ViT-B-16"
WIDTH = 512
INSTALL = "pip install git+https://github.com/mahmoodlab/CONCH (its package is not on the index)"


def available() -> bool:
    """Whether CONCH's package can be imported here (its module that defines the network: a
    folder left behind by an uninstall is only a namespace)."""
    try:
        return importlib.util.find_spec("conch.open_clip_custom") is not None
    except ImportError:  # no package named conch at all
        return False


def _package() -> Any:
    if not available():
        raise UsageError(f"conch: CONCH's network is defined by its own package; {INSTALL}")
    with warnings.catch_warnings():  # it imports timm's old module paths, which warn
        warnings.simplefilter("ignore")
        import conch.open_clip_custom as package
    return package


class ConchImage(nn.Module):
    """CONCH's image tower (``CoCa.visual``) as hiresctl's encoders take a network: one
    feature per image from ``forward_features``."""

    transformer = True  # a ViT-B/16 trunk: its activations are many tensors of a few MB

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual
        self.num_features = WIDTH

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual.forward_no_head(x, normalize=False)  # type: ignore[operator]

    def forward_head(self, out: torch.Tensor, pre_logits: bool = True) -> torch.Tensor:
        return out

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.trunk.set_grad_checkpointing(enable)  # type: ignore[union-attr, operator]


def build() -> ConchImage:
    """CONCH's ``CoCa`` from its package's configuration (random weights), its image tower
    kept (the text towers are not used for patch features)."""
    package = _package()
    path = Path(package.__file__).parent / "model_configs" / f"{CONFIG}.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.pop("custom_text", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = package.CoCa(**config)
    return ConchImage(model.visual)


def image_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The image tower's tensors of a CONCH checkpoint (``visual.…``), named as in
    :class:`ConchImage`; CONCH's own loader reads the same file into the whole ``CoCa``."""
    return {f"visual.{k[7:]}": v for k, v in state.items() if k.startswith("visual.")}


__all__ = ["CONFIG", "WIDTH", "ConchImage", "available", "build", "image_state"]
