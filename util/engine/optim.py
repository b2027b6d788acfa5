"""Optimiser and learning-rate schedule of the training recipe.

SGD with momentum and weight decay; the backbone trains at ``base_lr`` and
the head, classifier and auxiliary branch at ``head_lr_mult * base_lr``
(10x). The schedule (``lr_schedule``, chosen by name) gives a factor of each
group's initial lr per iteration, applied after every iteration through
``LambdaLR``, so the 10x ratio is kept and the schedule's state is saved and
restored with ``state_dict``:

* ``poly`` (the release's): ``(1 - it / max_iter) ** power``;
* ``cosine``: ``(1 + cos(pi * it / max_iter)) / 2``;
* ``warmup_iters N`` (any schedule): the factor times ``(it + 1) / N`` for the
  first N iterations (it = 0 .. N-1), a linear warm-up to the schedule.

A new schedule is one class with one decorator::

    @register_schedule("step")
    class StepDecay(ScheduleFactor):
        def __init__(self, cfg, max_iter):
            super().__init__(max_iter, cfg.warmup_iters)

        def decay(self, it):   # x0.1 for the last third of the run
            return 0.1 if it >= 2 * self.max_iter // 3 else 1.0

(its attributes are its saved state: plain numbers only).
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn

from util.config import check_choice, register_keys, require
from util.registry import Registry

HEAD_LR_MULT = 10.0

SCHEDULES = Registry("LR schedule", "lr_schedule")
register_schedule = SCHEDULES.register


def _check_keys(cfg) -> None:
    check_choice(cfg, "lr_schedule", SCHEDULES.names())
    require(cfg.warmup_iters >= 0, f"warmup_iters must be >= 0 (0: no warm-up), got {cfg.warmup_iters}")
    require(cfg.base_lr > 0, f"base_lr must be > 0, got {cfg.base_lr}")


register_keys("TRAIN", {"base_lr": 0.01, "power": 0.9, "momentum": 0.9, "weight_decay": 0.0001,
                        "lr_schedule": "poly", "warmup_iters": 0}, check=_check_keys)


def _parameters_of(modules: Iterable[nn.Module]) -> List[nn.Parameter]:
    params, seen = [], set()
    for module in modules:
        for param in module.parameters():
            if id(param) not in seen:
                seen.add(id(param))
                params.append(param)
    return params


def build_param_groups(model: nn.Module, base_lr: float, head_lr_mult: float = HEAD_LR_MULT) -> List[Dict]:
    """Two groups, ``backbone`` at ``base_lr`` and ``head`` at ``head_lr_mult * base_lr``.

    Uses ``model.backbone_modules()`` and ``model.head_modules()``; every
    trainable parameter must be in exactly one of them (a parameter in
    neither would silently never train).
    """
    backbone = [p for p in _parameters_of(model.backbone_modules()) if p.requires_grad]
    head = [p for p in _parameters_of(model.head_modules()) if p.requires_grad]
    backbone_ids, head_ids = {id(p) for p in backbone}, {id(p) for p in head}
    overlap = backbone_ids & head_ids
    if overlap:
        raise ValueError(f"{len(overlap)} parameters are in both backbone_modules() and head_modules()")
    names = {id(p): n for n, p in model.named_parameters()}
    missing = [names[id(p)] for p in model.parameters()
               if p.requires_grad and id(p) not in backbone_ids and id(p) not in head_ids]
    if missing:
        raise ValueError(f"parameters in neither backbone_modules() nor head_modules(): {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''}")
    return [
        {"params": backbone, "lr": base_lr, "name": "backbone"},
        {"params": head, "lr": base_lr * head_lr_mult, "name": "head"},
    ]


def build_optimizer(model: nn.Module, base_lr: float, momentum: float, weight_decay: float,
                    head_lr_mult: float = HEAD_LR_MULT) -> torch.optim.SGD:
    """SGD over :func:`build_param_groups`; the fused kernel on CUDA and CPU, foreach elsewhere."""
    groups = build_param_groups(model, base_lr, head_lr_mult)
    fusable = all(p.device.type in ("cuda", "cpu") for g in groups for p in g["params"])
    kwargs = {"fused": True} if fusable else {"foreach": True}
    optimizer = torch.optim.SGD(groups, lr=base_lr, momentum=momentum, weight_decay=weight_decay, **kwargs)
    if fusable and momentum:
        # Fused SGD allocates its momentum buffers with empty_like() at its first step and fills
        # them in the kernel; when a GradScaler skips that step (fp16 overflow, likely at the first
        # step) the kernel returns early and the next step adds uninitialised memory. Zeros up front
        # are exactly the first step's result (buf = 0 * momentum + grad, dampening 0).
        for group in optimizer.param_groups:
            for param in group["params"]:
                optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param)
    return optimizer


class ScheduleFactor:
    """The factor of each group's initial lr at iteration ``it`` (0-based) of a ``max_iter`` run,
    with the linear warm-up over the first ``warmup_iters`` iterations. Subclasses implement
    :meth:`decay`; their attributes are plain numbers (``LambdaLR.state_dict`` saves them)."""

    def __init__(self, max_iter: int, warmup_iters: int = 0) -> None:
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        self.max_iter = int(max_iter)
        self.warmup_iters = int(warmup_iters)

    def decay(self, it: int) -> float:
        raise NotImplementedError

    def set_length(self, max_iter: int) -> None:
        """Stretch the schedule to a run of ``max_iter`` iterations (a resumed run's new length)."""
        self.max_iter = int(max_iter)

    def __call__(self, it: int) -> float:
        factor = self.decay(it)
        if it < self.warmup_iters:
            factor = factor * (it + 1) / self.warmup_iters
        return factor


class PolyDecay(ScheduleFactor):
    """``(1 - it / max_iter) ** power`` (never negative past the end): the release's schedule."""

    def __init__(self, max_iter: int, power: float, warmup_iters: int = 0) -> None:
        super().__init__(max_iter, warmup_iters)
        self.power = float(power)

    def decay(self, it: int) -> float:
        remaining = max(0.0, 1.0 - it / self.max_iter)
        return remaining ** self.power


class CosineDecay(ScheduleFactor):
    """``(1 + cos(pi * it / max_iter)) / 2``: from 1 down to 0 at the end of the run."""

    def decay(self, it: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(it, self.max_iter) / self.max_iter))


