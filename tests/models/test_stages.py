"""BatchNorm → ReLU → max-pool at the pooled resolution (hiresctl/models/stages.py): the same
outputs, gradients and running statistics as the three modules, and the modules' own path
wherever that computation does not apply."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hiresctl.models import create_backbone, stages
from hiresctl.models.stages import ConvStack


def _layers(widths: tuple[int, int] = (8, 6), **norm: object) -> list[nn.Module]:
    """Conv → BatchNorm → ReLU → 2×2 max-pool twice (8 and 6 channels: torch's stage; 16·k:
    the compiled passes)."""
    torch.manual_seed(0)
    first, second = widths
    layers = [
        nn.Conv2d(3, first, 3, padding=1, bias=False),
        nn.BatchNorm2d(first, **norm),  # type: ignore[arg-type]
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(first, second, 3, padding=1, bias=False),
        nn.BatchNorm2d(second, **norm),  # type: ignore[arg-type]
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    ]
    for layer in layers:
        if isinstance(layer, nn.BatchNorm2d) and layer.affine:
            with torch.no_grad():  # negative scales too: the pool becomes a minimum there
                layer.weight.uniform_(-1, 1)
                layer.bias.uniform_(-0.5, 0.5)
    return layers


def _pair(**norm: object) -> tuple[nn.Sequential, ConvStack]:
    modules = nn.Sequential(*_layers(**norm)).double()
    return modules, ConvStack(*copy.deepcopy(list(modules)))


def _no_module_batchnorm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make BatchNorm2d's own forward fail, so a test sees the stack compute without it."""

    monkeypatch.setattr(nn.BatchNorm2d, "forward", _refuse)


