"""Where a training process sits: one process, or one rank of a torchrun job (DDP).

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK (and MASTER_ADDR / MASTER_PORT);
with WORLD_SIZE > 1 the process group is initialised with NCCL on CUDA and gloo
on the CPU. Every rank computes the same decisions (skip, roll back, advance,
stop) from all-reduced numbers, so the ranks never disagree on what happens next.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints and logs."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, device: str = "auto") -> Distributed:
        """Join the torchrun job described by the environment, if any.

        device: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N". Under
        torchrun a CUDA rank uses cuda:LOCAL_RANK whatever N says.
        """
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        if dev.type == "cuda":  # an explicit index: DDP and set_device need one
            if world_size > 1:
                index = int(os.environ.get("LOCAL_RANK", "0"))
            else:
                index = torch.cuda.current_device() if dev.index is None else dev.index
            dev = torch.device("cuda", index)
            torch.cuda.set_device(dev)
        if world_size > 1 and not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        return cls(rank=rank, world_size=world_size, device=dev)

    def sum(self, values: Tensor) -> Tensor:
        """Element-wise sum over the ranks (the tensor itself on one process)."""
        if self.active:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any rank."""
        if not self.active:
            return flag
        return bool(self.sum(torch.tensor([float(flag)], device=self.device)).item() > 0)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()
