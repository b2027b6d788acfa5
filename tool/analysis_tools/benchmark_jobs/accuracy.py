"""Accuracy checks of bf16 against fp32 (tool/analysis_tools/check_bf16.py): the prediction on real
images, and the training loss over real steps beside the run-to-run noise."""
from __future__ import annotations

import os
import statistics
from typing import Dict

import torch
from torch import nn

from .measure import log
from .training import step_options
from .workload import prepare_eval_model, training_dataset, training_parts


def run_agreement(cfg, images: int, model: nn.Module, device: torch.device) -> Dict:
    """Fraction of pixels where bf16 and fp32 predictions agree (test settings of the config), on
    ``images`` real images spread over cfg.val_list (else test_list)."""
    from util.data.dataset import evenly_spaced_subset, load_image, read_list
    from util.engine.precision import autocast_dtype_for
    from util.evaluation.inference import inference_kwargs, predict_multiscale

    list_path = cfg.val_list or cfg.test_list
    if not list_path or not os.path.isfile(list_path):
        return {"skipped": f"no image list (val_list/test_list {list_path} not found)"}
    entries = read_list(list_path, cfg.data_root, "val")
    picks = evenly_spaced_subset(len(entries), images)  # the subset val_max_images validates on
    eval_model = prepare_eval_model(model, cfg, device)
    kwargs = inference_kwargs(cfg)
    equal, total, per_image = 0, 0, []
    log(f"agreement: bf16 vs fp32 on {len(picks)} image(s) of {list_path}")
    for index in picks:
        image = load_image(entries[index][0])
        preds = {}
        for precision in ("fp32", "bf16"):
            kwargs["autocast_dtype"] = autocast_dtype_for(precision)
            preds[precision] = predict_multiscale(eval_model, image, **kwargs)
        same = (preds["fp32"] == preds["bf16"]).sum().item()
        equal += same
        total += preds["fp32"].numel()
        per_image.append(same / preds["fp32"].numel())
    return {"bf16_equal_fp32_fraction": equal / max(total, 1), "per_image": per_image, "images": len(picks),
            "list": str(list_path), "crop": list(kwargs["crop_size"]), "scales": kwargs["scales"],
            "base_size": kwargs["base_size"]}


def run_loss_curve(cfg, steps: int, device: torch.device) -> Dict:
    """``steps`` training steps on real data from the config's initial weights (ImageNet backbone
    when ``pretrained`` is set, else random with seed ``manual_seed``), the same batches in three
    runs: fp32, bf16, and fp32 again with other dropout masks. The last one measures the run-to-run
    noise that the bf16-vs-fp32 difference is to be judged against."""
    from model import build_model
    from util.engine import training
    from util.runtime.checkpoint_io import load_pretrained_backbone

    dataset = training_dataset(cfg)
    if dataset is None:
        return {"skipped": f"train_list {cfg.train_list} not found"}
    seed = int(cfg.manual_seed or 0)
    batch = int(cfg.batch_size)
    batches = []
    for step in range(steps):
        samples = [dataset[(step * batch + i) % len(dataset)] for i in range(batch)]
        batches.append((torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])))
    torch.manual_seed(seed)
    start = build_model(cfg)
    if cfg.pretrained:
        load_pretrained_backbone(start, cfg.pretrained)
    curves = {}
    for run_name, precision, dropout_seed in (("fp32", "fp32", 0), ("bf16", "bf16", 0),
                                              ("fp32_other_dropout", "fp32", 1)):
        log(f"loss curve {run_name}: {steps} steps of batch {batch}")
        torch.manual_seed(dropout_seed)
        _, train_model, criterion, optimizer, scheduler = training_parts(cfg, start, device, steps)
        options = step_options(cfg, precision, device)
        losses = []
        for index, item in enumerate(batches):
            stats = training.train_iterations(train_model, [item], criterion, optimizer, scheduler, device, index,
                                           **options)
            losses.append(stats["loss"])
        curves[run_name] = losses

    def mean_abs_diff(a, b):
        return statistics.fmean(abs(x - y) for x, y in zip(a, b))

    return {
        "steps": steps, "batch": batch, "crop": [cfg.train_h, cfg.train_w], **curves,
        "bf16_vs_fp32_mean_abs_diff": mean_abs_diff(curves["bf16"], curves["fp32"]),
        "noise_mean_abs_diff": mean_abs_diff(curves["fp32_other_dropout"], curves["fp32"]),
        "bf16_vs_fp32_last_diff": curves["bf16"][-1] - curves["fp32"][-1],
        "noise_last_diff": curves["fp32_other_dropout"][-1] - curves["fp32"][-1],
    }