def _refuse(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    raise AssertionError(f"{type(self).__name__}.forward ran")


def _compare(modules: nn.Module, stack: nn.Module, x: torch.Tensor) -> None:
    """Outputs, parameter gradients and state dicts agree; the stack ran without calling
    BatchNorm2d (so the comparison is of the two computations)."""
    a = modules(x)
    grad = torch.randn_like(a)
    ga = torch.autograd.grad(a, list(modules.parameters()), grad)
    with pytest.MonkeyPatch.context() as patch:
        _no_module_batchnorm(patch)
        b = stack(x)
        gb = torch.autograd.grad(b, list(stack.parameters()), grad)
    torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    for u, v in zip(ga, gb, strict=True):
        torch.testing.assert_close(v, u, rtol=1e-9, atol=1e-11)
    for (name, u), v in zip(modules.state_dict().items(), stack.state_dict().values(), strict=True):
        torch.testing.assert_close(v, u, rtol=1e-12, atol=1e-14, msg=name)


@pytest.mark.parametrize("side", [(32, 32), (34, 37)])  # odd sides: the pool drops the last row
@pytest.mark.parametrize(
    "norm",
    [{}, {"momentum": None}, {"track_running_stats": False}, {"affine": False}],
    ids=["default", "cumulative", "untracked", "not-affine"],
)
def test_training_equals_the_modules(side: tuple[int, int], norm: dict) -> None:
    modules, stack = _pair(**norm)
    for step in range(3):  # the running statistics move: each step compares them too
        torch.manual_seed(step)
        x = torch.randn(3, 3, *side, dtype=torch.float64)
        _compare(modules, stack, x)


def test_evaluation_and_no_grad_training_equal_the_modules() -> None:
    modules, stack = _pair()
    x = torch.randn(4, 3, 20, 20, dtype=torch.float64)
    for _ in range(2):  # running statistics that are not 0 and 1
        _compare(modules, stack, x)
    # evaluation on the running statistics, with gradients to the parameters
    _compare(modules.eval(), stack.eval(), torch.randn(2, 3, 20, 20, dtype=torch.float64))
    # a no-grad pass on batch statistics (PatchGD's fill, IPS's selection): same output, same
    # update of the running statistics
    modules.train(), stack.train()
    with torch.no_grad():
        expected = modules(x)
        with pytest.MonkeyPatch.context() as patch:
            _no_module_batchnorm(patch)
            torch.testing.assert_close(stack(x), expected, rtol=1e-10, atol=1e-12)
    for u, v in zip(modules.state_dict().values(), stack.state_dict().values(), strict=True):
        torch.testing.assert_close(v, u, rtol=1e-12, atol=1e-14)


def test_input_gradient_equals_the_modules() -> None:
    modules, stack = _pair()
    x = torch.randn(2, 3, 18, 22, dtype=torch.float64, requires_grad=True)
    y = x.detach().clone().requires_grad_()
    grad = torch.randn(2, 6, 4, 5, dtype=torch.float64)
    (ga,) = torch.autograd.grad(modules(x), x, grad)
    with pytest.MonkeyPatch.context() as patch:
        _no_module_batchnorm(patch)
        (gb,) = torch.autograd.grad(stack(y), y, grad)
    torch.testing.assert_close(gb, ga, rtol=1e-9, atol=1e-11)


def test_float32_channels_last_matches_the_modules() -> None:
    modules, stack = _pair()
    modules, stack = modules.float(), stack.float()
    x = torch.randn(8, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    a = modules(x)
    with pytest.MonkeyPatch.context() as patch:
        _no_module_batchnorm(patch)
        b = stack(x)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    grad = torch.randn_like(a)
    for u, v in zip(
        torch.autograd.grad(a, list(modules.parameters()), grad),
        torch.autograd.grad(b, list(stack.parameters()), grad),
        strict=True,
    ):
        torch.testing.assert_close(v, u, rtol=1e-3, atol=1e-4)


def test_hooks_keep_the_modules() -> None:
    """A hook on a module expects the module's call."""
    _, stack = _pair()
    stack = stack.float()
    seen: list[str] = []
    stack[1].register_forward_hook(lambda *_: seen.append("norm"))
    stack(torch.randn(2, 3, 16, 16))
    assert seen == ["norm"]


def _errors(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> list[float]:
    pairs = zip(outputs, reference, strict=True)
    return [float((o.double() - r).abs().max() / r.abs().max()) for o, r in pairs]


@pytest.mark.parametrize("compiled", [False, True], ids=["torch", "compiled"])
def test_bfloat16_is_as_accurate_as_the_modules(
    compiled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In bfloat16 (what bfloat16 autocast gives BatchNorm on a CPU) the stack's output, input
    and parameter gradients and running statistics are as close to float64's as the modules'
    own bfloat16 computation. The input's mean is large beside its spread, so the backward's
    per-channel ``A·x + B`` nearly cancels: rounding its constants or an intermediate sum to
    bfloat16 would not pass (the median error of the input gradient's elements grows tenfold).
    8 channels: torch's version of the stage; 16: the compiled passes."""
    if compiled:
        _compiled()
    monkeypatch.setattr(stages, "BFLOAT16_MIN_VALUES", 0)  # a small tensor: the stage anyway
    torch.manual_seed(0)
    channels = 16 if compiled else 8
    norm = nn.BatchNorm2d(channels)
    with torch.no_grad():
        norm.weight.uniform_(-1, 1)
        norm.bias.uniform_(-0.5, 0.5)
    layers = [norm, nn.ReLU(), nn.MaxPool2d(2)]
    x = (20 + 0.5 * torch.randn(4, channels, 32, 32)).to(memory_format=torch.channels_last)
    x = x.bfloat16()
    grad = torch.randn(4, channels, 16, 16, dtype=torch.float64)

    def elementwise(gradient: torch.Tensor) -> float:
        where = reference[1] != 0  # a channel the ReLU closed has no gradient at all
        error = (gradient.double() - reference[1]).abs() / reference[1].abs()
        return float(error[where].median())

    def run(net: nn.Module, source: torch.Tensor) -> list[torch.Tensor]:
        source = source.detach().requires_grad_()
        y = net(source)
        inputs = [source, *net.parameters()]
        grads = torch.autograd.grad(y, inputs, grad.to(y.dtype))
        return [y.detach(), *grads, net[0].running_mean.clone(), net[0].running_var.clone()]

    reference = run(nn.Sequential(*copy.deepcopy(layers)).double(), x.double())
    theirs = run(nn.Sequential(*copy.deepcopy(layers)), x)
    with pytest.MonkeyPatch.context() as patch:
        _only_kernels(patch) if compiled else _no_module_batchnorm(patch)
        ours = run(ConvStack(*copy.deepcopy(layers)), x)
    stack, modules = _errors(ours, reference), _errors(theirs, reference)
    names = ["output", "input gradient", "weight gradient", "bias gradient", "mean", "var"]
    for name, error, bound in zip(names, stack, modules, strict=True):
        assert error <= 2 * bound + 1e-6, (name, error, bound)
    median, bound = elementwise(ours[1]), elementwise(theirs[1])
    assert median <= 2 * bound, (median, bound)


@pytest.mark.parametrize("name", ["tiny", "tiny-s2d"])
def test_bfloat16_autocast_computes_at_the_pooled_resolution(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under bfloat16 autocast (``precision: auto`` on CPUs with AMX or AVX-512 BF16) the
    encoders run their stages without the modules' calls (every max-pool is one of a stage), and
    the features stay those of the modules to bfloat16's precision."""
    monkeypatch.setattr(stages, "BFLOAT16_MIN_VALUES", 0)
    torch.manual_seed(0)
    backbone = create_backbone(name).to(memory_format=torch.channels_last)
    plain = copy.deepcopy(backbone)
    plain.body = nn.Sequential(*list(plain.body))
    x = torch.rand(4, 3, 64, 64).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", torch.bfloat16):
        expected = plain(x).float().detach()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(nn.MaxPool2d, "forward", _refuse)
            if stages.kernels() is not None:  # the last stage and the global pool in one pass
                patch.setattr(nn.AdaptiveMaxPool2d, "forward", _refuse)
            got = backbone(x).float().detach()
    error = float((got - expected).abs().max() / expected.abs().max())
    assert error < 0.03


def test_small_bfloat16_tensors_keep_the_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    """In bfloat16 the stage runs from BFLOAT16_MIN_VALUES values at the full resolution up;
    below, BatchNorm's own kernels are as fast and the modules run. In float32 it always runs."""
    _, stack = _pair()
    x = torch.randn(2, 3, 16, 16)  # 2 × 8 × 16² values after the first convolution
    monkeypatch.setattr(stages, "BFLOAT16_MIN_VALUES", 2 * 8 * 16 * 16 + 1)
    _no_module_batchnorm(monkeypatch)
    stack = stack.float()
    stack(x)  # float32: no BatchNorm2d call
    with torch.autocast("cpu", torch.bfloat16):
        with pytest.raises(AssertionError, match=r"BatchNorm2d\.forward ran"):
            stack(x)
        monkeypatch.setattr(stages, "BFLOAT16_MIN_VALUES", 2 * 8 * 16 * 16 // 4)
        with pytest.raises(AssertionError, match=r"BatchNorm2d\.forward ran"):
            stack(x)  # the first stage pooled, the second (2 × 6 × 8² values) the modules'
        monkeypatch.setattr(stages, "BFLOAT16_MIN_VALUES", 2 * 6 * 8 * 8)
        assert stack(x).dtype == torch.bfloat16  # both stages pooled


@pytest.mark.parametrize("name", ["tiny", "cnn5", "tiny-s2d"])
def test_small_encoders_keep_their_state_dict(name: str) -> None:
    """The stack is an nn.Sequential with the same modules: weights saved by a plain
    Sequential of the same layers load, and the outputs agree."""
    backbone = create_backbone(name).double()
    assert isinstance(backbone.body, ConvStack)
    plain = copy.deepcopy(backbone)
    plain.body = nn.Sequential(*list(plain.body))
    assert list(plain.state_dict()) == list(backbone.state_dict())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    torch.testing.assert_close(backbone(x), plain(x), rtol=1e-10, atol=1e-12)


# The compiled passes (stage_kernels.cpp): float32 and bfloat16, channels-last, 16·k channels


def _compiled() -> object:
    built = stages.kernels()
    if built is None:
        pytest.skip("the CPU kernels are not built here (no compiler or HIRESCTL_CPU_KERNELS=0)")
    return built


def test_kernels_build_where_a_compiler_is() -> None:
    """On Linux with a C++ compiler the kernels build (a broken build would otherwise only show
    as a slower encoder)."""
    import shutil
    import sys

    if sys.platform != "linux" or shutil.which("c++") is None:
        pytest.skip("no C++ compiler")
    if stages.os.environ.get("HIRESCTL_CPU_KERNELS") == "0":
        pytest.skip("HIRESCTL_CPU_KERNELS=0")
    assert stages.kernels() is not None


def _wide_layers(**norm: object) -> list[nn.Module]:
    return _layers((16, 32), **norm)


def _only_kernels(patch: pytest.MonkeyPatch) -> None:
    """Neither the modules nor torch's pooled stage may run: what computes is the kernels."""
    _no_module_batchnorm(patch)
    patch.setattr(stages, "_batch_forward", _refuse_call)
    patch.setattr(stages, "_pooled_stage", _refuse_call)


def _refuse_call(*args: object, **kwargs: object) -> None:
    raise AssertionError("torch's pooled stage ran")


@pytest.mark.parametrize("side", [(32, 32), (34, 37)])
@pytest.mark.parametrize(
    "norm",
    [{}, {"momentum": None}, {"track_running_stats": False}, {"affine": False}],
    ids=["default", "cumulative", "untracked", "not-affine"],
)
def test_kernels_float32_equal_float64_modules(side: tuple[int, int], norm: dict) -> None:
    """Output, input and parameter gradients and running statistics of the compiled passes in
    float32 against the modules in float64, over three training steps, then in evaluation with
    gradients (torch's pooled stage: the compiled backward is for batch statistics)."""
    _compiled()
    reference = nn.Sequential(*_layers_double(**norm))
    stack = ConvStack(*copy.deepcopy(list(reference))).float()
    for step in range(4):
        if step == 3:
            reference.eval(), stack.eval()
        torch.manual_seed(step)
        x64 = torch.randn(3, 3, *side, dtype=torch.float64) + 2
        x64.requires_grad_()
        x = x64.detach().float().contiguous(memory_format=torch.channels_last).requires_grad_()
        a = reference(x64)
        grad = torch.randn_like(a)
        ga = torch.autograd.grad(a, [x64, *reference.parameters()], grad)
        with pytest.MonkeyPatch.context() as patch:
            _only_kernels(patch) if step < 3 else _no_module_batchnorm(patch)
            b = stack(x)
            gb = torch.autograd.grad(b, [x, *stack.parameters()], grad.float())
        _agrees_with_float64(a, b, ga, gb, reference, stack)


def _agrees_with_float64(
    a: torch.Tensor,
    b: torch.Tensor,
    ga: tuple[torch.Tensor, ...],
    gb: tuple[torch.Tensor, ...],
    reference: nn.Module,
    stack: nn.Module,
) -> None:
    """The float32 output ``b``, gradients ``gb`` and state dict agree with the float64
    modules' (``a``, ``ga``, ``reference``)."""
    torch.testing.assert_close(b.double(), a, rtol=1e-4, atol=1e-5)
    for u, v in zip(ga, gb, strict=True):
        scale = float(u.abs().max()) or 1.0
        torch.testing.assert_close(v.double() / scale, u / scale, rtol=0, atol=2e-5)
    pairs = zip(reference.state_dict().items(), stack.state_dict().values(), strict=True)
    for (name, u), v in pairs:
        torch.testing.assert_close(v.double(), u.double(), rtol=1e-5, atol=1e-6, msg=name)


def _layers_double(**norm: object) -> list[nn.Module]:
    return [layer.double() for layer in _wide_layers(**norm)]


def test_kernels_no_grad_passes_equal_the_modules() -> None:
    """A no-grad pass on batch statistics (PatchGD's fill) gives the modules' output and update
    of the running statistics; one in evaluation (selection, prediction) their output."""
    _compiled()
    reference = nn.Sequential(*_layers_double())
    stack = ConvStack(*copy.deepcopy(list(reference))).float()
    x64 = torch.randn(4, 3, 20, 20, dtype=torch.float64)
    x = x64.float().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = reference(x64)
        with pytest.MonkeyPatch.context() as patch:
            _only_kernels(patch)
            got = stack(x)
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)
        reference.eval(), stack.eval()
        expected = reference(x64)
        with pytest.MonkeyPatch.context() as patch:
            _only_kernels(patch)
            got = stack(x)
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)
    pairs = zip(reference.state_dict().values(), stack.state_dict().values(), strict=True)
    for u, v in pairs:
        torch.testing.assert_close(v.double(), u.double(), rtol=1e-5, atol=1e-6)


def test_kernels_keep_nan_and_the_first_of_equal_values() -> None:
    """A NaN reaches the output as it does through the modules, and of equal values in a window
    the gradient goes to the first, as nn.MaxPool2d's does."""
    _compiled()
    layers = _wide_layers()[1:4]
    modules, stack = nn.Sequential(*copy.deepcopy(layers)), ConvStack(*copy.deepcopy(layers))
    x = torch.randn(2, 16, 8, 8)
    x[:, :, 0:2, 0:2] = 3.0  # four equal values in the first window of every channel
    nan = x.clone()
    nan[1, 5, 4, 4] = float("nan")
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        expected = modules(nan)
        _only_kernels(patch)
        got = stack(nan.contiguous(memory_format=torch.channels_last))
    assert torch.equal(torch.isnan(got), torch.isnan(expected)) and bool(torch.isnan(got).any())
    finite = ~torch.isnan(expected)
    torch.testing.assert_close(got[finite], expected[finite], rtol=1e-5, atol=1e-5)
    xa = x.clone().requires_grad_()
    xb = x.clone().contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.zeros(2, 16, 4, 4)
    grad[0, :, 0, 0] = 1.0  # the gradient of the tied window only
    (ga,) = torch.autograd.grad(modules(xa), xa, grad)
    with pytest.MonkeyPatch.context() as patch:
        _only_kernels(patch)
        (gb,) = torch.autograd.grad(stack(xb), xb, grad)
    # equal x: equal A·x + B over the window; what differs is where the pool sent G
    window, expected_window = gb[0, :, 0:2, 0:2], ga[0, :, 0:2, 0:2]
    picked = expected_window - expected_window.amin(dim=(1, 2), keepdim=True)
    assert bool((picked.flatten(1).argmax(1) == 0).all())  # the modules: the first value
    torch.testing.assert_close(window, expected_window, rtol=1e-4, atol=1e-5)


def test_a_failed_build_falls_back_in_one_line(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A kernel source that does not compile: one line on stderr, and the encoders compute with
    torch's kernels (nothing else changes)."""
    broken = tmp_path / "stage_kernels.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(stages, "_SOURCE", broken)
    monkeypatch.setenv("HIRESCTL_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(stages, "_kernels_tried", False)
    monkeypatch.setattr(stages, "_kernels", None)
    assert stages.kernels() is None
    lines = [line for line in capsys.readouterr().err.splitlines() if "could not be built" in line]
    assert len(lines) == 1 and str(tmp_path / "cache") in lines[0]
    modules = nn.Sequential(*_wide_layers())
    stack = ConvStack(*copy.deepcopy(list(modules)))
    x = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(stack(x), modules(x), rtol=1e-4, atol=1e-5)


def test_kernels_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIRESCTL_CPU_KERNELS", "0")
    monkeypatch.setattr(stages, "_kernels_tried", False)
    monkeypatch.setattr(stages, "_kernels", None)
    assert stages.kernels() is None


# The last stage of a max-pooled small encoder with the global max-pool (ConvStack.forward_max)


def _tail_layers(**norm: object) -> list[nn.Module]:
    """Conv → BatchNorm → ReLU → 2×2 pool, then conv → BatchNorm → ReLU (for a global max-pool
    after it); 16 and 32 channels: the compiled passes."""
    return _wide_layers(**norm)[:-1]


@pytest.mark.parametrize("side", [(16, 16), (18, 29)])
@pytest.mark.parametrize(
    "norm",
    [{}, {"momentum": None}, {"track_running_stats": False}, {"affine": False}],
    ids=["default", "cumulative", "untracked", "not-affine"],
)
def test_kernels_global_max_tail_float32_equals_float64_modules(
    side: tuple[int, int], norm: dict
) -> None:
    """``forward_max``: output, input and parameter gradients and running statistics of the
    compiled last stage with the global max-pool in float32 against the modules in float64,
    over three training steps, then in evaluation with gradients (the modules) and without
    (the compiled pass on running statistics)."""
    _compiled()
    reference = nn.Sequential(*[layer.double() for layer in _tail_layers(**norm)])
    stack = ConvStack(*copy.deepcopy(list(reference))).float()
    pool = nn.AdaptiveMaxPool2d(1)
    for step in range(5):
        if step == 3:
            reference.eval(), stack.eval()
        torch.manual_seed(step)
        x64 = (torch.randn(3, 3, *side, dtype=torch.float64) + 2).requires_grad_()
        x = x64.detach().float().contiguous(memory_format=torch.channels_last).requires_grad_()
        a = pool(reference(x64)).flatten(1)
        if step == 4:  # no gradient, running statistics
            with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
                _only_kernels(patch)
                b = stack.forward_max(x, pool)
            torch.testing.assert_close(b.double(), a.detach(), rtol=1e-4, atol=1e-5)
            continue
        grad = torch.randn_like(a)
        ga = torch.autograd.grad(a, [x64, *reference.parameters()], grad)
        with pytest.MonkeyPatch.context() as patch:
            if step < 3:
                _only_kernels(patch)
            b = stack.forward_max(x, pool)
            gb = torch.autograd.grad(b, [x, *stack.parameters()], grad.float())
        _agrees_with_float64(a, b, ga, gb, reference, stack)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_global_max_keeps_nan_and_the_first_of_equal_values(dtype: torch.dtype) -> None:
    """Of equal maxima in a plane the gradient goes to the first, as nn.AdaptiveMaxPool2d's
    does; a NaN reaches the output as through the modules."""
    _compiled()
    torch.manual_seed(0)
    layers = [nn.BatchNorm2d(16), nn.ReLU()]
    with torch.no_grad():
        layers[0].weight.uniform_(-1, 1)  # negative scales too: the maximum becomes a minimum
    modules, stack = nn.Sequential(*copy.deepcopy(layers)), ConvStack(*copy.deepcopy(layers))
    pool = nn.AdaptiveMaxPool2d(1)
    x = torch.randn(2, 16, 6, 6).to(dtype)
    x[:, :, 1, 2] = x[:, :, 4, 0] = 5.0  # two equal maxima of every plane
    x[:, 8:, 1, 2] = x[:, 8:, 4, 0] = -5.0  # and two equal minima in half the channels
    xa = x.float().requires_grad_()
    xb = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn(2, 16)
    (ga,) = torch.autograd.grad(pool(modules(xa)).flatten(1), xa, grad)
    with pytest.MonkeyPatch.context() as patch:
        _only_kernels(patch)
        (gb,) = torch.autograd.grad(stack.forward_max(xb, pool), xb, grad.to(dtype))
    tolerance = (
        {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 0.02, "atol": 0.02}
    )
    torch.testing.assert_close(gb.float(), ga, **tolerance)  # the pool's term at the first one
    nan = x.clone()
    nan[1, 5, 3, 3] = float("nan")
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        expected = pool(modules(nan.float())).flatten(1)
        _only_kernels(patch)
        got = stack.forward_max(nan.contiguous(memory_format=torch.channels_last), pool)
    assert torch.equal(torch.isnan(got), torch.isnan(expected)) and bool(torch.isnan(got).any())


def test_global_max_tail_keeps_the_modules_where_it_does_not_apply() -> None:
    """A hook on the last BatchNorm or ReLU expects the module's call, and an average pool is
    not a maximum: there ``forward_max`` is ``pool(stack(x)).flatten(1)`` as the modules run
    it."""
    reference = nn.Sequential(*_tail_layers())
    x = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    average = nn.AdaptiveAvgPool2d(1)
    stack = ConvStack(*copy.deepcopy(list(reference)))
    torch.testing.assert_close(stack.forward_max(x, average), average(reference(x)).flatten(1))
    seen: list[str] = []
    stack[-2].register_forward_hook(lambda *_: seen.append("norm"))
    stack[-1].register_forward_pre_hook(lambda *_: seen.append("relu"))
    stack.forward_max(x, nn.AdaptiveMaxPool2d(1))
    assert seen == ["norm", "relu"]
