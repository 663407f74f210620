"""Small timm encoders written as users hold them: a Hub-format folder (timm's config.json
beside model.safetensors), random weights."""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file


def hub_folder(
    folder: Path,
    fixed_side: int | None = None,
    mean: tuple[float, float, float] = (0.6, 0.5, 0.4),
    std: tuple[float, float, float] = (0.2, 0.25, 0.3),
    seed: int = 0,
) -> torch.nn.Module:
    """Write timm's ``test_vit`` (random weights from ``seed``) as a Hub-format folder whose
    configuration states ``mean``/``std`` and, with ``fixed_side``, a fixed input side; the
    model as written."""
    torch.manual_seed(seed)
    args = {"img_size": fixed_side or 160, "dynamic_img_size": fixed_side is None}
    model = timm.create_model("test_vit", pretrained=False, num_classes=0, **args).eval()
    folder.mkdir(parents=True)
    side = fixed_side or 160
    config = {
        "architecture": "test_vit",
        "num_features": model.num_features,
        "model_args": args,
        "pretrained_cfg": {
            "input_size": [3, side, side],
            "interpolation": "bicubic",
            "mean": list(mean),
            "std": list(std),
        },
    }
    (folder / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    return model


def transformers_vit_folder(
    folder: Path, processor: dict | None = None, seed: int = 0, **config: int
) -> torch.nn.Module:
    """Write a transformers ``ViTModel`` (random weights from ``seed``; its pooler too, as
    Phikon's folder holds it) with ``save_pretrained``, and ``processor`` as its
    ``preprocessor_config.json``; the model as written, in evaluation mode."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    shape = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    shape |= {"intermediate_size": 64, "image_size": 32, "patch_size": 8}
    model = ViTModel(ViTConfig(**(shape | config))).eval()
    model.save_pretrained(folder)
    if processor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return model
