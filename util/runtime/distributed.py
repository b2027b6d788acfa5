"""Process-group setup and the few collectives training needs.

Four ways a run can be laid out (:func:`detect_launcher` names the one in use):

* one process (no process group; every helper here is a no-op);
* ``torchrun --nproc_per_node=N tool/train.py ...``: torchrun sets ``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` and we
  join with ``env://``;
* SLURM: ``srun`` starts one task per GPU and sets ``SLURM_PROCID``,
  ``SLURM_NTASKS``, ``SLURM_LOCALID``; the rendezvous is the first host of the
  step's node list and a port derived from the job id (:func:`slurm_rendezvous`),
  so every task of a job agrees without a shared file. torchrun's variables win
  where both are set (torchrun started inside an ``srun`` task);
* the release's mode: on a CUDA machine, ``tool/train.py`` itself starts one
  process per entry of ``train_gpu`` (``torch.multiprocessing.spawn``); the
  parent publishes ``MASTER_ADDR``/``MASTER_PORT`` from ``dist_url`` and each
  child calls :func:`init_distributed` with its ``spawn_index``.

The backend is NCCL on CUDA and Gloo on the CPU unless ``dist_backend`` says
otherwise. Collectives time out after ``dist_timeout`` seconds, so a dead
peer makes the survivors fail instead of waiting forever.
"""
from __future__ import annotations

import itertools
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, List, Optional, Sequence, Tuple
from urllib.parse import urlparse

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler

from util.errors import ConfigError

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
SLURM_ENV = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
# Step ids at or above this are SLURM's pseudo steps (the batch script 0xfffffffb.., the
# interactive step): a job script that runs python without srun is one process, not task 0 of N.
SLURM_PSEUDO_STEP = 0xFFFFFFF0
# MASTER_PORT under SLURM without one in the environment: SLURM_PORT_BASE + job id modulo
# SLURM_PORT_SPAN, below Linux's ephemeral range (32768+) so it does not collide with client sockets.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 10000


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
    launcher: str = "single process"


def launched_by_torchrun() -> bool:
    """True when torchrun (or another env:// launcher) started this process."""
    return all(name in os.environ for name in TORCHRUN_ENV)


def launched_by_slurm() -> bool:
    """True when this process is a task of an ``srun`` step (and torchrun did not start it)."""
    if launched_by_torchrun() or not all(name in os.environ for name in SLURM_ENV):
        return False
    step = os.environ.get("SLURM_STEP_ID", os.environ.get("SLURM_STEPID"))
    return step is not None and step.isdigit() and int(step) < SLURM_PSEUDO_STEP


def detect_launcher() -> str:
    """``"torchrun"``, ``"slurm"`` or ``"single process"`` (spawn mode is decided by :func:`should_spawn`)."""
    if launched_by_torchrun():
        return "torchrun"
    if launched_by_slurm():
        return "slurm"
    return "single process"


def launcher_world_size() -> int:
    """The number of processes the launcher started (1 for a plain ``python tool/...``)."""
    launcher = detect_launcher()
    if launcher == "torchrun":
        return int(os.environ["WORLD_SIZE"])
    if launcher == "slurm":
        return int(os.environ["SLURM_NTASKS"])
    return 1


def _expand_brackets(name: str) -> List[str]:
    """``node[01-03,07]-ib`` -> ``node01-ib, node02-ib, node03-ib, node07-ib`` (several brackets multiply)."""
    match = re.search(r"\[([^\[\]]*)\]", name)
    if match is None:
        return [name]
    prefix, suffix = name[:match.start()], name[match.end():]
    values = []
    for part in match.group(1).split(","):
        part = part.strip()
        bounds = part.split("-")
        if len(bounds) == 1 and bounds[0].isdigit():
            values.append(bounds[0])
        elif len(bounds) == 2 and bounds[0].isdigit() and bounds[1].isdigit() and int(bounds[0]) <= int(bounds[1]):
            width = len(bounds[0])  # node[08-10] keeps the leading zero: node08 node09 node10
            values.extend(str(v).zfill(width) for v in range(int(bounds[0]), int(bounds[1]) + 1))
        else:
            raise ValueError(f"cannot parse the SLURM node list range '[{match.group(1)}]' in '{name}'")
    return [expanded for value in values for expanded in _expand_brackets(prefix + value + suffix)]


