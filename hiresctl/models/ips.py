"""Iterative Patch Selection parts: the cross-attention aggregator and its scorer (docs/methods.md §3)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from hiresctl.models.backbones import Backbone
from hiresctl.models.mil import Standardize
from hiresctl.models.patchgd import PatchEncoder
from storage import UsageError

POSITIONAL_ENCODINGS = ("none", "1d", "2d")


def sinusoidal(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """(…,) integer positions → (…, dim) sinusoidal encodings (sin on even, cos on odd dims)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, device=positions.device, dtype=torch.float32) / half
    )
    angles = positions.float().unsqueeze(-1) * freqs
    out = torch.zeros(*positions.shape, dim, device=positions.device)
    out[..., 0 : 2 * half : 2] = torch.sin(angles)
    out[..., 1 : 2 * half : 2] = torch.cos(angles)
    return out


class CrossAttentionAggregator(nn.Module):
    """Learnable query tokens attend over patch embeddings (no biases in the projections).

    ``x = LayerNorm(q + Dropout(out(attn · v)))`` then ``LayerNorm(x + Dropout(W2·ReLU(W1·x)))``.

    Initialised so that the block starts close to a plain pooling of the patches: the value
    and output projections orthogonal (they keep the embeddings' geometry), the feed-forward's
    last layer zero (its residual starts as the identity). With PyTorch's default
    initialisation, trained from scratch, IPS spent its first epochs near the class prior, as
    slow with the attention forced uniform, while a mean of the same embeddings straight into
    the classifier learned at once (docs/methods.md §3).
    """

    def __init__(
        self,
        dim: int = 128,
        heads: int = 8,
        dim_key: int = 16,
        dim_value: int = 16,
        dim_inner: int = 512,
        dropout: float = 0.1,
        tokens: int = 1,
    ) -> None:
        super().__init__()
        self.heads, self.dim_key, self.dim_value = heads, dim_key, dim_value
        self.queries = nn.Parameter(torch.randn(1, tokens, dim) * dim**-0.5)
        self.w_q = nn.Linear(dim, heads * dim_key, bias=False)
        self.w_k = nn.Linear(dim, heads * dim_key, bias=False)
        self.w_v = nn.Linear(dim, heads * dim_value, bias=False)
        self.out = nn.Linear(heads * dim_value, dim, bias=False)
        self.norm_attention = nn.LayerNorm(dim)
        last = nn.Linear(dim_inner, dim)
        self.feed_forward = nn.Sequential(nn.Linear(dim, dim_inner), nn.ReLU(inplace=True), last)
        self.norm_feed_forward = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        nn.init.orthogonal_(self.w_v.weight)
        nn.init.orthogonal_(self.out.weight)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) → attention weights (B, heads, tokens, N)."""
        batch, count, _ = x.shape
        q = self.w_q(self.queries).view(1, -1, self.heads, self.dim_key).transpose(1, 2)
        k = self.w_k(x).view(batch, count, self.heads, self.dim_key).transpose(1, 2)
        logits = (q / math.sqrt(self.dim_key)) @ k.transpose(-1, -2)
        return logits.softmax(dim=-1)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) → (B, N): attention averaged over heads and query tokens."""
        return self.attention(x).mean(dim=(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) → (B, tokens, D)."""
        batch, count, _ = x.shape
        attn = self.attention(x)
        v = self.w_v(x).view(batch, count, self.heads, self.dim_value).transpose(1, 2)
        mixed = (attn @ v).transpose(1, 2).reshape(batch, -1, self.heads * self.dim_value)
        tokens = self.norm_attention(self.queries + self.dropout(self.out(mixed)))
        return self.norm_feed_forward(tokens + self.dropout(self.feed_forward(tokens)))


class FeatureEncoder(nn.Module):
    """Stored patch features (N, ``in_dim``) → (N, ``latent_dim``): standardised with the
    training features' statistics, then Linear → ReLU → Dropout (the frozen encoder's place,
    the only part of it that learns)."""

    def __init__(self, in_dim: int, latent_dim: int = 128, dropout: float = 0.1) -> None:
        super().__init__()
        self.standardize = Standardize(in_dim)
        self.project = nn.Sequential(nn.Linear(in_dim, latent_dim), nn.ReLU(), nn.Dropout(dropout))
        self.latent_dim = latent_dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.project(self.standardize(features))


class IPSClassifier(nn.Module):
    """Instance encoder + positional encoding + cross-attention aggregator + Linear classifier.

    The encoder maps a batch of instances to (N, ``encoder.latent_dim``) embeddings: a
    :class:`PatchEncoder` over pixels (``ips``), or a :class:`FeatureEncoder` over stored
    features (``ips-features``); selection and aggregation do not depend on which."""

    def __init__(
        self,
        encoder: PatchEncoder | FeatureEncoder,
        num_classes: int,
        heads: int = 8,
        dim_key: int = 16,
        dim_value: int = 16,
        dim_inner: int = 512,
        dropout: float = 0.1,
        positional: str = "1d",
    ) -> None:
        super().__init__()
        if positional not in POSITIONAL_ENCODINGS:
            raise UsageError(
                f"unknown positional encoding {positional!r}; valid: {', '.join(POSITIONAL_ENCODINGS)}"
            )
        self.encoder = encoder
        dim = self.encoder.latent_dim
        self.aggregator = CrossAttentionAggregator(
            dim, heads, dim_key, dim_value, dim_inner, dropout
        )
        self.classifier = nn.Linear(dim, num_classes)
        self.positional = positional

    @classmethod
    def on_patches(
        cls, backbone: Backbone, num_classes: int, latent_dim: int | None = 128, **kwargs: Any
    ) -> IPSClassifier:
        """IPS over pixels: the backbone's pooled features, projected to ``latent_dim``."""
        return cls(PatchEncoder(backbone, latent_dim), num_classes, **kwargs)

    def with_positions(
        self, embeddings: torch.Tensor, indices: torch.Tensor, cols: int
    ) -> torch.Tensor:
        """Add the encoding of each patch's original grid index (row-major, ``cols`` wide)."""
        dim = embeddings.shape[-1]
        match self.positional:
            case "1d":
                return embeddings + sinusoidal(indices, dim)
            case "2d":
                rows, columns = indices // cols, indices % cols
                half = dim // 2
                enc = torch.cat([sinusoidal(rows, half), sinusoidal(columns, dim - half)], -1)
                return embeddings + enc
            case _:
                return embeddings

    def scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.aggregator.scores(embeddings)

    def classify(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, M, D) position-encoded embeddings → (B, classes) logits."""
        return self.classifier(self.aggregator(embeddings)[:, 0])
