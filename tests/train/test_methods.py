"""The trainers compute what docs/methods.md specifies: gradients reach the encoder, the latent is
row-major, IPS keeps the patch that carries the signal, a step reads only what it needs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hiresctl.data import ReadRequest
from hiresctl.train import Recipe, build_run, step_context
from storage import Dataset
from tests.conftest import coord_pixels
from tests.stores import make_store

# float32 whatever `auto` picks on this CPU: the tests compare latents and features exactly
TINY = {
    "backbone": "tiny",
    "patch_size": 32,
    "latent_dim": 16,
    "head_width": 16,
    "batch_size": 2,
    "precision": "fp32",
}


@pytest.fixture
def coord_store(tmp_path: Path) -> Path:
    images = {"a": coord_pixels(128, 96), "b": coord_pixels(96, 128)[::-1].copy()}
    return make_store(tmp_path, images, {"a": ("0", "train"), "b": ("1", "train")})


def _run(store: Path, **changes: object):  # type: ignore[no-untyped-def]
    recipe = Recipe(**{**TINY, **changes})  # type: ignore[arg-type]
    return build_run(recipe, Dataset(store), ["0", "1"], torch.device("cpu"))


def _reads(run, image_ids: list[str], train: bool, seed: int = 0):  # type: ignore[no-untyped-def]
    return run.reads(image_ids, train, seed)


def test_latent_position_holds_that_patchs_feature(coord_store: Path) -> None:
    run = _run(coord_store, method="patchgd")
    model = run.model.eval()
    ctx = step_context(run, None, None, 1)
    captured: dict[str, torch.Tensor] = {}
    original = model.classify

    def spy(latent: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        captured["latent"] = latent.clone()
        return original(latent, g)

    model.classify = spy  # type: ignore[method-assign]
    run.method.predict(ctx, ["a"], _reads(run, ["a"], train=False))
    latent = captured["latent"]
    grid, _ = run.method.patches("a")
    assert latent.shape == (1, 16, grid.rows, grid.cols) == (1, 16, 4, 3)
    with torch.no_grad():
        for index in range(grid.num_patches):
            row, col = divmod(index, grid.cols)
            expect = model.encoder(run.reader.read_patches("a", grid, [index]))[0]
            assert torch.allclose(latent[0, :, row, col], expect, atol=1e-5), (row, col)


def test_encoder_receives_gradients_and_changes(coord_store: Path) -> None:
    run = _run(coord_store, method="patchgd-global", sample_fraction=0.5)
    model = run.model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ctx = step_context(run, optimizer, None, 1)
    encoder_params = list(model.encoder.parameters())
    before = [p.detach().clone() for p in encoder_params]
    grad_norms: list[float] = []
    step = ctx.step

    def recording_step() -> None:
        grad_norms.append(
            sum(float(p.grad.abs().sum()) for p in encoder_params if p.grad is not None)
        )
        step()

    ctx.step = recording_step
    targets = torch.tensor([0, 1])
    output = run.method.train_batch(ctx, ["a", "b"], targets, _reads(run, ["a", "b"], train=True))
    assert output.inner_steps == 2  # ρ = 0.5 → J = 2
    assert len(grad_norms) == 2 and all(n > 0 for n in grad_norms)
    changed = [not torch.equal(a, b.detach()) for a, b in zip(before, encoder_params, strict=True)]
    assert all(changed)


def test_patchgd_step_reads_each_patch_for_the_fill_and_only_k_per_inner_step(
    coord_store: Path,
) -> None:
    run = _run(coord_store, method="patchgd-global", patches_per_step=3, inner_steps=1)
    optimizer = torch.optim.AdamW(run.model.parameters())
    ctx = step_context(run, optimizer, None, 1)
    _, kept = run.method.patches("a")
    run.method.train_batch(ctx, ["a"], torch.tensor([0]), _reads(run, ["a"], train=True))
    assert run.reader.patches_read == len(kept) + 3  # fill N, then k = 3 with gradient
    assert ctx.patches_with_grad == 3


def test_downsample_reads_no_level_0_patch(coord_store: Path) -> None:
    run = _run(coord_store, method="downsample")
    ctx = step_context(run, None, None, 1)
    logits = run.method.predict(ctx, ["a", "b"], _reads(run, ["a", "b"], train=False))
    assert logits.shape == (2, 2)
    assert run.reader.patches_read == 0


def test_full_runs_images_past_the_channels_last_limit_in_the_default_layout(
    coord_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a CPU, ``full`` fed an image over ``CHANNELS_LAST_MAX_PIXELS`` (where oneDNN's
    channels-last convolution backward crawls) moves its network to the default layout and
    keeps it there; images within the limit leave it channels-last."""
    from hiresctl.train.classification import baselines

    run = _run(coord_store, method="full")
    ctx = step_context(run, None, None, 1)
    conv = next(m for m in run.model.modules() if isinstance(m, nn.Conv2d))

    def channels_last() -> bool:
        return conv.weight.is_contiguous(memory_format=torch.channels_last) and not (
            conv.weight.is_contiguous()
        )

    side = run.method.input_side("a")[0]
    assert channels_last()
    monkeypatch.setattr(baselines, "CHANNELS_LAST_MAX_PIXELS", side * side)
    run.method.predict(ctx, ["a"], _reads(run, ["a"], train=False))
    assert channels_last()  # at the limit: unchanged
    monkeypatch.setattr(baselines, "CHANNELS_LAST_MAX_PIXELS", side * side - 1)
    logits = run.method.predict(ctx, ["a"], _reads(run, ["a"], train=False))
    assert not channels_last() and logits.shape == (1, 2)
    monkeypatch.setattr(baselines, "CHANNELS_LAST_MAX_PIXELS", side * side)
    run.method.predict(ctx, ["a"], _reads(run, ["a"], train=False))
    assert not channels_last()  # kept


