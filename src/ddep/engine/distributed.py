"""One process per device under torchrun (NCCL on GPUs, gloo on CPUs), or a single process."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_world_size() -> int:
    """How many processes torchrun started (``WORLD_SIZE``; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's rank among those torchrun started (``RANK``; 0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))


def init_distributed(device: str = "auto", timeout_minutes: float = 30.0) -> DistInfo:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1; otherwise a single process.

    ``timeout_minutes`` bounds every wait for another rank (connecting, a collective): a rank
    that hangs then fails, and torchrun (``--max-restarts``) can restart the group."""
    if launched_world_size() <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device != "cpu" and torch.cuda.is_available() else "gloo"
        timeout = timedelta(minutes=timeout_minutes)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if attempt is None:
            dist.init_process_group(backend, timeout=timeout)
        else:  # torchrun's store can outlive a restart: keys of this attempt only, never a dead worker's address
            from torch.distributed.rendezvous import rendezvous

            store, rank, world_size = next(rendezvous("env://", timeout=timeout))
            dist.init_process_group(backend, store=dist.PrefixStore(f"ddep/attempt{attempt}/", store), rank=rank,
                                    world_size=world_size, timeout=timeout)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(device: str, info: DistInfo) -> torch.device:
    """The run's device; under torchrun, ``cuda`` (or ``auto``) is the GPU of the process's
    ``LOCAL_RANK``."""
    if info.enabled and device.startswith("cuda:"):
        raise ValueError(f"device={device} under torchrun with {info.world_size} processes would put every process on one GPU: "
                         "set device=cuda (each process takes the GPU of its LOCAL_RANK), and choose the GPUs with "
                         "CUDA_VISIBLE_DEVICES")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{info.local_rank}"
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but no CUDA GPU is available")
        torch.cuda.set_device(resolved)
    return resolved


def all_reduce_mean(value: float, info: DistInfo, device: torch.device) -> float:
    if not info.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.item() / info.world_size


def all_reduce_max(values: list[int], info: DistInfo, device: torch.device) -> list[int]:
    """The element-wise maximum of ``values`` over the ranks (flags any rank raised)."""
    if not info.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def gather_objects(value: object, info: DistInfo) -> list:
    """``value`` from every rank, in rank order, on every rank (``[value]`` in a single process)."""
    if not info.enabled:
        return [value]
    values: list = [None] * info.world_size
    dist.all_gather_object(values, value)
    return values


def barrier(info: DistInfo) -> None:
    """Wait until every rank gets here (e.g. until rank 0 has written a file the others read)."""
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
