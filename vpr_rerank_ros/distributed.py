"""Several processes on one job, as `torchrun` starts them (docs/training.md): which one this is, its device,
and the few collective steps the training loop and sharded extraction need. Without torchrun (no WORLD_SIZE
in the environment, or 1) everything here is the single-process case and no process group is created."""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from .descriptors.extract import pick_device

# Ranks wait for each other at the end of a shard or while rank 0 validates: at MSLS scale that is hours.
TIMEOUT = timedelta(hours=12)


@dataclass(frozen=True)
class Workers:
    """This process's place in the job: rank `rank` of `world`, `local_rank` on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 writes checkpoints, logs and merged files."""
        return self.rank == 0

    def device(self, requested: str | None = None) -> str:
        """The device of this rank: its own GPU (cuda:LOCAL_RANK) when CUDA is used, else the CPU; a ValueError for
        a device name `pick_device` refuses."""
        requested = str(pick_device(requested))
        if requested == "cuda" and self.world > 1:
            return f"cuda:{self.local_rank}"
        return requested

    def quiet(self, log: Callable[[str], None]) -> Callable[[str], None]:
        """`log` on rank 0; the other ranks say nothing (their lines would repeat rank 0's)."""
        return log if self.main else _nothing

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def broadcast(self, value):
        """Rank 0's `value` on every rank (any picklable object)."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, value: float) -> float:
        """The sum of `value` over the ranks."""
        if self.world == 1:
            return value
        total = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(total)
        return float(total.item())


def _nothing(_: str) -> None:
    """The log of ranks other than 0."""


def workers(device: str | None = None) -> Workers:
    """This process's `Workers`, joining torchrun's process group on first use (NCCL for CUDA, gloo for the CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Workers()
    here = Workers(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        cuda = here.device(device).startswith("cuda")
        if cuda:
            torch.cuda.set_device(here.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
        atexit.register(dist.destroy_process_group)   # else gloo's threads abort the interpreter at exit
    return here