def parse_nodelist(nodelist: str) -> List[str]:
    """Host names of a SLURM node list in its compact form: ``node[01-03,07]``, ``gpu5,gpu6``,
    ``a[1-2],b3``, ``rack[1-2]-n[1-2]``. (:func:`expand_nodelist` asks ``scontrol`` first.)"""
    names, depth, start = [], 0, 0
    for index, char in enumerate(nodelist + ","):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            item = nodelist[start:index].strip()
            if item:
                names.extend(_expand_brackets(item))
            start = index + 1
    if depth != 0 or not names:
        raise ValueError(f"cannot parse the SLURM node list '{nodelist}'")
    return names


def expand_nodelist(nodelist: str) -> List[str]:
    """Host names of a SLURM node list: ``scontrol show hostnames`` where it exists (it knows every
    form SLURM writes), else :func:`parse_nodelist`."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            result = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True,
                                    timeout=60, check=True)
            names = result.stdout.split()
            if names:
                return names
        except (OSError, subprocess.SubprocessError):
            pass  # a broken scontrol: the node list's compact form is still readable
    return parse_nodelist(nodelist)


def slurm_rendezvous() -> Tuple[str, int]:
    """``(MASTER_ADDR, MASTER_PORT)`` for the tasks of an ``srun`` step.

    Either from the environment when set, else the first host of the step's node list (the node
    task 0 runs on; ``SLURM_STEP_NODELIST``, else ``SLURM_JOB_NODELIST``) and
    ``SLURM_PORT_BASE + SLURM_JOB_ID % SLURM_PORT_SPAN``: the same on every task of the job.
    """
    address = os.environ.get("MASTER_ADDR")
    if not address:
        nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise ConfigError("running under srun but neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is set: "
                              "set MASTER_ADDR (the host of task 0) and MASTER_PORT")
        address = expand_nodelist(nodelist)[0]
    port = os.environ.get("MASTER_PORT")
    if not port:
        job_id = os.environ.get("SLURM_JOB_ID", os.environ.get("SLURM_JOBID", ""))
        if not job_id.isdigit():
            raise ConfigError(f"running under srun without MASTER_PORT and without a numeric SLURM_JOB_ID "
                              f"('{job_id}'): set MASTER_PORT to a free port, the same for every task")
        port = str(SLURM_PORT_BASE + int(job_id) % SLURM_PORT_SPAN)
    return address, int(port)


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


def rendezvous_address(dist_url: Optional[str], nodes: int = 1) -> Tuple[str, int]:
    """``(MASTER_ADDR, MASTER_PORT)`` for spawned processes.

    ``tcp://host:port`` gives them directly; ``env://`` takes them from the
    environment when set, else (one node only) uses this machine and a free port.
    With ``nodes > 1`` and neither, each node would wait for itself until
    ``dist_timeout``: that is refused here with what to set.
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
        if nodes > 1:
            missing = " and ".join(name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ)
            raise ConfigError(f"world_size {nodes} (nodes) with dist_url env:// needs {missing} in the environment "
                              f"of every node (the address of node rank 0 and a free port there), or "
                              f"dist_url tcp://HOST:PORT; without them each node would wait for itself until "
                              f"dist_timeout")
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

    launcher = "spawn" if spawn_index is not None else detect_launcher()
    if launcher == "spawn":
        per_node, world_size = spawn_world(cfg)
        rank = int(cfg.rank) * per_node + spawn_index
        local_rank = spawn_index
        device = _cuda_device(int(train_gpu[spawn_index])) if use_cuda else torch.device("cpu")
    elif launcher == "torchrun":
        rank = int(os.environ["RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ["LOCAL_RANK"])
        device = _cuda_device(local_rank) if use_cuda else torch.device("cpu")
    elif launcher == "slurm" and launcher_world_size() > 1:
        rank = int(os.environ["SLURM_PROCID"])
        world_size = int(os.environ["SLURM_NTASKS"])
        local_rank = int(os.environ["SLURM_LOCALID"])
        os.environ["MASTER_ADDR"], port = slurm_rendezvous()
        os.environ["MASTER_PORT"] = str(port)
        # A cluster that binds one GPU per task (--gpus-per-task=1) shows each task only its own.
        gpu_index = local_rank if not use_cuda or torch.cuda.device_count() > 1 else 0
        device = _cuda_device(gpu_index) if use_cuda else torch.device("cpu")
    else:
        # A single process (also one srun task): no process group at all.
        device = _cuda_device(int(train_gpu[0])) if use_cuda else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return DistContext(rank=0, world_size=1, local_rank=0, device=device, is_main=True, distributed=False,
                           launcher=launcher)

    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = choose_backend(cfg, device)
    kwargs = dict(backend=backend, init_method="env://", rank=rank, world_size=world_size, timeout=timeout)
    if backend == "nccl":
        kwargs["device_id"] = device  # binds NCCL to our GPU up front (no guessing in barrier())
    dist.init_process_group(**kwargs)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                       is_main=rank == 0, distributed=True, launcher=launcher)


def describe_launch(ctx: DistContext) -> str:
    """The log's first line: which launcher was detected and where this process sits."""
    where = f"rank {ctx.rank} of {ctx.world_size} (local rank {ctx.local_rank}) on {socket.gethostname()}"
    if ctx.launcher == "slurm" and ctx.distributed:
        where += (f", SLURM job {os.environ.get('SLURM_JOB_ID', '?')}, rendezvous "
                  f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}")
    return f"launcher: {ctx.launcher}, {where}, device {ctx.device}"


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


def problems_on_any_rank(problem: Optional[str]) -> List[str]:
    """Every rank's ``problem`` (None when its check passed) as ``"rank R on HOST: problem"``; the same
    list on every rank, so a check that fails on one node only (a file it does not have) stops all
    ranks at once instead of leaving the others in their next collective until ``dist_timeout``."""
    if not is_distributed():
        return [problem] if problem else []
    gathered = all_gather_object((socket.gethostname(), problem))
    return [f"rank {rank} on {host}: {found}" for rank, (host, found) in enumerate(gathered) if found]


def all_gather_object(value) -> list:
    """``[value of rank 0, value of rank 1, ...]`` on every process (``[value]`` when not distributed)."""
    if not is_distributed():
        return [value]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Give every process rank ``src``'s buffers of ``module`` (BatchNorm running statistics), in place.

    DDP broadcasts them at the start of each forward, but the forward then updates each process's
    copy with its own batch, so after training the processes disagree; rank 0's copy is the one
    saved in checkpoints, and evaluating anything else would score a model nobody can load.
    """
    if is_distributed() and get_world_size() > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=src)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (safe to call when none was initialised)."""
    if is_distributed():
        dist.destroy_process_group()


class TrainSampler(DistributedSampler):
    """``DistributedSampler`` (shuffled by ``seed`` and epoch) that can start an epoch part-way:
    ``set_epoch(epoch, start=k)`` skips this process's first ``k`` indices, the batches an
    interrupted run already trained on, so the rest of the epoch sees exactly the same data."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = int(start)

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


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


def select_device(requested: Optional[str] = None, local_rank: int = 0) -> torch.device:
    """The device to run on: ``requested`` if given ("cpu", "cuda", "cuda:1"),
    else CUDA (``cuda:local_rank``) when available, else the CPU."""
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device '{requested}' was requested but CUDA is not available on this machine")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")
