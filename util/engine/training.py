"""One training epoch and the evaluation passes, written against objects, not a global ``args``.

* :func:`train_one_epoch`: one pass over the training loader.
* :func:`evaluate_images`: the test protocol, image by image (whole images, sliding windows of
  util/evaluation/inference.py): ``tool/test.py`` and the training-time validation (``val_mode whole``) both
  run this loop, so they produce the same confusion matrix for the same model, images and settings.
* :func:`evaluate`: the release's quick crop-level validation (``val_mode crop``) over a loader.

Each accumulates a confusion matrix on the device and sums it (and the loss) over all processes,
so every rank returns the same global numbers.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from util.config import check_choice, register_keys, require
from util.runtime.distributed import ShardSampler, all_reduce_sum, get_rank
from util.engine.losses import match_target_size
from util.evaluation.metrics import (class_range_error, confusion_counts, confusion_matrix,
                                     metrics_from_confusion)
from util.runtime.log import AverageMeter, format_seconds
from util.engine.precision import autocast

VAL_LOG_EVERY = 10  # images (or batches) between validation progress lines
VAL_MODES = ("whole", "crop")


def _check_validation_keys(cfg) -> None:
    check_choice(cfg, "val_mode", VAL_MODES)
    require(isinstance(cfg.val_scales, list) and len(cfg.val_scales) > 0 and all(s > 0 for s in cfg.val_scales),
            f"val_scales must be a non-empty list of positive numbers, got {cfg.val_scales}")
    require(isinstance(cfg.val_every, int) and cfg.val_every >= 1, f"val_every must be an integer >= 1, got {cfg.val_every}")
    require(isinstance(cfg.val_max_images, int) and cfg.val_max_images >= 0,
            f"val_max_images must be an integer >= 0 (0 = every image of val_list), got {cfg.val_max_images}")


# The training-time validation (tool/train.py, when ``evaluate``): "whole" = evaluate_images, tool/test.py's
# protocol, on whole val images (the TEST section's base_size, test_h/test_w, test_batch_size, with these
# scales and flip); "crop" = evaluate, the release's centre train_h x train_w crop.
register_keys("TRAIN", {
    "val_mode": "whole",
    "val_scales": [1.0],
    "val_flip": False,
    "val_every": 1,  # epochs between validations (the last epoch is always validated)
    "val_max_images": 0,  # 0 = all of val_list, else this many evenly spaced images (a fixed subset)
}, check=_check_validation_keys)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stops (the last saved checkpoint is kept)."""


class EpochInterrupted(Exception):
    """:func:`train_one_epoch` stopped early because a process asked to (every rank stops after the same
    iteration). ``progress`` is what continuing the epoch needs: ``dict(iteration, loss_sums, confusion)``
    (iterations done, the summed statistics so far, on the CPU); pass it back as ``progress``."""

    def __init__(self, progress: Dict) -> None:
        super().__init__(f"stopped after iteration {progress['iteration']}")
        self.progress = progress


def _to_device(image: torch.Tensor, target: torch.Tensor, device: torch.device, channels_last: bool):
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


class ProgressLine:
    """``[done/total] s/item, elapsed, ETA`` lines every ``every`` items (and after the last one)."""

    def __init__(self, title: str, total: Optional[int], logger: Optional[logging.Logger], every: int = VAL_LOG_EVERY,
                 unit: str = "image") -> None:
        self.title, self.total, self.logger, self.every, self.unit = title, total, logger, every, unit
        self.start = time.time()

    def update(self, done: int, last: bool = False) -> None:
        """Log after every ``every`` items and the last one; with ``total`` None (a video that does not
        say its length) the call with ``last`` True logs the count without an ETA."""
        if self.logger is None or not (done % self.every == 0 or done == self.total or last):
            return
        elapsed = time.time() - self.start
        if self.total is None:
            self.logger.info(f"{self.title}: [{done}] {elapsed / max(done, 1):.3f} s/{self.unit}, "
                             f"elapsed {format_seconds(elapsed)}")
            return
        remaining = elapsed / done * (self.total - done)
        self.logger.info(f"{self.title}: [{done}/{self.total}] {elapsed / done:.3f} s/{self.unit}, "
                         f"elapsed {format_seconds(elapsed)}, ETA {format_seconds(remaining)}")


