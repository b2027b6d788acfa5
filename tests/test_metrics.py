"""Confusion matrix and scores (util/evaluation/metrics.py), colour maps (util/evaluation/visualize.py)."""
import math

import numpy as np
import pytest
import torch

from util.evaluation.metrics import confusion_matrix, metrics_from_confusion, nan_to_none
from util.evaluation.visualize import colorize, overlay


def test_confusion_matrix_hand_made():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 2, 0, 3]])
    cm = confusion_matrix(pred, target, num_classes=4)
    assert cm.dtype == torch.int64 and cm.shape == (4, 4)
    expected = torch.zeros(4, 4, dtype=torch.int64)
    expected[0, 0] = 1
    expected[0, 1] = 1
    expected[1, 1] = 2
    expected[2, 0] = 1
    expected[2, 2] = 1
    assert torch.equal(cm, expected)  # the ignored pixels (pred 0 and 3) are not counted


def test_metrics_hand_made_and_nan_semantics():
    # rows = target, cols = prediction; class 3 absent everywhere, class 2 only predicted.
    cm = torch.tensor([[3, 1, 0, 0],
                       [0, 2, 2, 0],
                       [0, 0, 0, 0],
                       [0, 0, 0, 0]])
    m = metrics_from_confusion(cm)
    # IoU: c0 3/(4+3-3)=0.75, c1 2/(4+3-2)=0.4, c2 0/(0+2-0)=0, c3 NaN
    assert m["iou"][:3] == pytest.approx([0.75, 0.4, 0.0])
    assert math.isnan(m["iou"][3])
    # acc: c0 3/4, c1 2/4, c2 and c3 absent from labels -> NaN
    assert m["acc"][:2] == pytest.approx([0.75, 0.5])
    assert math.isnan(m["acc"][2]) and math.isnan(m["acc"][3])
    assert m["mIoU"] == pytest.approx((0.75 + 0.4 + 0.0) / 3)
    assert m["mAcc"] == pytest.approx(0.625)
    assert m["allAcc"] == pytest.approx(5 / 8)
    assert all(isinstance(v, float) for v in m["iou"] + m["acc"] + [m["mIoU"], m["mAcc"], m["allAcc"]])
    assert nan_to_none(m)["iou"][3] is None


def test_confusion_matrix_accumulates_and_checks_range():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 5, size=(2, 9, 7))
    target[0, :2] = 255
    pred = rng.integers(0, 5, size=(2, 9, 7))
    whole = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), 5)
    parts = sum(confusion_matrix(torch.from_numpy(pred[i]), torch.from_numpy(target[i]), 5) for i in range(2))
    assert torch.equal(whole, parts)
    assert int(whole.sum()) == int((target != 255).sum())
    with pytest.raises(ValueError, match="class ids"):
        confusion_matrix(torch.tensor([0, 7]), torch.tensor([0, 1]), 5)
    with pytest.raises(ValueError, match="class ids"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 9]), 5)
    with pytest.raises(ValueError, match="elements"):
        confusion_matrix(torch.tensor([0, 1, 2]), torch.tensor([0, 1]), 5)
    empty = metrics_from_confusion(torch.zeros(3, 3, dtype=torch.int64))
    assert math.isnan(empty["mIoU"]) and math.isnan(empty["allAcc"])


def test_colorize_and_overlay():
    palette = np.array([[10, 20, 30], [200, 100, 0]], dtype=np.uint8)
    gray = np.array([[0, 1], [255, 7]], dtype=np.uint8)
    color = colorize(gray, palette)
    assert color.dtype == np.uint8 and color.shape == (2, 2, 3)
    assert color[0, 0].tolist() == [10, 20, 30] and color[0, 1].tolist() == [200, 100, 0]
    assert color[1].tolist() == [[0, 0, 0], [0, 0, 0]]
    image = np.full((2, 2, 3), 100, dtype=np.float32)
    blended = overlay(image, color, alpha=0.5)
    assert blended.dtype == np.uint8 and blended[0, 1].tolist() == [150, 100, 50]
