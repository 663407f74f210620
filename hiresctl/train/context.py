"""The step context: what a method gets from the loop (precision, backward and the optimizer
step, reads the plan could not know), built for a model on its device."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hiresctl.data import PatchAugment, PatchReader, PatchStream
from hiresctl.train import distributed
from hiresctl.train.methods import StepContext
from hiresctl.train.recipe import Recipe
from storage.errors import HiresError


class TrainingDiverged(HiresError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def autocast_factory(
    device: torch.device, precision: str
) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    precision = effective_precision(device, precision)
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (Intel AMX tiles or AVX-512 BF16), the
    case where oneDNN's bfloat16 convolutions beat float32 ones."""
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(torch.cpu, probe, None)
        try:
            if check is not None and check():
                return True
        except RuntimeError:  # an older torch without the probe's kernel
            continue
    return False


def effective_precision(device: torch.device, precision: str) -> str:
    """``auto``: bfloat16 autocast where the device computes it natively (a CUDA GPU that
    supports it, else float16; a CPU with AMX or AVX-512 BF16), float32 elsewhere."""
    if precision != "auto":
        return precision
    if device.type == "cpu":
        return "bf16" if cpu_has_bf16() else "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def make_context(
    model: nn.Module,
    device: torch.device,
    reader: PatchReader,
    recipe: Recipe,
    world: distributed.World,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: Any = None,
    accumulation: int = 1,
    augment: PatchAugment | None = None,
) -> StepContext:
    """The loop's hooks for a method training or inferring with ``model``; ``augment``: reads
    a method makes beyond its plan (``ctx.read``, for pixels the plan could not know in
    advance) are augmented as the planned ones are."""
    autocast = autocast_factory(device, recipe.precision)
    ctx: StepContext

    def backward(loss: torch.Tensor) -> None:
        if not torch.isfinite(loss.detach()).all():
            raise TrainingDiverged(f"loss became {float(loss.detach())} (not finite)")
        scaled = loss / accumulation
        if scaler is not None:
            scaler.scale(scaled).backward()
        else:
            scaled.backward()
        ctx.micro_steps += 1

    def step() -> None:
        assert optimizer is not None, "an optimizer step without an optimizer"
        distributed.average_gradients(model, world)
        if scaler is not None:
            scaler.unscale_(optimizer)
        if recipe.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ctx.micro_steps = 0

    read = PatchStream(reader, augment=augment).read
    ctx = StepContext(model, device, autocast, backward, step, read, accumulation)
    return ctx


__all__ = [
    "TrainingDiverged",
    "autocast_factory",
    "cpu_has_bf16",
    "effective_precision",
    "make_context",
]