def train_one_epoch(model: nn.Module, loader, criterion: nn.Module, optimizer: torch.optim.Optimizer,
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
        image, target = _to_device(image, target, device, channels_last)
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


def evaluate(model: nn.Module, loader, criterion: nn.Module, device: torch.device, num_classes: int,
             ignore_index: int = 255, amp_dtype: Optional[torch.dtype] = None, channels_last: bool = True,
             logger: Optional[logging.Logger] = None) -> Dict:
    """Score ``model`` (eval mode) on ``loader``; the confusion matrix and loss are summed over processes.

    Pass the plain model, not the DDP wrapper: processes may hold different
    numbers of evaluation batches (no padding), and DDP's forward would try to
    synchronise buffers in every call.

    Returns:
        ``dict(loss, mIoU, mAcc, allAcc, iou, acc)``; ``loss`` is ``criterion(logits, target)``
        (the main output's pixel loss) per sample; ``iou``/``acc`` are per-class lists.
    """
    was_training = model.training
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    loss_sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss*n, n
    start = time.time()
    progress = ProgressLine("Val (crops)", len(loader), logger, unit="batch")
    with torch.inference_mode():
        for done, (image, target) in enumerate(loader, 1):
            image, target = _to_device(image, target, device, channels_last)
            with autocast(device.type, amp_dtype):
                logits = model(image)
            if isinstance(logits, (tuple, list)):  # a model that also returns aux in eval mode
                logits = logits[0]
            target = match_target_size(target, logits.shape[-2:])
            loss = criterion(logits, target)
            n = image.shape[0]
            loss_sums[0] += loss.double() * n
            loss_sums[1] += n
            cm += confusion_matrix(logits.argmax(1), target, num_classes, ignore_index)
            progress.update(done)
    all_reduce_sum(cm)
    all_reduce_sum(loss_sums)
    model.train(was_training)
    sums = loss_sums.cpu()
    scores = metrics_from_confusion(cm)
    result = {"loss": sums[0].item() / max(sums[1].item(), 1.0), **scores}
    if logger is not None:
        logger.info(f"Evaluated {int(sums[1].item())} images in {format_seconds(time.time() - start)}")
    return result


# A prediction function for evaluate_images: (index into entries, the entry, "list L line N") ->
# the (H, W) class map of that image (torch tensor or numpy array).
Predictor = Callable[[int, "ListEntry", str], object]


def whole_image_predictor(model: nn.Module, inference_kwargs: dict) -> Predictor:
    """The test protocol's prediction: the image read from disk, then
    :func:`util.evaluation.inference.predict_multiscale` (multi-scale, optionally flipped sliding windows) with
    ``inference_kwargs`` (see :func:`util.evaluation.inference.inference_kwargs`). ``model`` in eval mode."""
    from util.data.dataset import load_image
    from util.evaluation.inference import predict_multiscale

    def predict(index, entry, where):
        return predict_multiscale(model, load_image(entry.image_path, where=where), **inference_kwargs)

    return predict


def evaluate_images(entries: Sequence, predict: Predictor, num_classes: int, device: torch.device, *,
                    ignore_index: int = 255, labelled: bool = True, rank: int = 0, world_size: int = 1,
                    list_path=None, on_prediction: Optional[Callable] = None,
                    logger: Optional[logging.Logger] = None, title: str = "Test") -> Optional[Dict]:
    """Predict this process's share of ``entries`` (``rank, rank + world_size, ...``: every image
    exactly once over all processes) one whole image at a time and score the predictions.

    Args:
        entries: :class:`util.data.dataset.ListEntry` items (image path, label path, list line number).
        predict: ``predict(index, entry, where) -> (H, W) class map`` (tensor or numpy), e.g.
            :func:`whole_image_predictor`, or a reader of saved predictions.
        labelled: score against ``entry.label_path`` (False for an unlabelled test split).
        on_prediction: called as ``on_prediction(index, entry, prediction)`` after each image
            (tool/test.py saves the maps there; training keeps a few for TensorBoard).
        list_path: named in error messages with the entry's line number.
        logger: progress lines with count and ETA (``title: [done/total] ...``).

    Returns:
        None when not ``labelled``, else ``metrics_from_confusion`` of the confusion matrix summed
        over all processes plus ``confusion_matrix`` (int64 tensor, on ``device``) and
        ``num_images``; identical on every rank.

    Raises:
        DataError: a label that does not match its prediction's size or holds invalid class ids.
    """
    from util.data.dataset import DataError, load_label

    my_indices = ShardSampler(len(entries), num_replicas=world_size, rank=rank)
    total_cm = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)
    progress = ProgressLine(title, len(my_indices), logger)
    for done, index in enumerate(my_indices, 1):
        entry = entries[index]
        where = f"list {list_path} line {entry.line_number}"
        prediction = predict(index, entry, where)
        if on_prediction is not None:
            on_prediction(index, entry, prediction)
        if labelled:
            label = load_label(entry.label_path, where=where)
            if tuple(label.shape) != tuple(prediction.shape):
                raise DataError(f"{where}: label {entry.label_path} is {label.shape[1]}x{label.shape[0]} but the "
                                f"prediction for {entry.image_path} is {prediction.shape[1]}x{prediction.shape[0]}")
            try:
                total_cm += confusion_matrix(torch.as_tensor(prediction).to(device),
                                             torch.from_numpy(label).to(device), num_classes, ignore_index)
            except ValueError as error:
                raise DataError(f"{where}: {entry.label_path}: {error}") from None
        progress.update(done)
    count = torch.tensor([len(my_indices)], dtype=torch.int64, device=device)
    if world_size > 1:
        all_reduce_sum(total_cm)
        all_reduce_sum(count)
    if not labelled:
        return None
    return {**metrics_from_confusion(total_cm), "confusion_matrix": total_cm, "num_images": int(count.item())}


def evenly_spaced_subset(length: int, max_items: int) -> List[int]:
    """``max_items`` indices spread evenly over ``range(length)`` (first and last included; all of
    them when ``max_items`` is 0 or >= ``length``): a fixed, reproducible subset that samples every
    part of a list, e.g. every sequence of a video dataset, not only its first frames."""
    if not max_items or max_items >= length:
        return list(range(length))
    if max_items == 1:
        return [0]
    return sorted({round(i * (length - 1) / (max_items - 1)) for i in range(max_items)})
