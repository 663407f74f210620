"""Recipes: every training setting in one frozen dataclass, loaded from YAML and ``--set``.

Each task × method has defaults (so ``--recipe`` is optional); a YAML file overrides them and
``--set key=value`` overrides the file. Unknown keys are errors that name the nearest valid key.
The resolved recipe is saved into the run folder and every checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from hiresctl.data.transforms import AUGMENTATIONS, GEOMETRIC, GRID_OFFSETS
from hiresctl.models.patchgd import HEAD_POOLS
from hiresctl.train.registry import (
    canonical_method,
    method_class,
    method_defaults,
    method_names,
    task_class,
    task_names,
    unknown,
)
from storage.errors import UsageError

SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Recipe:
    """All settings of a training run. Paper symbols in brackets (docs/methods.md)."""

    task: str = "cls"
    method: str = "patchgd-global"
    # data
    patch_size: int = 256  # [p] side of a patch, pixels of `level`
    stride: int | None = None  # [s] step between patches; None = patch_size
    level: int = 0  # pyramid level patches are read from
    input_size: int | None = None  # downsample: side of the resized image; None = patch_size
    foreground_threshold: float = 0.0  # skip patches with less foreground than this (0 = keep all)
    augment: str = "none"  # none | color | stain (per-image consistent, photometric)
    geometric: str = "none"  # none | flip (mirror whole images; masks and boxes follow)
    # PatchGD: lay each training image's patch grid with a random offset (below one patch) every
    # epoch, so patch borders cut objects elsewhere each time; evaluation's grid starts at 0
    grid_offset: str = "none"  # none | random
    num_workers: int = 0  # DataLoader worker processes reading ahead of compute
    train_split: str = "train"
    val_split: str = "val"
    # model
    backbone: str = "resnet18"
    pretrained: str | None = None  # local path to backbone weights; nothing is downloaded
    # recompute a transformer encoder's blocks in the backward instead of keeping their
    # activations (timm encoders: ViTs and others that support it); --memory-budget measures
    # the patch cost with it, so more patches fit a step
    grad_checkpointing: bool = False
    # [D] feature size of a patch; None = the backbone's own features, unprojected (classification
    # PatchGD's default: a max over unprojected cells is the whole-image network's global max)
    latent_dim: int | None = 256
    head_width: int = 256
    dropout: float = 0.2
    fusion: str = "add"  # patchgd-global: add | concat
    # patchgd-global: the factor on the gradient the global patch sends back into the shared
    # encoder. Fused into every cell (or pixel) of the image, it gathers the gradient of all of
    # them in every inner step, where a patch gathers its own cells' once per batch; None
    # scales it by k/N (patches per step / patches in the image), so over a batch the global
    # patch pulls on the encoder as one patch does. 1 is the paper's unscaled global branch.
    global_grad: float | None = 1.0
    # PatchGD head: max (a stride-1 block, then the grid's maximum) | avg (the paper's: three more
    # blocks at stride 2, then the average) | avgmax (both poolings after the first block)
    head_pool: str = "max"
    head_context: int = 0  # PatchGD head: stride-1 conv blocks over the grid before the pool
    # detection (FCOS): latent_dim is the FPN's channels
    head_convs: int = 4  # conv layers of each FCOS head branch
    max_detections: int = 100  # per image, after NMS (COCO evaluation's maxDets too)
    overlap: float = 0.2  # sliced: fraction of a window shared with its neighbour
    # PatchGD inner loop
    sample_fraction: float = 0.25  # [ρ] fraction of patches re-encoded with gradient per inner step
    patches_per_step: int | None = None  # [k] overrides sample_fraction when set
    inner_steps: int | None = None  # [J] None = ceil(N / k): every patch updated once per batch
    # patches per no-grad forward (latent fill, evaluation): the memory a fill frees is not all
    # reusable by the inner steps' smaller batches, so its transient adds to their peak; 16
    # keeps it small and measured as fast on a CPU as 64 (ResNet-18 at 256²: 3.0 s vs 3.7 s
    # for 64 patches)
    fill_batch: int = 16
    # detection PatchGD: patches encoded with gradient at once in an inner step's encoder
    # phase, each slice's backward before the next (GroupNorm encoders: the same gradients,
    # less memory held); None = the step's k patches and its global patch at once
    grad_batch: int | None = None
    # PatchGD: "batch" averages the J inner steps' gradients into one micro-step per image batch
    # (an optimizer step every `accumulation_steps` batches, as the whole-image network steps);
    # "step" makes every inner step a micro-step (the paper's ε counts inner iterations)
    inner_update: str = "step"
    # BatchNorm mode of the no-grad fill pass. "train" (the reference; classification's PatchGD
    # default) normalises each fill batch (patches of one image) by its own statistics, as the
    # inner steps' patches are normalised by theirs, so one latent holds cells of one scale;
    # "eval" uses the running statistics, as evaluation does (docs/methods.md §1).
    fill_mode: str = "eval"
    # BatchNorm mode of IPS's no-grad selection in training: "train" normalises each scored group
    # by its own statistics; "eval" uses the running statistics (0 and 1 at the start, so the
    # first selections score unnormalised features and kept blank background on Megapixel MNIST,
    # after which nothing was learned). Evaluation always selects on running statistics.
    select_mode: str = "train"
    calibration_batches: int = 8  # training batches that re-estimate the head's BatchNorm per epoch
    # IPS
    memory_size: int = 100  # [M] patches kept
    iter_size: int = 100  # [I] patches scored per selection iteration
    heads: int = 8
    dim_key: int = 16
    dim_value: int = 16
    dim_inner: int = 512
    positional: str = "1d"  # none | 1d | 2d
    # multiple-instance learning (abmil, transmil on `hiresctl embed` features; e2e-mil on patches)
    features: str | None = None  # feature set to train on; None = the one the store has
    mil_hidden: int = 256  # width each instance is embedded to before attention
    attention_dim: int = 128  # hidden width of the gated attention
    max_instances: int | None = None  # abmil/transmil: at most this many instances per training bag
    bag_size: int = 64  # [K] e2e-mil: random kept patches per image per training step
    # optimisation
    epochs: int = 10
    batch_size: int = 4
    accumulation_steps: int = 1  # [ε]
    lr: float = 1e-3
    weight_decay: float = 0.01
    schedule: str = "linear"  # warm-up then linear | cosine | constant
    warmup: float = 0.1  # fraction of the run spent warming up
    min_lr_ratio: float = 0.0  # final lr / peak lr
    max_grad_norm: float | None = None
    # auto = bfloat16 autocast where the device computes it natively (CUDA GPUs, else float16;
    # CPUs with AMX or AVX-512 BF16), float32 elsewhere
    precision: str = "auto"
    seed: int = 0
    memory_budget: str | None = None  # e.g. "4GiB": choose patches/step, batch, accumulation
    checkpoint_every: int = 0  # also checkpoint every N image batches (0 = end of epoch only)
    full_max_pixels: int = 2**26  # `full` refuses larger images (it holds them whole)
    notes: str = ""  # free text: where the settings come from

    @property
    def channels(self) -> int:
        """``latent_dim`` where a task needs a number (detection's FPN, segmentation's latent);
        only classification leaves it to the backbone (None), which ``_check`` enforces."""
        if self.latent_dim is None:
            raise UsageError(f"{self.task}: latent_dim must be a number")
        return self.latent_dim

    def replace(self, **changes: Any) -> Recipe:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_CHOICES: dict[str, tuple[str, ...]] = {
    "schedule": SCHEDULES,
    "precision": PRECISIONS,
    "fusion": ("add", "concat"),
    "head_pool": HEAD_POOLS,
    "fill_mode": ("train", "eval"),
    "select_mode": ("train", "eval"),
    "inner_update": ("step", "batch"),
    "positional": ("none", "1d", "2d"),
    "augment": AUGMENTATIONS,
    "geometric": GEOMETRIC,
    "grid_offset": GRID_OFFSETS,
}

_FIELDS = {f.name: f for f in fields(Recipe)}


def valid_keys() -> list[str]:
    return list(_FIELDS)


def _nearest(key: str) -> str:
    close = difflib.get_close_matches(key, list(_FIELDS), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(_FIELDS)}"


def _coerce(key: str, value: Any, where: str) -> Any:
    hint = typing.get_type_hints(Recipe)[key]
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in allowed:
            return None
        raise UsageError(f"{where}: {key} cannot be empty")
    for kind in allowed:
        if kind is type(None):
            continue
        if kind in (int, float) and isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; users write it that way.
            try:
                value = kind(value)
            except ValueError:
                continue
        if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is str and isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        if kind is bool and isinstance(value, bool):
            return value
    names = " or ".join(getattr(k, "__name__", str(k)) for k in allowed)
    raise UsageError(f"{where}: {key} must be {names}, got {value!r}")


def _check(recipe: Recipe, where: str) -> None:
    try:
        task = task_class(recipe.task)()
        method_class(recipe.task, recipe.method)
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from None
    if not task.accepts_backbone(recipe.backbone):
        what = f"{where}: backbone {recipe.backbone!r} is not a {recipe.task} backbone"
        raise unknown(what, list(task.backbones()), recipe.backbone)
    for key, choices in _CHOICES.items():
        if getattr(recipe, key) not in choices:
            raise UsageError(
                f"{where}: {key} {getattr(recipe, key)!r} is not one of {', '.join(choices)}"
            )
    positive = ("patch_size", "epochs", "batch_size", "accumulation_steps", "fill_batch")
    for key in (
        *positive,
        "memory_size",
        "iter_size",
        "latent_dim",
        "head_width",
        "head_convs",
        "max_detections",
        "mil_hidden",
        "attention_dim",
        "bag_size",
        "grad_batch",
    ):
        if key == "latent_dim" and recipe.latent_dim is None and recipe.task == "cls":
            continue  # the backbone's own width
        if key == "grad_batch" and recipe.grad_batch is None:
            continue  # all at once
        if getattr(recipe, key) is None or getattr(recipe, key) < 1:
            raise UsageError(f"{where}: {key} must be at least 1, got {getattr(recipe, key)}")
    if recipe.max_instances is not None and recipe.max_instances < 1:
        raise UsageError(f"{where}: max_instances must be at least 1, got {recipe.max_instances}")
    if recipe.head_context < 0:
        raise UsageError(f"{where}: head_context must be at least 0, got {recipe.head_context}")
    if recipe.global_grad is not None and not 0 <= recipe.global_grad <= 1:
        raise UsageError(f"{where}: global_grad must be in [0, 1], got {recipe.global_grad}")
    if not 0 < recipe.sample_fraction <= 1:
        raise UsageError(
            f"{where}: sample_fraction must be in (0, 1], got {recipe.sample_fraction}"
        )
    if not 0 <= recipe.overlap < 1:
        raise UsageError(f"{where}: overlap must be in [0, 1), got {recipe.overlap}")
    if recipe.grid_offset != "none" and not method_class(recipe.task, recipe.method).moves_grid:
        movable = [
            f"{t}/{m}"
            for t in task_names()
            for m in method_names(t)
            if method_class(t, m).moves_grid
        ]
        raise UsageError(
            f"{where}: grid_offset {recipe.grid_offset!r}: {recipe.task} method {recipe.method} "
            f"lays a fixed patch grid (methods that move it: {', '.join(movable)})"
        )
    if recipe.lr <= 0:
        raise UsageError(f"{where}: lr must be positive, got {recipe.lr}")
    if recipe.memory_budget is not None:
        parse_bytes(recipe.memory_budget, where)


def parse_bytes(text: str, where: str = "memory budget") -> int:
    """'4GiB', '512MB', '2e9' → bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]i?B?|B)?\s*", str(text))
    if not match:
        raise UsageError(f"{where}: cannot read {text!r} as a size (e.g. 4GiB, 512MB)")
    number = float(match.group(1))
    unit = (match.group(2) or "B").upper().rstrip("B") or "B"
    scale = {
        "B": 1,
        "K": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
        "KI": 2**10,
        "MI": 2**20,
        "GI": 2**30,
        "TI": 2**40,
    }[unit]
    return int(number * scale)


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["lr=1e-4", "backbone=tiny"]`` → values typed by YAML rules."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {item!r}: expected key=value")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return out


