"""Segmentation metrics from a confusion matrix (used by training and testing).

The confusion matrix is the one statistic that has to be accumulated over a
dataset (and summed across processes); every score is derived from it at the
end, so per-batch and per-image accumulation give identical results.
"""
from __future__ import annotations

import math
from typing import Dict, List, Tuple, Union

import numpy as np
import torch


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """Pixel counts per (target class, predicted class).

    Args:
        pred: integer class ids, any shape.
        target: integer class ids, same number of elements as ``pred``.
            Pixels whose target equals ``ignore_index`` are dropped.
        num_classes: C.
        ignore_index: label value that is not scored.

    Returns:
        int64 tensor (C, C) on the inputs' device; rows are targets, columns
        predictions.

    Raises:
        ValueError: shapes differ, or a scored target / prediction lies outside
            ``[0, C)`` (a wrong ``classes`` setting or an unconverted label map
            would otherwise be silently miscounted).
    """
    counts, out_of_range = confusion_counts(pred, target, num_classes, ignore_index)
    if out_of_range.item():  # the one device sync of the check
        raise class_range_error(pred, target, num_classes, ignore_index)
    return counts


def confusion_counts(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`confusion_matrix` without the check, and without any host-device synchronisation (a
    training step checks later, when it syncs anyway): ``(counts (C, C) int64, number of scored pixels
    whose target or prediction lies outside [0, C) as a 0-dim int64 tensor)``. Such pixels are not
    counted. (Boolean indexing and ``bincount`` on CUDA would each wait for the GPU.)"""
    pred = torch.as_tensor(pred)
    target = torch.as_tensor(target, device=pred.device)
    if pred.numel() != target.numel():
        raise ValueError(f"prediction has {pred.numel()} elements ({tuple(pred.shape)}) but the label has "
                         f"{target.numel()} ({tuple(target.shape)})")
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    scored = target != ignore_index
    valid = scored & (target >= 0) & (target < num_classes) & (pred >= 0) & (pred < num_classes)
    cells = num_classes * num_classes
    index = torch.where(valid, target * num_classes + pred, cells)  # the rest go to a spare bin
    counts = torch.zeros(cells + 1, dtype=torch.int64, device=pred.device)
    counts.scatter_add_(0, index, torch.ones_like(index))
    return counts[:cells].reshape(num_classes, num_classes), (scored & ~valid).sum()


def class_range_error(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> ValueError:
    """The error for scored pixels outside ``[0, num_classes)``, naming the range of values found."""
    pred = torch.as_tensor(pred).reshape(-1).long()
    target = torch.as_tensor(target, device=pred.device).reshape(-1).long()
    scored = target != ignore_index
    bad = torch.cat([target[scored & ((target < 0) | (target >= num_classes))],
                     pred[scored & ((pred < 0) | (pred >= num_classes))]])
    return ValueError(f"class ids must lie in [0, {num_classes}) (ignore {ignore_index}); found values in "
                      f"[{int(bad.min())}, {int(bad.max())}] among labels/predictions: check 'classes' and "
                      f"the label format")


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def metrics_from_confusion(cm: Union[torch.Tensor, np.ndarray]) -> Dict[str, Union[float, List[float]]]:
    """Scores from a (C, C) confusion matrix (rows target, columns prediction).

    Returns a dict of Python floats (fractions, not percentages):
        iou: per class, intersection / union; NaN for a class absent from both
            labels and predictions.
        acc: per class, correct / labelled pixels; NaN for a class absent from labels.
        mIoU: mean of the non-NaN iou; mAcc: mean of the non-NaN acc.
        allAcc: correctly classified / all scored pixels (NaN if none).
    """
    if isinstance(cm, torch.Tensor):
        cm = cm.detach().cpu().numpy()
    cm = np.asarray(cm, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square (C, C), got shape {cm.shape}")
    intersection = np.diag(cm)
    labelled = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    union = labelled + predicted - intersection
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, intersection / union, np.nan)
        acc = np.where(labelled > 0, intersection / labelled, np.nan)
    total = cm.sum()
    return {
        "iou": [float(v) for v in iou],
        "acc": [float(v) for v in acc],
        "mIoU": _nanmean(iou),
        "mAcc": _nanmean(acc),
        "allAcc": float(intersection.sum() / total) if total > 0 else float("nan"),
    }


def nan_to_none(value):
    """Recursively replace float NaN by None (JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [nan_to_none(v) for v in value]
    return value
