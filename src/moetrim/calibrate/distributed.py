"""Data-parallel calibration: several processes (torchrun / accelerate launch), one profile.

Every process picks the same chunks and forms the same batches, then runs its share of the batches
(batch r, r + N, r + 2N, ... on rank r of N). The statistics are sums, so one all-reduce of each
gives what one process would have summed (act_abs_max takes the maximum instead). Fisher is summed
per sequence, or per batch over the very batches one process would form, so the result does not
depend on how many processes took part, up to float64 summation order.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

from moetrim.errors import MoetrimError


def env_world_size() -> int:
    """Processes the launcher started (WORLD_SIZE; 1 when not launched by torchrun/accelerate)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that writes outputs."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def rank_device(device: str) -> str:
    """Under a launcher each process takes its own GPU: 'cuda' -> 'cuda:LOCAL_RANK'."""
    if device == "cuda" and env_world_size() > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


@contextlib.contextmanager
def process_group(device: torch.device, enabled: bool = True) -> Iterator[tuple[int, int]]:
    """(rank, world size) for the block: an initialised process group, or one started here from the
    launcher's environment (nccl for CUDA models, gloo otherwise) and shut down on exit."""
    dist = torch.distributed
    if not enabled or not dist.is_available():
        yield 0, 1
        return
    created = False
    if not dist.is_initialized() and env_world_size() > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        created = True
    try:
        yield (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    finally:
        if created:
            dist.destroy_process_group()


def comm_device(fallback: torch.device) -> torch.device:
    """The device collectives run on: the current GPU for nccl, CPU for gloo."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if fallback.type != "cpu" else fallback


def agree_no_failure(failed: bool, device: torch.device) -> None:
    """Every process says whether its share failed; the others stop with one line instead of waiting
    forever in the all-reduce (the failed process raises its own error)."""
    flag = torch.tensor([1.0 if failed else 0.0], device=comm_device(device))
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if flag.item() > 0 and not failed:
        raise MoetrimError("another calibration process failed (see its error); no profile was written")


def all_reduce_stats(tensors: list[torch.Tensor], maxima: list[torch.Tensor], n_tokens: int, device: torch.device) -> int:
    """Sum `tensors` and take the maximum of `maxima` over all processes, in place; returns the
    total token count. Each tensor is reduced where it lives when the backend can, else through the
    collective's device."""
    dist = torch.distributed
    via = comm_device(device)
    for group, op in ((tensors, dist.ReduceOp.SUM), (maxima, dist.ReduceOp.MAX)):
        for t in group:
            if t.device == via:
                dist.all_reduce(t, op=op)
            else:
                moved = t.to(via)
                dist.all_reduce(moved, op=op)
                t.copy_(moved)
    count = torch.tensor([n_tokens], dtype=torch.float64, device=via)
    dist.all_reduce(count)
    return int(count.item())
