"""Is the input pipeline fast enough? The training DataLoader of tool/train.py (cfg.workers,
cfg.batch_size, real files of cfg.train_list with the training augmentation) measured twice:

* alone: samples/s of the loader;
* through the real training step: ``util.engine.training.train_iterations`` (the config's loss, optimiser
  and schedule, cfg.precision) fed by the loader, against the same step fed the same number of
  batches already in memory. ``loading_slowdown`` = fed-by-loader seconds / in-memory seconds - 1
  is what data loading costs a real run (0: the loader keeps up; its workers share the CPU
  with the step, which the loader-alone figure does not show).
"""
from __future__ import annotations

import time
from typing import Dict

import torch
from torch import nn

from .measure import log, synchronize, warm_up
from .training import TRAIN_WARMUP_MAX, step_options
from .workload import training_dataset, training_parts


class _Batches:
    """``count`` batches drawn from ``loader`` (restarting it when a small dataset runs out), with a length
    (``train_one_epoch`` reads ``len``)."""

    def __init__(self, loader, count: int):
        self.loader, self.count = loader, count
        self._iterator = None

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        produced = 0
        while produced < self.count:
            if self._iterator is None:
                self._iterator = iter(self.loader)
            try:
                item = next(self._iterator)
            except StopIteration:  # a small dataset: start another pass
                self._iterator = None
                continue
            produced += 1
            yield item


def run_data(cfg, args, model: nn.Module, device: torch.device) -> Dict:
    dataset = training_dataset(cfg)
    if dataset is None:
        return {"skipped": f"train_list {cfg.train_list} not found"}
    from util.engine import training

    workers, batch, count = int(cfg.workers), int(cfg.batch_size), int(args.data_batches)
    precision = cfg.get("precision") or "fp32"
    section = {"workers": workers, "batch": batch, "crop": [int(cfg.train_h), int(cfg.train_w)],
               "batches": count, "precision": precision}
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                                         drop_last=True, pin_memory=device.type == "cuda",  # as tool/train.py
                                         persistent_workers=workers > 0)
    log(f"data: DataLoader alone, {workers} worker(s), batch {batch}, {count} timed batches")
    batches = _Batches(loader, count + 1)
    iterator = iter(batches)
    next(iterator)  # the first batch includes the workers' start-up
    start = time.perf_counter()
    in_memory = list(iterator)
    seconds = time.perf_counter() - start
    section["samples_per_s"] = count * batch / seconds

    log(f"data: the training step ({precision}) fed by the loader and fed from memory, {count} batches each")
    _, train_model, criterion, optimizer, scheduler = training_parts(cfg, model, device, count)
    options = step_options(cfg, precision, device)

    def epoch(source):
        training.train_iterations(train_model, source, criterion, optimizer, scheduler, device, 0, **options)

    section["warmup_steps"] = warm_up(lambda: epoch(in_memory[:1]), device, max_calls=TRAIN_WARMUP_MAX)
    timings = {}
    for name, source in (("from_memory", in_memory), ("from_loader", _Batches(loader, count)),
                         ("from_memory_again", in_memory)):
        start = time.perf_counter()
        epoch(source)
        synchronize(device)
        timings[name] = time.perf_counter() - start
    memory_seconds = min(timings["from_memory"], timings["from_memory_again"])
    section.update(train_images_per_s_from_memory=count * batch / memory_seconds,
                   train_images_per_s_from_loader=count * batch / timings["from_loader"],
                   loading_slowdown=timings["from_loader"] / memory_seconds - 1.0)
    log(f"data: loader alone {section['samples_per_s']:.1f} samples/s; training step "
        f"{section['train_images_per_s_from_memory']:.2f} images/s from memory, "
        f"{section['train_images_per_s_from_loader']:.2f} fed by the loader")
    del loader
    return section
