"""Small helpers shared by the tools: logging, meters, device choice, seeding."""
from __future__ import annotations

import logging
import random
import sys
from typing import Optional

import numpy as np
import torch


def get_logger(name: str = "pyconvsegnet", rank: int = 0, log_file: Optional[str] = None) -> logging.Logger:
    """A logger that prints on rank 0 only (other ranks log warnings and errors).

    Calling it again with the same name reconfigures the handlers instead of adding
    duplicates, so tests and repeated ``main()`` calls do not print every line twice.
    """
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter("[%(asctime)s %(levelname)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    logger.addHandler(stream)
    if log_file and rank == 0:
        handler = logging.FileHandler(log_file)
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return logger


class AverageMeter:
    """Running sum / count of a scalar (e.g. loss per sample, seconds per batch)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.val = 0.0
        self.sum = 0.0
        self.count = 0
        self.avg = 0.0

    def update(self, val: float, n: int = 1) -> None:
        self.val = float(val)
        self.sum += float(val) * n
        self.count += n
        self.avg = self.sum / self.count if self.count else 0.0


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


def format_seconds(seconds: float) -> str:
    """Seconds as H:MM:SS (or D days, H:MM:SS for long runs)."""
    seconds = max(0, int(round(seconds)))
    days, rem = divmod(seconds, 86400)
    hours, rem = divmod(rem, 3600)
    minutes, secs = divmod(rem, 60)
    text = f"{hours:d}:{minutes:02d}:{secs:02d}"
    return f"{days}d {text}" if days else text


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict:
    """torch's random-number state on the CPU (and ``device`` when it is a GPU): what dropout draws from.
    (Python's and NumPy's are reseeded per sample by the dataset.)"""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict, device: torch.device) -> None:
    """Undo :func:`rng_state`: the draws continue exactly where they were saved."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
