"""Models: backbones (registry), PatchGD head and fusion, the IPS aggregator."""

from hiresctl.models.backbones import BACKBONES, Backbone, create_backbone, load_pretrained
from hiresctl.models.ips import (
    POSITIONAL_ENCODINGS,
    CrossAttentionAggregator,
    IPSClassifier,
    sinusoidal,
)
from hiresctl.models.patchgd import (
    FUSIONS,
    ImageClassifier,
    PatchEncoder,
    PatchGDClassifier,
    PatchGDHead,
)

__all__ = [
    "BACKBONES",
    "FUSIONS",
    "POSITIONAL_ENCODINGS",
    "Backbone",
    "CrossAttentionAggregator",
    "IPSClassifier",
    "ImageClassifier",
    "PatchEncoder",
    "PatchGDClassifier",
    "PatchGDHead",
    "create_backbone",
    "load_pretrained",
    "sinusoidal",
]
