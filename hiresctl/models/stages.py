"""BatchNorm → ReLU → 2×2 max-pool computed at the pooled resolution (CPU).

The small encoders (``tiny``, ``cnn5``) follow each convolution with BatchNorm, ReLU and a
2×2 max-pool. Written as three modules this is three passes over the convolution's full-
resolution output forward and four backward, and on a CPU those passes, not the convolutions,
take most of a ``tiny`` step (docs/encoders.md). The same function needs far fewer:

* BatchNorm followed by ReLU is, per channel, ``relu(a·x + b)`` with ``a = γ/σ`` and
  ``b = β − a·μ``: monotonic in ``x`` (increasing where ``a ≥ 0``, decreasing where ``a < 0``).
  The maximum of a monotonic function over a 2×2 window is the function of the window's
  maximum (or minimum), so the block equals ``relu(a·maxpool(s·x)·s + b)`` with ``s = sign(a)``:
  the affine map and the ReLU run on a quarter of the values.
* In training the statistics ``μ, σ`` still come from every value: torch's own statistics
  kernel, which also updates the running statistics.
* Backward, BatchNorm's gradient ``γσ⁻¹(G − mean G − x̂·mean(G·x̂))`` needs ``G`` only where
  the pool took its maximum and the ReLU passed it, so its sums run at the pooled resolution
  and the full-resolution gradient is the pool's scatter plus a per-channel ``A·x + B``.

Outputs and gradients equal the three modules' (to rounding; the gradient goes to the element
the max-pool picks, as ``nn.MaxPool2d``'s does), the running statistics are updated as
``nn.BatchNorm2d`` updates them, and the modules and their state dict are unchanged: the
stack only calls them differently. It is used on CPU tensors in float32, float64 and bfloat16
(what ``precision: auto`` trains in on CPUs with AMX or AVX-512 BF16; there from
``BFLOAT16_MIN_VALUES`` values up, below which the modules are as fast); on a GPU the modules
run as they are.

Where it can, the stage runs as two compiled passes instead (``stage_kernels.cpp``, built once
per machine by :func:`kernels`): forward, one read of the full-resolution values gives the batch
statistics and the pool's choices; backward, one write gives the whole input gradient (the
per-channel ``A·x + B`` and the pool's scatter together). They take float32 or bfloat16
channels-last tensors with 16·k channels (every width of ``tiny`` and ``cnn5``), are 2–3× faster
than torch's own kernels for the same work on a CPU, and run at every size in bfloat16 too.
Elsewhere, or where no compiler is, the torch version below computes the same. The same passes
take a max-pooled backbone's last BatchNorm → ReLU together with its global max-pool
(:meth:`ConvStack.forward_max`: the maximum over the whole plane is taken first, by the same
algebra); without the compiled passes that tail runs as the modules.

Per-channel maps ``a·x + b`` over a bfloat16 tensor go through BatchNorm's own evaluation
kernel (:func:`_affine`): it computes in float32 from float32 constants and rounds once, where
torch's broadcast arithmetic would round the constants to bfloat16 first (the backward's
``A·x + B`` nearly cancels, so that rounding would be the gradient's largest error) or, with
float32 constants, promote the whole tensor; the kernel is also the fast one for a channels-last
bfloat16 tensor (a per-channel broadcast in bfloat16 runs an order of magnitude slower).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

_DIMS = (0, 2, 3)
_FULL_TYPES = (torch.float32, torch.float64)  # the stage at every size; bfloat16 from a size
# In bfloat16, below this many values at the full resolution (a batch of 16 × 16 channels ×
# 64², 1M values) BatchNorm's own kernels are as fast as the passes the stage saves, and the
# stage's per-channel calls cost more: measured on 2 cores, a 16-channel stage with its
# convolution at 64² took 7.7 ms against the modules' 7.6, at 128² (4M values) 20.2 against
# 22.6, 32 channels at 64² (2M) 11.6 against 14.3. In float32 the stage was the faster at
# every size measured (from 0.26M values).
BFLOAT16_MIN_VALUES = 1 << 21


def _channel(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return v.to(dtype).view(1, -1, 1, 1)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _affine(x: torch.Tensor, gain: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``gain·x + shift`` per channel in one pass of BatchNorm's evaluation kernel (statistics 0
    and 1, no epsilon): float32 arithmetic from float32 constants for a bfloat16 ``x``, one
    rounding, the output in ``x``'s type and layout."""
    dtype = _compute_dtype(x)
    channels = x.shape[1]
    zero, one = x.new_zeros(channels, dtype=dtype), x.new_ones(channels, dtype=dtype)
    return F.batch_norm(x, zero, one, gain.to(dtype), shift.to(dtype), False, 0.0, 0.0)


