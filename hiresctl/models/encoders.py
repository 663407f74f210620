"""Encoders the field starts from: any timm model (``timm:NAME``), any Hub model in timm's
format or a transformers ViT (``hf-hub:ORG/REPO[@REVISION]``, ``hf_vit.py``) and short names
for the pathology and natural-image encoders (``uni``, ``uni2-h``, ``virchow2``,
``h-optimus-0``, ``conch``, ``phikon``, ``dinov2-s/b/l``, ``resnet50-trunc``; ``known.py``), beside hiresctl's own backbones (``backbones.py``).

Nothing is ever downloaded. An encoder's weights come from, in this order:

1. ``pretrained`` (``--pretrained PATH``): a state-dict file (``.safetensors``, ``.bin``,
   ``.pth``, ``.pt``) or a Hub-format folder (``config.json`` beside ``model.safetensors`` or
   ``pytorch_model.bin``, as ``huggingface-cli download`` leaves it);
2. the site's weights file: ``HIRESCTL_WEIGHTS``, else ``~/.config/hiresctl/weights.yaml``, a
   mapping from encoder name to such a path;
3. the Hugging Face cache, when it already holds the model's files (read as with
   ``HF_HUB_OFFLINE=1``: no request leaves the machine).

A short name whose weights are in none of these is refused in one line that names the file to
place and where; ``timm:`` names without weights start from random weights (training from
scratch), and say so in their provenance.

Each encoder carries its own transform (input side, resize interpolation, mean and standard
deviation) and pooling, applied inside the module: patches arrive ImageNet-normalised at any
side (what the reader gives every backbone), are renormalised and resized the encoder's way,
and pooled its way, identically in ``embed``, training and ``predict``. :func:`provenance`
is what a feature set or checkpoint records of it.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hiresctl.models import conch, hf_vit
from hiresctl.models.backbones import BACKBONES, Backbone, create_registered
from hiresctl.models.known import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    KNOWN,
    NOT_YET,
    POOLINGS,
    Known,
    Transform,
)
from hiresctl.models.weights import Published, Weights, find_weights, read_state, weights_sha256
from storage import UsageError


def create_backbone(
    name: str, pretrained: str | Path | None = None, record: dict[str, Any] | None = None
) -> Backbone:
    """Any backbone by name: hiresctl's registered ones (``backbones.py``), or a timm, Hub or
    short name with its own weights, transform and pooling (:func:`create_encoder`). With
    ``record`` (the provenance a checkpoint saved), the encoder is rebuilt from it without
    weights: the checkpoint brings them."""
    if record and is_encoder_name(name):
        return encoder_from_record(record)
    if is_encoder_name(name):
        return create_encoder(name, pretrained)
    if name not in BACKBONES:
        valid = ", ".join([*BACKBONES, *KNOWN, "timm:NAME", "hf-hub:ORG/REPO"])
        raise UsageError(f"unknown backbone {name!r}; valid: {valid}")
    return create_registered(name, pretrained)


def is_encoder_name(name: str) -> bool:
    """Whether ``name`` is one of this module's names (timm, Hub or short)."""
    return name.startswith(("timm:", "hf-hub:")) or name in KNOWN or name in NOT_YET


# ---------------------------------------------------------------------------------- the module

LAYERS = {
    "swiglu_packed": ("timm.layers", "SwiGLUPacked"),
    "silu": ("torch.nn", "SiLU"),
    "layernorm_eps12": ("hiresctl.models.hf_vit", "LayerNormEps12"),
}


