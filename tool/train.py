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
optimizer, scheduler, scaler, best_mIoU, cfg}``, loadable with
``torch.load(..., weights_only=True)``. ``resume: auto`` continues from the
newest ``train_epoch_N.pth``; a resumed run ends with the same weights as an
uninterrupted one.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from util import distributed as dist_utils  # noqa: E402
from util import engine  # noqa: E402  (engine.train_one_epoch is looked up at call time: tests patch it)
from util.checkpoint import (BEST_CHECKPOINT, check_training_checkpoint, checkpoint_path,  # noqa: E402
                              find_resume_checkpoint, make_checkpoint, prune_checkpoints, save_training_checkpoint)
from util.cli import exit_with  # noqa: E402
from util.config import ConfigError, load_cfg  # noqa: E402
from util.misc import format_seconds, get_logger, set_seed  # noqa: E402
from util.precision import autocast_dtype_for, check_device_support  # noqa: E402
from util.preparation import missing_list_hint  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Command line and checks that run before anything heavy


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a PyConvSegNet / PSPNet segmentation model.")
    parser.add_argument("--config", required=True, help="YAML config, e.g. config/camvid/camvid_pyconvresnet50_pyconvsegnet.yaml")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides of config keys")
    return parser


def check_writable_dir(path: str) -> None:
    """Create ``path`` and write + remove a probe file in it, or raise ConfigError."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_probe_{os.getpid()}_{uuid.uuid4().hex[:8]}")
        with open(probe, "w") as handle:
            handle.write("ok")
        os.remove(probe)
    except OSError as exc:
        raise ConfigError(f"save_path '{path}' is not a writable directory ({exc.strerror or exc}); "
                          f"checkpoints and logs could not be saved") from None


def check_run_config(cfg) -> None:
    """Every check that needs no model or data loading; raises ConfigError with what to change."""
    device_type = "cuda" if dist_utils.wants_cuda(cfg) else "cpu"
    check_device_support(cfg, device_type)  # fp16 on the CPU
    if not cfg.save_path:
        raise ConfigError("save_path is not set: give the directory for checkpoints (e.g. save_path exp/camvid/run1/model)")
    if not cfg.train_list:
        raise ConfigError("train_list is not set")
    if not os.path.isfile(cfg.train_list):
        raise ConfigError(f"train_list file not found: {cfg.train_list}{missing_list_hint(cfg.train_list)}")
    if cfg.evaluate:
        if not cfg.val_list:
            raise ConfigError("evaluate is True but val_list is not set")
        if not os.path.isfile(cfg.val_list):
            raise ConfigError(f"val_list file not found: {cfg.val_list}{missing_list_hint(cfg.val_list)}")
    for key in ("weight", "pretrained"):
        if cfg[key] and not os.path.isfile(cfg[key]):
            raise ConfigError(f"{key} file not found: {cfg[key]}")
    if cfg.resume and cfg.resume != "auto" and not os.path.isfile(cfg.resume):
        raise ConfigError(f"resume checkpoint not found: {cfg.resume} (use 'resume auto' to continue from the "
                          f"newest train_epoch_N.pth in save_path if there is one)")
    if cfg.start_epoch < 0 or cfg.start_epoch >= cfg.epochs:
        raise ConfigError(f"start_epoch must be in [0, epochs), got {cfg.start_epoch} with epochs {cfg.epochs}")
    check_writable_dir(cfg.save_path)


# ---------------------------------------------------------------------------------------------
def _resume_path(cfg, logger) -> Optional[str]:
    """The checkpoint to resume from, or None (no ``resume``, or ``resume: auto`` with nothing saved yet)."""
    path = find_resume_checkpoint(cfg.resume, cfg.save_path)
    if cfg.resume == "auto" and path is None:
        logger.info(f"resume auto: no train_epoch_N.pth in {cfg.save_path}; starting from scratch")
    return path


# ---------------------------------------------------------------------------------------------
# Seeding


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed for torch/random/numpy at the start of ``epoch`` on ``rank`` (dropout etc.); resuming at
    an epoch boundary reproduces the uninterrupted run's random stream."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(rank)]).generate_state(1)[0])


def choose_run_seed(cfg, logger) -> int:
    """``manual_seed``, or one drawn on rank 0 and shared with every process (logged, so the run can be repeated)."""
    if cfg.manual_seed is not None:
        return int(cfg.manual_seed)
    seed = dist_utils.broadcast_object(random.SystemRandom().randrange(2**31))
    logger.info(f"manual_seed is not set: using {seed} (set 'manual_seed {seed}' to repeat this run)")
    return int(seed)


# ---------------------------------------------------------------------------------------------
# Data


def build_loaders(cfg, ctx, seed: int):
    from torch.utils.data import DataLoader, DistributedSampler

    from util.dataset import SegDataset
    from util.transforms import build_train_transform, build_val_transform

    # No util.dataset.worker_init_fn: its cv2.setNumThreads() deadlocks in a forked worker once this
    # process has used OpenCV's thread pool (e.g. a previous in-process run with workers 0).
    world = ctx.world_size
    batch_size = cfg.batch_size // world
    if batch_size < 1:
        raise ConfigError(f"batch_size {cfg.batch_size} is the total over {world} processes: it must be >= {world}")
    workers = math.ceil(cfg.workers / world)
    pin = ctx.device.type == "cuda"

    train_set = SegDataset("train", cfg.data_root, cfg.train_list, transform=build_train_transform(cfg), seed=seed,
                           num_classes=cfg.classes, ignore_label=cfg.ignore_label)
    # shuffle=True even for one process: the order then depends only on (seed, epoch), which resume needs.
    train_sampler = DistributedSampler(train_set, num_replicas=world, rank=ctx.rank, shuffle=True, seed=seed)
    train_loader = DataLoader(train_set, batch_size=batch_size, sampler=train_sampler, num_workers=workers,
                              pin_memory=pin, drop_last=True,
                              persistent_workers=False)  # workers must see set_epoch() each epoch
    if len(train_loader) == 0:
        raise ConfigError(f"train_list {cfg.train_list} has {len(train_set)} images: fewer than one batch "
                          f"({batch_size} per process x {world} processes); lower batch_size")

    val_loader = None
    if cfg.evaluate:
        val_batch = max(1, cfg.batch_size_val // world)
        val_set = SegDataset("val", cfg.data_root, cfg.val_list, transform=build_val_transform(cfg),
                             num_classes=cfg.classes, ignore_label=cfg.ignore_label)
        val_sampler = dist_utils.ShardSampler(len(val_set), num_replicas=world, rank=ctx.rank)
        val_loader = DataLoader(val_set, batch_size=val_batch, sampler=val_sampler, num_workers=workers,
                                pin_memory=pin, drop_last=False)
    return train_set, train_sampler, train_loader, val_loader, batch_size


# ---------------------------------------------------------------------------------------------
# The run


def _log_config(cfg, logger) -> None:
    logger.info("Config:\n" + "\n".join(f"  {key}: {cfg[key]!r}" for key in sorted(cfg.keys())))


def run(cfg, spawn_index: Optional[int] = None) -> Optional[Dict[str, Any]]:
    """One process's share of the run: join the process group, train, leave it."""
    ctx = dist_utils.init_distributed(cfg, spawn_index)
    try:
        return _train(cfg, ctx)
    finally:
        dist_utils.cleanup()


