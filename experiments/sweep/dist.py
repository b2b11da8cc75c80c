"""Ranks under ``torchrun``: read ``WORLD_SIZE`` / ``RANK``, join a gloo process group, and three
collectives (broadcast from rank 0, all-gather, barrier) that are no-ops in a single process."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist


@dataclass
class Ranks:
    """This process's place in the sweep: ``rank`` of ``world`` processes (``world == 1``: alone)."""

    rank: int = 0
    world: int = 1
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, by rank, on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def ranks_from_env(timeout_minutes: int = 120) -> Ranks:
    """The ranks ``torchrun`` describes in the environment; joins the gloo group when ``WORLD_SIZE > 1``.

    ``timeout_minutes`` bounds how long a rank waits for the others (rank 0 runs the analyses that
    follow a capture while the other ranks wait).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world <= 1:
        return Ranks()
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(
            "gloo", rank=rank, world_size=world, timeout=timedelta(minutes=timeout_minutes)
        )
        owns = True
    return Ranks(rank, world, owns)
