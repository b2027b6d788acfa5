"""Peak memory of a six-scale test of a large image, in its own process (so the peak is that job's alone)."""
from __future__ import annotations

import time
from typing import Dict

import torch

from .evaluation import eval_crop_count
from .measure import GIB, log, peak_rss_gib, run_child, synchronize
from .workload import eval_settings, prepare_eval_model, synthetic_image

MEMORY_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
LIMIT_GIB = 8.0


def memory_job(cfg, args, device: torch.device) -> Dict:
    """The child's job: the test of a ``--memory-image-size`` image at the six MEMORY_SCALES."""
    from model import build_model
    from util.data.transforms import MEAN, STD
    from util.engine.precision import autocast_dtype_for
    from util.evaluation.inference import predict_multiscale

    cfg.classes = int(args.memory_classes)
    precision = args.memory_precision or cfg.precision
    crop, _, base_size = eval_settings(cfg, args)  # at the six MEMORY_SCALES, not the config's
    model = prepare_eval_model(build_model(cfg), cfg, device)
    image = synthetic_image(*args.memory_image_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    prediction = predict_multiscale(model, image, int(cfg.classes), crop, MEMORY_SCALES, base_size, MEAN, STD,
                                    batch_size=int(args.window_batch or cfg.test_batch_size),
                                    autocast_dtype=autocast_dtype_for(precision))
    synchronize(device)
    seconds = time.perf_counter() - start
    out = {"image_size": list(args.memory_image_size), "scales": list(MEMORY_SCALES), "classes": int(cfg.classes),
           "crop": list(crop), "base_size": base_size, "precision": precision, "seconds": seconds,
           "prediction_shape": list(prediction.shape), "peak_rss_gib": peak_rss_gib(),
           "crops": eval_crop_count(tuple(args.memory_image_size), crop, MEMORY_SCALES, base_size)}
    if device.type == "cuda":
        out["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    return out


def run_memory_check(script: str, args, overrides, device: torch.device) -> Dict:
    log(f"memory check: six-scale test of a {args.memory_image_size[1]}x{args.memory_image_size[0]} image "
        f"in a separate process")
    check = run_child(script, args, overrides, device, ["--memory-job"])
    if "error" not in check:
        check["limit_gib"] = LIMIT_GIB
        check["under_limit"] = (check["peak_rss_gib"] < LIMIT_GIB
                                and check.get("cuda_max_allocated_gib", 0.0) < LIMIT_GIB)
    return check
