"""Validation during training, in one place: what is measured (:func:`validation_protocol`), when
(:func:`should_validate`), how (:func:`validate`: whole images through tool/test.py's protocol,
util/evaluation/whole_images.py, or the release's centre crops, :func:`evaluate_crops`), what is
reported (log lines, TensorBoard scalars and preview images, in both modes) and the whole-image score of the final
and the best model at the end of training (:func:`report_final_and_best`)."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
from torch import nn

import model as models
from util.config import check_choice, register_keys, require
from util.data import dataset
from util.data.dataset import evenly_spaced_subset, load_image, load_label
from util.data.loaders import TrainingData
from util.engine.losses import match_target_size
from util.engine.precision import autocast
from util.engine.training import Optimization, to_device
from util.evaluation import whole_images
from util.evaluation.inference import inference_kwargs, prepare_inference_model
from util.evaluation.metrics import confusion_matrix, metrics_from_confusion
from util.evaluation.visualize import colorize, config_palette
from util.runtime import distributed
from util.runtime.checkpoint_io import load_checkpoint_file, load_model_weights
from util.runtime.distributed import all_reduce_sum
from util.runtime.log import ProgressLine, format_seconds
from util.runtime.runs import BEST_CHECKPOINT

VAL_MODES = ("whole", "crop")


def _check_validation_keys(cfg) -> None:
    check_choice(cfg, "val_mode", VAL_MODES)
    require(isinstance(cfg.val_scales, list) and len(cfg.val_scales) > 0 and all(s > 0 for s in cfg.val_scales),
            f"val_scales must be a non-empty list of positive numbers, got {cfg.val_scales}")
    require(isinstance(cfg.val_every, int) and cfg.val_every >= 1,
            f"val_every must be an integer >= 1, got {cfg.val_every}")
    require(isinstance(cfg.val_max_images, int) and cfg.val_max_images >= 0,
            f"val_max_images must be an integer >= 0 (0 = every image of val_list), got {cfg.val_max_images}")


# The training-time validation (tool/train.py, when ``evaluate``): "whole" = evaluate_images, tool/test.py's
# protocol, on whole val images (the TEST section's base_size, test_h/test_w, test_batch_size, with these
# scales and flip); "crop" = evaluate_crops, the release's centre train_h x train_w crop.
register_keys("TRAIN", {
    "val_mode": "whole",
    "val_scales": [1.0],
    "val_flip": False,
    "val_every": 1,  # epochs between validations (the last epoch is always validated)
    "val_max_images": 0,  # 0 = all of val_list, else this many evenly spaced images (a fixed subset)
}, check=_check_validation_keys)


def evaluate_crops(model: nn.Module, loader, criterion: nn.Module, device: torch.device, num_classes: int,
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
            image, target = to_device(image, target, device, channels_last)
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


def validation_protocol(cfg, data: Optional[TrainingData] = None) -> str:
    """What the validation mIoU measures, in words.

    Without ``data``, the settings alone (saved with the best score: scores of different protocols are
    not compared); with the run's ``data`` (for the log), the number of images actually validated, which
    ``val_max_images`` only bounds: ``all 3 images of val_list``, ``25 evenly spaced of the 101 images
    of val_list``."""
    if data is None:
        images = f"{cfg.val_max_images} evenly spaced images" if cfg.val_max_images else "all images"
    else:
        used, listed = data.val_image_count(), data.val_list_length
        images = f"all {listed} images" if used == listed else f"{used} evenly spaced of the {listed} images"
    if cfg.val_mode == "crop":
        return f"centre {cfg.train_h}x{cfg.train_w} crop of {images} of val_list"
    return (f"whole images ({images} of val_list), tool/test.py's sliding window: scales {list(cfg.val_scales)}, "
            f"flip {bool(cfg.val_flip)}, base_size {cfg.base_size}, window {cfg.test_h}x{cfg.test_w}")


PREVIEW_IMAGES = 3  # validation images shown in TensorBoard (image | ground truth | prediction)


def should_validate(cfg, epochs_done: int) -> bool:
    """Validate after epochs ``val_every``, ``2 * val_every``, ... and after the last one."""
    return bool(cfg.evaluate) and (epochs_done % cfg.val_every == 0 or epochs_done == cfg.epochs)


def validate_whole_images(cfg, ctx, model, entries, logger, title: str, writer=None, step: Optional[int] = None):
    """tool/test.py's protocol on ``entries`` (``val_scales``, ``val_flip``; the TEST section's
    base_size, window and test_batch_size), images split across processes, confusion matrices summed.

    ``model`` (the plain module, not DDP) is scored through the same BatchNorm-folded copy that
    tool/test.py builds from a checkpoint, so both give the same confusion matrix. With a
    ``writer`` (rank 0), a few fixed images of this process's share go to TensorBoard as
    image | ground truth | prediction, coloured with the dataset palette.
    """
    was_training = model.training
    eval_model = prepare_inference_model(model, ctx.device, channels_last=bool(cfg.channels_last))
    kwargs = inference_kwargs(cfg, scales=[float(s) for s in cfg.val_scales], flip=bool(cfg.val_flip))
    my_share = list(range(ctx.rank, len(entries), ctx.world_size))
    previews = {my_share[i]: None for i in evenly_spaced_subset(len(my_share), PREVIEW_IMAGES)} \
        if writer is not None else {}

    def keep_preview(index, entry, prediction):
        if index in previews:
            previews[index] = prediction.to("cpu", torch.uint8).numpy()

    try:
        predict = whole_images.whole_image_predictor(eval_model, kwargs)
        stats = whole_images.evaluate_images(entries, predict, cfg.classes, ctx.device, ignore_index=cfg.ignore_label,
                                             rank=ctx.rank, world_size=ctx.world_size, list_path=cfg.val_list,
                                             on_prediction=keep_preview, logger=logger, title=title)
    finally:
        del eval_model
        model.train(was_training)
    if writer is not None:
        write_previews(cfg, writer, entries, previews, step)
    return stats


def add_preview(writer, image_path, image: np.ndarray, label: np.ndarray, prediction: np.ndarray,
                palette: np.ndarray, step: int) -> None:
    """TensorBoard image ``val_preview/NAME``: the HxWx3 RGB ``image`` (0..255), its ``label`` and the
    ``prediction`` (HxW class ids) coloured with ``palette``, side by side."""
    panel = np.concatenate([image.astype(np.uint8), colorize(label, palette), colorize(prediction, palette)], axis=1)
    writer.add_image(f"val_preview/{Path(image_path).stem}", panel, step, dataformats="HWC")


def write_previews(cfg, writer, entries, previews: Dict[int, Any], step: int) -> None:
    """:func:`add_preview` of the whole images ``entries[index]`` predicted as ``previews[index]``."""
    palette = config_palette(cfg)
    for index, prediction in previews.items():
        if prediction is None:  # not predicted (an evaluation stopped early, or a test's stand-in)
            continue
        entry = entries[index]
        add_preview(writer, entry.image_path, load_image(entry.image_path), load_label(entry.label_path),
                    prediction, palette, step)


def write_crop_previews(cfg, writer, model: nn.Module, val_set, device: torch.device, step: int,
                        amp_dtype: Optional[torch.dtype] = None) -> None:
    """:func:`add_preview` of ``PREVIEW_IMAGES`` evenly spaced samples of the crop-mode validation set
    (``val_set``, a SegDataset or a Subset of one): their centre crops, as validated, predicted by
    ``model`` (the plain module; rank 0 alone, no collective call)."""
    from util.data.transforms import MEAN, STD

    was_training = model.training
    model.eval()
    palette = config_palette(cfg)
    for index in evenly_spaced_subset(len(val_set), PREVIEW_IMAGES):
        image, label = val_set[index]
        with torch.inference_mode(), autocast(device.type, amp_dtype):
            logits = model(image.unsqueeze(0).to(device))
        logits = logits[0] if isinstance(logits, (tuple, list)) else logits
        logits = torch.nn.functional.interpolate(logits.float(), size=tuple(label.shape[-2:]), mode="bilinear",
                                                 align_corners=True)
        prediction = logits.argmax(1)[0].to("cpu", torch.uint8).numpy()
        pixels = image.permute(1, 2, 0).cpu().numpy() * np.array(STD) + np.array(MEAN)  # undo Normalize
        add_preview(writer, _entry(val_set, index).image_path, np.clip(pixels, 0, 255), label.numpy(),
                    prediction, palette, step)
    model.train(was_training)


def _entry(val_set, index: int):
    """The list entry of sample ``index`` of a SegDataset or of a Subset of one."""
    if isinstance(val_set, torch.utils.data.Subset):
        return val_set.dataset.entries[val_set.indices[index]]
    return val_set.entries[index]


def validate(cfg, ctx, model, data: TrainingData, optim: Optimization, epochs_done: int, logger, writer):
    """The per-epoch validation of ``val_mode`` (whole images or centre crops); logs and writes
    ``{loss,mIoU,mAcc,allAcc}_val`` (loss in crop mode only) at ``epochs_done``."""
    title = f"Val epoch [{epochs_done}/{cfg.epochs}]"
    distributed.broadcast_buffers(model)  # every process scores the model rank 0 saves
    if cfg.val_mode == "whole":
        stats = validate_whole_images(cfg, ctx, model, data.val_entries, logger, title, writer, epochs_done)
    else:
        stats = evaluate_crops(model, data.val_loader, optim.criterion, ctx.device, cfg.classes, cfg.ignore_label,
                                amp_dtype=optim.amp_dtype, channels_last=cfg.channels_last, logger=logger)
        if writer is not None:
            write_crop_previews(cfg, writer, model, data.val_loader.dataset, ctx.device, epochs_done,
                                amp_dtype=optim.amp_dtype)
    loss_text = f"loss {stats['loss']:.4f} " if "loss" in stats else ""
    logger.info(f"Val result at epoch [{epochs_done}/{cfg.epochs}] ({validation_protocol(cfg, data)}): {loss_text}"
                f"mIoU/mAcc/allAcc {stats['mIoU']:.4f}/{stats['mAcc']:.4f}/{stats['allAcc']:.4f}")
    if writer is not None:
        for name in ("loss", "mIoU", "mAcc", "allAcc"):
            if name in stats:
                writer.add_scalar(f"{name}_val", stats[name], epochs_done)
    return stats


def report_final_and_best(cfg, ctx, model, data: TrainingData, last_whole: Optional[Dict], logger) -> Dict[str, Any]:
    """Whole-image validation (the validation's protocol, whatever ``val_mode`` is) of the final
    model and of ``best_mIoU.pth``, logged at the end of training; reuses a result already measured."""
    if not cfg.evaluate:
        return {}
    if data.val_entries is None:  # val_mode crop: the whole-image list was not needed until now
        entries = dataset.SegDataset("val", cfg.data_root, cfg.val_list).entries
        data.val_entries = [entries[i] for i in evenly_spaced_subset(len(entries), cfg.val_max_images)]
    whole_cfg = type(cfg)(cfg, val_mode="whole")
    protocol = validation_protocol(whole_cfg, data)
    results: Dict[str, Any] = {}
    distributed.broadcast_buffers(model)
    results["final"] = last_whole or validate_whole_images(cfg, ctx, model, data.val_entries, logger,
                                                           "Val final model")
    best_path = os.path.join(cfg.save_path, BEST_CHECKPOINT)
    best_epoch = distributed.broadcast_object(
        int(load_checkpoint_file(best_path)["epoch"]) if ctx.is_main and os.path.isfile(best_path) else None)
    if best_epoch == cfg.epochs and last_whole is not None:
        results["best"] = results["final"]
    elif best_epoch is not None:
        best_model = models.build_model(cfg)
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