def _signed_pool(x: torch.Tensor, gain: torch.Tensor, indices: bool):
    """2×2 max-pool of ``s·x`` times ``s``, ``s`` the sign of ``gain`` (a min-pool where it is
    negative), and the index of each picked value (None without ``indices``)."""
    negative = gain.detach() < 0
    s = torch.where(negative, -1.0, 1.0).to(gain.dtype) if bool(negative.any()) else None
    source = x if s is None else _affine(x, s, torch.zeros_like(s))
    if indices:
        picked, index = F.max_pool2d(source, 2, return_indices=True)
    else:
        picked, index = F.max_pool2d(source, 2), None
    return (picked if s is None else _affine(picked, s, torch.zeros_like(s))), index


def _pooled_stage(x: torch.Tensor, gain: torch.Tensor, shift: torch.Tensor, indices: bool):
    """``relu(gain·maxpool(x) + shift)`` per channel, the pool taken first:
    ``(y, picked, index)``."""
    picked, index = _signed_pool(x, gain, indices)
    return _affine(picked, gain, shift).relu_(), picked, index


def _batch_forward(x, weight, bias, eps, running_mean, running_var, factor, indices):
    """The forward on batch statistics: ``(y, picked, index, gain, mean, rstd)``."""
    # torch's own statistics kernel: the mean and biased variance BatchNorm normalises by, the
    # running statistics updated as nn.BatchNorm2d updates them (with the unbiased variance)
    dtype = _compute_dtype(x)
    mean, var = torch.batch_norm_update_stats(x, running_mean, running_var, factor)
    mean, var = mean.to(dtype), var.to(dtype)
    rstd = (var + eps).rsqrt()
    gain = weight.detach().to(dtype) * rstd
    shift = bias.detach().to(dtype) - gain * mean
    y, picked, index = _pooled_stage(x, gain, shift, indices)
    return y, picked, index, gain, mean, rstd


class _TrainStage(torch.autograd.Function):
    """BatchNorm on batch statistics, ReLU and a 2×2 max-pool, with the backward above.

    Per-channel numbers and the backward's pooled sums are float32 (float64 for a float64
    input), as BatchNorm's own kernels compute them. Full-resolution passes: torch's statistics
    kernel and one max-pool forward; the pool's scatter and one ``A·x + B`` backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, running_mean, running_var, factor):
        y, picked, index, gain, mean, rstd = _batch_forward(
            x, weight, bias, eps, running_mean, running_var, factor, indices=True
        )
        ctx.save_for_backward(x, picked, index, y, gain, mean, rstd)
        ctx.weight_dtype = weight.dtype
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, picked, index, y, gain, mean, rstd = ctx.saved_tensors
        n = x.numel() // x.shape[1]
        dtype = _compute_dtype(x)
        # G, the gradient at BatchNorm's output: non-zero only where the pool picked a value
        # and the ReLU passed it
        g = torch.ops.aten.threshold_backward(grad_y, y, 0).to(dtype)  # one pass
        g_bias = g.sum(_DIMS)
        # Σ G·x̂ = σ⁻¹ (Σ G·x − μ Σ G)
        g_weight = rstd * ((g * picked).sum(_DIMS) - mean * g_bias)
        coef = -gain * rstd * g_weight / n
        const = -gain * g_bias / n - coef * mean
        grad_x = torch.ops.aten.max_pool2d_with_indices_backward(
            (g * _channel(gain, dtype)).to(x.dtype), x, [2, 2], [2, 2], [0, 0], [1, 1], False, index
        )
        if x.dtype in _FULL_TYPES:  # in place, two passes without a temporary
            grad_x.addcmul_(x, _channel(coef, x.dtype)).add_(_channel(const, x.dtype))
        else:  # A·x + B computed in float32 and rounded once (its terms nearly cancel)
            grad_x.add_(_affine(x, coef, const))
        return grad_x, g_weight.to(ctx.weight_dtype), g_bias.to(ctx.weight_dtype), *([None] * 4)


# The two fused passes of stage_kernels.cpp, compiled once per machine (see kernels())
_SOURCE = Path(__file__).with_name("stage_kernels.cpp")
_KERNEL_TYPES = (torch.float32, torch.bfloat16)
_kernels: Any = None
_kernels_tried = False
_kernels_lock = threading.Lock()


def _cpu_key() -> str:
    """What the compiled kernels depend on: their source, torch, Python and this CPU's
    instruction sets (they are built for the CPU they run on)."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    parts = (_SOURCE.read_bytes(), torch.__version__, sys.version, platform.machine(), flags)
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:12]


