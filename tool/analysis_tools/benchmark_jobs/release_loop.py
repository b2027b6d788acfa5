"""The release-style loop (tests/release_reference.py: one window and its flip per forward, float32
NCHW, BatchNorm as is, float64 accumulation on the host, cv2 resizing) on the benchmark image, in
a fresh process with glibc's default allocator, as the release ran: the baseline of the speed-up."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import torch

from .measure import log, run_child, time_calls, utilisation
from .workload import eval_settings, load_weights_or_warn, synthetic_image

TESTS_DIR = Path(__file__).resolve().parents[3] / "tests"


def release_predict_fn():
    """tests/release_reference.py's ``release_predict`` (the reference lives with the tests)."""
    if str(TESTS_DIR) not in sys.path:
        sys.path.insert(0, str(TESTS_DIR))
    from release_reference import release_predict

    return release_predict


def naive_job(cfg, args, device: torch.device) -> Dict:
    """The child's job: time the release loop with the benchmark's weights (same seed or model_path);
    the argmax prediction goes to ``args.naive_job`` (.npy)."""
    from model import build_model
    from util.data.transforms import MEAN, STD

    release_predict = release_predict_fn()
    crop, scales, base_size = eval_settings(cfg, args)
    torch.manual_seed(0)
    model = build_model(cfg)
    load_weights_or_warn(cfg, model, [])
    model = model.to(device).eval()
    image = synthetic_image(*args.image_size)
    holder = {}

    def once():
        holder["pred"] = release_predict(model, image, int(cfg.classes), crop[0], crop[1], scales,
                                         base_size or max(image.shape[:2]), MEAN, STD).argmax(2)

    timing = time_calls(once, args.eval_iters, device)
    np.save(args.naive_job, holder["pred"])
    return {"seconds_per_image": timing["best_s"], "seconds_median": timing["median_s"],
            "warmup_calls": timing["warmup_calls"], "allocator": "glibc default", "process": "separate"}


def run_release_loop(script: str, args, overrides, device: torch.device, section: Dict,
                     predictions: Dict[str, torch.Tensor], limit_now: Callable[[str], float],
                     precisions) -> Dict:
    """The ``eval.naive_fp32`` record: the release loop's s/image, the speed-ups over it and the
    fraction of pixels the fast fp32 path predicts as it does."""
    log("eval naive fp32 (one window + flip per forward, NCHW, float64 host accumulation) in a fresh process "
        "with glibc's default allocator, as the release ran")
    limit: Optional[float] = limit_now("fp32") if "fp32" in precisions else None
    with tempfile.TemporaryDirectory() as folder:
        prediction_path = os.path.join(folder, "naive.npy")
        naive = run_child(script, args, overrides, device, ["--naive-job", prediction_path, "--default-malloc"])
        if "error" in naive:
            return naive
        naive_prediction = torch.from_numpy(np.load(prediction_path))
    gflop = section["gflop_per_image"]
    naive.update(gflops=gflop / naive["seconds_per_image"], peak_gflops_before=limit,
                 utilisation=utilisation(gflop, naive["seconds_per_image"], limit))
    for precision in ("fp32", "bf16"):
        if precision in section:
            naive[f"speedup_{precision}"] = naive["seconds_per_image"] / section[precision]["seconds_per_image"]
    if "fp32" in predictions:
        naive["fp32_equal_naive_fraction"] = (predictions["fp32"] == naive_prediction).double().mean().item()
    log(f"eval naive: {naive['seconds_per_image']:.2f} s/image")
    return naive
