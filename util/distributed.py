"""Process-group setup and the few collectives training needs.

Three ways a training run can be laid out:

* one process (no process group; every helper here is a no-op);
* ``torchrun --nproc_per_node=N tool/train.py ...``: torchrun sets ``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` and we
  join with ``env://``;
* the release's mode: on a CUDA machine, ``tool/train.py`` itself starts one
  process per entry of ``train_gpu`` (``torch.multiprocessing.spawn``); the
  parent publishes ``MASTER_ADDR``/``MASTER_PORT`` from ``dist_url`` and each
  child calls :func:`init_distributed` with its ``spawn_index``.

The backend is NCCL on CUDA and Gloo on the CPU unless ``dist_backend`` says
otherwise. Collectives time out after ``dist_timeout`` seconds, so a dead
peer makes the survivors fail instead of waiting forever.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Optional, Sequence, Tuple
from urllib.parse import urlparse

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the run.

    Attributes:
        rank: global rank (0 when not distributed).
        world_size: number of processes.
        local_rank: rank on this machine (selects the GPU under torchrun).
        device: the device this process trains on.
        is_main: True on rank 0, the process that logs and writes files.
        distributed: True when a process group was initialised.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool
    distributed: bool


def launched_by_torchrun() -> bool:
    """True when torchrun (or another env:// launcher) started this process."""
    return all(name in os.environ for name in TORCHRUN_ENV)


def wants_cuda(cfg) -> bool:
    """True when this run will use CUDA: available, and ``cfg.device`` does not force the CPU."""
    requested = cfg.get("device") if hasattr(cfg, "get") else getattr(cfg, "device", None)
    if requested is not None and str(requested).startswith("cpu"):
        return False
    return torch.cuda.is_available()


def choose_backend(cfg, device: torch.device) -> str:
    backend = cfg.get("dist_backend") if hasattr(cfg, "get") else None
    if backend:
        return str(backend)
    return "nccl" if device.type == "cuda" else "gloo"


def _cuda_device(index: int) -> torch.device:
    count = torch.cuda.device_count()
    if index < 0 or index >= count:
        raise RuntimeError(f"GPU {index} was requested but this machine has {count} visible CUDA device(s)")
    return torch.device("cuda", index)


def should_spawn(cfg) -> bool:
    """The release's launch mode: several ``train_gpu`` entries on a CUDA machine, not under torchrun."""
    gpus = list(cfg.train_gpu or [])
    return (len(gpus) > 1 and bool(cfg.multiprocessing_distributed) and not launched_by_torchrun()
            and wants_cuda(cfg))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rendezvous_address(dist_url: Optional[str]) -> Tuple[str, int]:
    """``(MASTER_ADDR, MASTER_PORT)`` for spawned processes.

    ``tcp://host:port`` gives them directly; ``env://`` takes them from the
    environment when set, else uses this machine and a free port.
    """
    url = dist_url or "env://"
    if url.startswith("tcp://"):
        parsed = urlparse(url)
        if not parsed.hostname or not parsed.port:
            raise ValueError(f"dist_url must look like tcp://HOST:PORT, got '{url}'")
        return parsed.hostname, int(parsed.port)
    if url.startswith("env://"):
        if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
            return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        return "127.0.0.1", _free_port()
    raise ValueError(f"dist_url must be env:// or tcp://HOST:PORT, got '{url}'")


def spawn_world(cfg) -> Tuple[int, int]:
    """``(processes on this node, world size)`` in spawn mode: one process per ``train_gpu`` entry
    on each of ``cfg.world_size`` nodes (``cfg.rank`` is the node's index)."""
    per_node = len(cfg.train_gpu)
    return per_node, per_node * max(1, int(cfg.world_size))


def init_distributed(cfg, spawn_index: Optional[int] = None) -> DistContext:
    """Join the process group if this run is distributed; pick this process's device.

    Args:
        cfg: the run's config (uses ``device``, ``train_gpu``, ``dist_backend``,
            ``dist_timeout``, ``world_size``, ``rank``).
        spawn_index: this process's index among the processes ``tool/train.py``
            spawned on this node (None unless in spawn mode). The parent has set
            ``MASTER_ADDR``/``MASTER_PORT``.
    """
    use_cuda = wants_cuda(cfg)
    timeout = timedelta(seconds=float(cfg.dist_timeout))
    train_gpu = list(cfg.train_gpu or [0])

    if spawn_index is not None:
        per_node, world_size = spawn_world(cfg)
        rank = int(cfg.rank) * per_node + spawn_index
        local_rank = spawn_index
        device = _cuda_device(int(train_gpu[spawn_index])) if use_cuda else torch.device("cpu")
    elif launched_by_torchrun():
        rank = int(os.environ["RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ["LOCAL_RANK"])
        device = _cuda_device(local_rank) if use_cuda else torch.device("cpu")
    else:
        # A single process: no process group at all.
        device = _cuda_device(int(train_gpu[0])) if use_cuda else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return DistContext(rank=0, world_size=1, local_rank=0, device=device, is_main=True, distributed=False)

    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = choose_backend(cfg, device)
    kwargs = dict(backend=backend, init_method="env://", rank=rank, world_size=world_size, timeout=timeout)
    if backend == "nccl":
        kwargs["device_id"] = device  # binds NCCL to our GPU up front (no guessing in barrier())
    dist.init_process_group(**kwargs)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                       is_main=rank == 0, distributed=True)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes in place (no-op in a single process); returns it."""
    if is_distributed() and get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(value, src: int = 0):
    """``value`` from rank ``src`` on every process (returns ``value`` itself when not distributed)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (safe to call when none was initialised)."""
    if is_distributed():
        dist.destroy_process_group()


class ShardSampler(Sampler[int]):
    """Evaluation sampler: process ``rank`` gets indices ``rank, rank + world, ...``.

    Unlike ``DistributedSampler`` it never pads with duplicates, so every
    image is scored exactly once over all processes (shards may differ in
    length by one; the metrics are summed, not averaged per process).
    """

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.indices: Sequence[int] = range(rank, length, num_replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
