"""The same sliding-window test through onnxruntime: the benchmark's model exported to ONNX at the
window size (util.evaluation.deploy, as tool/deployment/export.py writes it), timed on the same image in
fp32, right after the PyTorch fp32 test of the same run."""
from __future__ import annotations

import copy
import os
import tempfile
import time
from typing import Callable, Dict, Optional

import torch
from torch import nn

from .evaluation import predict_kwargs, time_prediction
from .measure import log
from .workload import eval_settings, synthetic_image


def run_onnxruntime(cfg, args, model: nn.Module, device: torch.device, section: Dict,
                    pytorch_fp32: Optional[torch.Tensor], limit_now: Callable[[str], float]) -> Dict:
    """The ``eval.onnxruntime_fp32`` record: s/image, utilisation, the ratio to PyTorch fp32 and the
    fraction of pixels predicted as PyTorch fp32 predicts them (or ``skipped`` without onnxruntime)."""
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return {"skipped": "onnxruntime/onnxscript not installed (pip install -r requirements-export.txt)"}
    from model import output_size
    from util.evaluation.deploy import export_metadata, export_model, load_exported_model
    from util.evaluation.inference import prepare_inference_model

    crop, _, _ = eval_settings(cfg, args)
    network = prepare_inference_model(copy.deepcopy(model).cpu(), torch.device("cpu"), channels_last=False)
    logits = output_size(*crop, int(cfg.get("zoom_factor", 8)))
    record: Dict = {"threads": torch.get_num_threads(), "runs_on": "cpu"}
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.onnx")
        log(f"onnxruntime: exporting the model to ONNX at {crop[0]}x{crop[1]} (minutes for a large model)")
        start = time.perf_counter()
        export_model(network, "onnx", path, crop, export_metadata(cfg, crop, logits, "onnx"),
                     batch_sizes=(1,))
        record["export_seconds"] = time.perf_counter() - start
        exported = load_exported_model(path, threads=torch.get_num_threads())
        log(f"eval onnxruntime fp32: {section['crops_per_image']} crops per image, {args.eval_iters} timed run(s)")
        timing, prediction = time_prediction(exported, synthetic_image(*args.image_size),
                                             predict_kwargs(cfg, args, None), args, device,
                                             section["gflop_per_image"], limit_now("fp32"))
        del exported
    record.update(timing)
    if "fp32" in section:
        record["pytorch_fp32_over_onnxruntime"] = \
            section["fp32"]["seconds_per_image"] / record["seconds_per_image"]
    if pytorch_fp32 is not None:
        record["equal_pytorch_fp32_fraction"] = (prediction == pytorch_fp32).double().mean().item()
    log(f"eval onnxruntime fp32: {record['seconds_per_image']:.2f} s/image")
    return record
