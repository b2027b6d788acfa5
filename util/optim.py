"""Optimiser and learning-rate schedule of the training recipe.

SGD with momentum and weight decay; the backbone trains at ``base_lr`` and
the head, classifier and auxiliary branch at ``head_lr_mult * base_lr``
(10x). The poly policy ``lr = initial_lr * (1 - iter / max_iter) ** power``
is applied after every iteration through ``LambdaLR``, which scales each
group's own initial lr, so the 10x ratio is kept and the schedule's state is
saved and restored with ``state_dict``.
"""
from __future__ import annotations

from typing import Dict, Iterable, List

import torch
from torch import nn

from util.config import register_keys

HEAD_LR_MULT = 10.0

register_keys("TRAIN", {"base_lr": 0.01, "power": 0.9, "momentum": 0.9, "weight_decay": 0.0001})


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


class PolyDecay:
    """``(1 - it / max_iter) ** power``, the factor LambdaLR applies to each group's initial lr.

    A callable object (not a lambda) so ``LambdaLR.state_dict()`` stores its
    ``max_iter`` and ``power`` as plain data.
    """

    def __init__(self, max_iter: int, power: float) -> None:
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        self.max_iter = int(max_iter)
        self.power = float(power)

    def __call__(self, it: int) -> float:
        remaining = max(0.0, 1.0 - it / self.max_iter)
        return remaining ** self.power


def build_poly_scheduler(optimizer: torch.optim.Optimizer, max_iter: int,
                         power: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Poly schedule over ``max_iter`` iterations; call ``step()`` after every ``optimizer.step()``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=PolyDecay(max_iter, power))


def set_schedule_position(scheduler: torch.optim.lr_scheduler.LambdaLR, current_iter: int,
                          max_iter: int) -> None:
    """Put the schedule at iteration ``current_iter`` of ``max_iter`` and set the groups' lr.

    Used after restoring a checkpoint whose run had a different length (more
    epochs, another batch size): the restored state would otherwise keep the
    old run's ``max_iter``. A no-op in effect when nothing changed.
    """
    for fn in scheduler.lr_lambdas:
        if isinstance(fn, PolyDecay):
            fn.max_iter = int(max_iter)
    scheduler.last_epoch = int(current_iter)
    lrs = [base * fn(current_iter) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports
