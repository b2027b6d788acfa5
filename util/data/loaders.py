"""The data loaders of a training run: the training set with its sampler (an order that depends only on
the seed and the epoch, which exact resume needs) and what validation reads."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
from torch.utils.data import DataLoader

from util.data.dataset import SegDataset, evenly_spaced_subset
from util.data.transforms import build_train_transform, build_val_transform
from util.errors import ConfigError
from util.runtime import distributed
from util.runtime.cli import ignore_stop_signals


@dataclass
class TrainingData:
    """The run's data: the training set, its sampler and loader, and what validation reads
    (a crop loader for ``val_mode crop``, the list entries for ``val_mode whole``)."""

    train_set: Any
    train_sampler: Any
    train_loader: Any
    batch_size: int  # per process per step
    val_loader: Any = None
    val_entries: Optional[List[Any]] = None
    val_list_length: int = 0  # images in val_list (validation reads val_max_images of them at most)

    def val_image_count(self) -> int:
        """How many images each validation reads (all of val_list, or the evenly spaced subset)."""
        if self.val_entries is not None:
            return len(self.val_entries)
        return len(self.val_loader.dataset) if self.val_loader is not None else 0


def build_loaders(cfg, ctx, seed: int) -> TrainingData:
    """The run's loaders; ConfigError when ``batch_size`` cannot be split over the processes or the
    training list holds fewer images than one batch."""
    # The workers' only set-up is ignoring stop signals (below): augmentation is seeded per sample
    # (SegDataset), and a cv2.setNumThreads() in a forked worker deadlocks once this process has used
    # OpenCV's thread pool (e.g. an earlier run).
    world = ctx.world_size
    batch_size = cfg.batch_size // world  # batch_size is the total over all processes of all nodes
    if batch_size < 1:
        raise ConfigError(f"batch_size {cfg.batch_size} is the total over {world} processes: it must be >= {world}")
    sync_bn_spans_processes = bool(cfg.sync_bn) and ctx.distributed and ctx.device.type == "cuda"
    if batch_size == 1 and not sync_bn_spans_processes:
        raise ConfigError(
            f"batch_size {cfg.batch_size} over {world} process(es) is 1 image per process: BatchNorm in training "
            f"mode would normalise each image on its own (PSPNet's 1x1 pooling branch cannot run at all). "
            f"batch_size is the total over all processes: use batch_size {2 * world} or more"
            + (", or sync_bn True on CUDA" if world > 1 else ""))
    workers = math.ceil(cfg.workers / world)
    pin = ctx.device.type == "cuda"

    train_set = SegDataset("train", cfg.data_root, cfg.train_list, transform=build_train_transform(cfg), seed=seed,
                           num_classes=cfg.classes, ignore_label=cfg.ignore_label)
    # shuffle=True even for one process: the order then depends only on (seed, epoch), which resume needs.
    train_sampler = distributed.TrainSampler(train_set, num_replicas=world, rank=ctx.rank, shuffle=True, seed=seed)
    # worker_init_fn: a cluster's stop signal reaches the workers too; they must outlive the iteration.
    # generator: the loader's base seed is not drawn from the global stream, which then holds only
    # the model's randomness (dropout) and resumes mid-epoch from a saved state.
    train_loader = DataLoader(train_set, batch_size=batch_size, sampler=train_sampler, num_workers=workers,
                              pin_memory=pin, drop_last=True, worker_init_fn=ignore_stop_signals,
                              generator=torch.Generator().manual_seed(seed),
                              persistent_workers=False)  # workers must see set_epoch() each epoch
    if len(train_loader) == 0:
        raise ConfigError(f"train_list {cfg.train_list} has {len(train_set)} images: fewer than one batch "
                          f"({batch_size} per process x {world} processes); lower batch_size")
    data = TrainingData(train_set, train_sampler, train_loader, batch_size)
    if not cfg.evaluate:
        return data

    if cfg.val_mode == "whole":
        # Validation reads the whole images itself (as tool/test.py); the dataset only checks the list.
        val_set = SegDataset("val", cfg.data_root, cfg.val_list, num_classes=cfg.classes,
                             ignore_label=cfg.ignore_label)
        entries = val_set.entries
        data.val_list_length = len(entries)
        data.val_entries = [entries[i] for i in evenly_spaced_subset(len(entries), cfg.val_max_images)]
    else:
        val_set = SegDataset("val", cfg.data_root, cfg.val_list, transform=build_val_transform(cfg),
                             num_classes=cfg.classes, ignore_label=cfg.ignore_label)
        data.val_list_length = len(val_set)
        if cfg.val_max_images:
            val_set = torch.utils.data.Subset(val_set, evenly_spaced_subset(len(val_set), cfg.val_max_images))
        val_sampler = distributed.ShardSampler(len(val_set), num_replicas=world, rank=ctx.rank)
        data.val_loader = DataLoader(val_set, batch_size=max(1, cfg.batch_size_val // world), sampler=val_sampler,
                                     num_workers=workers, pin_memory=pin, drop_last=False)
    return data
