"""The one way the command-line tools turn known errors into a one-line message and an exit status.

A user who mistypes a key or points at a missing file should read one line that names the problem,
not a traceback; a bug should still show its traceback. ``run_cli`` draws that line: the errors this
codebase raises on purpose (bad config, bad data, bad checkpoint, diverged loss) are printed as one
line, anything else propagates.
"""
import sys
from typing import Callable, Optional

from util.config import ConfigError

# Exit statuses: 2 is argparse's status for a bad command line, and a bad config is the same kind of
# mistake; 1 for everything else the tools report on purpose.
EXIT_CONFIG = 2
EXIT_ERROR = 1


def one_line_reason(exc: BaseException) -> str:
    """``str(exc)`` without the worker traceback that DataLoader adds to errors raised in a worker."""
    message = str(exc)
    if "Original Traceback" in message:
        last = [line for line in message.splitlines() if line.strip()][-1]
        message = last.split(f"{type(exc).__name__}: ", 1)[-1]
    return message


def reported_errors() -> tuple:
    """The exception types a tool reports as one line (imported here so util.cli stays light to import)."""
    from util.checkpoint import CheckpointError
    from util.dataset import DataError
    from util.engine import NonFiniteLossError

    return (CheckpointError, DataError, NonFiniteLossError, FileNotFoundError)


def run_cli(main: Callable[[], Optional[object]]) -> int:
    """Call ``main()``; return its status (0 unless it returned an int), or print a known error as one
    line on stderr and return that error's status."""
    try:
        status = main()
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except reported_errors() as exc:
        print(f"error: {one_line_reason(exc)}", file=sys.stderr)
        return EXIT_ERROR
    return status if isinstance(status, int) else 0


def exit_with(main: Callable[[], Optional[object]]) -> None:
    """The ``if __name__ == "__main__"`` body of a tool: tune the CPU allocator, run ``main``, exit."""
    from util.perf import keep_freed_memory_for_reuse

    keep_freed_memory_for_reuse()  # CPU: reuse freed activation memory instead of fresh page faults
    sys.exit(run_cli(main))
