"""torch.distributed helpers for data-parallel stages launched with `torchrun` (see anomaly_core.launch).

A stage calls `init()` once: under torchrun (WORLD_SIZE > 1) it joins the process group (gloo on CPU, nccl
on CUDA, one GPU per local rank), otherwise it returns a single-process context and nothing else changes.
The library functions ask `rank()` / `world_size()`; only rank 0 writes files (`is_main()`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

__all__ = ["DistContext", "init", "shutdown", "active", "rank", "world_size", "is_main", "barrier",
           "gather_objects", "all_reduce_sum", "shard", "backend_for"]


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def backend_for(device: torch.device) -> str:
    """nccl for CUDA devices, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def init(device: torch.device) -> DistContext:
    """Join the torchrun process group when WORLD_SIZE > 1; `device` is the stage's device choice (on CUDA each
    rank takes cuda:LOCAL_RANK). Without torchrun: DistContext(0, 1, 0, device) and no process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(0, 1, 0, device)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend_for(device))
    return DistContext(dist.get_rank(), dist.get_world_size(), local, device)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def gather_objects(obj: Any) -> list[Any] | None:
    """Every rank's `obj` (picklable, CPU tensors) in rank order on rank 0, None on the other ranks;
    [obj] without a process group."""
    if not active():
        return [obj]
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Element-wise sum of `values` over ranks (float64); the values themselves without a process group."""
    if not active():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def shard(n: int, rank_: int, world: int) -> list[int]:
    """Indices of range(n) that rank `rank_` of `world` takes: every world-th item (round robin), so shard
    sizes differ by at most one."""
    return list(range(rank_, n, world))
