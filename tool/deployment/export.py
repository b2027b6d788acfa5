"""Export a trained model to ONNX or TorchScript, for use outside this repository.

    python tool/deployment/export.py --config CFG model_path CKPT --format onnx --output model.onnx
    python tool/deployment/export.py --config CFG model_path CKPT --format torchscript --output model.torchscript

The file holds the eval-mode network with BatchNorm folded into the convolutions: normalised
float32 ``N x 3 x test_h x test_w`` images in, logits out, any batch size N, only that height and
width (the window the sliding-window test feeds; other sizes are refused). ONNX goes through
``torch.onnx.export(..., dynamo=True)`` at a fixed opset. Its metadata names the classes, the
mean/std and the input size (see util/evaluation/deploy.py). Before the file is written, it is run
(onnxruntime / ``torch.jit.load``) beside the PyTorch model on batches of ``--check-batches``
sizes; the max relative logit difference and the argmax agreement are printed, and nothing is
written when they disagree beyond float tolerance.

``tool/test.py`` and ``tool/demo.py`` take the written file as ``model_path``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from util.config import load_cfg  # noqa: E402
from util.errors import ConfigError  # noqa: E402
from util.evaluation.deploy import FORMAT_SUFFIXES, describe_check, export_metadata, export_model  # noqa: E402
from util.runtime.cli import exit_with  # noqa: E402


def parse_args(argv: Optional[Sequence[str]]):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (KEY VALUE overrides may follow, e.g. model_path)")
    parser.add_argument("--format", required=True, choices=sorted(FORMAT_SUFFIXES), help="file format")
    parser.add_argument("--output", required=True,
                        help="file to write; its extension is the format's (" +
                             ", ".join(f"{s} for {f}" for f, s in FORMAT_SUFFIXES.items()) + ")")
    parser.add_argument("--check-batches", nargs="+", type=int, default=[1, 2, 3], metavar="N",
                        help="batch sizes of the self-check (default 1 2 3)")
    args, overrides = parser.parse_known_args(list(argv) if argv is not None else None)
    unknown = [o for o in overrides if o.startswith("--")]
    if unknown:
        parser.error(f"unknown option(s) {unknown}; config overrides are given as KEY VALUE")
    suffix = FORMAT_SUFFIXES[args.format]
    if Path(args.output).suffix.lower() != suffix:
        parser.error(f"--output must end with {suffix} for --format {args.format} (the tools pick the runtime "
                     f"by the extension), got {args.output}")
    if any(n < 1 for n in args.check_batches):
        parser.error("--check-batches must be >= 1")
    return args, overrides


def main(argv: Optional[Sequence[str]] = None) -> int:
    from model import build_model, output_size
    from util.evaluation.inference import prepare_inference_model
    from util.runtime.checkpoint_io import load_model_weights

    args, overrides = parse_args(argv)
    cfg = load_cfg(args.config, overrides)
    if not cfg.model_path:
        raise ConfigError("model_path must be set to the checkpoint to export (KEY VALUE: model_path CKPT)")
    input_size = (int(cfg.test_h), int(cfg.test_w))
    try:
        logits_size = output_size(*input_size, int(cfg.get("zoom_factor", 8)))
    except ValueError as error:
        raise ConfigError(f"test_h x test_w: {error}") from None
    device = torch.device("cpu")  # export on the CPU; the file runs anywhere
    reference = build_model(cfg)
    load_model_weights(reference, cfg.model_path)
    reference.eval()
    network = prepare_inference_model(reference, device, channels_last=False)  # a BatchNorm-folded copy
    metadata = export_metadata(cfg, input_size, logits_size, args.format, source=cfg.model_path)
    print(f"=> exporting {cfg.arch}/{cfg.backbone_net}{cfg.layers} ({cfg.classes} classes) from {cfg.model_path} "
          f"to {args.format} at {input_size[0]}x{input_size[1]} (a minute or more for ONNX)", flush=True)
    start = time.perf_counter()
    checks = export_model(network, args.format, args.output, input_size, metadata, reference=reference,
                          batch_sizes=args.check_batches)
    print("=> self-check against PyTorch (BatchNorm not folded):")
    for check in checks:
        print(f"   {describe_check(check)}")
    size_mb = os.path.getsize(args.output) / 1e6
    print(f"=> wrote {args.output} ({size_mb:.1f} MB, {time.perf_counter() - start:.0f} s): input "
          f"N x 3 x {input_size[0]} x {input_size[1]}, logits N x {cfg.classes} x {logits_size[0]} x {logits_size[1]}"
          + (f", opset {metadata['opset']}" if "opset" in metadata else ""))
    return 0


if __name__ == "__main__":
    exit_with(main)
