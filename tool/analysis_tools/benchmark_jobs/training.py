"""Training steps: ``util.engine.training.train_iterations`` (the loop tool/train.py runs, with the loss,
optimiser and schedule of the config's builders) on random crops: images/s and utilisation."""
from __future__ import annotations

import time
from typing import Callable, Dict, Sequence, Tuple

import torch
from torch import nn

from .flops import train_step_gflop
from .measure import log, synchronize, utilisation, warm_up
from .workload import size_pair, training_parts

TRAIN_WARMUP_MAX = 4  # untimed steps at most before the timed ones (see measure.warm_up)


def random_batches(cfg, count: int, batch: int, crop: Tuple[int, int], seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        image = torch.randn(batch, 3, crop[0], crop[1], generator=generator)
        label = torch.randint(0, int(cfg.classes), (batch, crop[0], crop[1]), generator=generator)
        batches.append((image, label))
    return batches


def step_options(cfg, precision: str, device: torch.device) -> Dict:
    """The keyword arguments of ``train_one_epoch`` for ``precision``, as tool/train.py passes them."""
    from util.engine.precision import autocast_dtype_for

    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return dict(num_classes=int(cfg.classes), ignore_index=cfg.ignore_label,
                scaler=scaler, amp_dtype=autocast_dtype_for(precision), channels_last=bool(cfg.get("channels_last")),
                print_freq=10 ** 9, logger=None, writer=None)


def run_train(cfg, args, model: nn.Module, device: torch.device, precisions: Sequence[str],
              limit_now: Callable[[str], float]) -> Dict:
    from util.engine import training

    crop = size_pair(args.train_crop, (cfg.train_h, cfg.train_w))
    batch = args.train_batch
    flop = train_step_gflop(cfg, batch, *crop)
    section = {"batch": batch, "crop": list(crop), "gflop_per_step": flop["total"],
               "gflop_per_step_forward": flop["forward"], "channels_last": bool(cfg.get("channels_last")),
               "compile": bool(cfg.get("compile"))}
    warm, timed = random_batches(cfg, 1, batch, crop, 1), random_batches(cfg, args.train_iters, batch, crop, 2)
    for precision in precisions:
        log(f"train {precision}: batch {batch} of {crop[0]}x{crop[1]}, {args.train_iters} timed step(s)")
        _, train_model, criterion, optimizer, scheduler = training_parts(cfg, model, device, len(timed))
        options = step_options(cfg, precision, device)

        def warm_step(train_model=train_model, optimizer=optimizer, scheduler=scheduler):
            training.train_iterations(train_model, warm, criterion, optimizer, scheduler, device, 0, **options)

        warmup_steps = warm_up(warm_step, device, max_calls=TRAIN_WARMUP_MAX)
        limit = limit_now(precision)
        start = time.perf_counter()
        stats = training.train_iterations(train_model, timed, criterion, optimizer, scheduler, device, 1, **options)
        synchronize(device)
        seconds = (time.perf_counter() - start) / len(timed)
        section[precision] = {"seconds_per_step": seconds, "warmup_steps": warmup_steps, "peak_gflops_before": limit,
                              "images_per_s": batch / seconds, "gflops": flop["total"] / seconds,
                              "utilisation": utilisation(flop["total"], seconds, limit), "loss": stats["loss"]}
        log(f"train {precision}: {seconds:.2f} s/step, {batch / seconds:.2f} images/s, "
            f"utilisation {section[precision]['utilisation']:.2f}")
        del train_model, optimizer, scheduler
    return section
