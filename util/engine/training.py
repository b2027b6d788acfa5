"""Training, written against objects, not a global ``args``: the model, optimiser and schedule a run
trains (:func:`build_training_model`, :func:`build_optimization`, :func:`wrap_model`), one epoch with
its seeds, data order and result line (:func:`train_one_epoch`), and the pass over the training
loader it runs (:func:`train_iterations`), which sums its statistics over all processes, so every
rank returns the same global numbers.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

import model as models
from util.data.loaders import TrainingData
from util.engine.losses import build_criterion, match_target_size
from util.engine.optim import build_optimizer, build_scheduler
from util.engine.precision import autocast, autocast_dtype_for
from util.errors import NonFiniteLossError
from util.evaluation.metrics import class_range_error, confusion_counts, metrics_from_confusion
from util.runtime.checkpoint_io import load_pretrained_backbone, load_weights_for_fine_tuning
from util.runtime.distributed import all_reduce_sum, get_rank
from util.runtime.log import AverageMeter, format_seconds
from util.runtime.seeding import epoch_seed, restore_rng_state, set_seed


class EpochInterrupted(Exception):
    """:func:`train_iterations` stopped early because a process asked to (every rank stops after the same
    iteration). ``progress`` is what continuing the epoch needs: ``dict(iteration, loss_sums, confusion)``
    (iterations done, the summed statistics so far, on the CPU); pass it back as ``progress``."""

    def __init__(self, progress: Dict) -> None:
        super().__init__(f"stopped after iteration {progress['iteration']}")
        self.progress = progress


def to_device(image: torch.Tensor, target: torch.Tensor, device: torch.device, channels_last: bool):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    image = image.to(device, non_blocking=True, memory_format=memory_format)
    target = target.to(device, non_blocking=True).long()
    return image, target


def _current_lrs(optimizer: torch.optim.Optimizer) -> str:
    return "/".join(f"{g['lr']:.6g}" for g in optimizer.param_groups)


def learning_rate_scalars(optimizer: torch.optim.Optimizer) -> Dict[str, float]:
    """TensorBoard tags and values of the current learning rate: ``lr`` when all parameter groups
    share it, else ``lr/NAME`` per group (``lr/backbone``, ``lr/head``: the head's 10x group)."""
    groups = optimizer.param_groups
    if len({g["lr"] for g in groups}) == 1:
        return {"lr": float(groups[0]["lr"])}
    return {f"lr/{g.get('name', index)}": float(g["lr"]) for index, g in enumerate(groups)}


def train_iterations(model: nn.Module, loader, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler, device: torch.device, epoch: int, *, max_epochs: Optional[int] = None,
                    num_classes: int, ignore_index: int = 255,
                    scaler: Optional[torch.amp.GradScaler] = None, amp_dtype: Optional[torch.dtype] = None,
                    channels_last: bool = True, print_freq: int = 10,
                    logger: Optional[logging.Logger] = None, writer=None, progress: Optional[Dict] = None,
                    stop_requested: Optional[Callable[[], bool]] = None) -> Dict[str, float]:
    """Train ``model`` for one pass over ``loader``.

    Args:
        model: in train mode returns ``(logits, aux_logits)``, both (N, C, h, w).
            May be wrapped in DistributedDataParallel / torch.compile.
        loader: yields ``(image (N,3,H,W) float, label (N,H,W) int)``; every
            process must yield the same number of batches (DistributedSampler
            with ``drop_last``), since each iteration has collectives.
        criterion: a :class:`util.engine.losses.SegmentationLoss` (``build_criterion(cfg)``):
            ``criterion.with_aux(logits, aux_logits, target)`` -> (loss, main, aux).
        scheduler: stepped once after every optimizer step (``util.engine.optim.build_scheduler``).
        epoch: 0-based index of this epoch; messages print ``epoch + 1``.
        max_epochs: total epochs of the run (for the ETA); default ``epoch + 1``.
        scaler: a GradScaler for fp16, else None.
        amp_dtype: autocast dtype (torch.bfloat16 / torch.float16) or None for fp32.
        print_freq: a progress line every ``print_freq`` iterations (rank 0 only).
        writer: tensorboardX SummaryWriter on rank 0 (None elsewhere); gets the
            release's per-batch scalars at the global iteration number.
        progress: continue an interrupted epoch (:class:`EpochInterrupted`'s ``progress``);
            ``loader`` then yields only the batches after ``progress['iteration']``.
        stop_requested: polled every iteration; when it is True on any process, every
            process stops after that same iteration (the flag rides on the iteration's
            one collective) by raising :class:`EpochInterrupted`.

    Returns:
        ``dict(loss, main_loss, aux_loss, mIoU, mAcc, allAcc)`` over the whole
        epoch and all processes (loss is the mean total loss per sample).

    Raises:
        NonFiniteLossError: the loss summed over processes is NaN/inf (every
            rank sees the same sum, so all of them stop at the same iteration).
    """
    max_epochs = epoch + 1 if max_epochs is None else max_epochs
    is_main = get_rank() == 0
    aux_weight = criterion.aux_weight
    model.train()
    start_iteration = int(progress["iteration"]) if progress else 0
    iters_per_epoch = start_iteration + len(loader)
    epoch_cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    loss_sums = torch.zeros(3, dtype=torch.float64, device=device)  # main*n, aux*n, n over the epoch
    if progress:
        epoch_cm += progress["confusion"].to(device)
        loss_sums += progress["loss_sums"].to(device)
    data_time, batch_time = AverageMeter(), AverageMeter()
    main_meter, aux_meter, loss_meter = AverageMeter(), AverageMeter(), AverageMeter()

    end = time.time()
    for i, (image, target) in enumerate(loader, start_iteration):
        data_time.update(time.time() - end)
        image, target = to_device(image, target, device, channels_last)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device.type, amp_dtype):
            logits, aux_logits = model(image)
        loss, main_loss, aux_loss = criterion.with_aux(logits, aux_logits, target)
        target_main = match_target_size(target, logits.shape[-2:])
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()

        # One collective per iteration carries the loss sums, the stop flag, the count of class ids
        # out of range and this batch's confusion matrix (float64 holds pixel counts exactly up to
        # 2**53); its copy to the host is the iteration's one host-device sync. Nothing before it
        # waits for the GPU: confusion_counts checks nothing itself, and torch.full fills on the device.
        n = image.shape[0]
        batch_cm, out_of_range = confusion_counts(logits.detach().argmax(1), target_main, num_classes, ignore_index)
        stop = bool(stop_requested is not None and stop_requested())
        flags = torch.full((2,), float(n), dtype=torch.float64, device=device)
        flags[1] = float(stop)
        packed = torch.cat([main_loss.detach().double().reshape(1) * n, aux_loss.detach().double().reshape(1) * n,
                            flags, out_of_range.double().reshape(1), batch_cm.reshape(-1).double()])
        all_reduce_sum(packed)
        host = packed.cpu()  # the one host sync of the iteration
        if host[4].item() > 0:
            raise (class_range_error(logits.argmax(1), target_main, num_classes, ignore_index) if out_of_range.item()
                   else ValueError(f"another process found class ids outside [0, {num_classes}) in its batch"))
        main_avg = host[0].item() / host[2].item()
        aux_avg = host[1].item() / host[2].item()
        total_avg = main_avg + aux_weight * aux_avg
        if not math.isfinite(total_avg):
            raise NonFiniteLossError(
                f"training loss is {total_avg} (main {main_avg}, aux {aux_avg}) at epoch {epoch + 1}, "
                f"iteration {i + 1}/{iters_per_epoch} (global iteration {epoch * iters_per_epoch + i + 1}); "
                f"stopping. The last saved checkpoint is untouched; lower base_lr or check the data/labels.")

        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()

        epoch_cm += packed[5:].round().long().reshape(num_classes, num_classes)
        loss_sums += packed[:3]
        main_meter.update(main_avg, int(host[2].item()))
        aux_meter.update(aux_avg, int(host[2].item()))
        loss_meter.update(total_avg, int(host[2].item()))
        batch_time.update(time.time() - end)
        end = time.time()

        current_iter = epoch * iters_per_epoch + i + 1
        need_batch_metrics = is_main and (writer is not None or (i + 1) % print_freq == 0)
        if need_batch_metrics:
            batch_metrics = metrics_from_confusion(host[5:].round().long().reshape(num_classes, num_classes))
        if is_main and logger is not None and (i + 1) % print_freq == 0:
            remaining = max_epochs * iters_per_epoch - current_iter
            logger.info(
                f"Epoch: [{epoch + 1}/{max_epochs}][{i + 1}/{iters_per_epoch}] "
                f"Data {data_time.val:.3f} ({data_time.avg:.3f}) "
                f"Batch {batch_time.val:.3f} ({batch_time.avg:.3f}) "
                f"Remain {format_seconds(remaining * batch_time.avg)} "
                f"MainLoss {main_meter.val:.4f} AuxLoss {aux_meter.val:.4f} Loss {loss_meter.val:.4f} "
                f"Accuracy {batch_metrics['allAcc']:.4f} lr {_current_lrs(optimizer)}")
        if is_main and writer is not None:
            for tag, value in learning_rate_scalars(optimizer).items():
                writer.add_scalar(tag, value, current_iter)
            writer.add_scalar("loss_train_batch", main_meter.val, current_iter)
            writer.add_scalar("mIoU_train_batch", batch_metrics["mIoU"], current_iter)
            writer.add_scalar("mAcc_train_batch", batch_metrics["mAcc"], current_iter)
            writer.add_scalar("allAcc_train_batch", batch_metrics["allAcc"], current_iter)
        if host[3].item() > 0:  # a process was asked to stop: all stop here, with what resuming needs
            raise EpochInterrupted(dict(iteration=i + 1, loss_sums=loss_sums.cpu(), confusion=epoch_cm.cpu()))

    # The per-iteration reduction already made these global.
    sums = loss_sums.cpu()
    count = max(sums[2].item(), 1.0)
    scores = metrics_from_confusion(epoch_cm)
    return {
        "loss": (sums[0].item() + aux_weight * sums[1].item()) / count,
        "main_loss": sums[0].item() / count,
        "aux_loss": sums[1].item() / count,
        "mIoU": scores["mIoU"],
        "mAcc": scores["mAcc"],
        "allAcc": scores["allAcc"],
    }


