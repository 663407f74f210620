"""PatchFCOS's exactness: chunked matching, a recomputed head, staged losses and the global fusion
compute what the plain model computes (only the memory they hold differs)."""

from __future__ import annotations

import pytest
import torch


def test_chunked_matching_and_recomputed_head_change_nothing_but_memory() -> None:
    # The losses (torchvision's FCOS.compute_loss: its own anchor matching, activations kept)
    # must equal PatchFCOS.losses (matching in chunks of anchors, the head's towers recomputed
    # in backward), and so must every gradient.
    from hiresctl.models.detection import PatchFCOS, RecomputedTower, match_anchors

    torch.manual_seed(0)
    plain = PatchFCOS("tiny", 3, 32, head_convs=2, recompute_head=False)
    lean = PatchFCOS("tiny", 3, 32, head_convs=2)
    lean.load_state_dict(plain.state_dict())  # same keys: the towers stay Sequentials
    assert isinstance(lean.detector.head.classification_head.conv, RecomputedTower)
    corners = torch.rand(40, 2) * 230
    boxes = torch.cat([corners, corners + 4 + torch.rand(40, 2) * 120], 1).clamp(max=256)
    boxes[1] = boxes[0] + torch.tensor([2.0, 2.0, -2.0, -2.0])  # nested: the smaller one wins
    boxes[2] = torch.tensor([8.0, 8.0, 24.0, 24.0])  # edges through the point (8, 8): not inside
    targets = [
        {"boxes": boxes, "labels": torch.randint(0, 3, (40,))},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    shapes = [(2, 32, 256 // s, 256 // s) for s in plain.strides]
    maps = [torch.randn(shape) for shape in shapes]
    reference_inputs = [m.clone().requires_grad_() for m in maps]
    head = plain.detector.head(reference_inputs)
    anchors = plain._anchors(reference_inputs, 256, 256)
    counts = [m.shape[-2] * m.shape[-1] for m in maps]
    reference = plain.detector.compute_loss(targets, head, anchors, counts)
    sum(reference.values()).backward()
    inputs = [m.clone().requires_grad_() for m in maps]
    ours = lean.losses(inputs, targets)
    sum(ours.values()).backward()
    for key, value in reference.items():
        torch.testing.assert_close(ours[key], value)
    for a, b in zip(reference_inputs, inputs, strict=True):
        torch.testing.assert_close(b.grad, a.grad)
    for (name, a), b in zip(plain.named_parameters(), lean.parameters(), strict=True):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, msg=name)
    whole = match_anchors(anchors[0], boxes, counts, 1.5, chunk=10**9)
    assert (whole >= 0).sum() > 40  # most boxes found points
    assert torch.equal(match_anchors(anchors[0], boxes, counts, 1.5, chunk=7), whole)


@pytest.mark.parametrize("use_global", [True, False])
def test_staged_losses_equal_one_backward_of_the_whole_loss(use_global: bool) -> None:
    # PatchFCOS.staged_losses runs the fusion, head and losses a level and a branch at a time
    # and calls backward on each piece: the loss terms and every gradient (stitched maps,
    # global maps, fusion convs, head) must be those of losses(fuse(...)) and one backward.
    from hiresctl.models.detection import PatchFCOS

    torch.manual_seed(0)
    whole = PatchFCOS("tiny", 3, 32, use_global=use_global, head_convs=2)
    if use_global:  # not the identity it starts as: the global maps must matter
        for conv in whole.fusion:  # type: ignore[union-attr]
            torch.nn.init.normal_(conv.weight, std=0.05)
    staged = PatchFCOS("tiny", 3, 32, use_global=use_global, head_convs=2)
    staged.load_state_dict(whole.state_dict())
    corners = torch.rand(30, 2) * 230
    boxes = torch.cat([corners, corners + 4 + torch.rand(30, 2) * 120], 1).clamp(max=256)
    targets = [
        {"boxes": boxes, "labels": torch.randint(0, 3, (30,))},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    maps = [torch.randn(2, 32, 256 // s, 256 // s) for s in whole.strides]
    globals_ = [torch.randn(2, 32, 64 // s, 64 // s) for s in whole.strides]
    sides = [256, 200]
    a = [m.clone().requires_grad_() for m in maps]
    ga = [g.clone().requires_grad_() for g in globals_]
    reference = whole.losses(whole.fuse(a, ga if use_global else None, sides), targets)
    sum(reference.values()).backward()
    b = [m.clone().requires_grad_() for m in maps]
    gb = [g.clone().requires_grad_() for g in globals_]
    pieces: list[float] = []

    def backward(piece: torch.Tensor) -> None:
        pieces.append(float(piece.detach()))
        piece.backward()

    ours = staged.staged_losses(b, gb if use_global else None, sides, targets, backward)
    assert len(pieces) == 2 * len(whole.strides)  # two branches per level
    assert sum(pieces) == pytest.approx(
        sum(float(v.detach()) for v in reference.values()), rel=1e-5
    )
    for key, value in reference.items():
        assert ours[key] == pytest.approx(float(value.detach()), rel=1e-5)
    for x, y in zip(a + (ga if use_global else []), b + (gb if use_global else []), strict=True):
        torch.testing.assert_close(y.grad, x.grad)
    for (name, p), q in zip(whole.named_parameters(), staged.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_fusion_is_one_conv_over_the_stitched_and_the_upsampled_global_maps() -> None:
    # fuse_level runs the conv over [stitched, up(global)] as two half convs (so the stitched
    # maps' gradient is a tensor of its own): the output must be the conv of the concatenation.
    from hiresctl.models.detection import PatchFCOS
    from hiresctl.models.segmentation import upsample_region

    torch.manual_seed(0)
    model = PatchFCOS("tiny", 3, 32, use_global=True, head_convs=2)
    conv = model.fusion[1]  # type: ignore[index]
    torch.nn.init.normal_(conv.weight, std=0.1)
    torch.nn.init.normal_(conv.bias, std=0.1)
    maps, g = torch.randn(2, 32, 12, 10), torch.randn(2, 32, 4, 4)
    sides = [160, 120]  # the second image's square is smaller than the grid: zero past it
    up = torch.cat(
        [upsample_region(g[b : b + 1], sides[b] / model.strides[1], 0, 0, 12, 10) for b in range(2)]
    )
    expected = conv(torch.cat([maps, up], 1))
    torch.testing.assert_close(model.fuse_level(1, maps, g, sides), expected)
