"""Peak-memory accounting (CUDA: peak allocated; CPU: peak RSS) and ``--memory-budget`` planning."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import resource
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


class PeakMemory:
    """Peak memory since the last :meth:`reset`: CUDA peak allocated, or the process's peak RSS.

    On Linux the RSS high-water mark is reset through ``/proc/self/clear_refs`` so a
    measurement covers only what ran after ``reset()``.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda_allocated" if device.type == "cuda" else "cpu_rss"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        # Not Linux: the peak then covers the whole process.
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    return trim


@functools.cache
def _mallopt() -> Callable[[int, int], int] | None:
    try:
        call: Callable[[int, int], int] = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return None
    return call


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -3, -4, -8  # malloc.h
MAPPED_FROM = 1 << 20  # bytes: a transformer's larger activations, not a CNN's many small ones


def map_large_allocations(device: torch.device) -> bool:
    """Have glibc map every CPU allocation of :data:`MAPPED_FROM` bytes or more and unmap it when
    it is freed (``mallopt(M_MMAP_THRESHOLD)``, as ``MALLOC_MMAP_THRESHOLD_`` would), so freed
    activations leave the process. A transformer's activations are many tensors of 0.3-5 MB,
    which glibc otherwise serves from its heap and keeps resident after they are freed: a
    ViT-S PatchGD step at 2048² peaked 0.5 GB above what it held, 0.84× its plan (BENCHMARKS.md,
    B1). Mapped, the run is slower (page faults on every large allocation: 1.2× the time in
    that run), so training asks for it under a memory budget only. Whether it was set: not on
    CUDA, under another C library, or where the variable already says."""
    if device.type != "cpu" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    call = _mallopt()
    return (
        call is not None
        and call(_M_MMAP_MAX, 1 << 24) == 1  # glibc's default, should it have been set to 0
        and call(_M_MMAP_THRESHOLD, MAPPED_FROM) == 1
    )


_ALLOCATOR_VARIABLES = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_MMAP_MAX_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_ARENA_MAX",
)


def keep_large_allocations(device: torch.device) -> bool:
    """Have glibc serve every CPU allocation from its heap and keep freed memory there for the
    next one (``mallopt(M_MMAP_MAX, 0)``, a 1 GiB ``M_TRIM_THRESHOLD``, and one arena for the
    threads started after it, ``M_ARENA_MAX``). By default glibc
    maps each allocation above 32 MiB (a batch of 16 activations of 16 channels at 256² is
    64 MiB) and unmaps it when freed, so every training step faults all of its large
    activations in again, page by page, and the kernel zeroes them: 85,000-127,000 page faults
    (0.1-0.2 s) a step of ``tiny`` at 256² (docs/encoders.md). The process's peak is the
    same; what it frees stays resident for the next step instead of leaving. Not under a memory
    budget (:func:`map_large_allocations`: there freed memory must leave, so the measured peak
    is what is held), not on CUDA, not under another C library, and not where one of the
    ``MALLOC_*`` variables already says how to allocate. Whether it was set."""
    if device.type != "cpu" or any(v in os.environ for v in _ALLOCATOR_VARIABLES):
        return False
    call = _mallopt()
    return (
        call is not None
        and call(_M_MMAP_MAX, 0) == 1
        and call(_M_TRIM_THRESHOLD, 1 << 30) == 1
        # threads started later (the read-ahead thread) allocate in the main heap too: a
        # thread's own arena is unmapped whenever it empties, and a whole 4096² image read
        # there came back as fresh pages every step (BENCHMARKS.md, E1)
        and call(_M_ARENA_MAX, 1) == 1
    )


def release_freed_memory(device: torch.device) -> None:
    """Return the heap memory the process has freed to the operating system (glibc's
    ``malloc_trim``). Between phases of a CPU step that allocate in different sizes (a head on
    a stitched canvas, then an encoder's backward), freed heap pages would otherwise stay
    resident and the second phase's peak would stack on them. Nothing on CUDA, whose caching
    allocator reuses the blocks, or where the C library has no such call."""
    trim = _malloc_trim() if device.type == "cpu" else None
    if trim is not None:
        trim(0)


@dataclass(frozen=True)
class PatchCost:
    """What one ``patch_size``² patch costs an encoder, in bytes.

    ``grad``: a forward with gradient and its backward (every tensor autograd saves, counted once
    per storage, plus the backward's transient gradients of the largest of them). ``nograd``: a
    forward without gradient, which frees as it goes (the largest layer's input and output at
    once, plus the patch itself).
    """

    grad: int
    nograd: int

    def scaled(self, side: int, patch_size: int) -> PatchCost:
        """The cost of one ``side``² input (activations grow with the pixels)."""
        factor = (side / patch_size) ** 2
        return PatchCost(int(self.grad * factor), int(self.nograd * factor))


