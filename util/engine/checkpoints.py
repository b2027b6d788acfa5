"""The files of a training run in ``save_path``: ``train_epoch_N.pth`` (and mid-epoch
``train_epoch_N_iter_I.pth``) and ``best_mIoU.pth``.

Their naming, listing and pruning (``keep_checkpoints``), the file ``resume`` points to, their
content and its check, and a failed write that says what to do. Reading and writing the files
themselves (safely, atomically) is util/runtime/checkpoint_io.py.
"""
from __future__ import annotations

import os
import re
from typing import Any, List, Optional, Tuple

from torch import nn

from util.runtime.checkpoint_io import CheckpointError, PathLike, add_module_prefix, save_checkpoint

EPOCH_CHECKPOINT_PATTERN = re.compile(r"^train_epoch_(\d+)\.pth$")
# Written when training is stopped by a signal in the middle of epoch E after I of its iterations
# (the log's "Epoch: [E/..][I/..]"); it holds epoch E - 1 (epochs done) and iteration I.
MID_EPOCH_CHECKPOINT_PATTERN = re.compile(r"^train_epoch_(\d+)_iter_(\d+)\.pth$")
BEST_CHECKPOINT = "best_mIoU.pth"


def checkpoint_path(save_path: PathLike, epoch: int, iteration: int = 0) -> str:
    """``save_path/train_epoch_{epoch}.pth`` after ``epoch`` whole epochs; with ``iteration`` > 0 the
    mid-epoch ``train_epoch_{epoch + 1}_iter_{iteration}.pth`` (``iteration`` done of epoch ``epoch + 1``)."""
    name = f"train_epoch_{epoch + 1}_iter_{iteration}.pth" if iteration else f"train_epoch_{epoch}.pth"
    return os.path.join(os.fspath(save_path), name)


def list_training_checkpoints(save_path: PathLike) -> List[Tuple[Tuple[int, int], str]]:
    """``[((epochs done, iterations done in the next epoch), path), ...]`` of every training checkpoint
    in ``save_path`` (whole-epoch and mid-epoch), oldest first."""
    save_path = os.fspath(save_path)
    found = [((epoch, 0), path) for epoch, path in list_epoch_checkpoints(save_path)]
    if os.path.isdir(save_path):
        for name in os.listdir(save_path):
            match = MID_EPOCH_CHECKPOINT_PATTERN.match(name)
            if match and int(match.group(1)) >= 1:
                found.append(((int(match.group(1)) - 1, int(match.group(2))), os.path.join(save_path, name)))
    return sorted(found)


def list_epoch_checkpoints(save_path: PathLike) -> List[Tuple[int, str]]:
    """``[(epoch, path), ...]`` of the ``train_epoch_N.pth`` files in ``save_path``, oldest first."""
    save_path = os.fspath(save_path)
    if not os.path.isdir(save_path):
        return []
    found = []
    for name in os.listdir(save_path):
        match = EPOCH_CHECKPOINT_PATTERN.match(name)
        if match:
            found.append((int(match.group(1)), os.path.join(save_path, name)))
    return sorted(found)


def prune_checkpoints(save_path: PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` ``train_epoch_N.pth`` files (never ``best_mIoU.pth``), and every
    mid-epoch checkpoint older than the newest training checkpoint (it is only there to be resumed)."""
    newest = list_training_checkpoints(save_path)[-1:]
    stale = [path for position, path in list_training_checkpoints(save_path)
             if MID_EPOCH_CHECKPOINT_PATTERN.match(os.path.basename(path)) and position < newest[0][0]]
    for path in [path for _, path in list_epoch_checkpoints(save_path)[:-keep]] + stale:
        try:
            os.remove(path)
        except FileNotFoundError:  # another process (or a user) removed it first
            pass


def find_resume_checkpoint(resume: Optional[str], save_path: PathLike) -> Optional[str]:
    """The file a run resumes from: None without ``resume``; for ``"auto"`` the newest training
    checkpoint in ``save_path``, whole-epoch or mid-epoch (None when there is none yet); else ``resume``."""
    if not resume:
        return None
    if resume == "auto":
        found = list_training_checkpoints(save_path)
        return found[-1][1] if found else None
    return resume


def make_checkpoint(epoch: int, model: nn.Module, optimizer, scheduler, scaler, best_miou: float,
                    cfg) -> dict:
    """The saved training state: plain data and tensors only, so it loads with ``weights_only=True``.

    ``state_dict`` keys carry the release's ``module.`` prefix, so the release's tools read it too.
    """
    return {
        "epoch": int(epoch),
        "state_dict": add_module_prefix(model.state_dict()),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "best_mIoU": float(best_miou),
        "cfg": cfg.to_dict(),
    }


def add_mid_epoch_state(checkpoint: dict, progress: dict, rng_states: List[dict], iters_per_epoch: int) -> dict:
    """Make ``checkpoint`` (of ``epoch`` whole epochs) a mid-epoch one: ``epoch_progress`` (iterations of
    the next epoch done and that epoch's summed statistics so far, util.engine.training.EpochInterrupted), each
    rank's random-number state (``rng_states[rank]``), and the layout they hold for (processes,
    iterations per epoch)."""
    checkpoint.update(epoch_progress=progress, rng_states=list(rng_states), world_size=len(rng_states),
                      iters_per_epoch=int(iters_per_epoch))
    return checkpoint


def check_training_checkpoint(checkpoint: Any, path: str) -> None:
    """Raise CheckpointError unless ``checkpoint`` is a training checkpoint of tool/train.py."""
    required = ("epoch", "state_dict", "optimizer")
    missing = [key for key in required if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing or not isinstance(checkpoint["epoch"], int) or not isinstance(checkpoint.get("cfg") or {}, dict):
        found = (f"keys {sorted(map(str, checkpoint))[:8]}" if isinstance(checkpoint, dict)
                 else type(checkpoint).__name__)
        raise CheckpointError(f"{path} is not a training checkpoint of tool/train.py (needs {', '.join(required)}; "
                              f"found {found}); to start a new run from its weights use 'weight {path}' instead "
                              f"of resume")


def save_training_checkpoint(checkpoint: dict, path: PathLike) -> None:
    """:func:`save_checkpoint`, with a failed write reported as a CheckpointError that says what to do."""
    try:
        save_checkpoint(checkpoint, path)
    except OSError as exc:
        raise CheckpointError(f"could not write checkpoint {os.fspath(path)}: {exc.strerror or exc}; the checkpoints "
                              f"already in {os.path.dirname(os.fspath(path))} are intact (free space, then "
                              f"'resume auto' continues from the newest)") from None


__all__ = ["BEST_CHECKPOINT", "checkpoint_path", "list_training_checkpoints", "list_epoch_checkpoints",
           "prune_checkpoints", "find_resume_checkpoint", "make_checkpoint", "add_mid_epoch_state",
           "check_training_checkpoint", "save_training_checkpoint"]
