"""How close do training and evaluation run to this machine's arithmetic limit? One JSON object, one run.

    python tool/benchmark.py --config CFG [options] [KEY VALUE ...]

Everything is measured in the same process on the current machine, so the ratios are meaningful even
when the absolute numbers are not comparable between machines:

* ``matmul``: GFLOP/s of a 4096^3 matmul in float32 and bfloat16 (and float16 on CUDA): the limit.
* ``model``: forward GFLOP of one test crop and of one training step (counted once per shape on the
  ``meta`` device; 2 FLOP per multiply-add; the backward pass counted as grad-input + grad-weight of
  every convolution, because ``torch.utils.flop_counter`` over-counts grouped-convolution backward
  by the group count).
* ``eval``: the test path of ``tool/test.py`` (``util.inference.load_inference_model``'s model:
  BatchNorm folded, channels_last; ``predict_multiscale`` with the config's window batch) on one
  ``--image-size`` image: seconds per image and ``utilisation`` = model GFLOP done / seconds / matmul
  GFLOP/s of the same dtype, measured again just before that job (``matmul_gflops_before``; the
  machine's speed drifts on a shared host). ``--compare-naive`` also times the release's loop (one window and its
  flip per forward, float32, NCHW, BatchNorm as is, float64 accumulation on the host, glibc's default
  allocator) and reports the speed-up and the fraction of pixels whose fast float32 prediction equals
  the naive one.
* ``train``: ``util.engine.train_one_epoch`` (the training loop itself: fused SGD, poly lr, the
  loss of main + aux, channels_last, autocast) on random crops: images/s and utilisation.
* ``data``: samples/s of the training DataLoader (cfg.workers, cfg.batch_size, real files of
  cfg.train_list with the training augmentation) next to the training images/s.
* ``agreement``: fraction of pixels where the bf16 prediction equals the fp32 one on real images of
  cfg.val_list (test settings of the config), with the weights of ``model_path`` (random weights
  and a ``warnings`` entry when there is no checkpoint).
* ``memory_check`` (``--memory-check``): peak resident memory of a separate process that runs the
  multi-scale test of a 2048x1536 image at the six scales (150 classes by default).
* ``loss_curve`` (``--loss-curve N``): N training steps on real data from the same initial weights
  and batches in fp32 and in bf16, and once more in fp32 with other dropout masks (the noise).

Every timed job is first warmed up until one untimed call is in steady state (fewer than 1024
minor page faults, at most 4 calls; see ``warm_up``): what a long run spends per step, not the first steps'
heap growth. The JSON records how many warm-up calls each job took.

Like tool/train.py and tool/test.py, the run first applies ``util.perf.keep_freed_memory_for_reuse``
(``--default-malloc`` skips it). Progress goes to stderr, the JSON alone to stdout (and to ``--output``;
``--markdown`` writes a table of the main numbers). The README's performance table:

    python tool/benchmark.py --config config/ade20k/ade20k_pyconvresnet50_pyconvsegnet.yaml \
        --compare-naive --memory-check --eval-iters 3 --train-iters 4 --markdown perf_ade20k.md
    python tool/benchmark.py --config config/camvid/camvid_pyconvresnet50_pyconvsegnet.yaml \
        --skip-eval --skip-train --agree-images 16 --loss-curve 20 --markdown perf_camvid.md \
        model_path exp/camvid/pyconvresnet50_pyconvsegnet/model/best_mIoU.pth
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from util.config import ConfigError, load_cfg  # noqa: E402
from util.precision import autocast_dtype_for  # noqa: E402

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MEMORY_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
GIB = 1024 ** 3


_STARTED = time.perf_counter()


def log(message: str) -> None:
    print(f"[benchmark {time.perf_counter() - _STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, List[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", required=True, help="YAML config (KEY VALUE overrides follow the options)")
    parser.add_argument("--device", default=None, help="cpu / cuda / cuda:N (default: cfg.device, else auto)")
    parser.add_argument("--precisions", nargs="+", default=None, choices=sorted(PRECISION_DTYPES),
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
    parser.add_argument("--data-batches", type=int, default=8, help="timed DataLoader batches (default 8)")
    parser.add_argument("--agree-images", type=int, default=4,
                        help="real images for the bf16-vs-fp32 agreement (default 4; 0 skips)")
    parser.add_argument("--matmul-size", type=int, default=4096, help="matmul side (default 4096)")
    parser.add_argument("--matmul-repeats", type=int, default=3, help="timed matmuls per dtype (default 3)")
    parser.add_argument("--skip-eval", action="store_true", help="no sliding-window timing")
    parser.add_argument("--skip-train", action="store_true", help="no training timing")
    parser.add_argument("--skip-data", action="store_true", help="no DataLoader timing")
    parser.add_argument("--compare-naive", action="store_true",
                        help="also time the release's one-window-at-a-time float32 NCHW loop")
    parser.add_argument("--memory-check", action="store_true",
                        help="peak memory of a six-scale test of a --memory-image-size image (separate process)")
    parser.add_argument("--memory-image-size", nargs=2, type=int, default=(1536, 2048), metavar=("H", "W"))
    parser.add_argument("--memory-classes", type=int, default=150,
                        help="classes of the memory-check model (default 150, ADE20K: the largest output)")
    parser.add_argument("--memory-precision", default=None, choices=sorted(PRECISION_DTYPES),
                        help="precision of the memory check (default: cfg.precision)")
    parser.add_argument("--loss-curve", type=int, default=0, metavar="STEPS",
                        help="train STEPS steps on real data in fp32 and in bf16 from the same start (default 0: off)")
    parser.add_argument("--output", default=None, help="also write the JSON to this file")
    parser.add_argument("--markdown", default=None, metavar="FILE",
                        help="also write a Markdown table of the main numbers to FILE (for the README)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc malloc as it is (the tools apply util.perf.keep_freed_memory_for_reuse)")
    parser.add_argument("--memory-job", action="store_true", help=argparse.SUPPRESS)  # the --memory-check child
    parser.add_argument("--naive-job", default=None, help=argparse.SUPPRESS)  # the --compare-naive child
    args, overrides = parser.parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("--")]
    if unknown:
        parser.error(f"unknown option(s) {unknown}; config overrides are given as KEY VALUE")
    for name in ("eval_iters", "train_batch", "train_iters", "matmul_size", "matmul_repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("crop", "train_crop"):
        value = getattr(args, name)
        if value is not None and len(value) not in (1, 2):
            parser.error(f"--{name.replace('_', '-')} takes one or two integers")
    return args, overrides


def _size_pair(value: Optional[Sequence[int]], default: Tuple[int, int]) -> Tuple[int, int]:
    if value is None:
        return int(default[0]), int(default[1])
    return (int(value[0]), int(value[0])) if len(value) == 1 else (int(value[0]), int(value[1]))


def eval_settings(cfg, args) -> Tuple[Tuple[int, int], List[float], Optional[int]]:
    """(crop, scales, base_size) of the timed test: the options, else the config's TEST keys."""
    crop = _size_pair(args.crop, (cfg.test_h, cfg.test_w))
    scales = [float(s) for s in (args.scales or cfg.scales)]
    base_size = cfg.base_size if args.base_size is None else args.base_size
    return crop, scales, base_size