def _layers(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments with layer classes named in LAYERS resolved to the classes."""
    import importlib

    out = dict(kwargs)
    for key, value in kwargs.items():
        if isinstance(value, str) and value in LAYERS:
            module, attr = LAYERS[value]
            out[key] = getattr(importlib.import_module(module), attr)
    return out


class Encoder(Backbone):
    """A timm model with its transform and pooling: ImageNet-normalised patches of any side
    in, one feature per patch out (``forward_features``), or its spatial map
    (``forward_maps``: a CNN's last map, a ViT's patch tokens as a grid)."""

    def __init__(self, model: nn.Module, width: int, transform: Transform, pooling: str) -> None:
        if pooling not in POOLINGS:
            raise UsageError(f"unknown pooling {pooling!r}; valid: {', '.join(POOLINGS)}")
        super().__init__(model, width, pool="avg")
        self.transform = transform
        self.token_pooling = pooling
        self.provenance: dict[str, Any] = {}
        self.tokens = int(getattr(model, "num_prefix_tokens", 0))
        # a vision transformer (patch tokens through attention blocks), not a CNN
        self.transformer = hasattr(model, "patch_embed") or bool(getattr(model, "transformer", 0))
        imagenet = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        mean, std = torch.tensor(transform.mean), torch.tensor(transform.std)
        # x·scale + shift turns an ImageNet-normalised patch into this encoder's normalisation
        self.register_buffer("scale", (imagenet[1] / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer(
            "shift", ((imagenet[0] - mean) / std).view(1, 3, 1, 1), persistent=False
        )
        self.scale: torch.Tensor
        self.shift: torch.Tensor

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the blocks in the backward (timm's own checkpointing) instead of keeping
        their activations; refused for a model timm cannot checkpoint."""
        model = self.body.stages if isinstance(self.body, Trunk) else self.body
        if not hasattr(model, "set_grad_checkpointing"):
            raise UsageError(f"{self.provenance.get('encoder')}: no gradient checkpointing")
        try:
            model.set_grad_checkpointing(enable)  # type: ignore[operator]
        except (AssertionError, NotImplementedError) as exc:
            raise UsageError(f"gradient checkpointing is not supported here ({exc})") from None

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        t = self.transform
        if t.mean != IMAGENET_MEAN or t.std != IMAGENET_STD:
            x = x * self.scale.to(x.dtype) + self.shift.to(x.dtype)
        if t.size is not None and x.shape[-2:] != (t.size, t.size):
            x = F.interpolate(
                x, size=(t.size, t.size), mode=t.interpolation, align_corners=False, antialias=True
            )
        return x

    def forward_maps(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body.forward_features(self.prepare(x))  # type: ignore[operator]
        if out.dim() == 4:
            return out
        patches = out[:, self.tokens :]
        side = round(patches.shape[1] ** 0.5)
        return patches.transpose(1, 2).reshape(out.shape[0], -1, side, side)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body.forward_features(self.prepare(x))  # type: ignore[operator]
        if out.dim() == 4:  # a CNN's map
            return out.mean(dim=(2, 3))
        pooling = self.token_pooling
        if pooling == "model":
            return self.body.forward_head(out, pre_logits=True)  # type: ignore[operator]
        if pooling == "cls":
            return out[:, 0]
        if pooling == "mean":
            return out[:, self.tokens :].mean(dim=1)
        return torch.cat([out[:, 0], out[:, self.tokens :].mean(dim=1)], dim=1)


class Trunk(nn.Module):
    """A timm CNN cut after one of its stages (``forward_features`` gives that stage's map)."""

    def __init__(self, model: nn.Module, last: str) -> None:
        super().__init__()
        names = [n for n, _ in model.named_children()]
        keep = names[: names.index(last) + 1]
        self.stages = nn.Sequential(*(getattr(model, n) for n in keep))
        self.names = keep

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)

    def load(self, state: dict[str, torch.Tensor], where: Path) -> None:
        own = {}
        for index, name in enumerate(self.names):
            for key, value in state.items():
                if key.startswith(f"{name}."):
                    own[f"stages.{index}.{key[len(name) + 1 :]}"] = value
        _load(self, own, where)


def create_encoder(name: str, pretrained: str | Path | None = None) -> Encoder:
    """Build ``name`` (a timm, Hub or short name) with its weights, transform and pooling;
    its ``provenance`` says what it is."""

    if name in NOT_YET:
        raise UsageError(f"{name}: {NOT_YET[name]}; not supported yet")
    weights = find_weights(name, pretrained, published(name))
    config = weights.config()
    known = KNOWN.get(name)
    if known is not None:
        architecture, model_args = known.architecture, dict(known.kwargs)
    elif name.startswith("timm:"):
        architecture = name.removeprefix("timm:")
        model_args = dict(config.get("model_args") or {})
    elif hf_vit.is_transformers_vit(config):  # hf-hub: a transformers ViT's folder
        architecture = "vit_base_patch16_224"  # its shape set by the arguments
        model_args = hf_vit.vit_args(config, weights.path or name)
    else:  # hf-hub: the folder's config says what it is
        if "architecture" not in config:
            raise UsageError(
                f"{weights.path}: {name} needs the repository's config.json (timm's format: "
                "architecture, model_args; or a transformers ViT's) beside its weights"
            )
        architecture = str(config["architecture"])
        model_args = dict(config.get("model_args") or {})
    trunk = known.trunk if known is not None else None
    if known is not None and known.extra.get("package") == "conch":
        return _conch_encoder(name, known, weights)
    model, body = _build(name, architecture, model_args, trunk)
    file = weights.file()
    if file is not None:
        state = read_state(file)
        if hf_vit.has_transformers_layout(state):
            state = hf_vit.to_timm(state)
        if isinstance(body, Trunk):
            body.load(state, file)
        else:
            _load(body, state, file)
    transform = _transform(known, model, config)
    pooling = known.pooling if known is not None else "model"
    if known is None and hf_vit.is_transformers_vit(config):  # its processor's transform
        folder = weights.path if weights.path is not None and weights.path.is_dir() else None
        transform = Transform(**hf_vit.processor_transform(folder, config))
        pooling = "cls"  # last_hidden_state[:, 0], as its users take it
    width = known.width if known is not None else int(getattr(model, "num_features"))  # noqa: B009
    encoder = Encoder(body, width, transform, pooling)
    encoder.provenance = provenance(
        name, architecture, weights, file, transform, pooling, width, model_args, trunk
    )
    return encoder


def _conch_encoder(name: str, known: Known, weights: Weights) -> Encoder:
    """CONCH through its own package, its image tower loaded whole from the checkpoint."""
    body = conch.build()
    file = weights.file()
    if file is not None:
        _load(body, conch.image_state(read_state(file)), file)
    encoder = Encoder(body, known.width, known.transform, known.pooling)
    encoder.provenance = provenance(
        name, known.architecture, weights, file, known.transform, known.pooling, known.width
    )
    return encoder


def _build(
    name: str, architecture: str, model_args: dict[str, Any], trunk: str | None
) -> tuple[nn.Module, nn.Module]:
    """timm's model (random weights) and the module the encoder runs: the model, or its trunk."""
    import timm

    try:
        model = timm.create_model(
            architecture, pretrained=False, num_classes=0, **_layers(model_args)
        )
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"{name}: timm cannot build {architecture!r} ({exc})") from None
    return model, (Trunk(model, trunk) if trunk else model)


