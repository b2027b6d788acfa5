"""Training checkpoints, in one place: what they hold, when they are written (every ``save_freq``
epochs, the best, mid-epoch on a stop signal), pruning (``keep_checkpoints``) and resuming from them
(``resume``: the file, its check, the recipe (:data:`RECIPE_KEYS`) and state it restores, and the position
inside an epoch).

Their file names are util/runtime/runs.py's; reading and writing the files themselves (safely,
atomically) is util/runtime/checkpoint_io.py.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Dict, List, Optional, Tuple

from torch import nn

from util.config import validate_cfg
from util.engine.training import Optimization
from util.engine.validation import should_validate, validation_protocol
from util.errors import CheckpointError
from util.runtime import distributed
from util.runtime.checkpoint_io import (
    PathLike,
    add_module_prefix,
    load_checkpoint_file,
    load_model_weights,
    remove_stale_temporaries,
    save_checkpoint,
)
from util.runtime.runs import (
    BEST_CHECKPOINT,
    MID_EPOCH_CHECKPOINT_PATTERN,
    checkpoint_path,
    list_epoch_checkpoints,
    list_event_files,
    list_run_checkpoints,
    list_training_checkpoints,
)
from util.runtime.seeding import rng_state

# The keys that decide a run's training recipe. A resumed run takes them from the checkpoint's saved config
# (the run it continues), unless given on the command line: the config file alone does not change a recipe
# half-way (:func:`adopt_checkpoint_recipe`). ``epochs`` is the run's length, not its recipe: resuming with
# other epochs extends or shortens the run (the schedule is re-positioned to the new length; the log says so).
RECIPE_KEYS = (
    "lr_schedule", "warmup_iters", "power",  # schedule
    "base_lr", "momentum", "weight_decay",  # learning rate and optimiser
    "loss", "aux_weight", "ohem_thresh", "ohem_min_kept", "class_weight",  # loss
    "train_h", "train_w", "scale_min", "scale_max", "rotate_min", "rotate_max", "photometric",  # augmentation
    "precision",
    "batch_size", "manual_seed",  # batch layout and data order
)


def adopt_checkpoint_recipe(cfg, checkpoint: dict, resume_path: str, logger) -> None:
    """Before a resumed run builds anything: :data:`RECIPE_KEYS` not given on the command line
    (``cfg.overridden``) take the checkpoint's saved value, and every key whose value differs from the
    checkpoint's is logged, one line each (``resume`` itself aside). A checkpoint without a saved config
    (an older or foreign one) keeps this run's config, and the log says so. Raises ConfigError when the
    recipe taken over fails this run's checks (e.g. a loss of a ``custom_imports`` module not imported now)."""
    saved = checkpoint.get("cfg")
    if not saved:
        logger.info(f"{resume_path} holds no saved config (an older or foreign checkpoint): the training recipe "
                    f"is this run's config as it is")
        return
    for key in sorted(set(cfg) & set(saved) - {"resume"}):
        if cfg[key] == saved[key]:
            continue
        if key in RECIPE_KEYS and key not in cfg.overridden:
            logger.info(f"resume: {key} {saved[key]!r} as in the checkpoint's run (this config says {cfg[key]!r}; "
                        f"give {key} on the command line to change it)")
            cfg[key] = saved[key]
        else:
            source = "from the command line" if key in cfg.overridden else "from this config"
            logger.info(f"resume: {key} {cfg[key]!r} {source} (the checkpoint's run used {saved[key]!r})")
    validate_cfg(cfg)


