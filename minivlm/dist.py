"""Process setup: rank, world size and device, passed explicitly (no globals set at import).

Works the same under plain `python` (world size 1, no process group) and under `torchrun`
(gloo on CPU, nccl on CUDA). Only rank 0 prints, through `print0`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(process_group: bool = True) -> Dist:
    """Read torchrun's environment; start a process group when there is more than one rank."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    else:
        device = "cpu"
    if world_size > 1 and process_group and not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Dist(rank, local_rank, world_size, device)


def close_distributed() -> None:
    """Wait for every rank (rank 0 may still be writing files), then tear the group down; a rank that
    destroys a gloo group while a peer is still busy aborts with 'terminate called without an active exception'."""
    if torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def print0(dist: Dist, *args, **kwargs) -> None:
    if dist.is_main:
        print(*args, **kwargs, flush=True)
