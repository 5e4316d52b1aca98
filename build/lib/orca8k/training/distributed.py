"""Process rank and small collectives, usable before and after `torch.distributed` is initialised.

Launchers (`torchrun`, the `deepspeed` launcher) set `RANK`, `LOCAL_RANK`, `WORLD_SIZE`; a plain `python` process
has none of them and is rank 0 of 1.
"""

from __future__ import annotations

import os


def rank() -> int:
    """Global rank: torch.distributed's when initialised, else `RANK`, else 0."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Number of processes: torch.distributed's when initialised, else `WORLD_SIZE`, else 1."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """True on global rank 0: the only process that writes outputs and logs."""
    return rank() == 0


def launched() -> bool:
    """True inside a process started by torchrun / the deepspeed launcher (`LOCAL_RANK` is set)."""
    return "LOCAL_RANK" in os.environ


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def any_rank(*flags: bool, device: str = "cpu") -> list[bool]:
    """For each flag, True if it is True on any rank (one all-reduce for all of them; no-op in one process).

    Every rank must call this at the same point with the same number of flags.
    """
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return list(flags)
    t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]