# ---------------------------------------------------------------------------------------------
# Timing helpers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def minor_page_faults() -> int:
    """Minor page faults of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def warm_up(fn: Callable[[], object], device: torch.device, max_calls: int = 4,
            steady_faults: int = 1024) -> int:
    """Call ``fn()`` until a call is in steady state; return how many calls that took.

    Why: the first calls of a training step or a sliding-window job grow the heap to its
    high-water mark, and every new page costs a fault and a kernel page clearing. That lasts 2-3
    training steps of PyConvSegNet-50 at 473x473 here (about 1 s/step); a real run does
    thousands of steps, so timing from the first step measures the heap's growth, not the run.
    Steady = fewer than ``steady_faults`` minor page faults in one call, or ``max_calls`` calls.
    """
    for calls in range(1, max_calls + 1):
        before = minor_page_faults()
        fn()
        synchronize(device)
        if minor_page_faults() - before < steady_faults:
            return calls
    return max_calls


def time_calls(fn: Callable[[], object], repeats: int, device: torch.device, warmup: Optional[int] = None) -> Dict:
    """Best and median wall seconds of ``fn()`` over ``repeats`` calls.

    Before them, ``warmup`` untimed calls, or (None) :func:`warm_up` until the heap is steady.
    """
    if warmup is None:
        warmup_calls = warm_up(fn, device)
    else:
        for _ in range(warmup):
            fn()
        warmup_calls = warmup
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {"best_s": min(times), "median_s": statistics.median(times), "times_s": times,
            "warmup_calls": warmup_calls}


def matmul_rate(dtype: torch.dtype, device: torch.device, size: int, repeats: int) -> Dict:
    """GFLOP/s of a ``size``^3 matmul (2 size^3 FLOP) in ``dtype``: the machine's arithmetic limit."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    timing = time_calls(lambda: torch.mm(a, b), repeats, device, warmup=1)
    flop = 2.0 * size ** 3
    return {"gflops": flop / timing["best_s"] / 1e9, "gflops_median": flop / timing["median_s"] / 1e9,
            "size": size, "repeats": repeats}


