"""CUDA-only checks (``pytest -m gpu``): mixed precision and peak allocated memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hiresctl.train import Recipe, build_run, step_context
from hiresctl.train.memory import PeakMemory
from storage import Dataset
from tests.stores import make_store, planted_images

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("method", ["patchgd-global", "ips"])
def test_mixed_precision_step_on_cuda_records_peak_allocated(method: str, tmp_path: Path) -> None:
    images, labels = planted_images(2, 128, 32, seed=0)
    store = make_store(tmp_path, images, labels)
    recipe = Recipe(
        method=method,
        backbone="tiny",
        patch_size=32,
        latent_dim=32,
        head_width=32,
        precision="auto",
        memory_size=4,
        iter_size=4,
    )
    device = torch.device("cuda")
    run = build_run(recipe, Dataset(store), ["0", "1"], device)
    scaler = None if torch.cuda.is_bf16_supported() else torch.amp.GradScaler("cuda")
    ctx = step_context(run, torch.optim.AdamW(run.model.parameters()), scaler, 1)
    peak = PeakMemory(device)
    peak.reset()
    ids = list(images)
    output = run.step(ids, torch.tensor([0, 1]), ctx=ctx)
    assert torch.isfinite(torch.tensor(output.loss))
    assert peak.kind == "cuda_allocated" and peak.peak_bytes() > 0
    assert all(p.device.type == "cuda" for p in run.model.parameters())