@dataclass
class Optimization:
    """What the training step needs besides the model: loss, optimiser, schedule, fp16 scaler, autocast dtype."""

    criterion: Any
    optimizer: Any
    scheduler: Any
    scaler: Any
    amp_dtype: Optional[torch.dtype]


def build_training_model(cfg, ctx, has_checkpoint: bool, logger):
    """The model on ``ctx.device``: ImageNet backbone (``pretrained``) or whole ``weight`` file, also one of
    another class count (fine-tuning; not when resuming: the checkpoint's weights come later),
    SyncBatchNorm when distributed on CUDA."""
    model = models.build_model(cfg)
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
    """The run's loss, optimiser (backbone and 10x head groups), per-iteration schedule and precision."""
    optimizer = build_optimizer(model, cfg.base_lr, cfg.momentum, cfg.weight_decay)
    return Optimization(criterion=build_criterion(cfg), optimizer=optimizer,
                        scheduler=build_scheduler(optimizer, cfg, iters_per_epoch),
                        scaler=torch.amp.GradScaler(ctx.device.type) if cfg.precision == "fp16" else None,
                        amp_dtype=autocast_dtype_for(cfg.precision))


def wrap_model(cfg, ctx, model):
    """The module the training step calls: DDP when distributed, torch.compile when ``compile``."""
    train_model = model
    if ctx.distributed:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if cfg.compile:
        train_model = torch.compile(train_model)
    return train_model


def train_one_epoch(cfg, ctx, train_model, data: TrainingData, optim: Optimization, epoch: int, seed: int, logger,
                    writer, progress: Optional[Dict] = None, rng: Optional[Dict] = None,
                    stop=None) -> Dict[str, float]:
    """One epoch (0-based ``epoch``) with its seeds and data order set for exact resume; logs the result.

    ``progress``/``rng``: continue the epoch where a mid-epoch checkpoint stopped (the batches done are
    skipped, the random state is this rank's at that point). ``stop`` (util.runtime.cli.StopSignals): polled
    every iteration; a stop raises :class:`EpochInterrupted` on every rank after the same iteration."""
    set_seed(epoch_seed(seed, epoch, ctx.rank))
    data.train_sampler.set_epoch(epoch, start=progress["iteration"] * data.batch_size if progress else 0)
    data.train_set.set_epoch(epoch)
    if rng is not None:
        restore_rng_state(rng, ctx.device)
    epoch_start = time.time()
    stats = train_iterations(
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