def peak_rss_gib() -> float:
    """Peak resident memory of this process, GiB.

    Linux: ``VmHWM`` of /proc/self/status, the high-water mark of this program's own address
    space. (``ru_maxrss`` is not: Linux carries it over fork and exec, so a child started by a
    process with 6 GB resident would report at least 6 GB.) Elsewhere ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / (1024 ** 2)  # kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / GIB if sys.platform == "darwin" else peak / (1024 ** 2)


def utilisation(gflop: float, seconds: float, limit_gflops: Optional[float]) -> Optional[float]:
    if not limit_gflops or seconds <= 0:
        return None
    return gflop / seconds / limit_gflops


# ---------------------------------------------------------------------------------------------
# FLOP counting (on the meta device: shapes only, instant)


def _meta_model(cfg) -> nn.Module:
    from model import build_model

    with torch.device("meta"):
        return build_model(cfg, load_pretrained=False)


def forward_gflop(cfg, height: int, width: int) -> float:
    """GFLOP of one eval-mode forward of one ``height x width`` crop (as tool/summary.py prints it)."""
    from model.summary import summarize

    return summarize(cfg, height, width)["gflop"]


def train_step_gflop(cfg, batch: int, height: int, width: int) -> Dict[str, float]:
    """GFLOP of one training step (train-mode forward with aux, backward), batch ``batch``.

    Forward: FlopCounterMode. Backward: for every convolution its grad-input (when the input needs a
    gradient: not for the stem, whose input is the image) and grad-weight products, each as many
    FLOP as the forward convolution. (``FlopCounterMode`` counts grouped-convolution backward
    ``groups`` times too high, so it is not used for the backward.)
    """
    from torch.utils.flop_counter import FlopCounterMode

    model = _meta_model(cfg).train()
    conv_flop: List[Tuple[float, bool]] = []

    def hook(module: nn.Conv2d, inputs, output) -> None:
        macs_per_output = (module.in_channels // module.groups) * math.prod(module.kernel_size)
        conv_flop.append((2.0 * output.numel() * macs_per_output, inputs[0].requires_grad))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with FlopCounterMode(display=False) as counter:
            model(torch.empty(batch, 3, height, width, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    forward = counter.get_total_flops()
    backward = sum(flop * (2 if needs_input_grad else 1) for flop, needs_input_grad in conv_flop)
    # (The stem's input needs no gradient; all other convolutions see activations of parameters.)
    return {"forward": forward / 1e9, "backward": backward / 1e9, "total": (forward + backward) / 1e9}


# ---------------------------------------------------------------------------------------------
# Models


def load_weights_or_warn(cfg, model: nn.Module, warnings: List[str]) -> Optional[str]:
    """Load ``cfg.model_path`` when it exists; otherwise keep random weights and add a warning."""
    from util.checkpoint import load_model_weights

    path = cfg.get("model_path")
    if path and os.path.isfile(path):
        load_model_weights(model, path)
        return str(path)
    reason = "no model_path given" if not path else f"model_path {path} not found"
    warnings.append(f"{reason}: random weights (timings are valid; the bf16-vs-fp32 agreement of a random "
                    f"network is not representative of a trained one)")
    return None


def prepare_eval_model(model: nn.Module, cfg, device: torch.device) -> nn.Module:
    """As ``util.inference.load_inference_model`` (tool/test.py's model): a copy on ``device``, eval
    mode, BatchNorm folded, channels_last per cfg."""
    from util.inference import prepare_inference_model

    return prepare_inference_model(copy.deepcopy(model), device, channels_last=bool(cfg.get("channels_last")))


def synthetic_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB float image in 0..255 (blobs, not white noise, so it looks like a scene)."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((3, max(2, height // 32), max(2, width // 32))).astype(np.float32)
    image = F.interpolate(torch.from_numpy(coarse)[None], size=(height, width), mode="bilinear",
                          align_corners=False)[0]
    image = image * 200 + torch.from_numpy(rng.random((3, height, width)).astype(np.float32)) * 55
    return image.permute(1, 2, 0).contiguous().numpy()


# ---------------------------------------------------------------------------------------------
# Evaluation


def eval_crop_count(image_size: Tuple[int, int], crop: Tuple[int, int], scales: Sequence[float],
                    base_size: Optional[int], flip: bool = True) -> int:
    """Model inputs (windows x flips over all scales) of one sliding-window test of one image."""
    from util.inference import scaled_size, window_starts, window_stride

    total = 0
    for scale in scales:
        h, w = scaled_size(image_size[0], image_size[1], float(scale), base_size)
        h, w = max(h, crop[0]), max(w, crop[1])
        total += len(window_starts(h, crop[0], window_stride(crop[0]))) * \
            len(window_starts(w, crop[1], window_stride(crop[1])))
    return total * (2 if flip else 1)


def naive_predict(model: nn.Module, image: np.ndarray, num_classes: int, crop: Tuple[int, int],
                  scales: Sequence[float], base_size: Optional[int], mean: Sequence[float],
                  std: Sequence[float]) -> torch.Tensor:
    """The release's test loop: per window one forward of (window, flipped window), float32 NCHW,
    softmax summed into a float64 numpy array on the host. Returns the (H, W) argmax on the CPU."""
    from util.inference import scaled_size, window_starts, window_stride

    device = next(model.parameters()).device
    height, width, _ = image.shape
    crop_h, crop_w = crop
    total = np.zeros((num_classes, height, width), dtype=np.float64)
    for scale in scales:
        new_h, new_w = scaled_size(height, width, float(scale), base_size)
        scaled = torch.from_numpy(image).permute(2, 0, 1)[None]
        if (new_h, new_w) != (height, width):
            scaled = F.interpolate(scaled, size=(new_h, new_w), mode="bilinear", align_corners=False)
        scaled = scaled[0].permute(1, 2, 0).numpy()
        pad_h, pad_w = max(crop_h - new_h, 0), max(crop_w - new_w, 0)
        top, left = pad_h // 2, pad_w // 2
        padded = np.empty((new_h + pad_h, new_w + pad_w, 3), dtype=np.float32)
        padded[:] = np.asarray(mean, dtype=np.float32)
        padded[top:top + new_h, left:left + new_w] = scaled
        full_h, full_w, _ = padded.shape
        prob = np.zeros((num_classes, full_h, full_w), dtype=np.float64)
        count = np.zeros((full_h, full_w), dtype=np.float64)
        for y in window_starts(full_h, crop_h, window_stride(crop_h)):
            for x in window_starts(full_w, crop_w, window_stride(crop_w)):
                window = torch.from_numpy(padded[y:y + crop_h, x:x + crop_w].transpose(2, 0, 1).copy())
                for channel, m, s in zip(window, mean, std):
                    channel.sub_(m).div_(s)
                inputs = torch.stack([window, window.flip(2)]).to(device)
                with torch.no_grad():
                    logits = model(inputs)
                if tuple(logits.shape[-2:]) != (crop_h, crop_w):
                    logits = F.interpolate(logits, size=(crop_h, crop_w), mode="bilinear", align_corners=True)
                probs = F.softmax(logits, dim=1)
                probs = ((probs[0] + probs[1].flip(2)) / 2).cpu().numpy()
                prob[:, y:y + crop_h, x:x + crop_w] += probs
                count[y:y + crop_h, x:x + crop_w] += 1
        prob = prob[:, top:top + new_h, left:left + new_w] / count[top:top + new_h, left:left + new_w]
        prob_t = torch.from_numpy(prob.astype(np.float32))[None]
        if (new_h, new_w) != (height, width):
            prob_t = F.interpolate(prob_t, size=(height, width), mode="bilinear", align_corners=False)
        total += prob_t[0].numpy()
    return torch.from_numpy(total.argmax(0))


def run_eval(cfg, args, overrides: Sequence[str], model: nn.Module, device: torch.device,
             precisions: Sequence[str], limit_now: Callable[[str], float], result: Dict) -> None:
    from util.inference import predict_multiscale
    from util.transforms import MEAN, STD

    crop, scales, base_size = eval_settings(cfg, args)
    window_batch = int(args.window_batch or cfg.test_batch_size)
    image_size = tuple(args.image_size)
    image = synthetic_image(*image_size)
    crops = eval_crop_count(image_size, crop, scales, base_size)
    crop_gflop = forward_gflop(cfg, *crop)
    gflop = crops * crop_gflop
    eval_model = prepare_eval_model(model, cfg, device)
    section = {"image_size": list(image_size), "crop": list(crop), "scales": scales, "base_size": base_size,
               "flip": True, "window_batch": window_batch, "channels_last": bool(cfg.get("channels_last")),
               "crops_per_image": crops, "gflop_per_crop": crop_gflop, "gflop_per_image": gflop}
    predictions = {}
    for precision in precisions:
        log(f"eval {precision}: {crops} crops of {crop[0]}x{crop[1]} per image, {args.eval_iters} timed run(s)")
        kwargs = dict(num_classes=int(cfg.classes), crop_size=crop, scales=scales, base_size=base_size,
                      mean=list(MEAN), std=list(STD), batch_size=window_batch,
                      autocast_dtype=autocast_dtype_for(precision))
        holder = {}

        def once():
            holder["pred"] = predict_multiscale(eval_model, image, **kwargs)

        limit = limit_now(precision)
        timing = time_calls(once, args.eval_iters, device)
        predictions[precision] = holder["pred"].cpu()
        section[precision] = {
            "seconds_per_image": timing["best_s"], "seconds_median": timing["median_s"],
            "warmup_calls": timing["warmup_calls"], "gflops": gflop / timing["best_s"],
            "matmul_gflops_before": limit, "utilisation": utilisation(gflop, timing["best_s"], limit),
        }
        log(f"eval {precision}: {timing['best_s']:.2f} s/image, {gflop / timing['best_s']:.1f} GFLOP/s, "
            f"utilisation {section[precision]['utilisation']:.2f}")
    if "fp32" in predictions and "bf16" in predictions:
        section["bf16_equal_fp32_fraction_synthetic"] = \
            (predictions["fp32"] == predictions["bf16"]).double().mean().item()
    if args.compare_naive:
        log("eval naive fp32 (one window + flip per forward, NCHW, float64 host accumulation) in a fresh process "
            "with glibc's default allocator, as the release ran")
        naive_limit = limit_now("fp32") if "fp32" in precisions else None
        with tempfile.TemporaryDirectory() as folder:
            prediction_path = os.path.join(folder, "naive.npy")
            naive = run_child(args, overrides, device, ["--naive-job", prediction_path, "--default-malloc"])
            if "error" not in naive:
                naive_prediction = torch.from_numpy(np.load(prediction_path))
        if "error" not in naive:
            naive["gflops"] = gflop / naive["seconds_per_image"]
            naive["matmul_gflops_before"] = naive_limit
            naive["utilisation"] = utilisation(gflop, naive["seconds_per_image"], naive_limit)
            if "fp32" in section:
                naive["speedup_fp32"] = naive["seconds_per_image"] / section["fp32"]["seconds_per_image"]
                naive["fp32_equal_naive_fraction"] = (predictions["fp32"] == naive_prediction).double().mean().item()
            if "bf16" in section:
                naive["speedup_bf16"] = naive["seconds_per_image"] / section["bf16"]["seconds_per_image"]
            log(f"eval naive: {naive['seconds_per_image']:.2f} s/image")
        section["naive_fp32"] = naive
    result["eval"] = section


# ---------------------------------------------------------------------------------------------
# Training


TRAIN_WARMUP_MAX = 4  # untimed steps at most before the timed ones (see warm_up)


def _train_setup(cfg, model: nn.Module, device: torch.device, total_iters: int):
    from util import engine
    from util.optim import build_optimizer, build_poly_scheduler

    model = copy.deepcopy(model).to(device)
    memory_format = torch.channels_last if cfg.get("channels_last") else torch.contiguous_format
    model = model.to(memory_format=memory_format).train()
    optimizer = build_optimizer(model, cfg.base_lr, cfg.momentum, cfg.weight_decay)
    scheduler = build_poly_scheduler(optimizer, max(total_iters, 1), cfg.power)
    train_model = torch.compile(model) if cfg.get("compile") else model
    return model, train_model, engine.build_criterion(cfg.ignore_label), optimizer, scheduler


def _random_batches(cfg, count: int, batch: int, crop: Tuple[int, int], seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        image = torch.randn(batch, 3, crop[0], crop[1], generator=generator)
        label = torch.randint(0, int(cfg.classes), (batch, crop[0], crop[1]), generator=generator)
        batches.append((image, label))
    return batches


def run_train(cfg, args, model: nn.Module, device: torch.device, precisions: Sequence[str],
              limit_now: Callable[[str], float], result: Dict) -> None:
    from util import engine

    crop = _size_pair(args.train_crop, (cfg.train_h, cfg.train_w))
    batch = args.train_batch
    flop = train_step_gflop(cfg, batch, *crop)
    section = {"batch": batch, "crop": list(crop), "gflop_per_step": flop["total"],
               "gflop_per_step_forward": flop["forward"], "channels_last": bool(cfg.get("channels_last")),
               "compile": bool(cfg.get("compile"))}
    warm, timed = _random_batches(cfg, 1, batch, crop, 1), _random_batches(cfg, args.train_iters, batch, crop, 2)
    for precision in precisions:
        log(f"train {precision}: batch {batch} of {crop[0]}x{crop[1]}, {args.train_iters} timed step(s)")
        _, train_model, criterion, optimizer, scheduler = _train_setup(cfg, model, device,
                                                                       TRAIN_WARMUP_MAX + len(timed))
        scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        amp_dtype = autocast_dtype_for(precision)
        common = dict(aux_weight=cfg.aux_weight, num_classes=int(cfg.classes), ignore_index=cfg.ignore_label,
                      scaler=scaler, amp_dtype=amp_dtype, channels_last=bool(cfg.get("channels_last")),
                      print_freq=10 ** 9, logger=None, writer=None)
        def warm_step(parts=(train_model, criterion, optimizer, scheduler), common=common):
            engine.train_one_epoch(parts[0], warm, parts[1], parts[2], parts[3], device, 0, **common)

        warmup_steps = warm_up(warm_step, device, max_calls=TRAIN_WARMUP_MAX)
        limit = limit_now(precision)
        start = time.perf_counter()
        stats = engine.train_one_epoch(train_model, timed, criterion, optimizer, scheduler, device, 1, **common)
        synchronize(device)
        seconds = (time.perf_counter() - start) / len(timed)
        section[precision] = {"seconds_per_step": seconds, "warmup_steps": warmup_steps, "matmul_gflops_before": limit,
                              "images_per_s": batch / seconds,
                              "gflops": flop["total"] / seconds,
                              "utilisation": utilisation(flop["total"], seconds, limit),
                              "loss": stats["loss"]}
        log(f"train {precision}: {seconds:.2f} s/step, {batch / seconds:.2f} images/s, "
            f"utilisation {section[precision]['utilisation']:.2f}")
        del train_model, optimizer, scheduler
    result["train"] = section


def training_dataset(cfg):
    """The training dataset of ``cfg`` with its augmentation (seed ``manual_seed``), as tool/train.py
    reads it; None when ``train_list`` does not exist."""
    from util.dataset import SegDataset
    from util.transforms import build_train_transform

    if not cfg.train_list or not os.path.isfile(cfg.train_list):
        return None
    return SegDataset("train", cfg.data_root, cfg.train_list, transform=build_train_transform(cfg),
                      seed=int(cfg.manual_seed or 0), num_classes=cfg.classes, ignore_label=cfg.ignore_label)


def run_loss_curve(cfg, args, device: torch.device, result: Dict) -> None:
    """``args.loss_curve`` training steps on real data from the config's initial weights (ImageNet
    backbone when ``pretrained`` is set, else random with seed ``manual_seed``), the same batches
    in three runs: fp32, bf16, and fp32 again with other dropout masks. The last one measures the
    run-to-run noise that the bf16-vs-fp32 difference is to be judged against."""
    from model import build_model
    from util import engine

    dataset = training_dataset(cfg)
    if dataset is None:
        result["loss_curve"] = {"skipped": f"train_list {cfg.train_list} not found"}
        return
    steps = args.loss_curve
    seed = int(cfg.manual_seed or 0)
    batch = int(cfg.batch_size)
    batches = []
    for step in range(steps):
        samples = [dataset[(step * batch + i) % len(dataset)] for i in range(batch)]
        batches.append((torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])))
    torch.manual_seed(seed)
    start = build_model(cfg, load_pretrained=True)
    curves = {}
    for run_name, precision, dropout_seed in (("fp32", "fp32", 0), ("bf16", "bf16", 0), ("fp32_other_dropout", "fp32", 1)):
        log(f"loss curve {run_name}: {steps} steps of batch {batch}")
        torch.manual_seed(dropout_seed)
        _, train_model, criterion, optimizer, scheduler = _train_setup(cfg, start, device, steps)
        amp_dtype = autocast_dtype_for(precision)
        losses = []
        for index, item in enumerate(batches):
            stats = engine.train_one_epoch(train_model, [item], criterion, optimizer, scheduler, device, index,
                                           aux_weight=cfg.aux_weight, num_classes=int(cfg.classes),
                                           ignore_index=cfg.ignore_label, amp_dtype=amp_dtype,
                                           channels_last=bool(cfg.get("channels_last")), print_freq=10 ** 9)
            losses.append(stats["loss"])
        curves[run_name] = losses

    def mean_abs_diff(a, b):
        return statistics.fmean(abs(x - y) for x, y in zip(a, b))

    result["loss_curve"] = {
        "steps": steps, "batch": batch, "crop": [cfg.train_h, cfg.train_w], **curves,
        "bf16_vs_fp32_mean_abs_diff": mean_abs_diff(curves["bf16"], curves["fp32"]),
        "noise_mean_abs_diff": mean_abs_diff(curves["fp32_other_dropout"], curves["fp32"]),
        "bf16_vs_fp32_last_diff": curves["bf16"][-1] - curves["fp32"][-1],
        "noise_last_diff": curves["fp32_other_dropout"][-1] - curves["fp32"][-1],
    }


# ---------------------------------------------------------------------------------------------
# Data loading and agreement on real images


def run_data(cfg, args, device: torch.device, result: Dict) -> None:

    dataset = training_dataset(cfg)
    if dataset is None:
        result["data"] = {"skipped": f"train_list {cfg.train_list} not found"}
        return
    workers, batch = int(cfg.workers), int(cfg.batch_size)
    log(f"data: DataLoader with {workers} worker(s), batch {batch}, {args.data_batches} timed batches")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                                         drop_last=True, pin_memory=device.type == "cuda")  # as tool/train.py
    iterator, samples, start = iter(loader), 0, None
    try:
        for _ in range(args.data_batches + 1):
            try:
                images, _ = next(iterator)
            except StopIteration:
                iterator = iter(loader)
                images, _ = next(iterator)
            if start is None:  # the first batch includes the workers' start-up
                start = time.perf_counter()
                continue
            samples += images.shape[0]
    finally:
        del iterator
    seconds = time.perf_counter() - start
    result["data"] = {"samples_per_s": samples / seconds, "workers": workers, "batch": batch,
                      "crop": [cfg.train_h, cfg.train_w], "samples": samples}


def run_agreement(cfg, args, model: nn.Module, device: torch.device, result: Dict) -> None:
    """Fraction of pixels where bf16 and fp32 predictions agree, on real images of cfg.val_list."""
    from util.dataset import load_image, read_list
    from util.inference import inference_kwargs, predict_multiscale

    list_path = cfg.val_list or cfg.test_list
    if not list_path or not os.path.isfile(list_path):
        result["agreement"] = {"skipped": f"no image list (val_list/test_list {list_path} not found)"}
        return
    entries = read_list(list_path, cfg.data_root, "val")
    count = min(args.agree_images, len(entries))
    picks = sorted({round(i * (len(entries) - 1) / max(count - 1, 1)) for i in range(count)})
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
    result["agreement"] = {"bf16_equal_fp32_fraction": equal / max(total, 1), "per_image": per_image,
                           "images": len(picks), "list": str(list_path), "crop": list(kwargs["crop_size"]),
                           "scales": kwargs["scales"], "base_size": kwargs["base_size"]}


def naive_job(cfg, args, device: torch.device) -> Dict:
    """The --compare-naive child: the release-style loop on the benchmark image with the benchmark's
    weights (same seed or model_path); the prediction goes to ``args.naive_job`` (.npy)."""
    from model import build_model
    from util.transforms import MEAN, STD

    crop, scales, base_size = eval_settings(cfg, args)
    torch.manual_seed(0)
    model = build_model(cfg, load_pretrained=False)
    load_weights_or_warn(cfg, model, [])
    model = model.to(device).eval()
    image = synthetic_image(*args.image_size)
    holder = {}

    def once():
        holder["pred"] = naive_predict(model, image, int(cfg.classes), crop, scales, base_size, MEAN, STD)

    timing = time_calls(once, args.eval_iters, device)
    np.save(args.naive_job, holder["pred"].numpy())
    return {"seconds_per_image": timing["best_s"], "seconds_median": timing["median_s"],
            "warmup_calls": timing["warmup_calls"], "allocator": "glibc default", "process": "separate"}


# ---------------------------------------------------------------------------------------------
# Memory check (its own process, so ru_maxrss is the peak of that job alone)


def memory_job(cfg, args, device: torch.device) -> Dict:
    from model import build_model
    from util.inference import predict_multiscale
    from util.transforms import MEAN, STD

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


def run_child(args, overrides: Sequence[str], device: torch.device, job_flags: Sequence[str]) -> Dict:
    """Run this script again in a fresh process with ``job_flags`` (and this run's settings); its JSON."""
    command = [sys.executable, str(Path(__file__).resolve()), "--config", args.config, "--device", str(device),
               "--memory-image-size", *map(str, args.memory_image_size), "--memory-classes", str(args.memory_classes),
               "--image-size", *map(str, args.image_size), "--eval-iters", str(args.eval_iters)]
    for flag, value in (("--memory-precision", args.memory_precision), ("--base-size", args.base_size),
                        ("--window-batch", args.window_batch)):
        if value is not None:
            command += [flag, str(value)]
    for flag, values in (("--crop", args.crop), ("--scales", args.scales)):
        if values is not None:
            command += [flag, *map(str, values)]
    if args.default_malloc and "--default-malloc" not in job_flags:
        command.append("--default-malloc")
    command += list(job_flags) + list(overrides)
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        return {"error": f"{' '.join(job_flags[:1])} process exited with {done.returncode}"}
    return json.loads(done.stdout)


def run_memory_check(args, overrides: Sequence[str], device: torch.device, result: Dict) -> None:
    log(f"memory check: six-scale test of a {args.memory_image_size[1]}x{args.memory_image_size[0]} image "
        f"in a separate process")
    check = run_child(args, overrides, device, ["--memory-job"])
    if "error" not in check:
        check["limit_gib"] = 8.0
        check["under_limit"] = check["peak_rss_gib"] < 8.0 and check.get("cuda_max_allocated_gib", 0.0) < 8.0
    result["memory_check"] = check


# ---------------------------------------------------------------------------------------------


def machine_info(device: torch.device) -> Dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run(argv: Optional[Sequence[str]] = None) -> Dict:
    args, overrides = parse_args(argv)
    cfg = load_cfg(args.config, overrides)
    from util.misc import select_device
    from util.perf import keep_freed_memory_for_reuse

    # As tool/train.py and tool/test.py do at start-up (measure what they run).
    malloc_tuned = False if args.default_malloc else keep_freed_memory_for_reuse()

    device = select_device(args.device or cfg.get("device"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes, as tool/test.py and tool/train.py
    if args.memory_job:
        return memory_job(cfg, args, device)
    if args.naive_job:
        return naive_job(cfg, args, device)

    precisions = list(args.precisions or (["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])))
    if device.type == "cpu" and "fp16" in precisions:
        raise ConfigError("fp16 autocast is CUDA-only here; use --precisions fp32 bf16 on the CPU")
    started = time.perf_counter()
    result: Dict = {"config": args.config, "overrides": list(overrides),
                    "machine": {**machine_info(device), "malloc_keeps_freed_memory": malloc_tuned},
                    "model": {"arch": cfg.arch, "backbone": cfg.backbone_net, "layers": cfg.layers,
                              "classes": cfg.classes, "output_stride": cfg.backbone_output_stride},
                    "warnings": []}
    log(f"matmul {args.matmul_size}^3 in {', '.join(precisions)}")
    result["matmul"] = {p: matmul_rate(PRECISION_DTYPES[p], device, args.matmul_size, args.matmul_repeats)
                        for p in precisions}
    log("matmul GFLOP/s: " + ", ".join(f"{p} {r['gflops']:.1f}" for p, r in result["matmul"].items()))

    def limit_now(precision: str) -> float:
        """The matmul rate measured again just before a timed job: on a shared host the machine's
        speed drifts over minutes, and a ratio is only fair between numbers measured side by side."""
        rate = matmul_rate(PRECISION_DTYPES[precision], device, args.matmul_size, args.matmul_repeats)["gflops"]
        log(f"matmul {precision} just before the job: {rate:.1f} GFLOP/s")
        return rate

    from model import build_model

    torch.manual_seed(0)
    model = build_model(cfg, load_pretrained=False)
    result["model"]["weights"] = load_weights_or_warn(cfg, model, result["warnings"]) or "random"
    result["model"]["parameters_m"] = sum(p.numel() for p in model.parameters()) / 1e6

    if not args.skip_eval:
        run_eval(cfg, args, overrides, model, device, precisions, limit_now, result)
    if not args.skip_train:
        run_train(cfg, args, model, device, precisions, limit_now, result)
    if not args.skip_data:
        run_data(cfg, args, device, result)
        if "train" in result and "samples_per_s" in result["data"]:
            fastest = max(v["images_per_s"] for k, v in result["train"].items() if k in precisions)
            result["data"]["ratio_to_fastest_training"] = result["data"]["samples_per_s"] / fastest
            if result["train"]["crop"] != result["data"]["crop"]:
                result["data"]["note"] = "training was timed at another crop than the loader produces"
    if args.agree_images > 0 and {"fp32", "bf16"} <= set(precisions):
        run_agreement(cfg, args, model, device, result)
    if args.loss_curve > 0:
        run_loss_curve(cfg, args, device, result)
    if args.memory_check:
        run_memory_check(args, overrides, device, result)
    result["peak_memory"] = {"rss_gib": peak_rss_gib()}
    if device.type == "cuda":
        result["peak_memory"]["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    result["seconds_total"] = time.perf_counter() - started
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    from util.checkpoint import CheckpointError
    from util.dataset import DataError

    try:
        result = run(argv)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    args, _ = parse_args(argv)
    if not args.memory_job:
        for path, content in ((args.output, text), (args.markdown, markdown_table(result) if args.markdown else "")):
            if path:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                Path(path).write_text(content + "\n", encoding="utf-8")
    print(text)
    return 0


def markdown_table(result: Dict) -> str:
    """The main numbers of a benchmark result as a Markdown table (utilisation in % of the
    same-dtype matmul rate measured in the same run)."""
    def pct(value):
        return "" if value is None else f"{100 * value:.0f} %"

    machine, matmul = result["machine"], result["matmul"]
    lines = [f"Machine: {machine['cpu']} ({machine['threads']} threads), torch {machine['torch']}, device "
             f"{machine['device']}; model {result['model']['arch']}/{result['model']['backbone']}"
             f"{result['model']['layers']}, weights {result['model']['weights']}.", "",
             "| measurement | " + " | ".join(p for p in matmul) + " |",
             "| --- | " + " | ".join("---" for _ in matmul) + " |",
             "| matmul 4096^3, GFLOP/s at the start (the limit) | " + " | ".join(f"{matmul[p]['gflops']:.0f}" for p in matmul) + " |"]
    ev = result.get("eval")
    if ev:
        where = (f"{ev['image_size'][0]}x{ev['image_size'][1]} image, scales {ev['scales']}, {ev['crops_per_image']} "
                 f"crops of {ev['crop'][0]} ({ev['gflop_per_image']:.0f} GFLOP)")
        lines.append(f"| sliding-window test, s/image ({where}) | " +
                     " | ".join(f"{ev[p]['seconds_per_image']:.2f}" if p in ev else "" for p in matmul) + " |")
        lines.append("| sliding-window test, utilisation (of the matmul rate just before it) | " +
                     " | ".join(pct(ev[p]["utilisation"]) if p in ev else "" for p in matmul) + " |")
        lines.append("| matmul GFLOP/s just before the sliding-window test | " +
                     " | ".join(f"{ev[p]['matmul_gflops_before']:.0f}" if p in ev else "" for p in matmul) + " |")
        naive = ev.get("naive_fp32")
        if naive:
            lines.append(f"| release-style loop (1 window/forward, NCHW), s/image | {naive['seconds_per_image']:.2f} |"
                         + " |" * (len(matmul) - 1))
            lines.append("| speed-up over the release-style loop | " +
                         " | ".join(f"{naive.get('speedup_' + p):.1f}x" if naive.get("speedup_" + p) else ""
                                    for p in matmul) + " |")
            if "fp32_equal_naive_fraction" in naive:
                lines.append(f"| fp32 pixels equal to the release-style loop | "
                             f"{100 * naive['fp32_equal_naive_fraction']:.3f} % |" + " |" * (len(matmul) - 1))
    tr = result.get("train")
    if tr:
        lines.append(f"| training, images/s (batch {tr['batch']}, {tr['crop'][0]}x{tr['crop'][1]}, "
                     f"{tr['gflop_per_step']:.0f} GFLOP/step) | " +
                     " | ".join(f"{tr[p]['images_per_s']:.2f}" if p in tr else "" for p in matmul) + " |")
        lines.append("| training, utilisation (of the matmul rate just before it) | " +
                     " | ".join(pct(tr[p]["utilisation"]) if p in tr else "" for p in matmul) + " |")
        lines.append("| matmul GFLOP/s just before the training steps | " +
                     " | ".join(f"{tr[p]['matmul_gflops_before']:.0f}" if p in tr else "" for p in matmul) + " |")
    data = result.get("data") or {}
    if "samples_per_s" in data:
        lines.append(f"| data loading, samples/s ({data['workers']} workers, {data['crop'][0]}x{data['crop'][1]}) | "
                     f"{data['samples_per_s']:.1f} |" + " |" * (len(matmul) - 1))
    agreement = result.get("agreement") or {}
    if "bf16_equal_fp32_fraction" in agreement:
        lines.append(f"| bf16 pixels equal to fp32 ({agreement['images']} real images) | | "
                     f"{100 * agreement['bf16_equal_fp32_fraction']:.2f} % |" + " |" * (len(matmul) - 2))
    curve = result.get("loss_curve") or {}
    if "bf16_vs_fp32_mean_abs_diff" in curve:
        lines.append(f"| training loss, {curve['steps']} real steps: mean abs. difference to fp32 (noise: fp32 with "
                     f"other dropout masks {curve['noise_mean_abs_diff']:.3f}) | | "
                     f"{curve['bf16_vs_fp32_mean_abs_diff']:.3f} |" + " |" * (len(matmul) - 2))
    memory = result.get("memory_check") or {}
    if "peak_rss_gib" in memory:
        lines.append(f"| peak memory, six-scale test of {memory['image_size'][1]}x{memory['image_size'][0]} "
                     f"({memory['classes']} classes, {memory['precision']}), GiB | {memory['peak_rss_gib']:.2f} |"
                     + " |" * (len(matmul) - 1))
    lines.append(f"| peak memory of the benchmark process, GiB | {result['peak_memory']['rss_gib']:.2f} |"
                 + " |" * (len(matmul) - 1))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
