"""The test protocol, image by image: whole images predicted with sliding windows
(util/evaluation/inference.py) and scored into one confusion matrix summed over processes. tool/test.py
and the training-time validation (``val_mode whole``) both run :func:`evaluate_images`, so they produce
the same confusion matrix for the same model, images and settings."""
from __future__ import annotations

import logging
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn

from util.data.dataset import ListEntry, load_image, load_label
from util.errors import DataError
from util.evaluation.inference import predict_multiscale
from util.evaluation.metrics import confusion_matrix, metrics_from_confusion
from util.runtime.distributed import ShardSampler, all_reduce_sum
from util.runtime.log import ProgressLine

# A prediction function for evaluate_images: (index into entries, the entry, "list L line N") ->
# the (H, W) class map of that image (torch tensor or numpy array).
Predictor = Callable[[int, "ListEntry", str], object]


def whole_image_predictor(model: nn.Module, inference_kwargs: dict) -> Predictor:
    """The test protocol's prediction: the image read from disk, then
    :func:`util.evaluation.inference.predict_multiscale` (multi-scale, optionally flipped sliding windows) with
    ``inference_kwargs`` (see :func:`util.evaluation.inference.inference_kwargs`). ``model`` in eval mode."""
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