def _train(cfg, ctx) -> Dict[str, Any]:
    logger = get_logger(rank=ctx.rank)
    logger.info(dist_utils.describe_launch(ctx))
    if ctx.is_main:
        _log_config(cfg, logger)
    logger.info(f"{ctx.world_size} process(es), this one rank {ctx.rank} on {ctx.device}, precision {cfg.precision}")
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    from util.checkpoint import load_checkpoint_file, remove_stale_temporaries

    if ctx.is_main:
        for stale in remove_stale_temporaries(cfg.save_path):
            logger.info(f"removed {stale}: the partial write of a checkpoint by an interrupted run")
    # The checkpoint is read first: a run without manual_seed continues with the seed it started with.
    resume_path = dist_utils.broadcast_object(_resume_path(cfg, logger) if ctx.is_main else None)
    checkpoint = load_checkpoint_file(resume_path) if resume_path is not None else None
    if checkpoint is not None:
        check_training_checkpoint(checkpoint, resume_path)
    if checkpoint is not None and cfg.manual_seed is None:
        cfg.manual_seed = (checkpoint.get("cfg") or {}).get("manual_seed")
    seed = choose_run_seed(cfg, logger)
    cfg.manual_seed = seed  # saved with the checkpoints
    set_seed(seed)  # same initial head weights on every process (DDP also broadcasts rank 0's)

    # Data first: list problems surface before the (slow) model build.
    train_set, train_sampler, train_loader, val_loader, batch_size = build_loaders(cfg, ctx, seed)
    iters_per_epoch = len(train_loader)
    max_iter = cfg.epochs * iters_per_epoch
    logger.info(f"{len(train_set)} training images, {batch_size} per process per step, "
                f"{iters_per_epoch} iterations per epoch, {max_iter} in total")

    from model import build_model
    from util.checkpoint import CheckpointError, load_model_weights
    from util.optim import build_optimizer, build_poly_scheduler, set_schedule_position

    model = build_model(cfg, load_pretrained=True)
    if cfg.pretrained:
        logger.info(f"backbone initialised from {cfg.pretrained}")
    if cfg.weight and checkpoint is None:
        load_model_weights(model, cfg.weight)
        logger.info(f"weights initialised from {cfg.weight}")
    elif cfg.weight:
        logger.info(f"weight {cfg.weight} not used: resuming from {resume_path} instead")
    if cfg.sync_bn and ctx.distributed:
        if ctx.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif ctx.is_main:
            logger.warning("sync_bn: SyncBatchNorm needs CUDA; on the CPU each process normalises over its own batch")
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(ctx.device, memory_format=memory_format)
    logger.info(f"{cfg.arch} on {cfg.backbone_net}{cfg.layers}: "
                f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")

    criterion = engine.build_criterion(cfg.ignore_label)
    optimizer = build_optimizer(model, cfg.base_lr, cfg.momentum, cfg.weight_decay)
    scheduler = build_poly_scheduler(optimizer, max_iter, cfg.power)
    scaler = torch.amp.GradScaler(ctx.device.type) if cfg.precision == "fp16" else None
    amp_dtype = autocast_dtype_for(cfg.precision)

    start_epoch, best_miou = cfg.start_epoch, 0.0
    if checkpoint is not None:
        load_model_weights(model, checkpoint, source=resume_path)
        try:
            optimizer.load_state_dict(checkpoint["optimizer"])
        except (KeyError, ValueError) as exc:
            raise CheckpointError(
                f"{resume_path}: its optimizer state does not fit this run's parameter groups ({exc}); "
                f"to start a new run from its weights use 'weight {resume_path}' instead of resume") from None
        if checkpoint.get("scheduler") is not None:
            scheduler.load_state_dict(checkpoint["scheduler"])
        if scaler is not None and checkpoint.get("scaler") is not None:
            scaler.load_state_dict(checkpoint["scaler"])
        start_epoch = int(checkpoint["epoch"])
        best_miou = float(checkpoint.get("best_mIoU", 0.0))
        logger.info(f"resumed from {resume_path}: {start_epoch} epoch(s) done, best mIoU {best_miou:.4f}")
        del checkpoint
        if ctx.is_main and cfg.resume == "auto":
            # A run killed between writing train_epoch_N.pth and pruning the older ones (or resumed
            # with a smaller keep_checkpoints) leaves extra files: apply the policy now, since a run
            # resumed at its last epoch writes nothing more. The newest file, just loaded, is kept.
            prune_checkpoints(cfg.save_path, cfg.keep_checkpoints)
    if start_epoch >= cfg.epochs:
        logger.info(f"nothing to do: {start_epoch} epochs already done of {cfg.epochs}")
    # Also right for a run whose length (epochs, batch size, processes) changed since the checkpoint.
    set_schedule_position(scheduler, start_epoch * iters_per_epoch, max_iter)

    train_model = model
    if ctx.distributed:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if cfg.compile:
        train_model = torch.compile(train_model)

    writer = None
    if ctx.is_main:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(cfg.save_path)
    train_stats: Dict[str, float] = {}
    val_stats: Optional[Dict[str, Any]] = None
    try:
        for epoch in range(start_epoch, cfg.epochs):
            epoch_log = epoch + 1
            set_seed(epoch_seed(seed, epoch, ctx.rank))
            train_sampler.set_epoch(epoch)
            train_set.set_epoch(epoch)
            epoch_start = time.time()
            train_stats = engine.train_one_epoch(
                train_model, train_loader, criterion, optimizer, scheduler, ctx.device, epoch,
                max_epochs=cfg.epochs, aux_weight=cfg.aux_weight, num_classes=cfg.classes,
                ignore_index=cfg.ignore_label, scaler=scaler, amp_dtype=amp_dtype,
                channels_last=cfg.channels_last, print_freq=cfg.print_freq, logger=logger, writer=writer)
            logger.info(f"Train result at epoch [{epoch_log}/{cfg.epochs}]: loss {train_stats['loss']:.4f} "
                        f"mIoU/mAcc/allAcc {train_stats['mIoU']:.4f}/{train_stats['mAcc']:.4f}/"
                        f"{train_stats['allAcc']:.4f} ({format_seconds(time.time() - epoch_start)})")
            if writer is not None:
                for name in ("loss", "mIoU", "mAcc", "allAcc"):
                    writer.add_scalar(f"{name}_train", train_stats[name], epoch_log)

            improved = False
            if val_loader is not None:
                val_stats = engine.evaluate(model, val_loader, criterion, ctx.device, cfg.classes,
                                            cfg.ignore_label, amp_dtype=amp_dtype,
                                            channels_last=cfg.channels_last, logger=logger)
                logger.info(
                    f"Val result at epoch [{epoch_log}/{cfg.epochs}] (center {cfg.train_h}x{cfg.train_w} crop of each "
                    f"image: a crop-level score, NOT the whole-image score of tool/test.py): loss "
                    f"{val_stats['loss']:.4f} mIoU/mAcc/allAcc {val_stats['mIoU']:.4f}/{val_stats['mAcc']:.4f}/"
                    f"{val_stats['allAcc']:.4f}")
                if writer is not None:
                    for name in ("loss", "mIoU", "mAcc", "allAcc"):
                        writer.add_scalar(f"{name}_val", val_stats[name], epoch_log)
                if val_stats["mIoU"] > best_miou:  # NaN never counts as an improvement
                    best_miou = float(val_stats["mIoU"])
                    improved = True

            if ctx.is_main:
                checkpoint = None
                if epoch_log % cfg.save_freq == 0 or epoch_log == cfg.epochs:
                    checkpoint = make_checkpoint(epoch_log, model, optimizer, scheduler, scaler, best_miou, cfg)
                    path = checkpoint_path(cfg.save_path, epoch_log)
                    save_training_checkpoint(checkpoint, path)
                    prune_checkpoints(cfg.save_path, cfg.keep_checkpoints)
                    logger.info(f"saved {path}")
                if improved:
                    if checkpoint is None:
                        checkpoint = make_checkpoint(epoch_log, model, optimizer, scheduler, scaler, best_miou, cfg)
                    path = os.path.join(cfg.save_path, BEST_CHECKPOINT)
                    save_training_checkpoint(checkpoint, path)
                    logger.info(f"new best validation mIoU {best_miou:.4f}: saved {path}")
                del checkpoint
    finally:
        if writer is not None:
            writer.close()
    dist_utils.barrier()  # no process leaves (and tears down the group) while rank 0 still writes
    logger.info("training finished")
    return {"epochs": cfg.epochs, "best_mIoU": best_miou, "train": train_stats, "val": val_stats,
            "save_path": cfg.save_path}


# ---------------------------------------------------------------------------------------------
# Entry points


def _spawned_process(spawn_index: int, config_path: str, opts: List[str]) -> None:
    """Body of each process in the release's spawn mode (runs in a fresh interpreter)."""
    cfg = load_cfg(config_path, opts)
    run(cfg, spawn_index=spawn_index)


def launch_spawned(cfg, config_path: str, opts: List[str]) -> None:
    """One process per ``train_gpu`` entry, rendezvous at ``dist_url`` (tcp://HOST:PORT or env://)."""
    import torch.multiprocessing as mp

    address, port = dist_utils.rendezvous_address(cfg.dist_url, nodes=int(cfg.world_size))
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = address, str(port)
    per_node, _ = dist_utils.spawn_world(cfg)
    mp.spawn(_spawned_process, nprocs=per_node, args=(config_path, list(opts)), join=True)


def main(argv: Optional[List[str]] = None) -> Optional[Dict[str, Any]]:
    """Parse ``--config CFG [KEY VALUE ...]``, check the run, train. Returns rank's summary (None in spawn mode).

    Raises ConfigError (bad config, fp16 on CPU, save_path not writable, ...) before any model or
    data is built; NonFiniteLossError if the loss diverges.
    """
    args = build_arg_parser().parse_args(argv)
    cfg = load_cfg(args.config, args.opts)
    check_run_config(cfg)
    if dist_utils.should_spawn(cfg):
        launch_spawned(cfg, args.config, args.opts)
        return None
    return run(cfg)


if __name__ == "__main__":
    exit_with(main)
