"""Vision transformers saved by Hugging Face ``transformers`` (``ViTModel``, e.g. Phikon) as
timm's ``VisionTransformer``: the architecture from the folder's ``config.json``, the
transform from its ``preprocessor_config.json``, the weights renamed (query, key and value
joined into timm's ``qkv``). The two compute the same function: the same pre-norm blocks,
exact GELU, LayerNorm ε from the config, and ``last_hidden_state`` is timm's normed tokens."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from storage import UsageError

# transformers' ViTImageProcessor when a folder has no preprocessor_config.json
PROCESSOR_DEFAULTS = {"size": 224, "resample": 2, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL's codes, as the processor records them

LayerNormEps12 = functools.partial(nn.LayerNorm, eps=1e-12)  # transformers ViT's default ε


def is_transformers_vit(config: dict[str, Any]) -> bool:
    """Whether a Hub folder's ``config.json`` is transformers' ViT configuration."""
    return config.get("model_type") == "vit"


def vit_args(config: dict[str, Any], where: Path | str) -> dict[str, Any]:
    """timm ``VisionTransformer`` keyword arguments for a transformers ViT configuration;
    what timm's blocks cannot compute (another activation, ε or a mask token) is refused."""
    act = config.get("hidden_act", "gelu")
    eps = float(config.get("layer_norm_eps", 1e-12))
    if act != "gelu" or eps not in (1e-12, 1e-6):
        raise UsageError(
            f"{where}: a transformers ViT with hidden_act {act!r} and layer_norm_eps {eps} "
            "has no timm equivalent (gelu with ε 1e-12 or 1e-6)"
        )
    try:
        hidden = int(config["hidden_size"])
        args: dict[str, Any] = {
            "img_size": int(config.get("image_size", 224)),
            "patch_size": int(config.get("patch_size", 16)),
            "in_chans": int(config.get("num_channels", 3)),
            "embed_dim": hidden,
            "depth": int(config["num_hidden_layers"]),
            "num_heads": int(config["num_attention_heads"]),
            "mlp_ratio": int(config["intermediate_size"]) / hidden,
            "qkv_bias": bool(config.get("qkv_bias", True)),
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"{where}: config.json of a transformers ViT lacks {exc}") from None
    if eps == 1e-12:
        args["norm_layer"] = "layernorm_eps12"
    return args


def processor_transform(folder: Path | None, config: dict[str, Any]) -> dict[str, Any]:
    """Side, interpolation, mean and std of the folder's ``preprocessor_config.json``
    (transformers' ViTImageProcessor defaults where it has none)."""
    values: dict[str, Any] = dict(PROCESSOR_DEFAULTS, size=config.get("image_size", 224))
    path = folder / "preprocessor_config.json" if folder is not None else None
    if path is not None and path.is_file():
        try:
            processor = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UsageError(f"{path}: not readable JSON ({exc})") from None
        size = processor.get("size", values["size"])
        if isinstance(size, dict):
            size = size.get("height", size.get("shortest_edge", values["size"]))
        values.update(
            size=size,
            resample=processor.get("resample", values["resample"]),
            mean=tuple(processor.get("image_mean", values["mean"])),
            std=tuple(processor.get("image_std", values["std"])),
        )
    values["interpolation"] = RESAMPLE.get(int(values.pop("resample")), "bilinear")
    return values


def has_transformers_layout(state: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(("embeddings.patch_embeddings.", "vit.embeddings.")) for k in state)


_BLOCK = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}


def to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers ViT state dict (``ViTModel``, or ``vit.``-prefixed as in
    ``ViTForImageClassification``) in timm's names. The pooler and a classifier are left out
    (timm's ``head.``), as is the mask token of masked-image pretraining."""
    state = {k.removeprefix("vit."): v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in _TOP:
            out[_TOP[key]] = value
        elif key.startswith("encoder.layer."):
            index, _, rest = key.removeprefix("encoder.layer.").partition(".")
            name, _, kind = rest.rpartition(".")
            if name.startswith("attention.attention."):
                part = name.removeprefix("attention.attention.")
                qkv.setdefault((index, kind), {})[part] = value
            elif name in _BLOCK:
                out[f"blocks.{index}.{_BLOCK[name]}.{kind}"] = value
            else:
                out[key] = value  # unknown: the load names it as having no place
        elif key.startswith(("pooler.", "classifier.")):
            out["head." + key] = value
        elif key != "embeddings.mask_token":
            out[key] = value
    for (index, kind), parts in qkv.items():
        if set(parts) == {"query", "key", "value"}:  # else the load names qkv as absent
            out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat(
                [parts["query"], parts["key"], parts["value"]]
            )
    return out


__all__ = [
    "LayerNormEps12",
    "has_transformers_layout",
    "is_transformers_vit",
    "processor_transform",
    "to_timm",
    "vit_args",
]
