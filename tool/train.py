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

Also in ``save_path``, for every start once the config is accepted (util/runs.py): the log
``train-STAMP.log`` and the effective config ``train-STAMP.yaml`` (overrides applied, seed filled in).
``weight PATH`` fine-tunes from a whole model, also one of another class count (its final classifier
layers are re-initialised, and the log says which).
"""
from __future__ import annotations

import argparse
import math
import os
import random
import shlex
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from util import distributed as dist_utils  # noqa: E402
from util import engine  # noqa: E402
from util.checkpoint import CheckpointError  # noqa: E402
from util.cli import (STOP_SIGNALS, StopSignals, TrainingStopped, Uninterruptible, exit_with,  # noqa: E402
                      ignore_stop_signals)
from util.config import ConfigError, dump_cfg, load_cfg  # noqa: E402
from util.dataset import DataError, EmptyListError, read_list_entries  # noqa: E402
from util.misc import format_seconds, get_logger, restore_rng_state, rng_state, set_seed  # noqa: E402
from util.precision import autocast_dtype_for, check_device_support  # noqa: E402
from util.preparation import missing_list_hint  # noqa: E402
from util.runs import check_checkpoint_paths, timestamp, training_log_paths  # noqa: E402
from util.training_checkpoints import (BEST_CHECKPOINT, add_mid_epoch_state,  # noqa: E402
                                       check_training_checkpoint, checkpoint_path, find_resume_checkpoint,
                                       list_training_checkpoints, make_checkpoint, prune_checkpoints,
                                       save_training_checkpoint)

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
    for key, split in [("train_list", "train")] + ([("val_list", "val")] if cfg.evaluate else []):
        # An empty list stops the run before its log and config are written (on every rank, as a config
        # error); a malformed line stays a data error (status 1), reported when the datasets are built.
        try:
            read_list_entries(cfg[key], cfg.data_root, split)
        except EmptyListError as error:
            raise ConfigError(f"{key}: {error}" + ("; evaluate False trains without validation"
                                                   if key == "val_list" else "")) from None
        except DataError:
            pass
    check_checkpoint_paths(cfg, ("weight", "pretrained", "resume"))
    if cfg.start_epoch < 0 or cfg.start_epoch >= cfg.epochs:
        raise ConfigError(f"start_epoch must be in [0, epochs), got {cfg.start_epoch} with epochs {cfg.epochs}")
    check_writable_dir(cfg.save_path)


def check_on_every_rank(cfg) -> None:
    """:func:`check_run_config` on every process of a multi-process run, and ``save_path`` seen by all.

    Each node needs its own copy of ``pretrained``, the lists and the data; ``save_path`` must be one
    directory every node shares (checkpoints are written by rank 0 and read by all on resume). A
    problem on any rank stops every rank at once, named with its rank and host.
    """
    problem = None
    try:
        check_run_config(cfg)
    except ConfigError as exc:
        problem = str(exc)
    problems = dist_utils.problems_on_any_rank(problem)
    if not problems:
        # rank 0 leaves a marker in save_path; a rank that does not see it has a save_path of its own
        marker = os.path.join(cfg.save_path, f".shared_check_{dist_utils.broadcast_object(uuid.uuid4().hex)}")
        if dist_utils.get_rank() == 0:
            with open(marker, "w") as handle:
                handle.write("save_path shared check\n")
        dist_utils.barrier()
        problems = dist_utils.problems_on_any_rank(
            None if os.path.exists(marker) else
            f"save_path {cfg.save_path} is not the directory rank 0 writes to (a file rank 0 created there is missing)")
        dist_utils.barrier()
        if dist_utils.get_rank() == 0:
            os.remove(marker)
    if problems:
        raise ConfigError("; ".join(problems) + " (on several machines save_path must be a shared directory and "
                          "every node needs pretrained, the lists and the data)")


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


@dataclass
class TrainingData:
    """The run's data: the training set, its sampler and loader, and what validation reads
    (a crop loader for ``val_mode crop``, the list entries for ``val_mode whole``)."""

    train_set: Any
    train_sampler: Any
    train_loader: Any
    batch_size: int  # per process per step
    val_loader: Any = None
    val_entries: Optional[List[Any]] = None


def build_loaders(cfg, ctx, seed: int) -> TrainingData:
    from torch.utils.data import DataLoader

    from util.dataset import SegDataset
    from util.transforms import build_train_transform, build_val_transform

    # The workers' only set-up is ignoring stop signals (below): augmentation is seeded per sample
    # (SegDataset), and a cv2.setNumThreads() in a forked worker deadlocks once this process has used OpenCV's thread pool (e.g. an earlier run).
    world = ctx.world_size
    batch_size = cfg.batch_size // world  # batch_size is the total over all processes of all nodes
    if batch_size < 1:
        raise ConfigError(f"batch_size {cfg.batch_size} is the total over {world} processes: it must be >= {world}")
    sync_bn_spans_processes = bool(cfg.sync_bn) and ctx.distributed and ctx.device.type == "cuda"
    if batch_size == 1 and not sync_bn_spans_processes:
        raise ConfigError(
            f"batch_size {cfg.batch_size} over {world} process(es) is 1 image per process: BatchNorm in training "
            f"mode would normalise each image on its own (PSPNet's 1x1 pooling branch cannot run at all). "
            f"batch_size is the total over all processes: use batch_size {2 * world} or more"
            + (", or sync_bn True on CUDA" if world > 1 else ""))
    workers = math.ceil(cfg.workers / world)
    pin = ctx.device.type == "cuda"

    train_set = SegDataset("train", cfg.data_root, cfg.train_list, transform=build_train_transform(cfg), seed=seed,
                           num_classes=cfg.classes, ignore_label=cfg.ignore_label)
    # shuffle=True even for one process: the order then depends only on (seed, epoch), which resume needs.
    train_sampler = dist_utils.TrainSampler(train_set, num_replicas=world, rank=ctx.rank, shuffle=True, seed=seed)
    # worker_init_fn: a cluster's stop signal reaches the workers too; they must outlive the iteration.
    # generator: the loader's base seed is not drawn from the global stream, which then holds only
    # the model's randomness (dropout) and resumes mid-epoch from a saved state.
    train_loader = DataLoader(train_set, batch_size=batch_size, sampler=train_sampler, num_workers=workers,
                              pin_memory=pin, drop_last=True, worker_init_fn=ignore_stop_signals,
                              generator=torch.Generator().manual_seed(seed),
                              persistent_workers=False)  # workers must see set_epoch() each epoch
    if len(train_loader) == 0:
        raise ConfigError(f"train_list {cfg.train_list} has {len(train_set)} images: fewer than one batch "
                          f"({batch_size} per process x {world} processes); lower batch_size")
    data = TrainingData(train_set, train_sampler, train_loader, batch_size)
    if not cfg.evaluate:
        return data

    if cfg.val_mode == "whole":
        # Validation reads the whole images itself (as tool/test.py); the dataset only checks the list.
        val_set = SegDataset("val", cfg.data_root, cfg.val_list, num_classes=cfg.classes,
                             ignore_label=cfg.ignore_label)
        entries = val_set.entries
        data.val_entries = [entries[i] for i in engine.evenly_spaced_subset(len(entries), cfg.val_max_images)]
    else:
        val_set = SegDataset("val", cfg.data_root, cfg.val_list, transform=build_val_transform(cfg),
                             num_classes=cfg.classes, ignore_label=cfg.ignore_label)
        if cfg.val_max_images:
            val_set = torch.utils.data.Subset(val_set, engine.evenly_spaced_subset(len(val_set), cfg.val_max_images))
        val_sampler = dist_utils.ShardSampler(len(val_set), num_replicas=world, rank=ctx.rank)
        data.val_loader = DataLoader(val_set, batch_size=max(1, cfg.batch_size_val // world), sampler=val_sampler,
                                     num_workers=workers, pin_memory=pin, drop_last=False)
    return data


# ---------------------------------------------------------------------------------------------
# Model, optimisation, resume


@dataclass
class Optimization:
    criterion: Any
    optimizer: Any
    scheduler: Any
    scaler: Any
    amp_dtype: Optional[torch.dtype]


def build_training_model(cfg, ctx, has_checkpoint: bool, logger):
    """The model on ``ctx.device``: ImageNet backbone (``pretrained``) or whole ``weight`` file, also one of
    another class count (fine-tuning; not when resuming: the checkpoint's weights come later),
    SyncBatchNorm when distributed on CUDA."""
    from model import build_model
    from util.checkpoint import load_pretrained_backbone, load_weights_for_fine_tuning

    model = build_model(cfg)
    if cfg.pretrained:
        load_pretrained_backbone(model, cfg.pretrained)
        logger.info(f"backbone initialised from {cfg.pretrained}")
    if cfg.weight and not has_checkpoint:
        reinitialised = load_weights_for_fine_tuning(model, cfg.weight)
        logger.info(f"weights initialised from {cfg.weight}")
        if reinitialised:
            logger.info(f"{', '.join(reinitialised)} re-initialised: {cfg.weight} was trained for another number "
                        f"of classes (this run has {cfg.classes}); every other layer is the checkpoint's")
    elif cfg.weight:
        logger.info(f"weight {cfg.weight} not used: resuming from a checkpoint instead")
    if cfg.sync_bn and ctx.distributed:
        if ctx.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif ctx.is_main:
            logger.warning("sync_bn: SyncBatchNorm needs CUDA; on the CPU each process normalises over its own batch")
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(ctx.device, memory_format=memory_format)
    logger.info(f"{cfg.arch} on {cfg.backbone_net}{cfg.layers}: "
                f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    return model


def build_optimization(cfg, ctx, model, iters_per_epoch: int) -> Optimization:
    from util.losses import build_criterion
    from util.optim import build_optimizer, build_scheduler

    optimizer = build_optimizer(model, cfg.base_lr, cfg.momentum, cfg.weight_decay)
    return Optimization(criterion=build_criterion(cfg), optimizer=optimizer,
                        scheduler=build_scheduler(optimizer, cfg, iters_per_epoch),
                        scaler=torch.amp.GradScaler(ctx.device.type) if cfg.precision == "fp16" else None,
                        amp_dtype=autocast_dtype_for(cfg.precision))


def validation_protocol(cfg) -> str:
    """What the validation mIoU measures, in words (logged, and saved with the best score: scores
    of different protocols are not compared)."""
    images = f"{cfg.val_max_images} evenly spaced images" if cfg.val_max_images else "all images"
    if cfg.val_mode == "crop":
        return f"centre {cfg.train_h}x{cfg.train_w} crop of {images} of val_list"
    return (f"whole images ({images} of val_list), tool/test.py's sliding window: scales {list(cfg.val_scales)}, "
            f"flip {bool(cfg.val_flip)}, base_size {cfg.base_size}, window {cfg.test_h}x{cfg.test_w}")


def restore_training_state(cfg, checkpoint, resume_path: str, model, optim: Optimization, logger) -> Tuple[int, float]:
    """Load a training checkpoint into the model, optimiser, scheduler and scaler; returns
    ``(epochs done, best validation mIoU)``."""
    from util.checkpoint import CheckpointError, load_model_weights

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
    start_epoch = int(checkpoint["epoch"])
    best_miou = float(checkpoint.get("best_mIoU", 0.0))
    saved_protocol = checkpoint.get("val_protocol")
    if cfg.evaluate and best_miou > 0 and saved_protocol not in (None, validation_protocol(cfg)):
        logger.info(f"the saved best mIoU {best_miou:.4f} was measured on {saved_protocol}; this run validates "
                    f"on {validation_protocol(cfg)}: its first validation replaces best_mIoU.pth")
        best_miou = 0.0
    best_text = f", best mIoU {best_miou:.4f}" if best_miou > 0 else ""
    logger.info(f"resumed from {resume_path}: {start_epoch} epoch(s) done{best_text}")
    if cfg.resume == "auto":
        # A run killed between writing train_epoch_N.pth and pruning the older ones (or resumed
        # with a smaller keep_checkpoints) leaves extra files: apply the policy now, since a run
        # resumed at its last epoch writes nothing more. The newest file, just loaded, is kept.
        prune_checkpoints(cfg.save_path, cfg.keep_checkpoints)
    return start_epoch, best_miou


def wrap_model(cfg, ctx, model):
    """The module the training step calls: DDP when distributed, torch.compile when ``compile``."""
    train_model = model
    if ctx.distributed:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if cfg.compile:
        train_model = torch.compile(train_model)
    return train_model


# ---------------------------------------------------------------------------------------------
# Validation

PREVIEW_IMAGES = 3  # validation images shown in TensorBoard (image | ground truth | prediction)


def should_validate(cfg, epoch_log: int) -> bool:
    """Validate after epochs ``val_every``, ``2 * val_every``, ... and after the last one."""
    return bool(cfg.evaluate) and (epoch_log % cfg.val_every == 0 or epoch_log == cfg.epochs)


def validate_whole_images(cfg, ctx, model, entries, logger, title: str, writer=None, step: Optional[int] = None):
    """tool/test.py's protocol on ``entries`` (``val_scales``, ``val_flip``; the TEST section's
    base_size, window and test_batch_size), images split across processes, confusion matrices summed.

    ``model`` (the plain module, not DDP) is scored through the same BatchNorm-folded copy that
    tool/test.py builds from a checkpoint, so both give the same confusion matrix. With a
    ``writer`` (rank 0), a few fixed images of this process's share go to TensorBoard as
    image | ground truth | prediction, coloured with the dataset palette.
    """
    from util.inference import inference_kwargs, prepare_inference_model

    was_training = model.training
    eval_model = prepare_inference_model(model, ctx.device, channels_last=bool(cfg.channels_last))
    kwargs = inference_kwargs(cfg, scales=[float(s) for s in cfg.val_scales], flip=bool(cfg.val_flip))
    my_share = list(range(ctx.rank, len(entries), ctx.world_size))
    previews = {my_share[i]: None for i in engine.evenly_spaced_subset(len(my_share), PREVIEW_IMAGES)} \
        if writer is not None else {}

    def keep_preview(index, entry, prediction):
        if index in previews:
            previews[index] = prediction.to("cpu", torch.uint8).numpy()

    try:
        stats = engine.evaluate_images(entries, engine.whole_image_predictor(eval_model, kwargs), cfg.classes,
                                       ctx.device, ignore_index=cfg.ignore_label, rank=ctx.rank,
                                       world_size=ctx.world_size, list_path=cfg.val_list,
                                       on_prediction=keep_preview, logger=logger, title=title)
    finally:
        del eval_model
        model.train(was_training)
    if writer is not None:
        write_previews(cfg, writer, entries, previews, step)
    return stats


def write_previews(cfg, writer, entries, previews: Dict[int, Any], step: int) -> None:
    """TensorBoard images ``val_preview/NAME``: the image, its ground truth and the prediction side by side."""
    from util.dataset import load_image, load_label
    from util.visualize import colorize, config_palette

    palette = config_palette(cfg)
    for index, prediction in previews.items():
        if prediction is None:  # not predicted (an evaluation stopped early, or a test's stand-in)
            continue
        entry = entries[index]
        image = load_image(entry.image_path).astype(np.uint8)
        truth = colorize(load_label(entry.label_path), palette)
        panel = np.concatenate([image, truth, colorize(prediction, palette)], axis=1)
        writer.add_image(f"val_preview/{Path(entry.image_path).stem}", panel, step, dataformats="HWC")


def validate(cfg, ctx, model, data: TrainingData, optim: Optimization, epoch_log: int, logger, writer):
    """The per-epoch validation of ``val_mode`` (whole images or centre crops); logs and writes
    ``{loss,mIoU,mAcc,allAcc}_val`` (loss in crop mode only) at ``epoch_log``."""
    title = f"Val epoch [{epoch_log}/{cfg.epochs}]"
    dist_utils.broadcast_buffers(model)  # every process scores the model rank 0 saves
    if cfg.val_mode == "whole":
        stats = validate_whole_images(cfg, ctx, model, data.val_entries, logger, title, writer, epoch_log)
    else:
        stats = engine.evaluate(model, data.val_loader, optim.criterion, ctx.device, cfg.classes, cfg.ignore_label,
                                amp_dtype=optim.amp_dtype, channels_last=cfg.channels_last, logger=logger)
    loss_text = f"loss {stats['loss']:.4f} " if "loss" in stats else ""
    logger.info(f"Val result at epoch [{epoch_log}/{cfg.epochs}] ({validation_protocol(cfg)}): {loss_text}"
                f"mIoU/mAcc/allAcc {stats['mIoU']:.4f}/{stats['mAcc']:.4f}/{stats['allAcc']:.4f}")
    if writer is not None:
        for name in ("loss", "mIoU", "mAcc", "allAcc"):
            if name in stats:
                writer.add_scalar(f"{name}_val", stats[name], epoch_log)
    return stats


def report_final_and_best(cfg, ctx, model, data: TrainingData, last_whole: Optional[Dict], logger) -> Dict[str, Any]:
    """Whole-image validation (the validation's protocol, whatever ``val_mode`` is) of the final
    model and of ``best_mIoU.pth``, logged at the end of training; reuses a result already measured."""
    from util.checkpoint import load_checkpoint_file, load_model_weights

    if not cfg.evaluate:
        return {}
    if data.val_entries is None:  # val_mode crop: the whole-image list was not needed until now
        from util.dataset import SegDataset

        entries = SegDataset("val", cfg.data_root, cfg.val_list).entries
        data.val_entries = [entries[i] for i in engine.evenly_spaced_subset(len(entries), cfg.val_max_images)]
    whole_cfg = type(cfg)(cfg, val_mode="whole")
    protocol = validation_protocol(whole_cfg)
    results: Dict[str, Any] = {}
    dist_utils.broadcast_buffers(model)
    results["final"] = last_whole or validate_whole_images(cfg, ctx, model, data.val_entries, logger,
                                                           "Val final model")
    best_path = os.path.join(cfg.save_path, BEST_CHECKPOINT)
    best_epoch = dist_utils.broadcast_object(
        int(load_checkpoint_file(best_path)["epoch"]) if ctx.is_main and os.path.isfile(best_path) else None)
    if best_epoch == cfg.epochs and last_whole is not None:
        results["best"] = results["final"]
    elif best_epoch is not None:
        from model import build_model

        best_model = build_model(cfg)
        load_model_weights(best_model, best_path)  # every process reads save_path (one machine or a shared disk)
        results["best"] = validate_whole_images(cfg, ctx, best_model.to(ctx.device), data.val_entries, logger,
                                                "Val best_mIoU.pth")
        del best_model
    for name, label in (("final", f"final model (epoch {cfg.epochs})"),
                        ("best", f"{best_path} (epoch {best_epoch})")):
        if name in results:
            stats = results[name]
            logger.info(f"Whole-image validation of the {label} on {protocol}: mIoU/mAcc/allAcc "
                        f"{stats['mIoU']:.4f}/{stats['mAcc']:.4f}/{stats['allAcc']:.4f}")
    return {name: {key: stats[key] for key in ("mIoU", "mAcc", "allAcc", "num_images")}
            for name, stats in results.items()}


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoints(cfg, ctx, epoch_log: int, model, optim: Optimization, best_miou: float, improved: bool,
                     logger, force: bool = False) -> None:
    """``train_epoch_N.pth`` every ``save_freq`` epochs, after the last and when ``force`` (a stop signal);
    ``best_mIoU.pth`` when improved."""
    if not ctx.is_main:
        return
    checkpoint = None

    def build():
        made = make_checkpoint(epoch_log, model, optim.optimizer, optim.scheduler, optim.scaler, best_miou, cfg)
        made["val_protocol"] = validation_protocol(cfg) if cfg.evaluate else None
        return made

    if epoch_log % cfg.save_freq == 0 or epoch_log == cfg.epochs or force:
        checkpoint = build()
        path = checkpoint_path(cfg.save_path, epoch_log)
        save_training_checkpoint(checkpoint, path)
        prune_checkpoints(cfg.save_path, cfg.keep_checkpoints)
        logger.info(f"saved {path}")
    if improved:
        path = os.path.join(cfg.save_path, BEST_CHECKPOINT)
        save_training_checkpoint(checkpoint if checkpoint is not None else build(), path)
        logger.info(f"new best validation mIoU {best_miou:.4f}: saved {path}")


# ---------------------------------------------------------------------------------------------
# Stopping: where a run stopped and how to continue it


@dataclass
class RunStatus:
    """Where the run is (updated as it goes), so that a stop can say where it stopped, which
    checkpoint is the newest and the command that resumes."""

    save_path: str
    config_path: str
    opts: List[str] = field(default_factory=list)
    is_main: bool = True
    world_size: int = 1
    epoch: Optional[int] = None  # 1-based epoch being trained or validated
    epochs: Optional[int] = None
    stage: str = "setting up"  # "training", "validating", "saving checkpoints", "final validation"

    def where(self) -> str:
        if self.epoch is None:
            return f"while {self.stage}"
        return f"while {self.stage} epoch {self.epoch}/{self.epochs}"

    def resume_command(self) -> str:
        opts = list(self.opts)
        kept = []
        for key, value in zip(opts[0::2], opts[1::2]):
            if key.lstrip("-") != "resume":
                kept += [key, value]
        launcher = ["python"] if self.world_size == 1 else ["torchrun", f"--nproc_per_node={self.world_size}"]
        script = os.path.relpath(os.path.abspath(__file__))  # as typed from this directory
        return shlex.join(launcher + [script, "--config", self.config_path, *kept, "resume", "auto"])

    def stopped_message(self, reason: str = "interrupted") -> str:
        found = list_training_checkpoints(self.save_path)
        newest = f"newest checkpoint {found[-1][1]}" if found else f"no checkpoint in {self.save_path} yet"
        return f"{reason} {self.where()}; {newest}; resume with: {self.resume_command()}"


EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


# ---------------------------------------------------------------------------------------------
# The run


def _log_config(cfg, logger) -> None:
    logger.info("Config:\n" + "\n".join(f"  {key}: {cfg[key]!r}" for key in sorted(cfg.keys())))


def run(cfg, spawn_index: Optional[int] = None, status: Optional[RunStatus] = None) -> Optional[Dict[str, Any]]:
    """One process's share of the run: join the process group, train, leave it."""
    ctx = dist_utils.init_distributed(cfg, spawn_index)
    if status is not None:
        status.is_main, status.world_size = ctx.is_main, ctx.world_size
    try:
        if ctx.distributed:
            check_on_every_rank(cfg)
        return _train(cfg, ctx, status or RunStatus(cfg.save_path, ""))
    finally:
        dist_utils.cleanup()


def load_resume_checkpoint(cfg, ctx, logger):
    """``(checkpoint, path)`` to resume from (``(None, None)`` for a fresh run); stale partial writes removed."""
    from util.checkpoint import load_checkpoint_file, remove_stale_temporaries

    if ctx.is_main:
        for stale in remove_stale_temporaries(cfg.save_path):
            logger.info(f"removed {stale}: the partial write of a checkpoint by an interrupted run")
    resume_path = dist_utils.broadcast_object(_resume_path(cfg, logger) if ctx.is_main else None)
    if resume_path is None:
        return None, None
    missing = dist_utils.problems_on_any_rank(None if os.path.isfile(resume_path) else f"{resume_path} does not exist")
    if missing:
        raise CheckpointError(f"every rank resumes from {resume_path}, chosen by rank 0, but: {'; '.join(missing)} "
                              f"(on several machines save_path must be a shared directory)")
    checkpoint = load_checkpoint_file(resume_path)
    check_training_checkpoint(checkpoint, resume_path)
    return checkpoint, resume_path


def train_epoch(cfg, ctx, train_model, data: TrainingData, optim: Optimization, epoch: int, seed: int, logger,
                writer, progress: Optional[Dict] = None, rng: Optional[Dict] = None,
                stop: Optional[StopSignals] = None) -> Dict[str, float]:
    """One epoch (0-based ``epoch``) with its seeds and data order set for exact resume; logs the result.

    ``progress``/``rng``: continue the epoch where a mid-epoch checkpoint stopped (the batches done are
    skipped, the random state is this rank's at that point). ``stop``: polled every iteration; a stop
    raises util.engine.EpochInterrupted on every rank after the same iteration."""
    set_seed(epoch_seed(seed, epoch, ctx.rank))
    data.train_sampler.set_epoch(epoch, start=progress["iteration"] * data.batch_size if progress else 0)
    data.train_set.set_epoch(epoch)
    if rng is not None:
        restore_rng_state(rng, ctx.device)
    epoch_start = time.time()
    stats = engine.train_one_epoch(
        train_model, data.train_loader, optim.criterion, optim.optimizer, optim.scheduler, ctx.device, epoch,
        max_epochs=cfg.epochs, num_classes=cfg.classes, ignore_index=cfg.ignore_label,
        scaler=optim.scaler, amp_dtype=optim.amp_dtype, channels_last=cfg.channels_last, print_freq=cfg.print_freq,
        logger=logger, writer=writer, progress=progress, stop_requested=stop.requested if stop else None)
    logger.info(f"Train result at epoch [{epoch + 1}/{cfg.epochs}]: loss {stats['loss']:.4f} "
                f"mIoU/mAcc/allAcc {stats['mIoU']:.4f}/{stats['mAcc']:.4f}/{stats['allAcc']:.4f} "
                f"({format_seconds(time.time() - epoch_start)})")
    if writer is not None:
        for name in ("loss", "mIoU", "mAcc", "allAcc"):
            writer.add_scalar(f"{name}_train", stats[name], epoch + 1)
    return stats


def _train(cfg, ctx, status: RunStatus) -> Dict[str, Any]:
    # The log and the effective config belong to the run, in save_path; they are written only now,
    # after check_run_config accepted the config (a rejected one leaves nothing behind).
    log_path, config_copy = training_log_paths(cfg.save_path, dist_utils.broadcast_object(timestamp()))
    logger = get_logger(rank=ctx.rank, log_file=log_path)
    logger.info(dist_utils.describe_launch(ctx))
    if ctx.is_main:
        logger.info(f"run in {cfg.save_path}: log {log_path}, effective config {config_copy}")
        _log_config(cfg, logger)
    logger.info(f"{ctx.world_size} process(es), this one rank {ctx.rank} on {ctx.device}, precision {cfg.precision}")
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # The checkpoint is read first: a run without manual_seed continues with the seed it started with.
    checkpoint, resume_path = load_resume_checkpoint(cfg, ctx, logger)
    if checkpoint is not None and cfg.manual_seed is None:
        cfg.manual_seed = (checkpoint.get("cfg") or {}).get("manual_seed")
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
        logger.info(f"validation every {cfg.val_every} epoch(s) on {validation_protocol(cfg)}")

    model = build_training_model(cfg, ctx, checkpoint is not None, logger)
    optim = build_optimization(cfg, ctx, model, iters_per_epoch)
    start_epoch, best_miou = cfg.start_epoch, 0.0
    resume_progress, resume_rng = None, None  # a mid-epoch checkpoint: where in the epoch, and each rank's RNG
    if checkpoint is not None:
        start_epoch, best_miou = restore_training_state(cfg, checkpoint, resume_path, model, optim, logger)
        if checkpoint.get("epoch_progress"):
            resume_progress, resume_rng = mid_epoch_resume_state(checkpoint, resume_path, ctx, iters_per_epoch)
            logger.info(f"{resume_path} was written mid-epoch: epoch {start_epoch + 1} continues after "
                        f"{resume_progress['iteration']}/{iters_per_epoch} iterations")
        del checkpoint
    if start_epoch >= cfg.epochs:
        logger.info(f"nothing to do: {start_epoch} epochs already done of {cfg.epochs}")
    # Also right for a run whose length (epochs, batch size, processes) changed since the checkpoint.
    optim.scheduler.reposition(start_epoch * iters_per_epoch + (resume_progress or {}).get("iteration", 0), max_iter)
    train_model = wrap_model(cfg, ctx, model)

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
            for epoch in range(start_epoch, cfg.epochs):
                status.epoch, status.stage = epoch + 1, "training"
                progress = resume_progress if epoch == start_epoch else None
                try:
                    train_stats = train_epoch(cfg, ctx, train_model, data, optim, epoch, seed, logger, writer,
                                              progress=progress, rng=resume_rng if progress else None, stop=stop)
                except engine.EpochInterrupted as interrupted:
                    raise save_mid_epoch_and_stop(cfg, ctx, model, optim, epoch, interrupted.progress, best_miou,
                                                  iters_per_epoch, stop, status, logger) from None
                improved, last_whole = False, None
                if should_validate(cfg, epoch + 1):
                    status.stage = "validating after"
                    val_stats = validate(cfg, ctx, model, data, optim, epoch + 1, logger, writer)
                    last_whole = val_stats if cfg.val_mode == "whole" else None
                    improved = val_stats["mIoU"] > best_miou  # NaN never counts as an improvement
                    best_miou = float(val_stats["mIoU"]) if improved else best_miou
                # a stop signal during validation: this epoch's checkpoint is written whatever save_freq says
                stopping = stop.agree(dist_utils.all_gather_object(stop.signum)) and epoch + 1 < cfg.epochs
                status.stage = "saving checkpoints after"
                save_checkpoints(cfg, ctx, epoch + 1, model, optim, best_miou, improved, logger, force=stopping)
                if stopping:
                    raise _stopped(stop, f"the end of epoch {epoch + 1}", checkpoint_path(cfg.save_path, epoch + 1),
                                   status, logger)
        dist_utils.barrier()  # best_mIoU.pth is written before anyone reads it
        status.epoch, status.stage = None, "validating the final and the best model"
        end_results = report_final_and_best(cfg, ctx, model, data, last_whole, logger)
    finally:
        if writer is not None:
            writer.close()
    dist_utils.barrier()  # no process leaves (and tears down the group) while rank 0 still writes
    logger.info("training finished")
    return {"epochs": cfg.epochs, "best_mIoU": best_miou, "train": train_stats, "val": val_stats,
            "end": end_results, "save_path": cfg.save_path}


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


def save_mid_epoch_and_stop(cfg, ctx, model, optim: Optimization, epoch: int, progress: Dict, best_miou: float,
                            iters_per_epoch: int, stop: StopSignals, status: RunStatus, logger) -> TrainingStopped:
    """After a stop signal in the middle of ``epoch`` (0-based): rank 0 writes the mid-epoch checkpoint
    with every rank's random state; returns the TrainingStopped every rank raises."""
    stop.agree(dist_utils.all_gather_object(stop.signum))
    rng_states = dist_utils.all_gather_object(rng_state(ctx.device))
    path = checkpoint_path(cfg.save_path, epoch, progress["iteration"])
    if ctx.is_main:
        checkpoint = make_checkpoint(epoch, model, optim.optimizer, optim.scheduler, optim.scaler, best_miou, cfg)
        checkpoint["val_protocol"] = validation_protocol(cfg) if cfg.evaluate else None
        save_training_checkpoint(add_mid_epoch_state(checkpoint, progress, rng_states, iters_per_epoch), path)
        prune_checkpoints(cfg.save_path, cfg.keep_checkpoints)
    return _stopped(stop, f"epoch {epoch + 1}, iteration {progress['iteration']}/{iters_per_epoch}", path, status,
                    logger)


def _stopped(stop: StopSignals, where: str, path: str, status: RunStatus, logger) -> TrainingStopped:
    """Every rank waits for rank 0's checkpoint write, then leaves with 128 + the signal's number.
    (Rank 0 logs first: srun --kill-on-bad-exit ends the others as soon as one exits.)"""
    message = (f"{stop.name} received: stopped at {where}; saved {path}; resume with: "
               f"{status.resume_command()}")
    logger.info(message)
    dist_utils.barrier()
    return TrainingStopped(message, stop.exit_status)


# ---------------------------------------------------------------------------------------------
# Entry points


def _spawned_process(spawn_index: int, config_path: str, opts: List[str]) -> None:
    """Body of each process in the release's spawn mode (runs in a fresh interpreter)."""
    cfg = load_cfg(config_path, opts)
    try:
        run(cfg, spawn_index=spawn_index, status=RunStatus(cfg.save_path, config_path, list(opts)))
    except TrainingStopped as stopped:
        sys.exit(stopped.exit_status)  # the parent reports it


def launch_spawned(cfg, config_path: str, opts: List[str]) -> None:
    """One process per ``train_gpu`` entry, rendezvous at ``dist_url`` (tcp://HOST:PORT or env://).

    A stop signal sent to this parent only is passed on to the children, which save and exit."""
    import torch.multiprocessing as mp

    address, port = dist_utils.rendezvous_address(cfg.dist_url, nodes=int(cfg.world_size))
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = address, str(port)
    per_node, _ = dist_utils.spawn_world(cfg)
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


def main(argv: Optional[List[str]] = None) -> Optional[Dict[str, Any]]:
    """Parse ``--config CFG [KEY VALUE ...]``, check the run, train. Returns rank's summary (None in spawn mode).

    Raises ConfigError (bad config, fp16 on CPU, save_path not writable, ...) before any model or
    data is built; NonFiniteLossError if the loss diverges. Ctrl-C prints one line (where it stopped,
    the newest checkpoint, the command that resumes) and returns EXIT_INTERRUPTED.
    """
    args = build_arg_parser().parse_args(argv)
    cfg = load_cfg(args.config, args.opts)
    if dist_utils.launcher_world_size() == 1:  # else every rank checks in run(), together
        check_run_config(cfg)
    status = RunStatus(cfg.save_path, args.config, list(args.opts))
    try:
        if dist_utils.should_spawn(cfg):
            launch_spawned(cfg, args.config, args.opts)
            return None
        return run(cfg, status=status)
    except KeyboardInterrupt:
        if status.is_main:
            print(status.stopped_message(), file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    exit_with(main)
