"""The ``precision`` setting: its config key, its autocast dtype and the one autocast wrapper.

Training (util/engine/training.py), inference (util/evaluation/inference.py) and the benchmarks all turn
``precision`` into a dtype with :func:`autocast_dtype_for` and run the model under
:func:`autocast`, so a new precision is added here and nowhere else.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from util.config import check_choice, register_keys
from util.errors import ConfigError

# precision -> the dtype torch.autocast runs matmuls/convolutions in; None = no autocast (fp32).
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = tuple(AUTOCAST_DTYPES)


def _check(cfg) -> None:
    check_choice(cfg, "precision", PRECISIONS)


register_keys("TRAIN", {"precision": "fp32"}, check=_check)


def autocast_dtype_for(precision: Optional[str]) -> Optional[torch.dtype]:
    """The autocast dtype of a ``precision`` setting ("fp32" or None -> None, "bf16", "fp16")."""
    if precision not in AUTOCAST_DTYPES and precision is not None:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    return AUTOCAST_DTYPES.get(precision or "fp32")


def autocast(device_type: str, dtype: Optional[torch.dtype]):
    """``torch.autocast(device_type, dtype)`` for bf16/fp16; a no-op context for fp32 (``dtype`` None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def check_device_support(cfg, device_type: str) -> None:
    """Combinations that depend on the machine: fp16 needs CUDA (there is no fp16 training path on CPU);
    bf16 on CUDA needs a GPU that computes in bfloat16 (Ampere or newer)."""
    if cfg.precision == "fp16" and device_type != "cuda":
        raise ConfigError("precision fp16 needs a CUDA device (it trains with a gradient scaler on the GPU); "
                          "on the CPU use precision bf16 or fp32")
    # Emulated bf16 (pre-Ampere GPUs) runs, but slower than fp32: only native support counts.
    if (cfg.precision == "bf16" and device_type == "cuda"
            and not torch.cuda.is_bf16_supported(including_emulation=False)):
        raise ConfigError(f"precision bf16: this GPU ({torch.cuda.get_device_name()}) has no native bfloat16 "
                          f"support (Ampere or newer has); use precision fp16 or fp32")
