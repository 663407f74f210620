"""What ``--memory-budget`` plans from: one patch's measured cost through the encoder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from hiresctl.train.memory import PatchCost, patch_cost
from storage import UsageError

H = W = 32
FLOAT = 4


def test_patch_cost_counts_what_autograd_saves_once_per_storage() -> None:
    # conv saves its input (its weight is a parameter, not an activation); ReLU saves its output
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU())
    cost = patch_cost(net, torch.zeros(1, 3, H, W))
    conv_in, conv_out = 3 * H * W * FLOAT, 8 * H * W * FLOAT
    assert cost.grad == conv_in + conv_out + 2 * conv_out  # + backward's two largest gradients
    # without gradient only the widest layer's input and output live at once, plus the patch
    assert cost.nograd == 2 * conv_out + conv_in
    # an in-place ReLU writes into the conv's output: nothing new is kept, nothing counted twice
    inplace = patch_cost(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(inplace=True)),
        torch.zeros(1, 3, H, W),
    )
    assert inplace.grad <= cost.grad


def test_patch_cost_counts_functional_ops_no_module_outputs() -> None:
    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.sigmoid(self.conv(x))  # functional: its output is saved, and is no module's
            return y * y

    cost = patch_cost(Skip(), torch.zeros(1, 3, H, W))
    plane = 3 * H * W * FLOAT
    # conv's input and sigmoid's output (saved by sigmoid's backward and by the product)
    assert cost.grad == 2 * plane + 2 * plane


def test_patch_cost_leaves_the_encoder_as_it_was() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    net[1].running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    patch_cost(net, torch.rand(1, 3, H, W))
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in net.parameters())


def test_a_larger_input_costs_by_its_pixels() -> None:
    assert PatchCost(100, 40).scaled(64, 32) == PatchCost(400, 160)


def test_a_phase_apart_from_the_patches_counts_as_the_larger_of_the_two() -> None:
    # A step whose head runs before the encoder's backward peaks at the larger of its two
    # phases, not at their sum; a head phase that no longer fits shrinks the batch first.
    from hiresctl.train.memory import plan_memory

    GB = 10**9
    common = {
        "baseline": GB,
        "fixed": GB,
        "per_patch": GB // 10,
        "per_image": GB,
        "batch_size": 2,
        "accumulation_steps": 1,
        "patches_wanted": 8,
    }
    encoder_bound = plan_memory(20 * GB, apart=GB, **common)  # type: ignore[arg-type]
    assert encoder_bound.batch_size == 2 and encoder_bound.patches_per_step == 8
    assert encoder_bound.estimate == 2 * GB + 2 * (GB + 8 * GB // 10)
    head_bound = plan_memory(20 * GB, apart=5 * GB, **common)  # type: ignore[arg-type]
    assert head_bound.estimate == 2 * GB + 2 * 5 * GB
    shrunk = plan_memory(10 * GB, apart=5 * GB, **common)  # type: ignore[arg-type]
    assert shrunk.batch_size == 1 and shrunk.accumulation_steps == 2
    assert shrunk.estimate == 2 * GB + 5 * GB
    with pytest.raises(UsageError, match=r"needs about 6\.52 GiB"):  # 7e9 bytes: the head phase
        plan_memory(6 * GB, apart=5 * GB, **common)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "backbone,budget,mapped",
    [("timm:test_vit", "8GiB", True), ("timm:test_vit", None, False), ("tiny", "8GiB", False)],
)
def test_a_transformer_run_under_a_budget_maps_large_allocations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backbone: str, budget: str | None, mapped: bool
) -> None:
    """Training a transformer encoder under ``--memory-budget`` maps allocations of 1 MiB and
    more (``mallopt(M_MMAP_THRESHOLD, 1 MiB)``), so freed activations leave the process and
    the peak stays near the plan (B1: a ViT-S PatchGD step at 2048² peaked at 2.48 GB mapped
    against 3.0 GB). Without a budget (mapping is slower), or with a CNN, glibc keeps its own
    threshold."""
    from hiresctl.train import memory
    from hiresctl.train.recipe import Recipe
    from hiresctl.train.trainer import Trainer
    from tests.stores import make_store, planted_images

    calls: list[tuple[int, int]] = []

    def mallopt(option: int, value: int) -> int:
        calls.append((option, value))
        return 1

    monkeypatch.setattr(memory, "_mallopt", lambda: mallopt)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    images, labels = planted_images(4, 64, 32, seed=1)
    store = make_store(tmp_path / "s", images, labels)
    recipe = Recipe(method="patchgd", backbone=backbone, patch_size=32, memory_budget=budget)
    lines: list[str] = []
    Trainer(store, tmp_path / "run", recipe, device="cpu", log=lines.append)
    assert calls == ([(-3, 1 << 20)] if mapped else [])
    assert any("are mapped" in line for line in lines) == mapped