def prune_checkpoints(save_path: PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` ``train_epoch_N.pth`` files (never ``best_mIoU.pth``), and every
    mid-epoch checkpoint older than the newest training checkpoint (it is only there to be resumed)."""
    checkpoints = list_training_checkpoints(save_path)  # oldest first: the last one is the newest
    stale = [path for position, path in checkpoints
             if MID_EPOCH_CHECKPOINT_PATTERN.match(os.path.basename(path)) and position < checkpoints[-1][0]]
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


def make_checkpoint(epochs_done: int, model: nn.Module, optimizer, scheduler, scaler, best_miou: float,
                    cfg, environment: Optional[dict] = None) -> dict:
    """The saved training state: plain data and tensors only, so it loads with ``weights_only=True``.

    ``state_dict`` keys carry the release's ``module.`` prefix, so the release's tools read it too.
    ``environment`` is where the run runs (util.runtime.environment.collect_environment, collected once
    per run: plain JSON-able data).
    """
    return {
        "environment": environment,
        "epoch": int(epochs_done),
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




def resume_checkpoint_path(cfg, logger) -> Optional[str]:
    """The checkpoint to resume from, or None (no ``resume``, or ``resume: auto`` with nothing saved yet)."""
    path = find_resume_checkpoint(cfg.resume, cfg.save_path)
    if cfg.resume == "auto" and path is None:
        logger.info(f"resume auto: no train_epoch_N.pth in {cfg.save_path}; starting from scratch")
    return path


def restore_training_state(cfg, checkpoint, resume_path: str, model, optim: Optimization, logger) -> Tuple[int, float]:
    """Load a training checkpoint into the model, optimiser, scheduler and scaler; returns
    ``(epochs done, best validation mIoU)``."""
    load_model_weights(model, checkpoint, source=resume_path)
    try:
        optim.optimizer.load_state_dict(checkpoint["optimizer"])
    except (KeyError, ValueError) as exc:
        raise CheckpointError(
            f"{resume_path}: its optimizer state does not fit this run's parameter groups ({exc}); "
            f"to start a new run from its weights use 'weight {resume_path}' instead of resume") from None
    if checkpoint.get("scheduler") is not None:
        optim.scheduler.load_state_dict(checkpoint["scheduler"])
    if optim.scaler is not None and checkpoint.get("scaler") is not None:
        optim.scaler.load_state_dict(checkpoint["scaler"])
    epochs_done = int(checkpoint["epoch"])
    best_miou = float(checkpoint.get("best_mIoU", 0.0))
    saved_protocol = checkpoint.get("val_protocol")
    if cfg.evaluate and best_miou > 0 and saved_protocol not in (None, validation_protocol(cfg)):
        logger.info(f"the saved best mIoU {best_miou:.4f} was measured on {saved_protocol}; this run validates "
                    f"on {validation_protocol(cfg)}: its first validation replaces best_mIoU.pth")
        best_miou = 0.0
    best_text = f", best mIoU {best_miou:.4f}" if best_miou > 0 else ""
    logger.info(f"resumed from {resume_path}: {epochs_done} epoch(s) done{best_text}")
    if cfg.resume == "auto":
        # A run killed between writing train_epoch_N.pth and pruning the older ones (or resumed
        # with a smaller keep_checkpoints) leaves extra files: apply the policy now, since a run
        # resumed at its last epoch writes nothing more. The newest file, just loaded, is kept.
        prune_checkpoints(cfg.save_path, cfg.keep_checkpoints)
    return epochs_done, best_miou


def save_checkpoints(cfg, ctx, epochs_done: int, model, optim: Optimization, best_miou: float, improved: bool,
                     logger, force: bool = False, validation_pending: bool = False,
                     environment: Optional[dict] = None) -> None:
    """``train_epoch_N.pth`` every ``save_freq`` epochs, after the last and when ``force`` (a stop signal);
    ``best_mIoU.pth`` when improved. ``validation_pending`` marks the checkpoint as saved before the epoch's
    validation finished (:func:`epoch_kept_on_interrupt`). ``environment``: :func:`make_checkpoint`'s."""
    if not ctx.is_main:
        return
    checkpoint = None

    def build():
        made = make_checkpoint(epochs_done, model, optim.optimizer, optim.scheduler, optim.scaler, best_miou, cfg,
                               environment)
        made["val_protocol"] = validation_protocol(cfg) if cfg.evaluate else None
        if validation_pending:
            made["validation_pending"] = True
        return made

    if epochs_done % cfg.save_freq == 0 or epochs_done == cfg.epochs or force:
        checkpoint = build()
        path = checkpoint_path(cfg.save_path, epochs_done)
        save_training_checkpoint(checkpoint, path)
        prune_checkpoints(cfg.save_path, cfg.keep_checkpoints)
        logger.info(f"saved {path}")
    if improved:
        path = os.path.join(cfg.save_path, BEST_CHECKPOINT)
        save_training_checkpoint(checkpoint if checkpoint is not None else build(), path)
        logger.info(f"new best validation mIoU {best_miou:.4f}: saved {path}")


def remove_previous_run(save_path: PathLike, logger) -> List[str]:
    """For ``overwrite_run True``: delete the checkpoints (training ones and ``best_mIoU.pth``) and TensorBoard
    events of the run that used ``save_path`` before, so that nothing of it mixes with the new run; its logs
    and config copies (``train-STAMP.*``, one per start) stay. Says in the log what went; returns the paths."""
    removed = list_run_checkpoints(save_path) + list_event_files(save_path)
    for path in removed:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
    if removed:
        logger.info(f"overwrite_run True: removed the previous run's {', '.join(map(os.path.basename, removed))} "
                    f"from {os.fspath(save_path)}")
    return removed


@contextmanager
def epoch_kept_on_interrupt(cfg, ctx, epochs_done: int, model, optim: Optimization, best_miou: float, logger,
                            environment: Optional[dict] = None):
    """Around the validation after ``epochs_done`` epochs: a Ctrl-C (KeyboardInterrupt) there first writes
    ``train_epoch_N.pth`` (whatever ``save_freq`` says), so an epoch whose training finished is never lost.

    That checkpoint holds the best mIoU from before the interrupted validation and ``validation_pending``;
    ``resume auto`` then validates epoch N before it trains epoch N + 1 (:func:`validation_pending`), so its
    score, ``best_mIoU.pth`` and the validation curve miss nothing. (SIGTERM / SIGUSR1 let the validation
    finish and save after it, as before.)"""
    try:
        yield
    except KeyboardInterrupt:
        logger.info(f"interrupted while validating after epoch {epochs_done}: saving that epoch first")
        save_checkpoints(cfg, ctx, epochs_done, model, optim, best_miou, False, logger, force=True,
                         validation_pending=True, environment=environment)
        raise


def validation_pending(cfg, checkpoint: dict, resume_path: str, logger) -> bool:
    """True when ``checkpoint`` was saved by :func:`epoch_kept_on_interrupt` and this run validates after its
    epoch: the resumed run validates that epoch before training the next."""
    pending = bool(checkpoint.get("validation_pending")) and should_validate(cfg, int(checkpoint["epoch"]))
    if pending:
        logger.info(f"{resume_path} was saved before its validation finished: validating epoch "
                    f"{checkpoint['epoch']} first")
    return pending


def load_resume_checkpoint(cfg, ctx, logger):
    """``(checkpoint, path)`` to resume from (``(None, None)`` for a fresh run); stale partial writes removed,
    and for a fresh run with ``overwrite_run`` the previous run's files (:func:`remove_previous_run`)."""
    if ctx.is_main:
        for stale in remove_stale_temporaries(cfg.save_path):
            logger.info(f"removed {stale}: the partial write of a checkpoint by an interrupted run")
        if cfg.overwrite_run and not cfg.resume:
            remove_previous_run(cfg.save_path, logger)
    resume_path = distributed.broadcast_object(resume_checkpoint_path(cfg, logger) if ctx.is_main else None)
    if resume_path is None:
        return None, None
    missing = distributed.problems_on_any_rank(None if os.path.isfile(resume_path) else f"{resume_path} does not exist")
    if missing:
        raise CheckpointError(f"every rank resumes from {resume_path}, chosen by rank 0, but: {'; '.join(missing)} "
                              f"(on several machines save_path must be a shared directory)")
    checkpoint = load_checkpoint_file(resume_path)
    check_training_checkpoint(checkpoint, resume_path)
    return checkpoint, resume_path


def mid_epoch_resume_state(checkpoint: dict, path: str, ctx, iters_per_epoch: int):
    """``(progress, this rank's RNG state)`` of a mid-epoch checkpoint; CheckpointError when this run's
    layout differs from the one that wrote it (another data order: the position would mean nothing)."""
    written = (checkpoint.get("world_size"), checkpoint.get("iters_per_epoch"))
    if written != (ctx.world_size, iters_per_epoch):
        raise CheckpointError(
            f"{path} was written in the middle of an epoch by a run of {written[0]} process(es) with {written[1]} "
            f"iterations per epoch; this run has {ctx.world_size} and {iters_per_epoch}: resume it with the same "
            f"number of processes and batch_size, or resume a train_epoch_N.pth instead")
    return checkpoint["epoch_progress"], checkpoint["rng_states"][ctx.rank]


def save_mid_epoch_checkpoint(cfg, ctx, model, optim: Optimization, epoch: int, progress: Dict, best_miou: float,
                              iters_per_epoch: int, stop, environment: Optional[dict] = None) -> str:
    """After a stop signal (``stop``, a util.runtime.cli.StopSignals) in the middle of ``epoch`` (0-based):
    rank 0 writes the mid-epoch checkpoint with every rank's random state; returns its path.
    ``environment``: :func:`make_checkpoint`'s."""
    stop.agree(distributed.all_gather_object(stop.signum))
    rng_states = distributed.all_gather_object(rng_state(ctx.device))
    path = checkpoint_path(cfg.save_path, epoch, progress["iteration"])
    if ctx.is_main:
        checkpoint = make_checkpoint(epoch, model, optim.optimizer, optim.scheduler, optim.scaler, best_miou, cfg,
                                     environment)
        checkpoint["val_protocol"] = validation_protocol(cfg) if cfg.evaluate else None
        save_training_checkpoint(add_mid_epoch_state(checkpoint, progress, rng_states, iters_per_epoch), path)
        prune_checkpoints(cfg.save_path, cfg.keep_checkpoints)
    return path