def published(name: str) -> Published:
    """Where a name's weights are published; short and Hub names need them."""
    if name.startswith("hf-hub:"):
        repo, _, revision = name.removeprefix("hf-hub:").partition("@")
        return Published(repo, revision or None, required=True)
    if name in KNOWN:
        known = KNOWN[name]
        return Published(known.hub, None, known.files, known.gated, required=True)
    return Published()


def model_encoder(model: nn.Module) -> dict[str, Any] | None:
    """The provenance of the encoder (timm, Hub or short name) inside ``model``, if any."""
    for module in model.modules():
        if isinstance(module, Encoder) and module.provenance:
            return dict(module.provenance)
    return None


def encoder_from_record(record: dict[str, Any]) -> Encoder:
    """The encoder a checkpoint's provenance describes, without weights (the checkpoint holds
    them): nothing is looked up on this machine, so a run loads wherever its folder goes."""
    try:
        t = record["transform"]
        transform = Transform(t["size"], t["interpolation"], tuple(t["mean"]), tuple(t["std"]))
        if record["architecture"] == conch.CONFIG:
            body: nn.Module = conch.build()
        else:
            _, body = _build(
                record["encoder"], record["architecture"], record["model_args"], record.get("trunk")
            )
        encoder = Encoder(body, int(record["width"]), transform, record["pooling"])
    except (KeyError, TypeError) as exc:
        raise UsageError(f"the checkpoint's encoder record lacks {exc}") from None
    encoder.provenance = dict(record)
    return encoder


HEAD_KEYS = ("head.", "fc.", "classifier.", "head_drop.")


def _load(module: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """Every tensor of ``module`` from ``state`` (a classifier head may be left over): a
    partial load would train on a mix of pretrained and random layers without a word."""
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    misfit = [k for k in own if k in state and state[k].shape != own[k].shape]
    unused = [k for k in state if k not in own and not k.startswith(HEAD_KEYS)]
    if missing or misfit or unused:
        first = (misfit or missing or unused)[0]
        if first in misfit:
            why = (
                f"{first!r}: {tuple(own[first].shape)} expected, {tuple(state[first].shape)} found"
            )
        elif first in missing:
            why = f"{first!r} absent from the file"
        else:
            why = f"{first!r} has no place in the network"
        raise UsageError(
            f"{where}: does not fit the encoder ({len(missing)} missing, {len(misfit)} of "
            f"another shape, {len(unused)} unused; first {why}); weights of another model?"
        )
    module.load_state_dict({k: state[k] for k in own if k in state}, strict=False)


def _transform(known: Known | None, model: nn.Module, config: dict[str, Any]) -> Transform:
    """The authors' transform for a short name; else the Hub config's or timm's pretrained
    configuration (input size, interpolation, mean, std)."""
    if known is not None:
        return known.transform
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    cfg.update(config.get("pretrained_cfg") or {})
    size = cfg.get("input_size") or (3, None, None)
    fixed = not getattr(model, "dynamic_img_size", False) and hasattr(model, "patch_embed")
    interpolation = cfg.get("interpolation") or "bilinear"
    if interpolation not in ("bilinear", "bicubic"):
        interpolation = "bilinear"
    return Transform(
        int(size[-1]) if fixed and size[-1] else None,
        interpolation,
        tuple(cfg.get("mean") or IMAGENET_MEAN),
        tuple(cfg.get("std") or IMAGENET_STD),
    )


def provenance(
    name: str,
    architecture: str,
    weights: Weights,
    file: Path | None,
    transform: Transform,
    pooling: str,
    width: int,
    model_args: dict[str, Any] | None = None,
    trunk: str | None = None,
) -> dict[str, Any]:
    """What a feature set or checkpoint records of its encoder: enough to refuse features
    computed another way, to say how they were computed, and to rebuild it (``model_args``:
    timm's keyword arguments; ``trunk``: the stage a CNN is cut after)."""
    import timm

    digest = weights_sha256(file)
    return {
        "encoder": name,
        "architecture": architecture,
        "weights": f"sha256:{digest}" if digest else "random",
        "weights_source": weights.source,
        "revision": weights.revision,
        "transform": {
            k: list(v) if isinstance(v, tuple) else v for k, v in asdict(transform).items()
        },
        "pooling": pooling,
        "width": width,
        "timm": timm.__version__,
        "torch": torch.__version__.split("+")[0],
        "model_args": model_args or {},
        "trunk": trunk,
    }
