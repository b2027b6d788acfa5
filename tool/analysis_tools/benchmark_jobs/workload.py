"""What the jobs time: the weights, the evaluation model as tool/test.py runs it, a synthetic image,
the test settings, and the training parts built by the same builders tool/train.py calls."""
from __future__ import annotations

import copy
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def size_pair(value: Optional[Sequence[int]], default: Tuple[int, int]) -> Tuple[int, int]:
    """(h, w) from one or two ints of an option, else ``default``."""
    if value is None:
        return int(default[0]), int(default[1])
    return (int(value[0]), int(value[0])) if len(value) == 1 else (int(value[0]), int(value[1]))


def eval_settings(cfg, args) -> Tuple[Tuple[int, int], List[float], Optional[int]]:
    """(crop, scales, base_size) of the timed test: the options, else the config's TEST keys."""
    crop = size_pair(args.crop, (cfg.test_h, cfg.test_w))
    scales = [float(s) for s in (args.scales or cfg.scales)]
    base_size = cfg.base_size if args.base_size is None else args.base_size
    return crop, scales, base_size


def load_weights_or_warn(cfg, model: nn.Module, warnings: List[str]) -> Optional[str]:
    """Load ``cfg.model_path`` when it exists; otherwise keep random weights and add a warning."""
    from util.runtime.checkpoint_io import load_model_weights

    path = cfg.get("model_path")
    if path and os.path.isfile(path):
        load_model_weights(model, path)
        return str(path)
    reason = "no model_path given" if not path else f"model_path {path} not found"
    warnings.append(f"{reason}: random weights (timings are valid; the bf16-vs-fp32 agreement of a random "
                    f"network is not representative of a trained one)")
    return None


def prepare_eval_model(model: nn.Module, cfg, device: torch.device) -> nn.Module:
    """As ``util.evaluation.inference.load_inference_model`` (tool/test.py's model): a copy on ``device``, eval
    mode, BatchNorm folded, channels_last and ``compile`` per cfg."""
    from util.evaluation.inference import prepare_inference_model

    return prepare_inference_model(copy.deepcopy(model), device, channels_last=bool(cfg.get("channels_last")),
                                   compile=bool(cfg.get("compile")))


def synthetic_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB float image in 0..255 (blobs, not white noise, so it looks like a scene)."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((3, max(2, height // 32), max(2, width // 32))).astype(np.float32)
    image = F.interpolate(torch.from_numpy(coarse)[None], size=(height, width), mode="bilinear",
                          align_corners=False)[0]
    image = image * 200 + torch.from_numpy(rng.random((3, height, width)).astype(np.float32)) * 55
    return image.permute(1, 2, 0).contiguous().numpy()


def training_parts(cfg, model: nn.Module, device: torch.device, iters_per_epoch: int):
    """(model, train_model, criterion, optimizer, scheduler) for timing: a train-mode copy of ``model``
    on ``device`` (channels_last per cfg; ``train_model`` is it under torch.compile when cfg.compile),
    with the loss, optimiser and schedule of ``cfg`` from the builders tool/train.py uses."""
    from util.engine.losses import build_criterion
    from util.engine.optim import build_optimizer, build_scheduler

    model = copy.deepcopy(model).to(device)
    memory_format = torch.channels_last if cfg.get("channels_last") else torch.contiguous_format
    model = model.to(memory_format=memory_format).train()
    optimizer = build_optimizer(model, cfg.base_lr, cfg.momentum, cfg.weight_decay)
    scheduler = build_scheduler(optimizer, cfg, max(iters_per_epoch, 1))
    criterion = build_criterion(cfg)
    train_model = torch.compile(model) if cfg.get("compile") else model
    return model, train_model, criterion, optimizer, scheduler


def training_dataset(cfg):
    """The training dataset of ``cfg`` with its augmentation (seed ``manual_seed``), as tool/train.py
    reads it; None when ``train_list`` does not exist."""
    from util.data.dataset import SegDataset
    from util.data.transforms import build_train_transform

    if not cfg.train_list or not os.path.isfile(cfg.train_list):
        return None
    return SegDataset("train", cfg.data_root, cfg.train_list, transform=build_train_transform(cfg),
                      seed=int(cfg.manual_seed or 0), num_classes=cfg.classes, ignore_label=cfg.ignore_label)
