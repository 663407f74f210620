"""The short names of encoders the field starts from (``uni``, ``uni2-h``, ``virchow2``,
``h-optimus-0``, ``conch``, ``phikon``, ``dinov2-s/b/l``, ``resnet50-trunc``): where each one's
weights are published and how its authors use it (architecture, transform, pooling, width),
taken from its model card; docs/encoders.md cites each source, and a test checks this table
against that one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hiresctl.models import conch

# what the patch reader normalises every patch with (data/reader.py); an encoder with other
# statistics renormalises
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POOLINGS = ("cls", "cls+mean", "mean", "model")
# CLIP's statistics (CONCH normalises with them)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Transform:
    """What an encoder expects of its input: ``size`` (None: any side), the interpolation a
    patch of another side is resized with, and the mean and standard deviation of [0, 1] RGB."""

    size: int | None = None
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass(frozen=True)
class Known:
    """A short name: where its weights are published and how its authors use it."""

    hub: str  # the Hub repository its weights are published in
    architecture: str  # the timm architecture a plain state dict loads into
    kwargs: dict[str, Any]  # timm keyword arguments; layer classes by name (LAYERS)
    transform: Transform
    pooling: str  # cls | cls+mean (CLS beside the mean of the patch tokens) | mean
    width: int  # the feature width that pooling gives
    precision: str  # what its authors run it in
    files: tuple[str, ...] = ("pytorch_model.bin",)
    gated: bool = True  # the Hub asks for an agreement before it gives the files
    trunk: str | None = None  # a CNN cut after this stage (resnet50-trunc)
    extra: dict[str, Any] = field(default_factory=dict)


# Taken from each model's card: architecture and keyword arguments of its timm loading code,
# the transform it documents, how its authors pool the tokens into one feature.
KNOWN: dict[str, Known] = {
    "uni": Known(
        hub="MahmoodLab/UNI",
        architecture="vit_large_patch16_224",
        kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
        transform=Transform(224, "bilinear"),
        pooling="cls",
        width=1024,
        precision="fp16",
    ),
    "uni2-h": Known(
        hub="MahmoodLab/UNI2-h",
        architecture="vit_giant_patch14_224",
        kwargs={
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "no_embed_class": True,
            "mlp_layer": "swiglu_packed",
            "act_layer": "silu",
            "reg_tokens": 8,
            "dynamic_img_size": True,
        },
        transform=Transform(224, "bilinear"),
        pooling="cls",
        width=1536,
        precision="bf16",
    ),
    "virchow2": Known(
        hub="paige-ai/Virchow2",
        architecture="vit_huge_patch14_224",
        kwargs={
            "img_size": 224,
            "init_values": 1e-5,
            "reg_tokens": 4,
            "mlp_ratio": 5.3375,
            "global_pool": "",
            "dynamic_img_size": True,
            "mlp_layer": "swiglu_packed",
            "act_layer": "silu",
        },
        transform=Transform(224, "bicubic"),
        pooling="cls+mean",
        width=2560,
        precision="fp16",
    ),
    "h-optimus-0": Known(
        hub="bioptimus/H-optimus-0",
        architecture="vit_giant_patch14_reg4_dinov2",
        kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
        transform=Transform(
            224, "bicubic", (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517)
        ),
        pooling="cls",
        width=1536,
        precision="fp16",
    ),
    **{
        f"dinov2-{size}": Known(
            hub=f"timm/vit_{arch}_patch14_dinov2.lvd142m",
            architecture=f"vit_{arch}_patch14_dinov2",
            kwargs={"img_size": 518, "dynamic_img_size": True},
            transform=Transform(224, "bicubic"),
            pooling="cls",
            width=width,
            precision="fp32",
            files=("model.safetensors",),
            gated=False,
        )
        for size, arch, width in (("s", "small", 384), ("b", "base", 768), ("l", "large", 1024))
    },
    # CONCH's own package builds it (conch.py); TRIDENT's and its authors' patch feature
    "conch": Known(
        hub="MahmoodLab/CONCH",
        architecture=conch.CONFIG,
        kwargs={},
        transform=Transform(448, "bicubic", OPENAI_MEAN, OPENAI_STD),
        pooling="model",
        width=conch.WIDTH,
        precision="fp32",
        extra={"package": "conch"},
    ),
    # a transformers ViTModel (its Hub folder: config.json, model.safetensors), renamed to timm's
    "phikon": Known(
        hub="owkin/phikon",
        architecture="vit_base_patch16_224",
        kwargs={"img_size": 224, "norm_layer": "layernorm_eps12"},
        transform=Transform(224, "bilinear"),
        pooling="cls",
        width=768,
        precision="fp32",
        files=("model.safetensors", "pytorch_model.bin"),
        gated=False,
    ),
    "resnet50-trunc": Known(
        hub="timm/resnet50.tv_in1k",
        architecture="resnet50",
        kwargs={},
        transform=Transform(None, "bilinear"),
        pooling="mean",
        width=1024,
        precision="fp32",
        files=("model.safetensors",),
        gated=False,
        trunk="layer3",
    ),
}
NOT_YET = {
    "phikon-v2": "Phikon-v2 is a transformers Dinov2Model, whose layer names differ from ViTModel's",
}
