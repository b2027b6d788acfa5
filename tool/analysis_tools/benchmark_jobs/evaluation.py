"""The sliding-window test of tool/test.py (``util.evaluation.inference.predict_multiscale`` on the model
``util.evaluation.inference.load_inference_model`` builds) on one synthetic image: s/image and utilisation
per precision."""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from .flops import forward_gflop
from .measure import log, time_calls, utilisation
from .workload import eval_settings, prepare_eval_model, synthetic_image


def eval_crop_count(image_size: Tuple[int, int], crop: Tuple[int, int], scales: Sequence[float],
                    base_size: Optional[int], flip: bool = True) -> int:
    """Model inputs (windows x flips over all scales) of one sliding-window test of one image."""
    from util.evaluation.inference import scaled_size, window_starts, window_stride

    total = 0
    for scale in scales:
        h, w = scaled_size(image_size[0], image_size[1], float(scale), base_size)
        h, w = max(h, crop[0]), max(w, crop[1])
        total += len(window_starts(h, crop[0], window_stride(crop[0]))) * \
            len(window_starts(w, crop[1], window_stride(crop[1])))
    return total * (2 if flip else 1)


def predict_kwargs(cfg, args, precision: Optional[str]) -> Dict:
    """Keyword arguments of ``predict_multiscale`` for the timed test in ``precision``."""
    from util.data.transforms import MEAN, STD
    from util.engine.precision import autocast_dtype_for

    crop, scales, base_size = eval_settings(cfg, args)
    return dict(num_classes=int(cfg.classes), crop_size=crop, scales=scales, base_size=base_size,
                mean=list(MEAN), std=list(STD), batch_size=int(args.window_batch or cfg.test_batch_size),
                autocast_dtype=autocast_dtype_for(precision))


def time_prediction(model: nn.Module, image, kwargs: Dict, args, device: torch.device, gflop: float,
                    limit: Optional[float]) -> Tuple[Dict, torch.Tensor]:
    """Time ``predict_multiscale(model, image, **kwargs)``; (timing record, the prediction on the CPU)."""
    from util.evaluation.inference import predict_multiscale

    holder = {}

    def once():
        holder["pred"] = predict_multiscale(model, image, **kwargs)

    timing = time_calls(once, args.eval_iters, device)
    record = {"seconds_per_image": timing["best_s"], "seconds_median": timing["median_s"],
              "warmup_calls": timing["warmup_calls"], "gflops": gflop / timing["best_s"],
              "peak_gflops_before": limit, "utilisation": utilisation(gflop, timing["best_s"], limit)}
    return record, holder["pred"].cpu()


def run_eval(cfg, args, model: nn.Module, device: torch.device, precisions: Sequence[str],
             limit_now: Callable[[str], float]) -> Tuple[Dict, Dict[str, torch.Tensor]]:
    """The ``eval`` section and the predictions per precision (for the jobs that compare with them)."""
    crop, scales, base_size = eval_settings(cfg, args)
    image_size = tuple(args.image_size)
    crops = eval_crop_count(image_size, crop, scales, base_size)
    crop_gflop = forward_gflop(cfg, *crop)
    gflop = crops * crop_gflop
    kwargs = predict_kwargs(cfg, args, None)
    section = {"image_size": list(image_size), "crop": list(crop), "scales": scales, "base_size": base_size,
               "flip": True, "window_batch": kwargs["batch_size"], "channels_last": bool(cfg.get("channels_last")),
               "compile": bool(cfg.get("compile")), "crops_per_image": crops, "gflop_per_crop": crop_gflop,
               "gflop_per_image": gflop}
    compiled = " (torch.compile with freezing)" if cfg.get("compile") else ""
    log("eval: preparing the model as tool/test.py does" + compiled)
    eval_model = prepare_eval_model(model, cfg, device)
    image = synthetic_image(*image_size)
    predictions = {}
    for precision in precisions:
        log(f"eval {precision}: {crops} crops of {crop[0]}x{crop[1]} per image, {args.eval_iters} timed run(s)")
        record, predictions[precision] = time_prediction(eval_model, image, predict_kwargs(cfg, args, precision),
                                                         args, device, gflop, limit_now(precision))
        section[precision] = record
        log(f"eval {precision}: {record['seconds_per_image']:.2f} s/image, {record['gflops']:.1f} GFLOP/s, "
            f"utilisation {record['utilisation']:.2f}")
    if "fp32" in predictions and "bf16" in predictions:
        section["bf16_equal_fp32_fraction_synthetic"] = \
            (predictions["fp32"] == predictions["bf16"]).double().mean().item()
    return section, predictions
