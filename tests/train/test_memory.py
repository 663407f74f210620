"""What ``--memory-budget`` plans from: one patch's measured cost through the encoder."""

from __future__ import annotations

import os
import subprocess
import sys
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


MAPPED = [(-4, 1 << 24), (-3, 1 << 20)]  # mmap allowed again; from 1 MiB up
KEPT = [(-4, 0), (-1, 1 << 30), (-8, 1)]  # no mmap; trimmed beyond 1 GiB; one arena


@pytest.mark.parametrize(
    "backbone,budget,calls_made",
    [
        ("timm:test_vit", "8GiB", MAPPED),
        ("timm:test_vit", None, KEPT),
        ("tiny", "8GiB", []),
        ("tiny", None, KEPT),
    ],
)
def test_how_a_run_has_glibc_allocate(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    backbone: str,
    budget: str | None,
    calls_made: list[tuple[int, int]],
) -> None:
    """Training a transformer encoder under ``--memory-budget`` maps allocations of 1 MiB and
    more (``mallopt(M_MMAP_THRESHOLD, 1 MiB)``), so freed activations leave the process and
    the peak stays near the plan (B1: a ViT-S PatchGD step at 2048² peaked at 2.48 GB mapped
    against 3.0 GB). Without a budget every allocation stays in glibc's heap (no page faults
    for the next step's activations); a CNN under a budget keeps glibc's defaults."""
    from hiresctl.train import memory
    from hiresctl.train.recipe import Recipe
    from hiresctl.train.trainer import Trainer
    from tests.stores import make_store, planted_images

    calls: list[tuple[int, int]] = []

    def mallopt(option: int, value: int) -> int:
        calls.append((option, value))
        return 1

    monkeypatch.setattr(memory, "_mallopt", lambda: mallopt)
    for variable in memory._ALLOCATOR_VARIABLES:  # what the environment says is left alone
        monkeypatch.delenv(variable, raising=False)
    images, labels = planted_images(4, 64, 32, seed=1)
    store = make_store(tmp_path / "s", images, labels)
    recipe = Recipe(method="patchgd", backbone=backbone, patch_size=32, memory_budget=budget)
    lines: list[str] = []
    Trainer(store, tmp_path / "run", recipe, device="cpu", log=lines.append)
    assert calls == calls_made
    assert any("are mapped" in line for line in lines) == (calls_made == MAPPED)


_FAULTS = """
import resource, sys, torch
from hiresctl.train.memory import keep_large_allocations
if sys.argv[1] == "keep":
    assert keep_large_allocations(torch.device("cpu"))
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):  # 64 MiB, before counting (the heap grows to hold it)
    x = torch.ones(16 << 20)
    del x
before = faults()
for _ in range(5):
    x = torch.ones(16 << 20)
    del x
print((faults() - before) // 5)
"""


def test_kept_allocations_are_reused_without_page_faults() -> None:
    """With :func:`keep_large_allocations`, a freed 64 MiB activation's pages serve the next
    one: none faulted in again (glibc's default maps and unmaps it: 16,384 faults of 4 KiB)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}

    def per_allocation(mode: str) -> int:
        proc = subprocess.run(
            [sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, env=env
        )
        assert proc.returncode == 0, proc.stderr
        return int(proc.stdout.split()[-1])

    assert per_allocation("default") > 10_000
    assert per_allocation("keep") < 100
