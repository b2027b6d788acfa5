"""How close do training and evaluation run to this machine's arithmetic limit? One JSON object, one run.

    python tool/analysis_tools/benchmark.py --config CFG [options] [KEY VALUE ...]

Everything is measured in the same process on the current machine, so the ratios are meaningful even
when the absolute numbers are not comparable between machines (the jobs: benchmark_jobs/):

* ``peak``: the machine's arithmetic limit in float32 and bfloat16 (and float16 on CUDA): the fastest
  of the kernels probed in that dtype (a 4096^3 matmul, a 1x1 convolution of 4096 channels and a 3x3
  convolution of 512 channels on a 64x64 map, channels_last; ``kernel`` names the one that set it).
* ``eval``: the test path of ``tool/test.py`` (``util.evaluation.inference.load_inference_model``'s model:
  BatchNorm folded, channels_last, ``torch.compile`` with freezing when ``compile True``;
  ``predict_multiscale`` with the config's window batch) on one ``--image-size`` image: seconds per
  image and ``utilisation`` = model GFLOP done / seconds / peak GFLOP/s of the same dtype,
  measured again just before that job (``peak_gflops_before``; a shared host's speed drifts).
  ``--onnxruntime`` also exports the model to ONNX and times the same test through onnxruntime in
  fp32 (``onnxruntime_fp32``, with its ratio to PyTorch fp32 and the pixels both predict alike).
  ``--compare-naive`` also times the release's loop (tests/release_reference.py: one window and its
  flip per forward, float32, NCHW, BatchNorm as is, float64 accumulation on the host, glibc's default
  allocator, a separate process) and reports the speed-up and the fraction of pixels whose fast
  float32 prediction equals it.
* ``train``: ``util.engine.training.train_iterations`` (the loop of tool/train.py with the config's loss,
  optimiser and schedule, channels_last, autocast) on random crops: images/s and utilisation.
* ``data``: samples/s of the training DataLoader (cfg.workers, cfg.batch_size, real files of
  cfg.train_list with the training augmentation), and the training step fed by it against the same
  step fed from memory (what loading costs a real run).
* ``memory_check`` (``--memory-check``): peak resident memory of a separate process that runs the
  multi-scale test of a 2048x1536 image at the six scales (150 classes by default).

Every timed job is first warmed up until one untimed call is in steady state (fewer than 1024
minor page faults, at most 4 calls): what a long run spends per step, not the first steps' heap
growth. Like tool/train.py and tool/test.py, the run first applies
``util.runtime.perf.keep_freed_memory_for_reuse`` (``--default-malloc`` skips it). Progress goes to
stderr, the JSON alone to stdout (and to ``--output``; ``--markdown`` writes a table of the main
numbers). The bf16-against-fp32 accuracy checks are tool/analysis_tools/check_bf16.py. The tables of
docs/performance.md:

    python tool/analysis_tools/benchmark.py --config config/ade20k/ade20k_pyconvresnet50_pyconvsegnet.yaml \\
        --compare-naive --onnxruntime --memory-check --eval-iters 3 --train-iters 4 --markdown perf_ade20k.md
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from tool.analysis_tools.benchmark_jobs import command  # noqa: E402
from tool.analysis_tools.benchmark_jobs.measure import GIB, log, peak_rate, peak_rss_gib  # noqa: E402
from tool.analysis_tools.benchmark_jobs.report import benchmark_table  # noqa: E402
from util.engine.precision import PRECISIONS  # noqa: E402
from util.errors import ConfigError  # noqa: E402
from util.runtime.cli import run_cli  # noqa: E402

SCRIPT = str(Path(__file__).resolve())


def parse_args(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    command.add_common_options(parser)
    parser.add_argument("--precisions", nargs="+", default=None, choices=PRECISIONS,
                        help="precisions to time (default: fp32 bf16, plus fp16 on CUDA)")
    parser.add_argument("--image-size", nargs=2, type=int, default=(384, 512), metavar=("H", "W"),
                        help="size of the evaluation image (default 384 512)")
    parser.add_argument("--crop", nargs="+", type=int, default=None, metavar="N",
                        help="test window size, one or two ints (default: cfg.test_h cfg.test_w)")
    parser.add_argument("--base-size", type=int, default=None,
                        help="long side at scale 1.0 (default: cfg.base_size; 0 = the image's own size)")
    parser.add_argument("--scales", nargs="+", type=float, default=None, help="test scales (default: cfg.scales)")
    parser.add_argument("--window-batch", type=int, default=None,
                        help="windows per forward of the fast path (default: cfg.test_batch_size)")
    parser.add_argument("--eval-iters", type=int, default=2, help="timed evaluations per precision (default 2)")
    parser.add_argument("--train-crop", nargs="+", type=int, default=None, metavar="N",
                        help="training crop, one or two ints (default: cfg.train_h cfg.train_w)")
    parser.add_argument("--train-batch", type=int, default=2, help="training batch size (default 2)")
    parser.add_argument("--train-iters", type=int, default=3, help="timed training steps per precision (default 3)")
    parser.add_argument("--data-batches", type=int, default=8,
                        help="timed DataLoader batches, alone and through the training step (default 8)")
    parser.add_argument("--matmul-size", type=int, default=4096,
                        help="size N of the peak probes: N^3 matmul, 1x1 conv of N and 3x3 conv of N/8 channels "
                             "on a 64x64 map (default 4096)")
    parser.add_argument("--matmul-repeats", type=int, default=3, help="timed calls per probe and dtype (default 3)")
    parser.add_argument("--skip-eval", action="store_true", help="no sliding-window timing")
    parser.add_argument("--skip-train", action="store_true", help="no training timing")
    parser.add_argument("--skip-data", action="store_true", help="no data-loading timing")
    parser.add_argument("--onnxruntime", action="store_true",
                        help="also time the fp32 sliding-window test through onnxruntime "
                             "(needs requirements-export.txt)")
    parser.add_argument("--compare-naive", action="store_true",
                        help="also time the release's one-window-at-a-time float32 NCHW loop")
    parser.add_argument("--memory-check", action="store_true",
                        help="peak memory of a six-scale test of a --memory-image-size image (separate process)")
    parser.add_argument("--memory-image-size", nargs=2, type=int, default=(1536, 2048), metavar=("H", "W"))
    parser.add_argument("--memory-classes", type=int, default=150,
                        help="classes of the memory-check model (default 150, ADE20K: the largest output)")
    parser.add_argument("--memory-precision", default=None, choices=PRECISIONS,
                        help="precision of the memory check (default: cfg.precision)")
    parser.add_argument("--memory-job", action="store_true", help=argparse.SUPPRESS)  # the --memory-check child
    parser.add_argument("--naive-job", default=None, help=argparse.SUPPRESS)  # the --compare-naive child
    args, overrides = command.split_overrides(parser, argv)
    for name in ("eval_iters", "train_batch", "train_iters", "data_batches", "matmul_size", "matmul_repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("crop", "train_crop"):
        value = getattr(args, name)
        if value is not None and len(value) not in (1, 2):
            parser.error(f"--{name.replace('_', '-')} takes one or two integers")
    return args, overrides


def run(argv: Optional[Sequence[str]] = None) -> Dict:
    from tool.analysis_tools.benchmark_jobs import data, evaluation, exported, memory, release_loop, training

    args, overrides = parse_args(argv)
    cfg, device, malloc_tuned = command.start(args, overrides)
    if args.memory_job:
        return memory.memory_job(cfg, args, device)
    if args.naive_job:
        return release_loop.naive_job(cfg, args, device)

    precisions = list(args.precisions or (["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])))
    if device.type == "cpu" and "fp16" in precisions:
        raise ConfigError("fp16 autocast is CUDA-only here; use --precisions fp32 bf16 on the CPU")
    started = time.perf_counter()
    result = command.describe(cfg, args, overrides, device, malloc_tuned)
    log(f"peak probes (matmul and convolutions, size {args.matmul_size}) in {', '.join(precisions)}")
    result["peak"] = {p: peak_rate(p, device, args.matmul_size, args.matmul_repeats) for p in precisions}
    for p, peak in result["peak"].items():
        log(f"peak {p}: {peak['gflops']:.1f} GFLOP/s, set by {peak['kernel']} ("
            + ", ".join(f"{name} {rate:.1f}" for name, rate in peak["probes"].items()) + ")")

    def limit_now(precision: str) -> float:
        """The peak rate measured again just before a timed job: on a shared host the machine's
        speed drifts over minutes, and a ratio is only fair between numbers measured side by side."""
        peak = peak_rate(precision, device, args.matmul_size, args.matmul_repeats)
        log(f"peak {precision} just before the job: {peak['gflops']:.1f} GFLOP/s, set by {peak['kernel']}")
        return peak["gflops"]

    model = command.benchmark_model(cfg, result)
    if not args.skip_eval:
        section, predictions = evaluation.run_eval(cfg, args, model, device, precisions, limit_now)
        if args.onnxruntime:
            section["onnxruntime_fp32"] = exported.run_onnxruntime(cfg, args, model, device, section,
                                                                   predictions.get("fp32"), limit_now)
        if args.compare_naive:
            section["naive_fp32"] = release_loop.run_release_loop(SCRIPT, args, overrides, device, section,
                                                                  predictions, limit_now, precisions)
        result["eval"] = section
    if not args.skip_train:
        result["train"] = training.run_train(cfg, args, model, device, precisions, limit_now)
    if not args.skip_data:
        result["data"] = data.run_data(cfg, args, model, device)
    if args.memory_check:
        result["memory_check"] = memory.run_memory_check(SCRIPT, args, overrides, device)
    result["peak_memory"] = {"rss_gib": peak_rss_gib()}
    if device.type == "cuda":
        result["peak_memory"]["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    result["seconds_total"] = time.perf_counter() - started
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    result = run(argv)
    args, _ = parse_args(argv)
    command.write_outputs(result, args, benchmark_table)  # (a child job has no --output / --markdown)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
