"""Train a segmentation model.

    python tool/train.py --config config/camvid/camvid_pyconvresnet50_pyconvsegnet.yaml [KEY VALUE ...]
    torchrun --nproc_per_node=N tool/train.py --config CFG [KEY VALUE ...]

Without torchrun on a CUDA machine with several ``train_gpu`` entries (and
``multiprocessing_distributed: True``) it starts one process per GPU itself,
as the release did. ``batch_size``, ``batch_size_val`` and ``workers`` are
totals over all processes.

Checkpoints in ``save_path``: ``train_epoch_N.pth`` every ``save_freq``
epochs (and after the last one), the newest ``keep_checkpoints`` kept, and
``best_mIoU.pth`` when the validation mIoU improves (``evaluate: True``).
Each is ``{epoch, state_dict ('module.'-prefixed keys, as the release),
optimizer, scheduler, scaler, best_mIoU, cfg, environment}``, loadable with
``torch.load(..., weights_only=True)``. ``resume: auto`` continues from the
newest ``train_epoch_N.pth``; a resumed run ends with the same weights as an
uninterrupted one.

Also in ``save_path``, for every start once the config is accepted (util/runtime/runs.py): the log
``train-STAMP.log`` and the effective config ``train-STAMP.yaml`` (overrides applied, seed filled in).
``weight PATH`` fine-tunes from a whole model, also one of another class count (its final classifier
layers are re-initialised, and the log says which).

The layers, top-down: :func:`main` (command line, launcher) -> :func:`run_worker` (one process) ->
:func:`fit` (the epoch loop) -> ``util.engine.training.train_one_epoch``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from util.config import dump_cfg, load_cfg  # noqa: E402
from util.data.loaders import build_loaders  # noqa: E402
from util.engine import training, validation  # noqa: E402
from util.engine.checkpoints import (  # noqa: E402
    adopt_checkpoint_recipe,
    epoch_kept_on_interrupt,
    load_resume_checkpoint,
    mid_epoch_resume_state,
    restore_training_state,
    save_checkpoints,
    save_mid_epoch_checkpoint,
    validation_pending,
)
from util.engine.run_checks import check_on_every_rank, check_run_config  # noqa: E402
from util.runtime import distributed  # noqa: E402
from util.runtime.cli import (  # noqa: E402
    EXIT_INTERRUPTED,
    STOP_SIGNALS,
    StopSignals,
    TrainingStopped,
    Uninterruptible,
    exit_with,
)
from util.runtime.environment import collect_environment, format_environment  # noqa: E402
from util.runtime.log import get_logger, log_config  # noqa: E402
from util.runtime.runs import RunStatus, checkpoint_path, stop_error, timestamp, training_log_paths  # noqa: E402
from util.runtime.seeding import choose_run_seed, set_seed  # noqa: E402


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a PyConvSegNet / PSPNet segmentation model.")
    parser.add_argument("--config", required=True,
                        help="YAML config, e.g. config/camvid/camvid_pyconvresnet50_pyconvsegnet.yaml")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides of config keys")
    return parser


def main(argv: Optional[List[str]] = None) -> Optional[Dict[str, Any]]:
    """Parse ``--config CFG [KEY VALUE ...]``, check the run, train. Returns rank's summary (None in spawn mode).

    Raises ConfigError (bad config, fp16 on CPU, save_path not writable, ...) before any model or
    data is built; NonFiniteLossError if the loss diverges. Ctrl-C prints one line (where it stopped,
    the newest checkpoint, the command that resumes) and returns EXIT_INTERRUPTED.
    """
    args = build_arg_parser().parse_args(argv)
    cfg = load_cfg(args.config, args.opts)
    if distributed.launcher_world_size() == 1:  # else every rank checks in run_worker(), together
        check_run_config(cfg)
    status = RunStatus(cfg.save_path, args.config, list(args.opts))
    try:
        if distributed.should_spawn(cfg):  # the release's mode: one process per train_gpu entry
            launch_spawned(cfg, args.config, args.opts)
            return None
        return run_worker(cfg, status=status)  # a single process, or one of torchrun's / SLURM's
    except KeyboardInterrupt:
        if status.is_main:
            print(status.stopped_message(), file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


def launch_spawned(cfg, config_path: str, opts: List[str]) -> None:
    """One process per ``train_gpu`` entry, rendezvous at ``dist_url`` (tcp://HOST:PORT or env://).

    A stop signal sent to this parent only is passed on to the children, which save and exit."""
    import torch.multiprocessing as mp

    address, port = distributed.rendezvous_address(cfg.dist_url, nodes=int(cfg.world_size))
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = address, str(port)
    per_node, _ = distributed.spawn_world(cfg)
    with StopSignals() as stop:
        context = mp.start_processes(_spawned_process, nprocs=per_node, args=(config_path, list(opts)), join=False)
        forwarded = False
        try:
            while not context.join(timeout=1):
                if stop.requested() and not forwarded:
                    for process in context.processes:
                        if process.is_alive():
                            os.kill(process.pid, stop.signum)
                    forwarded = True
        except mp.ProcessExitedException as exited:
            if exited.exit_code not in [128 + int(signum) for signum in STOP_SIGNALS]:
                raise
            raise TrainingStopped(f"the spawned processes stopped on a signal and saved a checkpoint in "
                                  f"{cfg.save_path}; 'resume auto' continues from it", exited.exit_code) from None


def _spawned_process(spawn_index: int, config_path: str, opts: List[str]) -> None:
    """Body of each process in the release's spawn mode (runs in a fresh interpreter)."""
    cfg = load_cfg(config_path, opts)
    try:
        run_worker(cfg, spawn_index=spawn_index, status=RunStatus(cfg.save_path, config_path, list(opts)))
    except TrainingStopped as stopped:
        sys.exit(stopped.exit_status)  # the parent reports it


def run_worker(cfg, spawn_index: Optional[int] = None, status: Optional[RunStatus] = None) -> Dict[str, Any]:
    """One process's share of the run: join the process group, train, leave it."""
    ctx = distributed.init_distributed(cfg, spawn_index)
    if status is not None:
        status.is_main, status.world_size = ctx.is_main, ctx.world_size
    try:
        if ctx.distributed:
            check_on_every_rank(cfg)
        return fit(cfg, ctx, status or RunStatus(cfg.save_path, ""))
    finally:
        distributed.cleanup()


def fit(cfg, ctx, status: RunStatus) -> Dict[str, Any]:
    """Set the run up (log, seed, data, model, resume), then train epoch after epoch: train, validate, save.

    A Ctrl-C during a validation saves that epoch first; the run that resumes from it validates that epoch
    (without training it again) before the next (util.engine.checkpoints.epoch_kept_on_interrupt)."""
    # The log and the effective config belong to the run, in save_path; they are written only now,
    # after check_run_config accepted the config (a rejected one leaves nothing behind).
    log_path, config_copy = training_log_paths(cfg.save_path, distributed.broadcast_object(timestamp()))
    logger = get_logger(rank=ctx.rank, log_file=log_path)
    logger.info(distributed.describe_launch(ctx))
    if ctx.is_main:
        logger.info(f"run in {cfg.save_path}: log {log_path}, effective config {config_copy}")
        log_config(cfg, logger)
    environment = collect_environment() if ctx.is_main else None  # once per run: the log and every checkpoint
    for line in format_environment(environment) if environment else []:
        logger.info(line)
    logger.info(f"{ctx.world_size} process(es), this one rank {ctx.rank} on {ctx.device}, precision {cfg.precision}")
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # The checkpoint is read first: a resumed run continues with its recipe and seed (unless overridden).
    checkpoint, resume_path = load_resume_checkpoint(cfg, ctx, logger)
    if checkpoint is not None:
        adopt_checkpoint_recipe(cfg, checkpoint, resume_path, logger)
    seed = cfg.manual_seed = choose_run_seed(cfg, logger)  # saved with the checkpoints
    if ctx.is_main:
        dump_cfg(cfg, config_copy)  # as the run uses it: overrides applied, seed filled in
    set_seed(seed)  # same initial head weights on every process (DDP also broadcasts rank 0's)

    # Data first: list problems surface before the (slow) model build.
    data = build_loaders(cfg, ctx, seed)
    iters_per_epoch = len(data.train_loader)
    max_iter = cfg.epochs * iters_per_epoch
    logger.info(f"{len(data.train_set)} training images, batch_size {data.batch_size * ctx.world_size} in total "
                f"over {ctx.world_size} process(es): {data.batch_size} per process per step, "
                f"{iters_per_epoch} iterations per epoch, {max_iter} in total")
    if cfg.evaluate:
        logger.info(f"validation every {cfg.val_every} epoch(s) on {validation.validation_protocol(cfg, data)}")

    model = training.build_training_model(cfg, ctx, checkpoint is not None, logger)
    optim = training.build_optimization(cfg, ctx, model, iters_per_epoch)
    epochs_done, best_miou = cfg.start_epoch, 0.0
    resume_progress, resume_rng = None, None  # a mid-epoch checkpoint: where in the epoch, and each rank's RNG
    unvalidated = 0  # 1: the checkpoint's epoch is trained, its validation was interrupted
    if checkpoint is not None:
        epochs_done, best_miou = restore_training_state(cfg, checkpoint, resume_path, model, optim, logger)
        unvalidated = int(validation_pending(cfg, checkpoint, resume_path, logger))
        if checkpoint.get("epoch_progress"):
            resume_progress, resume_rng = mid_epoch_resume_state(checkpoint, resume_path, ctx, iters_per_epoch)
            logger.info(f"{resume_path} was written mid-epoch: epoch {epochs_done + 1} continues after "
                        f"{resume_progress['iteration']}/{iters_per_epoch} iterations")
        del checkpoint
    if epochs_done >= cfg.epochs and not unvalidated:
        logger.info(f"nothing to do: {epochs_done} epochs already done of {cfg.epochs}")
    # Also right for a run whose length (epochs, batch size, processes) changed since the checkpoint.
    optim.scheduler.reposition(epochs_done * iters_per_epoch + (resume_progress or {}).get("iteration", 0), max_iter)
    train_model = training.wrap_model(cfg, ctx, model)

    writer = None
    if ctx.is_main:
        from tensorboardX import SummaryWriter

        writer = Uninterruptible(SummaryWriter(cfg.save_path))  # Ctrl-C never lands inside its queue
    train_stats: Dict[str, float] = {}
    val_stats: Optional[Dict[str, Any]] = None
    last_whole = None  # the whole-image result of the newest model, if measured
    status.epochs = cfg.epochs
    stop = StopSignals()  # SIGTERM / SIGUSR1 (a cluster preempting the job): finish the iteration, save, exit
    try:
        with stop:
            for epoch in range(epochs_done - unvalidated, cfg.epochs):  # 0-based; logs and files count epoch + 1
                status.epoch, status.stage = epoch + 1, "training"
                progress = resume_progress if epoch == epochs_done else None
                try:
                    if epoch >= epochs_done:  # else trained already, its validation interrupted: validate it
                        train_stats = training.train_one_epoch(cfg, ctx, train_model, data, optim, epoch, seed,
                                                               logger, writer, progress=progress,
                                                               rng=resume_rng if progress else None, stop=stop)
                except training.EpochInterrupted as interrupted:
                    path = save_mid_epoch_checkpoint(cfg, ctx, model, optim, epoch, interrupted.progress, best_miou,
                                                     iters_per_epoch, stop, environment=environment)
                    where = f"epoch {epoch + 1}, iteration {interrupted.progress['iteration']}/{iters_per_epoch}"
                    raise stop_error(stop, where, path, status, logger) from None
                improved, last_whole = False, None
                if validation.should_validate(cfg, epoch + 1):
                    status.stage = "validating after"
                    with epoch_kept_on_interrupt(cfg, ctx, epoch + 1, model, optim, best_miou, logger, environment):
                        val_stats = validation.validate(cfg, ctx, model, data, optim, epoch + 1, logger, writer)
                    last_whole = val_stats if cfg.val_mode == "whole" else None
                    improved = val_stats["mIoU"] > best_miou  # NaN never counts as an improvement
                    best_miou = float(val_stats["mIoU"]) if improved else best_miou
                # a stop signal during validation: this epoch's checkpoint is written whatever save_freq says
                stopping = stop.agree(distributed.all_gather_object(stop.signum)) and epoch + 1 < cfg.epochs
                status.stage = "saving checkpoints after"
                save_checkpoints(cfg, ctx, epoch + 1, model, optim, best_miou, improved, logger,
                                 force=stopping or epoch < epochs_done,  # the latter: without validation_pending
                                 environment=environment)
                if stopping:
                    raise stop_error(stop, f"the end of epoch {epoch + 1}", checkpoint_path(cfg.save_path, epoch + 1),
                                     status, logger)
        distributed.barrier()  # best_mIoU.pth is written before anyone reads it
        status.epoch, status.stage = None, "validating the final and the best model"
        end_results = validation.report_final_and_best(cfg, ctx, model, data, last_whole, logger)
    finally:
        if writer is not None:
            writer.close()
    distributed.barrier()  # no process leaves (and tears down the group) while rank 0 still writes
    logger.info("training finished")
    return {"epochs": cfg.epochs, "best_mIoU": best_miou, "train": train_stats, "val": val_stats,
            "end": end_results, "save_path": cfg.save_path}


if __name__ == "__main__":
    exit_with(main)
