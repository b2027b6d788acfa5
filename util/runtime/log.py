"""What the tools print: the logger, progress lines with an ETA, running averages, durations."""
from __future__ import annotations

import logging
import sys
import time
from typing import Optional


def get_logger(name: str = "pyconvsegnet", rank: int = 0, log_file: Optional[str] = None) -> logging.Logger:
    """A logger that prints on rank 0 only (other ranks log warnings and errors).

    Calling it again with the same name reconfigures the handlers instead of adding
    duplicates, so tests and repeated ``main()`` calls do not print every line twice.
    """
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter("[%(asctime)s %(levelname)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    logger.addHandler(stream)
    if log_file and rank == 0:
        handler = logging.FileHandler(log_file)
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return logger


class AverageMeter:
    """Running sum / count of a scalar (e.g. loss per sample, seconds per batch)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.val = 0.0
        self.sum = 0.0
        self.count = 0
        self.avg = 0.0

    def update(self, val: float, n: int = 1) -> None:
        self.val = float(val)
        self.sum += float(val) * n
        self.count += n
        self.avg = self.sum / self.count if self.count else 0.0


def format_seconds(seconds: float) -> str:
    """Seconds as H:MM:SS (or D days, H:MM:SS for long runs)."""
    seconds = max(0, int(round(seconds)))
    days, rem = divmod(seconds, 86400)
    hours, rem = divmod(rem, 3600)
    minutes, secs = divmod(rem, 60)
    text = f"{hours:d}:{minutes:02d}:{secs:02d}"
    return f"{days}d {text}" if days else text




VAL_LOG_EVERY = 10  # images (or batches) between validation progress lines


class ProgressLine:
    """``[done/total] s/item, elapsed, ETA`` lines every ``every`` items (and after the last one)."""

    def __init__(self, title: str, total: Optional[int], logger: Optional[logging.Logger], every: int = VAL_LOG_EVERY,
                 unit: str = "image") -> None:
        self.title, self.total, self.logger, self.every, self.unit = title, total, logger, every, unit
        self.start = time.time()

    def update(self, done: int, last: bool = False) -> None:
        """Log after every ``every`` items and the last one; with ``total`` None (a video that does not
        say its length) the call with ``last`` True logs the count without an ETA."""
        if self.logger is None or not (done % self.every == 0 or done == self.total or last):
            return
        elapsed = time.time() - self.start
        if self.total is None:
            self.logger.info(f"{self.title}: [{done}] {elapsed / max(done, 1):.3f} s/{self.unit}, "
                             f"elapsed {format_seconds(elapsed)}")
            return
        remaining = elapsed / done * (self.total - done)
        self.logger.info(f"{self.title}: [{done}/{self.total}] {elapsed / done:.3f} s/{self.unit}, "
                         f"elapsed {format_seconds(elapsed)}, ETA {format_seconds(remaining)}")


def log_config(cfg, logger: logging.Logger) -> None:
    logger.info("Config:\n" + "\n".join(f"  {key}: {cfg[key]!r}" for key in sorted(cfg.keys())))