def load_recipe(
    path: str | Path | None = None,
    task: str = "cls",
    method: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> Recipe:
    """Defaults for (task, method) ← the YAML file ← ``overrides``; validated."""
    layers: list[tuple[str, dict[str, Any]]] = []
    if path is not None:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise UsageError(f"{path}: recipe not found") from None
        except yaml.YAMLError as exc:
            raise UsageError(f"{path}: not valid YAML ({exc})") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise UsageError(f"{path}: a recipe is a mapping of key: value")
        layers.append((str(path), data))
    if overrides:
        layers.append(("--set", dict(overrides)))
    for where, data in layers:
        for key in data:
            if key not in _FIELDS:
                raise UsageError(f"{where}: unknown recipe key {key!r}{_nearest(key)}")
    chosen_task = task
    chosen_method = method
    for _, data in layers:
        chosen_task = data.get("task", chosen_task)
        if method is None:
            chosen_method = data.get("method", chosen_method)
    chosen_method = chosen_method or "patchgd-global"
    if isinstance(chosen_task, str) and isinstance(chosen_method, str):
        chosen_method, note = canonical_method(chosen_task, chosen_method)
        if note:
            warnings.warn(note, FutureWarning, stacklevel=2)
    values: dict[str, Any] = {"task": chosen_task, "method": chosen_method}
    if isinstance(chosen_task, str) and isinstance(chosen_method, str):
        try:
            values.update(task_class(chosen_task).defaults)
            values.update(method_defaults(chosen_task, chosen_method))
        except UsageError as exc:
            raise UsageError(f"{str(path) if path else 'recipe'}: {exc}") from None
    for where, data in layers:
        for key, value in data.items():
            if key in ("task", "method"):
                continue
            values[key] = _coerce(key, value, where)
    values["task"] = _coerce("task", chosen_task, "recipe")
    values["method"] = _coerce("method", chosen_method, "recipe")
    recipe = Recipe(**values)
    _check(recipe, str(path) if path else "recipe")
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


def lr_lambda(recipe: Recipe, total_steps: int) -> Callable[[int], float]:
    """The learning-rate factor of each schedule step: linear warm-up over ``warmup`` of
    ``total_steps``, then ``schedule`` (constant, linear or cosine) down to ``min_lr_ratio``."""
    warmup = round(recipe.warmup * total_steps)
    floor = recipe.min_lr_ratio

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if recipe.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if recipe.schedule == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return floor + (1 - floor) * (1 - progress)

    return factor