class _Brightness(nn.Module):
    """Embedding = (mean brightness, 0, …): lets a test know which patch must score highest."""

    latent_dim = 8

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(patches), 8)
        out[:, 0] = patches.mean(dim=(1, 2, 3))
        return out


def test_ips_keeps_the_patch_that_carries_the_signal(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 40, (32 * 8, 32 * 8, 3), dtype=np.uint8)
    pixels[5 * 32 : 6 * 32, 6 * 32 : 7 * 32] = 250  # the signal: patch (5, 6)
    store = make_store(tmp_path, {"p": pixels}, {"p": ("1", "train")})
    run = _run(
        store,
        method="ips",
        memory_size=1,
        iter_size=7,
        positional="none",
        latent_dim=8,
        heads=1,
        dim_key=8,
        dim_value=8,
    )
    model = run.model
    model.encoder = _Brightness()
    with torch.no_grad():  # score ∝ key·query = brightness
        model.aggregator.queries.zero_()
        model.aggregator.queries[0, 0, 0] = 1.0
        model.aggregator.w_q.weight.copy_(torch.eye(8))
        model.aggregator.w_k.weight.copy_(torch.eye(8) * 50)
    ctx = step_context(run, None, None, 1)
    selected = run.method._select(ctx, _reads(run, ["p"], train=False), 1)
    request, patch = selected[0]
    grid = run.method.patches("p")[0]
    assert list(request.indices) == [grid.index(5, 6)]
    # 64 patches: memory of 1 + ceil(63 / 7) = 9 streamed iterations; the kept patch's pixels
    # come from the memory buffer, not from a second read
    assert run.reader.patches_read == 64
    assert float(patch.mean()) > 1.0


@pytest.mark.parametrize(("memory_size", "iter_size"), [(3, 5), (5, 64), (64, 7)])
def test_ips_trains_on_the_pixels_it_scored(
    tmp_path: Path, memory_size: int, iter_size: int
) -> None:
    """The M kept patches' pixels come out of the selection in index order, equal to what the
    store gives for those patches (augmented as the stream augments), with no second read."""
    store = make_store(tmp_path, {"p": coord_pixels(32 * 8, 32 * 8)}, {"p": ("1", "train")})
    run = _run(store, method="ips", memory_size=memory_size, iter_size=iter_size, augment="color")
    ctx = step_context(run, None, None, 1)
    selected = run.method._select(ctx, _reads(run, ["p"], train=True), 1, train=True)
    assert run.reader.patches_read == 64
    ((request, pixels),) = selected
    assert len(request.indices) == min(memory_size, 64)
    assert list(request.indices) == sorted(set(request.indices.tolist()))
    assert torch.equal(pixels, ctx.read(request))  # the same patches, the same augmentation


