"""Seeds and random-number state: one integer seeds a run, each epoch and each process; a resumed run
continues the uninterrupted run's random streams."""
from __future__ import annotations

import random

import numpy as np
import torch

from util.runtime import distributed


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


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed for torch/random/numpy at the start of ``epoch`` on ``rank`` (dropout etc.); resuming at
    an epoch boundary reproduces the uninterrupted run's random stream."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(rank)]).generate_state(1)[0])


def choose_run_seed(cfg, logger) -> int:
    """``manual_seed``, or one drawn on rank 0 and shared with every process (logged, so the run can be repeated)."""
    if cfg.manual_seed is not None:
        return int(cfg.manual_seed)
    seed = distributed.broadcast_object(random.SystemRandom().randrange(2**31))
    logger.info(f"manual_seed is not set: using {seed} (set 'manual_seed {seed}' to repeat this run)")
    return int(seed)