@register_schedule("poly")
def build_poly(cfg, max_iter: int) -> PolyDecay:
    return PolyDecay(max_iter, cfg.power, cfg.warmup_iters)


@register_schedule("cosine")
def build_cosine(cfg, max_iter: int) -> CosineDecay:
    return CosineDecay(max_iter, cfg.warmup_iters)


class IterationSchedule(torch.optim.lr_scheduler.LambdaLR):
    """``LambdaLR`` over one :class:`ScheduleFactor` for every group, stepped after every iteration."""

    def __init__(self, optimizer: torch.optim.Optimizer, factor: ScheduleFactor) -> None:
        super().__init__(optimizer, lr_lambda=factor)

    def reposition(self, current_iter: int, max_iter: int) -> None:
        """Put the schedule at iteration ``current_iter`` of a ``max_iter`` run and set the groups' lr.

        Used after restoring a checkpoint whose run had a different length (more epochs,
        another batch size): the restored state would otherwise keep the old run's length.
        Changes nothing when the length is the same."""
        for factor in self.lr_lambdas:
            factor.set_length(max_iter)
        self.last_epoch = int(current_iter)
        lrs = [base * factor(current_iter) for base, factor in zip(self.base_lrs, self.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = lrs  # what get_last_lr() reports


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, iters_per_epoch: int,
                    epochs: Optional[int] = None) -> IterationSchedule:
    """The ``cfg.lr_schedule`` schedule over ``epochs`` (default ``cfg.epochs``) x ``iters_per_epoch``
    iterations; call ``step()`` after every ``optimizer.step()``. The registered builder is called
    as ``builder(cfg, max_iter)`` and returns a :class:`ScheduleFactor`."""
    max_iter = (cfg.epochs if epochs is None else epochs) * iters_per_epoch
    return IterationSchedule(optimizer, SCHEDULES.get(cfg.lr_schedule)(cfg, max_iter))
