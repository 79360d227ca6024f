"""Many processes, one merge (issue 13): every pass over data is split between the processes of a
``torch.distributed`` group, and the sums it yields are added up across them.

Everything a merge learns from data is a sum over the samples: the statistics pass's moments and cross
moments, REPAIR's per-layer moments, the budget search's scores, the evaluation's tallies, RESET's running
statistics. Under ``torchrun --nproc_per_node N`` (or any initialised process group) process r reads
batches r, r+N, r+2N, … of every pass (:func:`shard`), and each sum is all-reduced in float64
(:func:`total`), so every process holds the same statistics, makes the same choices (alignment, plans,
allocation, all deterministic) and builds the same merge as one process would, up to the order of float64
additions. Without a process group every function here is the identity.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset

from .errors import DataError


def world() -> tuple[int, int]:
    """(rank, number of processes) of the current process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process writes results (rank 0, or the only process)."""
    return world()[0] == 0


def shard(data: Iterable) -> Iterator:
    """This process's batches of ``data``: every N-th, starting at its rank. A ``DataLoader`` over a
    map-style dataset loads only those batches."""
    rank, size = world()
    if size == 1:
        yield from data
        return
    if isinstance(data, DataLoader) and not isinstance(data.dataset, IterableDataset) and data.batch_sampler:
        for i, rows in enumerate(data.batch_sampler):
            if i % size == rank:
                yield data.collate_fn([data.dataset[j] for j in rows])
        return
    for i, batch in enumerate(data):
        if i % size == rank:
            yield batch


def total(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The sums of ``tensors`` over all processes, in float64 (one all-reduce for all of them), on each
    tensor's device and in its dtype; the tensors themselves without a process group."""
    if world()[1] == 1:
        return list(tensors)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flat = torch.cat([t.detach().reshape(-1).to(device, torch.float64) for t in tensors])
    dist.all_reduce(flat)
    out, start = [], 0
    for t in tensors:
        out.append(flat[start:start + t.numel()].reshape(t.shape).to(t.device, t.dtype))
        start += t.numel()
    return out


def require_everywhere(here: bool, message: str) -> None:
    """Raise ``DataError(message)`` in every process where ``here`` fails in any of them (raising in one
    process only would leave the others waiting in their next all-reduce)."""
    missing = total(torch.tensor(0.0 if here else 1.0))[0].item()
    if missing:
        size = world()[1]
        raise DataError(message if size == 1 else f"{message} (in {int(missing)} of {size} processes: each process "
                        f"reads every {size}-th batch, so give at least one batch per process)")


@contextmanager
def session(device: str) -> Iterator[str]:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1), for the
    duration of a command, and yield the device this process computes on: with several processes,
    ``cuda`` means this process's GPU, ``cuda:LOCAL_RANK`` (NCCL); CPU processes use gloo. Outside
    torchrun, or where the caller already initialised a group, nothing changes."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield device
        return
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        yield device
    finally:
        dist.destroy_process_group()
