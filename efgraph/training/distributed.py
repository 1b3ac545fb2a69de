"""Data-parallel training with ``torchrun``: process group set-up and the rank-0 rule.

``torchrun --nproc_per_node=N scripts/train.py ...`` sets ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE`` and the rendezvous address; :func:`init_distributed` reads them and starts a
process group: NCCL when training on CUDA (one GPU per local rank), gloo on CPU (no
``device_ids``). Without those variables it returns a single-process context and nothing changes.

``config.batch_size`` is the *global* batch: each step every rank takes its slice of the same
global batch (``tensor_split``) and scales its loss by its share, so the averaged gradient equals
the gradient of one process on the whole batch and results do not depend on the number of ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


SINGLE_PROCESS = DistributedContext()


def init_distributed(device: torch.device) -> DistributedContext:
    """Start the process group named by torchrun's environment (no-op without it)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return SINGLE_PROCESS
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank)


def shutdown_distributed(ctx: DistributedContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def local_device(device: torch.device, ctx: DistributedContext) -> torch.device:
    """One GPU per local rank on CUDA; the CPU stays the CPU."""
    if device.type == "cuda" and ctx.enabled:
        return torch.device("cuda", ctx.local_rank)
    return device