def patch_cost(
    module: nn.Module,
    sample: torch.Tensor,
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
) -> PatchCost:
    """Measure :class:`PatchCost` for ``sample`` (one patch) by running ``module`` on it, in the
    ``autocast`` training runs in (bfloat16 activations take half the bytes).

    Counting what autograd saves, not every layer's output, is what makes the estimate close:
    an in-place ReLU shares its input's storage, and a functional op (a residual sum, a
    concatenation, an upsampling) saves tensors no module outputs. The module's buffers (BatchNorm
    statistics) and gradients are left as they were. The backward also warms the autograd
    engine and thread pools up, so the process memory measured after this includes them.
    """
    parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}
    # autocast saves its low-precision copies of the weights: once a step, not per patch
    weight_shapes = {tuple(p.shape) for p in module.parameters() if p.dim() > 1}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        cast_weight = tensor.dtype != torch.float32 and tuple(tensor.shape) in weight_shapes
        if storage.data_ptr() not in parameters and not cast_weight:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    widest = 0

    def hook(_: nn.Module, inputs: tuple[object, ...], output: object) -> None:
        nonlocal widest
        tensors = [t for t in (*inputs, output) if isinstance(t, torch.Tensor)]
        widest = max(widest, sum(t.numel() * t.element_size() for t in tensors))

    buffers = [b.detach().clone() for b in module.buffers()]
    grads = [p.grad for p in module.parameters()]
    try:
        handles = [
            m.register_forward_hook(hook) for m in module.modules() if not list(m.children())
        ]
        try:
            with torch.no_grad(), autocast():
                module(sample)
        finally:
            for handle in handles:
                handle.remove()
        with (
            torch.enable_grad(),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            autocast(),
        ):
            output = module(sample)
        outputs = output.values() if isinstance(output, dict) else [output]
        total = sum(o.float().sum() for o in outputs if isinstance(o, torch.Tensor))
        if isinstance(total, torch.Tensor) and total.requires_grad:
            total.backward()
    finally:
        with torch.no_grad():
            for buffer, kept in zip(module.buffers(), buffers, strict=True):
                buffer.copy_(kept)
        for parameter, grad in zip(module.parameters(), grads, strict=True):
            parameter.grad = grad
    largest = max(saved.values(), default=0)
    input_bytes = sample.numel() * sample.element_size()
    return PatchCost(grad=sum(saved.values()) + 2 * largest, nograd=widest + input_bytes)


def parameter_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@dataclass(frozen=True)
class MemoryPlan:
    """What ``--memory-budget`` chose and the estimate behind it."""

    budget: int
    batch_size: int
    accumulation_steps: int
    patches_per_step: int | None  # PatchGD k; None for methods without it
    estimate: int

    def describe(self) -> str:
        parts = [f"batch_size={self.batch_size}", f"accumulation_steps={self.accumulation_steps}"]
        if self.patches_per_step is not None:
            parts.append(f"patches_per_step={self.patches_per_step}")
        return (
            f"memory budget {self.budget / 2**30:.2f} GiB → {', '.join(parts)} "
            f"(estimated step peak {self.estimate / 2**30:.2f} GiB)"
        )


def plan_memory(
    budget: int,
    *,
    baseline: int,
    fixed: int,
    per_patch: int,
    per_image: int,
    batch_size: int,
    accumulation_steps: int,
    patches_wanted: int | None,
    patches_min: int = 1,
    apart: int = 0,
) -> MemoryPlan:
    """Largest step that fits: first shrink the batch (raising accumulation), then patches/step.

    ``baseline`` is what the process holds before training (libraries, CUDA context), ``fixed``
    the model's weights, gradients and optimizer state, ``per_patch`` the activations of one
    patch encoded with gradient, ``per_image`` what one image costs besides its patches (latent
    grid and head activations, or the whole image for ``full``), ``apart`` what one image costs
    in a phase of the step that holds no patch's activations (a head run before the encoder's
    backward): the step's peak is the larger of the two phases.
    """
    from storage import UsageError

    effective = batch_size * accumulation_steps

    def estimate(batch: int, patches: int) -> int:
        return baseline + fixed + batch * max(per_image + patches * per_patch, apart)

    for batch in range(batch_size, 0, -1):
        room = budget - baseline - fixed - batch * per_image
        if batch * apart > budget - baseline - fixed:
            continue
        if patches_wanted is None:
            if room >= batch * per_patch:
                return MemoryPlan(
                    budget, batch, math.ceil(effective / batch), None, estimate(batch, 1)
                )
            continue
        fit = room // max(1, batch * per_patch)
        if fit >= max(patches_min, min(patches_wanted, patches_min)):
            chosen = int(min(patches_wanted, fit))
            return MemoryPlan(
                budget, batch, math.ceil(effective / batch), chosen, estimate(batch, chosen)
            )
    smallest = estimate(1, patches_min if patches_wanted else 1)
    raise UsageError(
        f"memory budget {budget / 2**30:.2f} GiB is too small for this model: one image with "
        f"{patches_min} patch(es) needs about {smallest / 2**30:.2f} GiB "
        "(use a smaller backbone, patch_size or latent_dim, or raise the budget)"
    )
