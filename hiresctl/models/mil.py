"""Multiple-instance aggregators over a bag of patch features (docs/methods.md §10).

A bag is one image's (N, D) patch features; every aggregator returns the bag's logits and one
non-negative weight per instance (where the model looked), whatever N is.
"""

from __future__ import annotations

import torch
from torch import nn

from hiresctl.models.backbones import Backbone
from storage import UsageError

AGGREGATORS = ("abmil", "transmil")


class Standardize(nn.Module):
    """``(x - mean) / scale`` per feature, with ``mean`` and ``scale`` buffers (saved with the
    model) set from the training features: frozen features come at whatever scale the encoder
    gives (random or foreign weights can give values of 0.01), and attention on unscaled inputs
    stayed at chance where standardised inputs learned."""

    mean: torch.Tensor
    scale: torch.Tensor

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    def fit(self, total: torch.Tensor, squares: torch.Tensor, count: int) -> None:
        """From the sum and the sum of squares of ``count`` instances."""
        mean = total / max(1, count)
        var = (squares / max(1, count) - mean**2).clamp_min(0)
        self.mean.copy_(mean)
        self.scale.copy_(var.sqrt().clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale


class GatedAttention(nn.Module):
    """Gated attention pooling (Ilse et al., 2018): ``a = softmax_i(wᵀ(tanh(V h_i) ⊙ σ(U h_i)))``,
    pooled ``z = Σ a_i h_i``."""

    def __init__(self, dim: int, hidden: int = 128, dropout: float = 0.0) -> None:
        super().__init__()
        self.value = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.gate = nn.Sequential(nn.Linear(dim, hidden), nn.Sigmoid(), nn.Dropout(dropout))
        self.score = nn.Linear(hidden, 1)

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, dim) → pooled (dim,), weights (N,) summing to 1."""
        weights = self.score(self.value(bag) * self.gate(bag)).squeeze(-1).softmax(0)
        return weights @ bag, weights


class ABMIL(nn.Module):
    """Attention MIL: Linear → ReLU → Dropout per instance, gated attention, a Linear."""

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        hidden: int = 256,
        attention: int = 128,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        self.standardize = Standardize(in_dim)
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention = GatedAttention(hidden, attention, dropout)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, weights = self.attention(self.embed(self.standardize(bag)))
        return self.classifier(pooled), weights


class TransformerMIL(nn.Module):
    """A small transformer aggregator in the spirit of TransMIL: instances embedded, a class
    token prepended, ``layers`` pre-norm encoder layers of full self-attention, the class token
    classified. Attention costs N² per layer, so long bags are subsampled in training
    (``max_instances``); the weights reported are the class token's attention in the last
    layer, averaged over heads."""

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        hidden: int = 256,
        heads: int = 4,
        layers: int = 2,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if hidden % heads:
            raise UsageError(f"mil_hidden {hidden} must be a multiple of heads {heads}")
        self.standardize = Standardize(in_dim)
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.cls = nn.Parameter(torch.zeros(1, 1, hidden))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                hidden, heads, 2 * hidden, dropout, batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(hidden)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([self.cls, self.embed(self.standardize(bag)).unsqueeze(0)], 1)
        for layer in self.layers[:-1]:
            x = layer(x)
        last: nn.TransformerEncoderLayer = self.layers[-1]  # type: ignore[assignment]
        normed = last.norm1(x)
        _, attention = last.self_attn(normed[:, :1], normed, normed, need_weights=True)
        x = last(x)
        weights = attention[0, 0, 1:]
        return self.classifier(self.norm(x[0, 0])), weights / weights.sum().clamp_min(1e-12)


def create_aggregator(
    name: str,
    in_dim: int,
    num_classes: int,
    hidden: int,
    attention: int,
    dropout: float,
    heads: int = 4,
) -> nn.Module:
    if name == "abmil":
        return ABMIL(in_dim, num_classes, hidden, attention, dropout)
    if name == "transmil":
        return TransformerMIL(in_dim, num_classes, hidden, heads, 2, dropout)
    raise UsageError(f"unknown aggregator {name!r}; valid: {', '.join(AGGREGATORS)}")


class EndToEndMIL(nn.Module):
    """A backbone trained jointly with gated attention on a bag of patches (``e2e-mil``)."""

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        hidden: int = 256,
        attention: int = 128,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.aggregator = ABMIL(backbone.num_features, num_classes, hidden, attention, dropout)

    def encode(self, patches: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(patches)

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, p, p) patches of one image → logits, weights."""
        return self.aggregator(self.encode(bag))
