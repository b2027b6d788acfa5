"""Timing on a shared machine: warm-up to steady state, best-of timings, the peak rate each job is
judged against (the fastest of matmul and convolution probes), peak memory, the machine, and running a
job in a fresh process."""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, Optional, Sequence

import torch

GIB = 1024 ** 3

_STARTED = time.perf_counter()


def log(message: str) -> None:
    """A progress line on stderr (stdout carries the JSON alone)."""
    print(f"[benchmark {time.perf_counter() - _STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


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
    training steps of PyConvSegNet-50 at 473x473; a real run does thousands of steps, so timing
    from the first step measures the heap's growth, not the run.
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


def _probe_dtype(precision: str) -> torch.dtype:
    """The dtype a probe of ``precision`` runs in: float32 for fp32, else its autocast dtype."""
    from util.engine.precision import autocast_dtype_for

    return autocast_dtype_for(precision) or torch.float32


def _rate(fn: Callable[[], object], flop: float, repeats: int, device: torch.device) -> Dict:
    timing = time_calls(fn, repeats, device, warmup=1)
    return {"gflops": flop / timing["best_s"] / 1e9, "gflops_median": flop / timing["median_s"] / 1e9}


def matmul_rate(precision: str, device: torch.device, size: int, repeats: int) -> Dict:
    """GFLOP/s of a ``size``^3 matmul (2 size^3 FLOP) in the dtype of ``precision`` (fp32: float32,
    else its autocast dtype)."""
    dtype = _probe_dtype(precision)
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    return {**_rate(lambda: torch.mm(a, b), 2.0 * size ** 3, repeats, device), "size": size, "repeats": repeats}


def conv_rate(precision: str, device: torch.device, channels: int, kernel_size: int, side: int,
              repeats: int) -> Dict:
    """GFLOP/s of a stride-1 ``kernel_size`` convolution of ``channels`` to ``channels`` on one
    ``side x side`` map, channels_last, in the dtype of ``precision`` (2 C^2 k^2 side^2 FLOP): the
    convolution kernels (oneDNN on the CPU, cuDNN on CUDA) the model's layers run on."""
    dtype = _probe_dtype(precision)
    generator = torch.Generator(device="cpu").manual_seed(0)
    image = torch.randn(1, channels, side, side, generator=generator).to(device=device, dtype=dtype)
    weight = torch.randn(channels, channels, kernel_size, kernel_size, generator=generator) / (channels * kernel_size)
    image = image.contiguous(memory_format=torch.channels_last)
    weight = weight.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    flop = 2.0 * channels * channels * kernel_size ** 2 * side ** 2

    def convolve():
        with torch.no_grad():
            return torch.nn.functional.conv2d(image, weight, padding=kernel_size // 2)

    return {**_rate(convolve, flop, repeats, device), "channels": channels, "kernel_size": kernel_size,
            "side": side, "repeats": repeats}


# The map side of the convolution probes: 64 x 64 = 4096 positions, the matmul's M at the default size.
PROBE_SIDE = 64


def peak_rate(precision: str, device: torch.device, size: int, repeats: int) -> Dict:
    """The machine's arithmetic limit for the dtype of ``precision``: the fastest of the kernels it runs
    for that dtype, probed here (a ``size``^3 matmul; a 1x1 convolution of ``size`` channels and a 3x3
    convolution of ``size // 8`` channels, each on a 64x64 map, channels_last). No single kind of kernel is
    the limit everywhere: which one is fastest depends on the CPU or GPU and the dtype (oneDNN's
    convolutions can outrun MKL's matmul), and a job judged against a slower kernel than the model's own
    would be reported above 100 %.

    Returns ``{"gflops": the fastest rate, "kernel": its name, "probes": {name: GFLOP/s}, ...}``."""
    small = max(size // 8, 8)
    probes = {
        f"matmul {size}^3": matmul_rate(precision, device, size, repeats),
        f"conv 1x1 {size}ch {PROBE_SIDE}x{PROBE_SIDE} channels_last": conv_rate(precision, device, size, 1,
                                                                                 PROBE_SIDE, repeats),
        f"conv 3x3 {small}ch {PROBE_SIDE}x{PROBE_SIDE} channels_last": conv_rate(precision, device, small, 3,
                                                                                  PROBE_SIDE, repeats),
    }
    kernel = max(probes, key=lambda name: probes[name]["gflops"])
    return {"gflops": probes[kernel]["gflops"], "kernel": kernel,
            "probes": {name: probe["gflops"] for name, probe in probes.items()}, "size": size, "repeats": repeats}


def utilisation(gflop: float, seconds: float, limit_gflops: Optional[float]) -> Optional[float]:
    if not limit_gflops or seconds <= 0:
        return None
    return gflop / seconds / limit_gflops


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


def run_child(script: str, args, overrides: Sequence[str], device: torch.device, job_flags: Sequence[str]) -> Dict:
    """Run ``script`` (the benchmark's command line) again in a fresh process with ``job_flags`` and
    this run's settings; its JSON, or ``{"error": ...}``."""
    command = [sys.executable, script, "--config", args.config, "--device", str(device),
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
