"""Models: backbones (registry), encoders by timm, Hub and short name, PatchGD head and
fusion, the IPS aggregator, segmenters."""

from hiresctl.models.backbones import (
    BACKBONES,
    Backbone,
    load_pretrained,
    load_weights,
)
from hiresctl.models.encoders import KNOWN, create_backbone, is_encoder_name, model_encoder
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
    "KNOWN",
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
    "is_encoder_name",
    "load_pretrained",
    "load_weights",
    "model_encoder",
    "scale_gradient",
    "sinusoidal",
    "upsample_region",
]
