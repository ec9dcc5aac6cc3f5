"""Work shared between processes (torchrun, accelerate launch): each process takes every n-th item, and the
results are gathered afterwards. Without a multi-process launch everything runs in this one process."""

from __future__ import annotations

import atexit
import os

__all__ = ["current", "share", "gather"]


def current(device: str = "auto"):
    """accelerate's ``PartialState`` of a multi-process launch (WORLD_SIZE > 1), else None. Processes take one GPU
    each, or share the CPUs (gloo) with ``device="cpu"`` or without CUDA."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
    atexit.register(_close, state)
    return state


def _close(state) -> None:
    """Shut the process group down, all processes together, before the interpreter exits: left to interpreter exit,
    a process that finished first aborts in gloo's teardown ("terminate called without an active exception",
    SIGABRT), which fails the whole launch."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        state.wait_for_everyone()  # together: one process leaving first tears the other's connections down
        dist.destroy_process_group()


def share(items: list, state) -> list:
    """This process's share of ``items``: every n-th, starting at its index (all of them without a launch)."""
    return list(items) if state is None else list(items)[state.process_index :: state.num_processes]


def gather(items: list, state) -> list:
    """Every process's ``items``, concatenated in process order, on every process."""
    if state is None:
        return list(items)
    from accelerate.utils import gather_object

    return gather_object(list(items))
