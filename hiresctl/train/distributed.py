"""torch.distributed under torchrun: one process per device, images sharded across ranks.

Gradients are averaged across ranks right before every optimizer step (the same all-reduce DDP
does, done explicitly because the PatchGD inner loop calls backward several times per batch).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_world(device_kind: str) -> World:
    """Join the process group torchrun describes in the environment (no-op when alone)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def broadcast_model(model: nn.Module, world: World) -> None:
    if world.active:
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor.data, src=0)


def average_gradients(model: nn.Module, world: World) -> None:
    if not world.active:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for param in params:
        if param.grad is None:  # a part unused this step still joins the reduction
            param.grad = torch.zeros_like(param)
    flat = torch.cat([p.grad.reshape(-1) for p in params])  # type: ignore[union-attr]
    dist.all_reduce(flat)
    flat /= world.size
    offset = 0
    for param in params:
        count = param.numel()
        param.grad.copy_(flat[offset : offset + count].view_as(param))  # type: ignore[union-attr]
        offset += count


def gather_objects(obj: object, world: World) -> list[object]:
    if not world.active:
        return [obj]
    out: list[object] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def all_true(flag: bool, world: World) -> bool:
    if not world.active:
        return flag
    tensor = torch.tensor([1 if flag else 0])
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return bool(tensor.item())


def shutdown(world: World) -> None:
    if world.active and dist.is_initialized():
        dist.destroy_process_group()
