"""The training loss, chosen by name from the config (``loss``), and the auxiliary weighting.

``build_criterion(cfg)`` returns a :class:`SegmentationLoss`: ``criterion(logits, target)`` is the
pixel loss of one output (what validation reports), ``criterion.with_aux(logits, aux_logits,
target)`` the training objective ``main + aux_weight * aux`` with both terms. Logits are
(N, C, h, w), possibly smaller than the (N, H, W) target: the target is subsampled to them
(:func:`match_target_size`).

A new loss is one file with one decorator (imported before the config is loaded, e.g. a module
in ``util/`` named in ``util.config.KEY_MODULES``, or a user's module imported by their script)::

    @register_loss("focal")
    def build_focal(cfg) -> nn.Module:      # the whole config: read your own keys
        return FocalLoss(gamma=cfg.focal_gamma, ignore_index=cfg.ignore_label)

    register_keys("TRAIN", {"focal_gamma": 2.0})

and ``loss focal`` selects it; the module only has to return ``loss(logits, target) -> scalar``,
ignoring ``ignore_index`` pixels.

Keys: ``loss`` (``ce``: the release's cross entropy; ``ohem``: online hard-example mining),
``aux_weight`` (0.4), ``ohem_thresh`` / ``ohem_min_kept``, ``class_weight`` (one weight per class,
empty = unweighted; ``tool/dataset_converters/make_lists.py`` prints the pixel frequencies).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from util.config import check_choice, register_keys, require
from util.registry import Registry

LOSSES = Registry("loss", "loss")
register_loss = LOSSES.register


def _check_keys(cfg) -> None:
    check_choice(cfg, "loss", LOSSES.names())
    require(cfg.aux_weight >= 0, f"aux_weight must be >= 0, got {cfg.aux_weight}")
    require(0.0 < cfg.ohem_thresh <= 1.0, f"ohem_thresh must be a probability in (0, 1], got {cfg.ohem_thresh}")
    require(cfg.ohem_min_kept >= 0, f"ohem_min_kept must be >= 0, got {cfg.ohem_min_kept}")
    weights = cfg.class_weight
    if weights is not None:
        require(isinstance(weights, list) and all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                                  and w >= 0 for w in weights),
                f"class_weight must be a list of numbers >= 0 (one per class), got {weights!r}")
        require(len(weights) == cfg.classes,
                f"class_weight has {len(weights)} weights but classes is {cfg.classes}: give one per class")


register_keys("TRAIN", {"loss": "ce", "aux_weight": 0.4, "ohem_thresh": 0.7, "ohem_min_kept": 100000,
                        "class_weight": None}, check=_check_keys)


def match_target_size(target: torch.Tensor, size) -> torch.Tensor:
    """Subsample an (N, H, W) label map to the logits' (h, w).

    The model's logits sample the input on an align_corners grid
    (h = (H - 1) / 8 * zoom + 1), so the matching label pixels are the ones at
    rows ``round(i * (H - 1) / (h - 1))``: nearest neighbour, never blended
    (bilinear interpolation of class ids, as the release did, invents classes).
    """
    h, w = int(size[0]), int(size[1])
    H, W = target.shape[-2:]
    if (h, w) == (H, W):
        return target
    rows = torch.linspace(0, H - 1, h, device=target.device).round().long() if h > 1 else \
        torch.zeros(1, dtype=torch.long, device=target.device)
    cols = torch.linspace(0, W - 1, w, device=target.device).round().long() if w > 1 else \
        torch.zeros(1, dtype=torch.long, device=target.device)
    return target.index_select(-2, rows).index_select(-1, cols)


def _pixels(logits: torch.Tensor, target: torch.Tensor):
    """(N*H*W, C) float logits and (N*H*W,) targets.

    Classes innermost: for channels_last logits (what a channels_last model returns) this is a
    free view and log-softmax runs over contiguous class vectors. Over dim 1 of a channels_last
    tensor, cross_entropy first copies it to NCHW, forward and backward: about a fifth of a CPU
    training step at 150 classes and 473x473."""
    logits = logits.float()
    if logits.dim() == 4:
        logits = logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1])
        target = target.reshape(-1)
    return logits, target


class SegmentationCrossEntropy(nn.Module):
    """Pixel-wise cross entropy averaged over the labelled pixels (``loss ce``).

    Same value as ``nn.CrossEntropyLoss(weight, ignore_index=...)`` (with ``weight``, the mean is
    over the labelled pixels' class weights), except that a batch with no labelled pixel at all (a
    crop that is all padding / void) gives 0 instead of NaN, so it cannot be mistaken for a
    diverged run.
    """

    def __init__(self, ignore_index: int = 255, weight: Optional[Sequence[float]] = None) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.weight = None if weight is None else torch.tensor([float(w) for w in weight])

    def _weight(self, device: torch.device) -> Optional[torch.Tensor]:
        return None if self.weight is None else self.weight.to(device)

    def _normaliser(self, target: torch.Tensor, weight: Optional[torch.Tensor],
                    keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        labelled = target != self.ignore_index
        if keep is not None:
            labelled = labelled & keep
        if weight is None:
            return labelled.sum().clamp_min(1)
        return (weight[target.clamp(0, weight.numel() - 1)] * labelled).sum().clamp_min(1e-12)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, target = _pixels(logits, target)
        weight = self._weight(logits.device)
        total = F.cross_entropy(logits, target, weight=weight, ignore_index=self.ignore_index, reduction="sum")
        return total / self._normaliser(target, weight)


class OhemCrossEntropy(SegmentationCrossEntropy):
    """Cross entropy over the hard pixels only (online hard-example mining, ``loss ohem``).

    A labelled pixel is kept when the softmax probability of its true class is below ``thresh``;
    when fewer than ``min_kept`` pixels are that hard, the threshold rises to the probability of
    the (``min_kept`` + 1)-th hardest pixel, so the ``min_kept`` hardest are kept (ties aside), as in
    mmsegmentation's OHEMPixelSampler. The loss is the (class-weighted) mean over the kept pixels;
    the selection is not differentiated through.
    """

    def __init__(self, ignore_index: int = 255, weight: Optional[Sequence[float]] = None, thresh: float = 0.7,
                 min_kept: int = 100000) -> None:
        super().__init__(ignore_index, weight)
        self.thresh = float(thresh)
        self.min_kept = int(min_kept)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, target = _pixels(logits, target)
        weight = self._weight(logits.device)
        labelled = target != self.ignore_index
        with torch.no_grad():
            true_prob = torch.softmax(logits, dim=1).gather(1, target.clamp(0, logits.shape[1] - 1)[:, None])[:, 0]
            labelled_prob = true_prob[labelled]
            threshold = self.thresh
            if labelled_prob.numel() > 0:
                kth = labelled_prob.kthvalue(min(self.min_kept, labelled_prob.numel() - 1) + 1).values.item()
                threshold = max(threshold, kth)
            keep = labelled & (true_prob < threshold)
        pixel_loss = F.cross_entropy(logits, target, weight=weight, ignore_index=self.ignore_index, reduction="none")
        return (pixel_loss * keep).sum() / self._normaliser(target, weight, keep)


@register_loss("ce")
def build_cross_entropy(cfg) -> nn.Module:
    return SegmentationCrossEntropy(cfg.ignore_label, cfg.class_weight)


@register_loss("ohem")
def build_ohem(cfg) -> nn.Module:
    return OhemCrossEntropy(cfg.ignore_label, cfg.class_weight, thresh=cfg.ohem_thresh, min_kept=cfg.ohem_min_kept)


class LossTerms(NamedTuple):
    total: torch.Tensor  # main + aux_weight * aux: what is back-propagated
    main: torch.Tensor
    aux: torch.Tensor


class SegmentationLoss(nn.Module):
    """A pixel loss on the main output, plus ``aux_weight`` times it on the auxiliary output."""

    def __init__(self, pixel_loss: nn.Module, aux_weight: float = 0.4) -> None:
        super().__init__()
        self.pixel_loss = pixel_loss
        self.aux_weight = float(aux_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The pixel loss of one output (N, C, h, w) against the (N, H, W) target."""
        return self.pixel_loss(logits.float(), match_target_size(target, logits.shape[-2:]))

    def with_aux(self, logits: torch.Tensor, aux_logits: torch.Tensor, target: torch.Tensor) -> LossTerms:
        """The training objective and its two terms."""
        main = self(logits, target)
        aux = self(aux_logits, target)
        return LossTerms(main + self.aux_weight * aux, main, aux)


def build_criterion(cfg) -> SegmentationLoss:
    """The training loss of ``cfg``: ``LOSSES[cfg.loss](cfg)`` weighted with ``cfg.aux_weight``."""
    return SegmentationLoss(LOSSES.get(cfg.loss)(cfg), cfg.aux_weight)