@pytest.mark.parametrize(("heads", "dim_value"), [(4, 16), (8, 16), (2, 8)])
def test_ips_aggregator_starts_as_a_pooling_of_its_inputs(heads: int, dim_value: int) -> None:
    """docs/methods.md §3: at initialisation the value and output projections are orthogonal
    and the feed-forward adds nothing: with the attention uniform, the query token is
    LayerNorm(q + W_o W_v · mean of the patches), W_o W_v a rotation when it is square."""
    from hiresctl.models.ips import CrossAttentionAggregator

    torch.manual_seed(0)
    dim = 64
    aggregator = CrossAttentionAggregator(dim, heads, 16, dim_value, 128, dropout=0.0).eval()
    for weight in (aggregator.w_v.weight, aggregator.out.weight):
        short = min(weight.shape)
        gram = weight @ weight.T if weight.shape[0] == short else weight.T @ weight
        assert torch.allclose(gram, torch.eye(short), atol=1e-5)
    x = torch.randn(3, 5, dim)
    with torch.no_grad():
        aggregator.queries.zero_()  # uniform attention: every head averages the patches
        mean = x.mean(dim=1, keepdim=True)
        value_path = aggregator.out(aggregator.w_v(mean))
        if heads * dim_value == dim:
            assert torch.allclose(value_path.norm(dim=-1), mean.norm(dim=-1), rtol=1e-4)
        tokens = torch.randn(3, 1, dim)
        assert torch.equal(aggregator.feed_forward(tokens), torch.zeros_like(tokens))
        expected = aggregator.norm_feed_forward(aggregator.norm_attention(value_path))
        assert torch.allclose(aggregator(x), expected, atol=1e-5)


def test_fusion_is_the_same_in_training_and_evaluation(coord_store: Path) -> None:
    run = _run(coord_store, method="patchgd-global", fusion="add", dropout=0.0)
    model = run.model
    latent = torch.randn(1, 16, 3, 3)
    g = torch.randn(1, 16)
    fused = model.fuse(latent, g)
    assert torch.allclose(fused, latent + g[:, :, None, None])
    # classify() is what both train_batch and predict call: it must be head(fuse(...))
    model.eval()
    assert torch.allclose(model.classify(latent, g), model.head(latent + g[:, :, None, None]))
    concat = _run(coord_store, method="patchgd-global", fusion="concat").model
    assert concat.fuse(latent, g).shape == (1, 32, 3, 3)


def test_read_request_plan_covers_every_patch_once_per_batch(coord_store: Path) -> None:
    run = _run(coord_store, method="patchgd", sample_fraction=0.25)
    plan = run.method.plan(["a"], seed=0, train=True)
    groups = [r for r in plan if r.tag.role == "group"]
    covered = np.concatenate([r.indices for r in groups])
    assert sorted(covered) == list(range(12)) and len(groups) == 4
    assert all(isinstance(r, ReadRequest) for r in plan)


def test_foreground_patches_follow_the_training_mirror(tmp_path: Path) -> None:
    # Tissue (dark texture) only in the top-left corner of a white 128 × 96 image: with a
    # foreground threshold the kept patches are that corner, and in an epoch that mirrors the
    # image they are the mirrored corner; evaluation plans never mirror.
    from hiresctl.data import NO_FLIP, PatchAugment

    pixels = np.full((128, 96, 3), 255, np.uint8)
    pixels[:40, :40] = np.random.default_rng(0).integers(0, 120, (40, 40, 3))
    store = make_store(tmp_path, {"a": pixels}, {"a": ("0", "train")}, thumbnail_size=128)
    run = _run(store, method="patchgd", foreground_threshold=0.5)
    _, kept = run.method.patches("a")
    assert kept.tolist() == [0]  # (0, 0) of a 4 × 3 grid
    augment = PatchAugment("none", seed=0, geometric="flip")
    run.method.augment = augment
    corner = {(False, False): [0], (False, True): [2], (True, False): [9], (True, True): [11]}
    seen = set()
    for epoch in range(12):
        augment.epoch = epoch
        flip = augment.flip("a")
        seen.add(flip)
        _, kept = run.method.patches("a", train=True)
        assert kept.tolist() == corner[flip.vertical, flip.horizontal], flip
        planned = [r for r in run.method.plan(["a"], epoch, train=True) if r.tag.role == "fill"]
        assert np.concatenate([r.indices for r in planned]).tolist() == kept.tolist()
        assert run.method.patches("a")[1].tolist() == [0]
    assert len(seen) == 4 and NO_FLIP in seen