def _build_directory(name: str) -> Path:
    root = os.environ.get("HIRESCTL_KERNEL_CACHE")
    base = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return (base if root else base / "hiresctl" / "kernels") / name


def kernels() -> Any:
    """The compiled fused stage (``forward``/``backward``), or None where it cannot be had.

    Built on first use with torch's C++ extension build (a C++ compiler and ninja; about 30 s on
    2 cores, once per machine: the build is kept under ``~/.cache/hiresctl/kernels``, or
    ``$HIRESCTL_KERNEL_CACHE``). ``HIRESCTL_CPU_KERNELS=0`` turns it off; a build that fails says
    so in one line on stderr and the stage runs torch's own kernels, with the same results."""
    global _kernels, _kernels_tried
    if _kernels_tried:
        return _kernels
    with _kernels_lock:
        if _kernels_tried:
            return _kernels
        if os.environ.get("HIRESCTL_CPU_KERNELS", "1") != "0" and sys.platform == "linux":
            _kernels = _build()
        _kernels_tried = True
    return _kernels


def _build() -> Any:
    name = f"hiresctl_stage_{_cpu_key()}"
    where = _build_directory(name)
    try:
        # torch's build finds ninja on PATH; the ninja package ships one
        import ninja

        path = os.environ.get("PATH", "")
        if ninja.BIN_DIR not in path.split(os.pathsep):
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
    except ImportError:
        pass
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "No CUDA runtime is found" on CPU builds of torch
    try:
        from torch.utils.cpp_extension import load

        if not any(where.glob(f"{name}*.so")):
            print(
                "hiresctl: compiling the CPU kernels of the small encoders' BatchNorm → ReLU → "
                f"max-pool (once on this machine, about 30 s) in {where}",
                file=sys.stderr,
            )
        where.mkdir(parents=True, exist_ok=True)
        return load(
            name,
            [str(_SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(where),
        )
    except Exception as e:  # no compiler, no ninja, a failed build: torch's kernels instead
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(
            f"hiresctl: the CPU kernels in {where} could not be built ({reason}); "
            "the small encoders run torch's own kernels (same results, slower)",
            file=sys.stderr,
        )
        return None
    finally:
        quiet.setLevel(level)


def _kernel_fits(x: torch.Tensor, norm: nn.BatchNorm2d) -> bool:
    """Whether the compiled stage computes this call: float32 or bfloat16 channels-last with
    16·k channels, float32 parameters and statistics, a non-empty batch of at least 2×2 values
    (so more than one value per channel; an empty batch gets torch's own handling)."""
    if x.dim() != 4 or x.dtype not in _KERNEL_TYPES or x.shape[1] % 16:
        return False
    if x.shape[0] == 0 or x.shape[2] < 2 or x.shape[3] < 2:
        return False
    if not x.is_contiguous(memory_format=torch.channels_last):
        return False
    tensors = (norm.weight, norm.bias, norm.running_mean, norm.running_var)
    return all(t is None or t.dtype == torch.float32 for t in tensors)


class _KernelStage(torch.autograd.Function):
    """:class:`_TrainStage` in the two fused passes of ``stage_kernels.cpp`` (``whole``: the
    pool is a global max-pool, else 2×2)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, running_mean, running_var, factor, update, whole):
        k = kernels()
        y, picked, index, gain, mean, rstd = k.forward(
            x, weight.detach(), bias.detach(), running_mean, running_var, eps, factor, True,
            update, True, whole,
        )  # fmt: skip
        ctx.save_for_backward(x, picked, index, y, gain, mean, rstd)
        ctx.whole = whole
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, picked, index, y, gain, mean, rstd = ctx.saved_tensors
        grad_y = grad_y.to(x.dtype).contiguous(memory_format=torch.channels_last)
        grad_x, g_weight, g_bias = kernels().backward(
            grad_y, x, picked, index, y, gain, mean, rstd, ctx.whole
        )
        return grad_x, g_weight, g_bias, *([None] * 6)


def _differentiable(x: torch.Tensor, norm: nn.BatchNorm2d) -> bool:
    params = [p for p in (norm.weight, norm.bias) if p is not None]
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))


def _compiled_applies(x: torch.Tensor, norm: nn.BatchNorm2d) -> bool:
    """Whether the compiled passes compute this call: on batch statistics with their backward,
    or without a gradient, for a tensor they take, where they were built."""
    compiled = norm.training or not _differentiable(x, norm)
    return compiled and _kernel_fits(x, norm) and kernels() is not None


def _kernel_stage(x: torch.Tensor, norm: nn.BatchNorm2d, whole: bool = False) -> torch.Tensor:
    """The stage in the compiled passes; ``whole``: a global max-pool, (N, C, 1, 1) out."""
    channels = x.shape[1]

    def ones() -> torch.Tensor:  # only where the layer has no such tensor
        return x.new_ones(channels, dtype=torch.float32)

    def zeros() -> torch.Tensor:
        return x.new_zeros(channels, dtype=torch.float32)

    weight = norm.weight if norm.weight is not None else ones()
    bias = norm.bias if norm.bias is not None else zeros()
    mean, var = norm.running_mean, norm.running_var
    if not norm.training and mean is not None and var is not None:  # running statistics
        return kernels().forward(
            x, weight.detach(), bias.detach(), mean, var, norm.eps, 0.0, False, False, False, whole
        )[0]
    update = norm.training and norm.track_running_stats and mean is not None and var is not None
    factor = _momentum(norm) if update else 0.0
    if not update:
        mean, var = zeros(), ones()
    if _differentiable(x, norm):
        return _KernelStage.apply(x, weight, bias, norm.eps, mean, var, factor, update, whole)
    return kernels().forward(
        x, weight.detach(), bias.detach(), mean, var, norm.eps, factor, True, update, False, whole
    )[0]


def _momentum(norm: nn.BatchNorm2d) -> float:
    """The running-average factor ``nn.BatchNorm2d`` uses for this training batch (it counts
    the batch, as the module does)."""
    if norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:
            return 1.0 / float(norm.num_batches_tracked)
    return 0.0 if norm.momentum is None else norm.momentum


def bn_relu_pool(x: torch.Tensor, norm: nn.BatchNorm2d) -> torch.Tensor:
    """``max_pool2d(relu(norm(x)), 2)``, computed at the pooled resolution (in the compiled
    passes where they fit and were built)."""
    if _compiled_applies(x, norm):
        return _kernel_stage(x, norm)
    dtype = _compute_dtype(x)
    mean, var = norm.running_mean, norm.running_var
    if not norm.training and mean is not None and var is not None:
        # running statistics: an affine map, applied after the pool
        rstd = (var.to(dtype) + norm.eps).rsqrt()
        gain = (norm.weight.to(dtype) if norm.weight is not None else 1.0) * rstd
        bias = norm.bias.to(dtype) if norm.bias is not None else 0.0
        shift = bias - gain * mean.to(dtype)
        return _pooled_stage(x, gain, shift, indices=False)[0]
    channels = x.shape[1]
    weight = norm.weight if norm.weight is not None else x.new_ones(channels, dtype=dtype)
    bias = norm.bias if norm.bias is not None else x.new_zeros(channels, dtype=dtype)
    if norm.training and norm.track_running_stats and norm.running_mean is not None:
        factor = _momentum(norm)
        running_mean, running_var = norm.running_mean, norm.running_var
    else:  # batch statistics without an update: scratch buffers
        factor = 0.0
        running_mean = x.new_zeros(channels, dtype=dtype)
        running_var = x.new_ones(channels, dtype=dtype)
    args = (x, weight, bias, norm.eps, running_mean, running_var, factor)
    if _differentiable(x, norm):
        return _TrainStage.apply(*args)
    return _batch_forward(*args, indices=False)[0]  # nothing to differentiate: no indices


def _fuses_on(x: torch.Tensor) -> bool:
    """Whether stages are computed differently for ``x`` at all: a CPU tensor, and no global
    forward hook that expects every module's own call."""
    return x.device.type == "cpu" and not torch.nn.modules.module._global_forward_hooks


def _unhooked(*modules: nn.Module) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _fusable(modules: list[nn.Module], i: int) -> bool:
    """Whether ``modules[i:i+3]`` is a plain BatchNorm2d, ReLU and a 2×2 max-pool without
    hooks (a subclass such as SyncBatchNorm, or a hook that expects the module's own call,
    keeps the modules' path)."""
    if i + 2 >= len(modules):
        return False
    norm, relu, pool = modules[i : i + 3]
    if type(norm) is not nn.BatchNorm2d or type(relu) is not nn.ReLU:
        return False
    if type(pool) is not nn.MaxPool2d:
        return False
    shape = (pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)
    if shape not in ((2, 2, 0, 1, False), ((2, 2), (2, 2), 0, 1, False)):
        return False
    return _unhooked(norm, relu, pool)


def _pays(x: torch.Tensor, norm: nn.BatchNorm2d) -> bool:
    """Whether computing a stage at the pooled resolution is the faster way for ``x``."""
    if x.dim() != 4:
        return False
    if x.dtype in _FULL_TYPES:
        return True
    if x.dtype != torch.bfloat16:
        return False
    return x.numel() >= BFLOAT16_MIN_VALUES or (_kernel_fits(x, norm) and kernels() is not None)


class ConvStack(nn.Sequential):
    """An ``nn.Sequential`` that runs each BatchNorm2d → ReLU → 2×2 MaxPool2d run of its
    modules through :func:`bn_relu_pool` on CPU tensors: the same modules, parameters and
    state dict, a faster call. :meth:`forward_max` does the same for a last BatchNorm2d → ReLU
    followed by a global max-pool."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(list(self), x)

    def _run(self, modules: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
        fuse = _fuses_on(x)
        i = 0
        while i < len(modules):
            # float32, float64 and bfloat16 (what a convolution under bfloat16 autocast
            # outputs) from BFLOAT16_MIN_VALUES values; float16 keeps the modules
            if fuse and _fusable(modules, i) and _pays(x, cast(nn.BatchNorm2d, modules[i])):
                x = bn_relu_pool(x, cast(nn.BatchNorm2d, modules[i]))
                i += 3
            else:
                x = modules[i](x)
                i += 1
        return x

    def forward_max(self, x: torch.Tensor, pool: nn.Module) -> torch.Tensor:
        """``pool(self(x)).flatten(1)`` where ``pool`` is a global max-pool (a ``max``-pooled
        backbone's features): on a CPU the stack's last BatchNorm2d → ReLU and the pool run as
        one compiled stage where it fits, by the same algebra as the 2×2 stages (the maximum
        over the plane is taken before the affine map and the ReLU); the same outputs,
        gradients and running statistics."""
        modules = list(self)
        if not _fusable_tail(modules, pool, x):
            return pool(self._run(modules, x)).flatten(1)
        x = self._run(modules[:-2], x)
        norm, relu = cast(nn.BatchNorm2d, modules[-2]), modules[-1]
        if _compiled_applies(x, norm):
            return _kernel_stage(x, norm, whole=True).flatten(1)
        return pool(relu(norm(x))).flatten(1)


def _fusable_tail(modules: list[nn.Module], pool: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``modules`` ends in a plain BatchNorm2d and ReLU, ``pool`` is a plain global
    max-pool and nothing hooks them (as :func:`_fusable`), for a CPU tensor."""
    if not _fuses_on(x):
        return False
    if len(modules) < 2 or type(pool) is not nn.AdaptiveMaxPool2d or pool.return_indices:
        return False
    if pool.output_size not in (1, (1, 1)):
        return False
    norm, relu = modules[-2:]
    if type(norm) is not nn.BatchNorm2d or type(relu) is not nn.ReLU:
        return False
    return _unhooked(norm, relu, pool)
