"""Where a run ran, as plain data for logs, checkpoints and metrics.json (JSON-able), and as log lines.

:func:`collect_environment` records the versions of Python, torch, torchvision, numpy and OpenCV; with
CUDA the CUDA and cuDNN versions and the GPU names; the CPU model and whether it computes bfloat16
natively; and the code's version: the git commit of the checkout and whether tracked files have
uncommitted changes (``None`` when the code is not a git checkout or git is missing). It runs two git
commands at most, each with a timeout, and never raises for a missing or slow git.
:func:`format_environment` turns the record into a few log lines.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
GIT_TIMEOUT_S = 5.0
# /proc/cpuinfo flags of a CPU with bfloat16 arithmetic: x86 (AVX512-BF16, AMX) and Arm ("bf16").
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def _version(module_name: str) -> Optional[str]:
    """``module.__version__`` of an installed module, else None (an optional package not installed)."""
    try:
        module = __import__(module_name)
    except ImportError:
        return None
    return str(getattr(module, "__version__", "unknown"))


def cpu_from_cpuinfo(text: str) -> Dict[str, Any]:
    """``{"model": ..., "native_bf16": bool}`` from the text of /proc/cpuinfo (its first processor)."""
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and model is None:
            model = value.strip() or None
        elif key in ("flags", "features") and not flags:  # x86 / Arm
            flags = set(value.split())
    return {"model": model, "native_bf16": any(flag in flags for flag in BF16_FLAGS)}


def cpu_info(cpuinfo_path: str = "/proc/cpuinfo") -> Dict[str, Any]:
    """The CPU's model, whether it has native bfloat16 (None where /proc/cpuinfo does not say: not
    Linux) and the SIMD level PyTorch's CPU kernels use."""
    try:
        with open(cpuinfo_path, encoding="utf-8", errors="replace") as handle:
            info = cpu_from_cpuinfo(handle.read())
    except OSError:
        info = {"model": None, "native_bf16": None}
    info["model"] = info["model"] or platform.processor() or platform.machine() or None
    try:
        info["capability"] = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        info["capability"] = None
    info["cores"] = os.cpu_count()
    return info


def cuda_info() -> Optional[Dict[str, Any]]:
    """CUDA and cuDNN versions and the visible GPUs' names; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return {"cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "gpus": [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]}


def _git(repo_root: Path, *args: str) -> Optional[str]:
    """stdout of ``git -C repo_root ARGS``, or None when git is missing, fails or is slow."""
    try:
        done = subprocess.run(["git", "-C", str(repo_root), *args], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_S, env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def code_version(repo_root: Optional[Path] = None) -> Optional[Dict[str, Any]]:
    """``{"commit": sha, "dirty": bool}`` of the git checkout at ``repo_root`` (default: this
    repository); ``dirty`` means tracked files differ from the commit (untracked files are not
    counted: a run's outputs and data may sit in the tree). None when it is not a git checkout."""
    root = Path(repo_root) if repo_root is not None else REPO_ROOT
    commit = _git(root, "rev-parse", "HEAD")
    if not commit or not commit.strip():
        return None
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return {"commit": commit.strip(), "dirty": None if status is None else bool(status.strip())}


def collect_environment(repo_root: Optional[Path] = None) -> Dict[str, Any]:
    """Where this process runs, as JSON-able data (see the module docstring)."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": str(torch.__version__),  # a str subclass, which weights_only loading refuses
        "torchvision": _version("torchvision"),
        "numpy": _version("numpy"),
        "opencv": _version("cv2"),
        "cuda": cuda_info(),
        "cpu": cpu_info(),
        "code": code_version(repo_root),
    }


def format_environment(environment: Dict[str, Any]) -> List[str]:
    """A few log lines of :func:`collect_environment`'s record."""
    versions = ", ".join(f"{name} {environment.get(key) or 'not installed'}" for name, key in
                         (("Python", "python"), ("torch", "torch"), ("torchvision", "torchvision"),
                          ("numpy", "numpy"), ("OpenCV", "opencv")))
    lines = [f"environment: {versions} on {environment.get('platform')}"]
    cuda = environment.get("cuda")
    if cuda:
        gpus = ", ".join(f"{index}: {name}" for index, name in enumerate(cuda["gpus"])) or "none visible"
        lines.append(f"CUDA {cuda['cuda']}, cuDNN {cuda['cudnn']}, GPU {gpus}")
    cpu = environment.get("cpu") or {}
    bf16 = {True: "native bf16", False: "no native bf16", None: "native bf16 unknown"}[cpu.get("native_bf16")]
    lines.append(f"CPU {cpu.get('model') or 'unknown'} ({cpu.get('cores')} cores, {bf16}, "
                 f"kernels {cpu.get('capability') or 'unknown'})")
    code = environment.get("code")
    if code is None:
        lines.append("code: not a git checkout (no commit recorded)")
    else:
        state = {True: "with uncommitted changes", False: "clean", None: "state unknown"}[code["dirty"]]
        lines.append(f"code: git commit {code['commit']} ({state})")
    return lines


__all__ = ["collect_environment", "format_environment", "code_version", "cpu_info", "cpu_from_cpuinfo", "cuda_info"]

if __name__ == "__main__":  # python -m util.runtime.environment: the lines a run logs
    print("\n".join(format_environment(collect_environment())), file=sys.stdout)