def test_an_offset_grid_keeps_fill_steps_and_latent_on_one_grid(coord_store: Path) -> None:
    """With ``grid_offset: random`` a PatchGD batch's fill, inner steps and latent share the
    epoch's moved grid; the patch at grid cell (r, c) holds the pixels the moved grid puts
    there, and evaluation's grid is not moved."""
    from hiresctl.data import PatchAugment

    run = _run(coord_store, method="patchgd-global", grid_offset="random")
    augment = PatchAugment("none", seed=0, grid_offset="random")
    run.method.augment = augment
    offsets = set()
    for epoch in range(5):
        augment.epoch = epoch
        grid, kept = run.method.patches("a", train=True)
        offsets.add(grid.offset)
        plan = run.method.plan(["a"], epoch, train=True)
        assert {r.grid for r in plan} == {grid}
        latent = run.method._latent(["a"], torch.device("cpu"), 16, train=True)
        assert latent.shape[-2:] == (grid.rows, grid.cols)
        steps = [r for r in plan if r.tag.role == "group"]
        assert sorted(np.concatenate([r.indices for r in steps]).tolist()) == kept.tolist()
        # the coordinate image says where a pixel came from: cell (1, 1)'s first pixel is
        # image pixel (s - offset_y, s - offset_x)
        patch = run.reader.read_patches_unit("a", grid, [grid.index(1, 1)])[0] * 255
        top, left = grid.offset
        assert (round(float(patch[0, 0, 0])), round(float(patch[1, 0, 0]))) == (32 - top, 32 - left)
    assert len(offsets) > 1 and run.method.patches("a")[0].offset == (0, 0)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fill_normalises_as_fill_mode_says(coord_store: Path, mode: str) -> None:
    """``fill_mode: train`` fills with each chunk's batch statistics (and moves the running
    ones), ``eval`` with the running statistics (left as they were); the latent holds what the
    encoder computes in that mode."""
    import copy

    run = _run(coord_store, method="patchgd", fill_mode=mode, fill_batch=6)
    method, encoder = run.method, run.model.encoder
    ctx = step_context(run, None, None, 1)
    norm = next(m for m in encoder.modules() if isinstance(m, nn.BatchNorm2d))
    norm.running_mean.fill_(3.0)  # far from any chunk's mean: eval and train differ plainly
    reference = copy.deepcopy(encoder).train(mode == "train")
    request = next(r for r in method.plan(["a"], 0, train=True) if r.tag.role == "fill")
    pixels = run.reader.read_patches("a", request.grid, request.indices)
    latent = method._latent(["a"], torch.device("cpu"), 16, train=True)
    method.engine.fill(ctx, encoder, latent, request, pixels, True, method._write)
    with torch.no_grad():
        expect = reference(pixels)
    rows, cols = request.grid.position(request.indices)
    assert torch.allclose(latent[0, :, rows, cols].T, expect, atol=1e-5)
    moved = not torch.equal(norm.running_mean, torch.full_like(norm.running_mean, 3.0))
    assert moved == (mode == "train")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_ips_selects_in_training_as_select_mode_says(coord_store: Path, mode: str) -> None:
    """In training, IPS's no-grad selection normalises with batch statistics (``select_mode:
    train``: the running ones move) or with the running ones (``eval``: left as they were);
    evaluation's selection never moves them."""
    run = _run(coord_store, method="ips", memory_size=2, iter_size=3, select_mode=mode)
    norm = next(m for m in run.model.encoder.modules() if isinstance(m, nn.BatchNorm2d))
    ctx = step_context(run, None, None, 1)
    before = norm.running_mean.clone()
    run.method._select(ctx, _reads(run, ["a"], train=False), 1)  # evaluation
    assert torch.equal(norm.running_mean, before)
    run.method._select(ctx, _reads(run, ["a"], train=True), 1, train=True)
    assert (not torch.equal(norm.running_mean, before)) == (mode == "train")
