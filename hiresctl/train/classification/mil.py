"""Multiple-instance methods (docs/methods.md §10): attention MIL on stored features
(``abmil``, ``transmil``) and end to end on K random patches (``e2e-mil``).

They run on the shared loop like every method (checkpoints, resume, DDP, ``--memory-budget``,
metrics, report, ``predict`` with attention heatmaps); what differs is what they read.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from hiresctl.data import PatchGrid, PatchReader, ReadRequest, ReadTag
from hiresctl.models.ips import FeatureEncoder, IPSClassifier
from hiresctl.models.mil import EndToEndMIL, Standardize, create_aggregator
from hiresctl.train.classification.base import ClassificationMethod
from hiresctl.train.memory import PatchCost
from hiresctl.train.methods import Heatmap, Reads, StepContext, chunks
from hiresctl.train.recipe import Recipe
from hiresctl.train.registry import register_method
from storage import StoreError, UsageError

_NO_GRID = PatchGrid.of(1, 1, 1)  # feature reads carry no grid
STANDARDIZE_IMAGES = 256


# CLAM's settings for attention MIL on frozen features: Adam 2e-4, weight decay 1e-5, dropout 0.25
@register_method(
    "cls",
    "abmil",
    defaults={"lr": 2e-4, "weight_decay": 1e-5, "dropout": 0.25, "calibration_batches": 0},
)
class FeatureMIL(ClassificationMethod):
    """An aggregator trained on each image's stored feature set: no pixel is read, so an epoch
    costs the aggregator's work alone (the features were paid for once by ``hiresctl embed``)."""

    aggregator = "abmil"
    encodes_pixels = False

    def __init__(self, recipe: Recipe, num_classes: int, reader: PatchReader) -> None:
        super().__init__(recipe, num_classes, reader)
        self._cells: dict[str, tuple[np.ndarray, np.ndarray, tuple[int, int], float]] = {}

    def feature_set(self) -> str:
        """The recipe's ``features``, else the one set every complete image has."""
        if self.recipe.features:
            return self.recipe.features
        dataset = self.reader.dataset
        names: set[str] | None = None
        for entry in dataset.entries(complete_only=True):
            found = set(dataset.feature_sets(entry.id))
            names = found if names is None else names & found
        if not names:
            raise UsageError(
                f"{dataset.path}: {self.name} trains on stored features and no feature set is "
                "complete for every image; run `hiresctl embed` first"
            )
        if len(names) > 1:
            raise UsageError(
                f"{dataset.path}: several feature sets ({', '.join(sorted(names))}); choose one "
                "with --set features=NAME"
            )
        self.recipe = self.recipe.replace(features=next(iter(names)))
        return self.recipe.features or ""

    def inputs_identity(self) -> dict[str, Any] | None:
        """The feature set's name, encoder, weights, patch, level and width (from the first
        complete image: a set is embedded with one setting for the whole store)."""
        first = self.reader.dataset.entries(complete_only=True)[0].id
        attrs = self._attrs(first)
        settings = attrs.get("settings", {})
        identity = {
            "features": self.feature_set(),
            "encoder": settings.get("backbone"),
            "weights": settings.get("weights"),
            "patch_size": settings.get("patch_size"),
            "level": settings.get("level"),
            "dim": int(attrs["dim"]),
        }
        # how an encoder by timm, Hub or short name read its patches (sets of hiresctl's own
        # backbones, and of earlier versions, hold the ImageNet transform and do not say it)
        for key in ("transform", "pooling"):
            if key in settings:
                identity[key] = settings[key]
        return identity

    def prepared_seconds(self) -> float | None:
        """The feature set's extraction time over every complete image of the store (training
        and evaluation both need them); None if a set predates the timing."""
        total = 0.0
        for entry in self.reader.dataset.entries(complete_only=True):
            seconds = self._attrs(entry.id).get("seconds")
            if seconds is None:
                return None
            total += float(seconds)
        return total

    def _attrs(self, image_id: str) -> dict:
        found = self.reader.dataset.feature_set(image_id, self.feature_set())
        if found is None:
            raise StoreError(
                f"{self.reader.dataset.path}/images/{image_id}",
                f"has no complete feature set {self.feature_set()!r} (run `hiresctl embed`)",
            )
        return found[2]

    def build_model(self) -> nn.Module:
        r = self.recipe
        dataset = self.reader.dataset
        training = [e.id for e in dataset.entries(r.train_split, complete_only=True)]
        if not training:
            training = [e.id for e in dataset.entries(complete_only=True)]
        dim = int(self._attrs(training[0])["dim"])
        model, standardize = self.aggregator_model(dim)
        # the inputs' standardisation, from (at most STANDARDIZE_IMAGES) training images
        total, squares, count = torch.zeros(dim), torch.zeros(dim), 0
        for image_id in training[:STANDARDIZE_IMAGES]:
            bag = self.reader.read_features(image_id, self.feature_set()).double()
            total += bag.sum(0).float()
            squares += (bag**2).sum(0).float()
            count += len(bag)
        standardize.fit(total, squares, count)
        return model

    def aggregator_model(self, dim: int) -> tuple[nn.Module, Standardize]:
        """The model over bags of ``dim`` features, and its input standardisation."""
        r = self.recipe
        model = create_aggregator(
            self.aggregator,
            dim,
            self.num_classes,
            r.mil_hidden,
            r.attention_dim,
            r.dropout,
            r.heads,
        )
        return model, model.standardize  # type: ignore[return-value]

    def cells(self, image_id: str) -> tuple[np.ndarray, np.ndarray, tuple[int, int], float]:
        """Each stored instance's (row, col) on the image's grid of patch cells at the
        recipe's level, that grid's (rows, cols) and the cell's side in level pixels (read
        from the store once per image: selection asks every step)."""
        if image_id not in self._cells:
            self._cells[image_id] = self._read_cells(image_id)
        return self._cells[image_id]

    def _read_cells(self, image_id: str) -> tuple[np.ndarray, np.ndarray, tuple[int, int], float]:
        _, coords, attrs = self.reader.dataset.feature_set(image_id, self.feature_set())  # type: ignore[misc]
        cell = float(attrs["patch_size_level0"]) / 2**self.recipe.level
        xy = np.asarray(coords[...]) / 2**self.recipe.level
        _, height, width = self.reader.shape(image_id)
        shape = (int(np.ceil(height / cell)), int(np.ceil(width / cell)))
        rows, cols = (xy[:, 1] // cell).astype(int), (xy[:, 0] // cell).astype(int)
        return np.minimum(rows, shape[0] - 1), np.minimum(cols, shape[1] - 1), shape, cell

    def heatmap(self, image_id: str, weights: np.ndarray, what: str) -> Heatmap:
        """``weights`` (one per stored instance) placed on the instances' cells."""
        rows, cols, shape, cell = self.cells(image_id)
        scores = np.zeros(shape, np.float32)
        np.maximum.at(scores, (rows, cols), weights.astype(np.float32))
        return Heatmap(image_id, scores, cell, what)

    def plan(self, image_ids: list[str], seed: int, train: bool) -> list[ReadRequest]:
        name = self.feature_set()
        return [
            ReadRequest(
                image_id, "features", _NO_GRID, tag=ReadTag("bag", b, number=seed), feature_set=name
            )
            for b, image_id in enumerate(image_ids)
        ]

    def _bag(self, request: ReadRequest, bag: torch.Tensor, train: bool) -> torch.Tensor:
        cap = self.recipe.max_instances
        if train and cap is not None and len(bag) > cap:
            rng = np.random.default_rng([request.tag.number, request.tag.image])
            bag = bag[torch.as_tensor(np.sort(rng.choice(len(bag), cap, replace=False)))]
        return bag

    def _forward(
        self, ctx: StepContext, reads: Reads, train: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        logits, weights = [], []
        for request, bag in reads:
            with ctx.autocast():
                out, w = self.model(self._bag(request, bag, train).to(ctx.device))
            logits.append(out.float())
            weights.append(w.detach().float().cpu())
        return torch.stack(logits), weights

    def forward(
        self, ctx: StepContext, image_ids: list[str], reads: Reads, train: bool
    ) -> torch.Tensor:
        return self._forward(ctx, reads, train)[0]

    def explain(
        self, ctx: StepContext, image_ids: list[str], reads: Reads
    ) -> tuple[torch.Tensor, list[Heatmap]]:
        """Logits, and each instance's attention weight placed on its patch's cell."""
        self.model.eval()
        with torch.no_grad():
            logits, weights = self._forward(ctx, reads, train=False)
        maps = [
            self.heatmap(image_id, w.numpy(), "attention weight")
            for image_id, w in zip(image_ids, weights, strict=True)
        ]
        return logits.cpu(), maps

    def describe(self, image_id: str) -> dict[str, str]:
        attrs = self._attrs(image_id)
        cap = self.recipe.max_instances
        return {
            "patch": f"{attrs['patch_size']}² (level {attrs['level']})",
            "sampling": f"all N={attrs['count']} stored features"
            + (f", at most {cap} per training bag" if cap else ""),
            "sees": f"frozen {attrs['encoder']} features ({attrs['settings']['weights']})",
        }

    def memory(
        self, model: nn.Module, images: list[Any], cost: PatchCost
    ) -> tuple[int, int, int | None]:
        """(per image, per patch, patches wanted): a bag's features and the aggregator's
        activations per instance; no patch is encoded."""
        r = self.recipe
        most = max(int(self._attrs(im.image_id)["count"]) for im in images)
        if r.max_instances:
            most = min(most, r.max_instances)
        dim = int(self._attrs(images[0].image_id)["dim"])
        per_instance = 4 * (dim + 6 * r.mil_hidden + 3 * r.attention_dim)
        if self.aggregator == "transmil":
            per_instance += 4 * r.heads * most  # the attention matrix of a layer
        return most * per_instance * 2, 0, None


# a transformer over all instances is N² per layer, so its bags are capped
@register_method(
    "cls",
    "transmil",
    defaults={
        "lr": 2e-4,
        "weight_decay": 1e-5,
        "dropout": 0.1,
        "max_instances": 4096,
        "calibration_batches": 0,
    },
)
class TransMIL(FeatureMIL):
    """A small transformer aggregator on each image's stored feature set (bags capped at
    ``max_instances``: attention is N² per layer)."""

    aggregator = "transmil"


# IPS's own settings (see `ips`); on features a selection iteration is cheap, so I is larger
@register_method(
    "cls",
    "ips-features",
    defaults={
        "latent_dim": 128,
        "weight_decay": 0.1,
        "schedule": "cosine",
        "min_lr_ratio": 1e-3,
        "dropout": 0.1,
        "memory_size": 32,
        "iter_size": 256,
        "positional": "2d",
        "calibration_batches": 0,
    },
)
class FeatureIPS(FeatureMIL):
    """Iterative Patch Selection on each image's stored feature set (docs/methods.md §10): the
    instances are scored ``iter_size`` [I] at a time without gradient, the ``memory_size``
    [M] best kept, and only those M pass through the learned projection and the aggregator
    with gradient. The bag is read whole (features are small); what stays bounded is the
    activations, M per image whatever N is."""

    model: IPSClassifier

    def aggregator_model(self, dim: int) -> tuple[nn.Module, Standardize]:
        r = self.recipe
        encoder = FeatureEncoder(dim, r.latent_dim or dim, r.dropout)
        model = IPSClassifier(
            encoder,
            self.num_classes,
            heads=r.heads,
            dim_key=r.dim_key,
            dim_value=r.dim_value,
            dim_inner=r.dim_inner,
            dropout=r.dropout,
            positional=r.positional,
        )
        return model, encoder.standardize

    def _select(
        self, ctx: StepContext, request: ReadRequest, bag: torch.Tensor, train: bool
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(the M selected instances' indices, their grid positions, the grid's columns)."""
        model = self.model
        rows, cols, (_, width), _ = self.cells(request.image_id)
        positions = torch.as_tensor(rows * width + cols, device=ctx.device)
        memory, step = self.recipe.memory_size, self.recipe.iter_size
        order = torch.arange(len(bag), device=ctx.device)
        if train:  # ties break at random, as in `ips`
            rng = np.random.default_rng([request.tag.number, request.tag.image])
            order = torch.as_tensor(rng.permutation(len(bag)), device=ctx.device)
        model.eval()
        kept = order[:memory]
        with torch.no_grad(), ctx.autocast():
            kept_emb = model.with_positions(
                model.encoder(bag[kept]).float(), positions[kept], width
            )
            for part in order[memory:].split(step) if len(bag) > memory else ():
                emb = model.with_positions(model.encoder(bag[part]).float(), positions[part], width)
                candidates, candidate_idx = torch.cat([kept_emb, emb]), torch.cat([kept, part])
                top = model.scores(candidates.unsqueeze(0))[0].topk(memory).indices
                kept_emb, kept = candidates[top], candidate_idx[top]
        kept = kept.sort().values
        return kept, positions[kept], width

    def _forward(
        self, ctx: StepContext, reads: Reads, train: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model = self.model
        logits, weights = [], []
        for request, bag in reads:
            bag = bag.to(ctx.device)
            kept, positions, width = self._select(ctx, request, bag, train)
            model.train(train)
            with ctx.autocast():
                emb = model.with_positions(model.encoder(bag[kept]).float(), positions, width)
                logits.append(model.classify(emb.unsqueeze(0))[0].float())
            w = torch.zeros(len(bag))
            if train:  # the weights are for heatmaps; a training step does not score again
                ctx.patches_with_grad += len(kept)
            else:
                with torch.no_grad():
                    w[kept.cpu()] = model.scores(emb.detach().unsqueeze(0))[0].float().cpu()
            weights.append(w)
        return torch.stack(logits), weights

    def describe(self, image_id: str) -> dict[str, str]:
        attrs = self._attrs(image_id)
        r = self.recipe
        return {
            "patch": f"{attrs['patch_size']}² (level {attrs['level']})",
            "sampling": f"M={min(r.memory_size, int(attrs['count']))} of N={attrs['count']} "
            f"stored features, I={r.iter_size}",
            "sees": f"frozen {attrs['encoder']} features ({attrs['settings']['weights']}), "
            "selected",
        }

    def memory(
        self, model: nn.Module, images: list[Any], cost: PatchCost
    ) -> tuple[int, int, int | None]:
        """The whole bag's features, one scored group (M + I) of embeddings, and M instances'
        activations with gradient."""
        r = self.recipe
        most = max(int(self._attrs(im.image_id)["count"]) for im in images)
        dim = int(self._attrs(images[0].image_id)["dim"])
        latent = r.latent_dim or dim
        per_instance = 4 * (dim + 3 * latent + 2 * r.heads * r.dim_key + r.dim_inner)
        scored, kept = min(most, r.memory_size + r.iter_size), min(most, r.memory_size)
        return 4 * dim * most + scored * per_instance + 2 * kept * per_instance, 0, None


@register_method("cls", "e2e-mil", defaults={"dropout": 0.25, "calibration_batches": 0})
class E2EMIL(ClassificationMethod):
    """The backbone and gated attention trained together on ``bag_size`` [K] random kept
    patches per image per step, all the batch's patches through the backbone as one batch (so
    BatchNorm sees several images). Evaluation encodes every kept patch without gradient,
    ``fill_batch`` at a time, and attends over all of them."""

    model: EndToEndMIL

    def build_model(self) -> nn.Module:
        r = self.recipe
        return EndToEndMIL(
            self.backbone(), self.num_classes, r.mil_hidden, r.attention_dim, r.dropout
        )

    def plan(self, image_ids: list[str], seed: int, train: bool) -> list[ReadRequest]:
        rng = np.random.default_rng(seed)
        requests = []
        for b, image_id in enumerate(image_ids):
            grid, kept = self.patches(image_id, train)
            if train:
                chosen = np.sort(rng.permutation(kept)[: self.recipe.bag_size])
                requests.append(
                    ReadRequest(image_id, "patches", grid, chosen, ReadTag("bag", b, last=True))
                )
                continue
            parts = chunks(kept, self.recipe.fill_batch)
            for i, part in enumerate(parts):
                requests.append(
                    ReadRequest(
                        image_id, "patches", grid, part, ReadTag("bag", b, last=i == len(parts) - 1)
                    )
                )
        return requests

    def forward(
        self, ctx: StepContext, image_ids: list[str], reads: Reads, train: bool
    ) -> torch.Tensor:
        """Training: the K patches of every image through the backbone as one batch."""
        if not train:
            return self._eval(ctx, reads)[0]
        bags = list(reads)
        features = self.model.encode(torch.cat([p for _, p in bags]).to(ctx.device))
        logits, start = [], 0
        for _, pixels in bags:
            out, _ = self.model.aggregator(features[start : start + len(pixels)].float())
            logits.append(out.float())
            start += len(pixels)
        ctx.patches_with_grad += start
        return torch.stack(logits)

    def _eval(
        self, ctx: StepContext, reads: Reads
    ) -> tuple[torch.Tensor, list[tuple[ReadRequest, np.ndarray, torch.Tensor]]]:
        model = self.model
        model.eval()
        logits, bags, pieces, indices = [], [], [], []
        with torch.no_grad():
            for request, pixels in reads:
                with ctx.autocast():
                    pieces.append(model.encode(pixels.to(ctx.device)).float())
                indices.append(request.indices)
                if request.tag.last:  # the image's last chunk
                    out, weights = model.aggregator(torch.cat(pieces))
                    logits.append(out.float())
                    bags.append((request, np.concatenate(indices), weights.cpu()))
                    pieces, indices = [], []
        return torch.stack(logits).cpu(), bags

    def predict(self, ctx: StepContext, image_ids: list[str], reads: Reads) -> torch.Tensor:
        return self._eval(ctx, reads)[0]

    def explain(
        self, ctx: StepContext, image_ids: list[str], reads: Reads
    ) -> tuple[torch.Tensor, list[Heatmap]]:
        logits, bags = self._eval(ctx, reads)
        maps = []
        for request, indices, weights in bags:
            grid = request.grid
            scores = np.zeros((grid.rows, grid.cols), np.float32)
            rows, cols = grid.position(indices)
            scores[rows, cols] = weights.numpy()
            maps.append(
                Heatmap(request.image_id, scores, float(grid.patch_size), "attention weight")
            )
        return logits, maps

    def describe(self, image_id: str) -> dict[str, str]:
        _, kept = self.patches(image_id)
        return {
            "sampling": f"K={min(self.recipe.bag_size, len(kept))} of N={len(kept)} random "
            "patches per step; evaluation attends over all N",
            "sees": "full resolution, a random bag of patches",
        }

    def memory(
        self, model: nn.Module, images: list[Any], cost: PatchCost
    ) -> tuple[int, int, int | None]:
        """Training encodes K patches per image with gradient (all N of an image with fewer);
        the rest is small."""
        size = self.recipe.patch_size
        bag = min(self.recipe.bag_size, len(self.largest(images)[1]))
        return self.recipe.fill_batch * size * size * 3 * 4, cost.grad * bag, None
