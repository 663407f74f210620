"""Models: backbones (registry), PatchGD head and fusion, the IPS aggregator, segmenters."""

from hiresctl.models.backbones import (
    BACKBONES,
    Backbone,
    create_backbone,
    load_pretrained,
    load_weights,
)
from hiresctl.models.ips import (
    POSITIONAL_ENCODINGS,
    CrossAttentionAggregator,
    FeatureEncoder,
    IPSClassifier,
    sinusoidal,
)
from hiresctl.models.patchgd import (
    FUSIONS,
    ImageClassifier,
    PatchEncoder,
    PatchGDClassifier,
    PatchGDHead,
    scale_gradient,
)
from hiresctl.models.segmentation import (
    SEG_NETWORKS,
    PatchSegmenter,
    UNet,
    create_seg_network,
    upsample_region,
)

__all__ = [
    "BACKBONES",
    "FUSIONS",
    "POSITIONAL_ENCODINGS",
    "SEG_NETWORKS",
    "Backbone",
    "CrossAttentionAggregator",
    "FeatureEncoder",
    "IPSClassifier",
    "ImageClassifier",
    "PatchEncoder",
    "PatchGDClassifier",
    "PatchGDHead",
    "PatchSegmenter",
    "UNet",
    "create_backbone",
    "create_seg_network",
    "load_pretrained",
    "load_weights",
    "scale_gradient",
    "sinusoidal",
    "upsample_region",
]
