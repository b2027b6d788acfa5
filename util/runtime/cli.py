"""The one way the command-line tools turn known errors into a one-line message and an exit status.

A user who mistypes a key or points at a missing file should read one line that names the problem,
not a traceback; a bug should still show its traceback. ``run_cli`` draws that line: the errors this
codebase raises on purpose (bad config, bad data, bad checkpoint, diverged loss) are printed as one
line, anything else propagates.
"""
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Optional

from util.errors import CheckpointError, ConfigError, DataError, NonFiniteLossError

# Exit statuses: 2 is argparse's status for a bad command line, and a bad config is the same kind of
# mistake; 1 for everything else the tools report on purpose.
EXIT_CONFIG = 2
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def one_line_reason(exc: BaseException) -> str:
    """``str(exc)`` without the worker traceback that DataLoader adds to errors raised in a worker."""
    message = str(exc)
    if "Original Traceback" in message:
        last = [line for line in message.splitlines() if line.strip()][-1]
        message = last.split(f"{type(exc).__name__}: ", 1)[-1]
    return message


def reported_errors() -> tuple:
    """The exception types a tool reports as one line."""
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
    except TrainingStopped as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return exc.exit_status
    return status if isinstance(status, int) else 0


def exit_with(main: Callable[[], Optional[object]]) -> None:
    """The ``if __name__ == "__main__"`` body of a tool: tune the CPU allocator, run ``main``, exit."""
    from util.runtime.perf import keep_freed_memory_for_reuse

    keep_freed_memory_for_reuse()  # CPU: reuse freed activation memory instead of fresh page faults
    status = run_cli(main)
    end_child_processes()
    sys.exit(status)


def end_child_processes() -> None:
    """Kill the multiprocessing children still running at exit: DataLoader workers of a run that failed
    or stopped mid-epoch. They ignore SIGTERM (:func:`ignore_stop_signals`), the signal multiprocessing's
    exit handler ends daemonic children with, so the interpreter would otherwise wait for them forever."""
    import multiprocessing

    children = multiprocessing.active_children()
    if children:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # exiting: no DataLoader "worker killed" error now
    for child in children:
        child.kill()
        child.join(timeout=10)


# ---------------------------------------------------------------------------------------------
# Preemption: a cluster asks a job to stop (SIGTERM; SIGUSR1 ahead of the time limit with
# sbatch --signal) and requeues it. Training finishes its iteration, writes a resumable checkpoint
# and exits with 128 + the signal's number, as a shell reports a process ended by that signal.

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """While active (``with StopSignals() as stop:``), SIGTERM and SIGUSR1 set ``stop.signum`` instead
    of ending the process; the training loop polls :meth:`requested` between iterations. The previous
    handlers are restored on exit. Only the main thread can install handlers (Python's rule)."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # elsewhere: inactive, never requested
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum  # only a flag: logging or I/O inside a signal handler is not safe

    def requested(self) -> bool:
        return self.signum is not None

    def agree(self, signums) -> bool:
        """Adopt the first signal another process received (``signums``: every process's ``signum``), so
        all of them report and exit alike; True when any process received one."""
        if self.signum is None:
            self.signum = next((signum for signum in signums if signum is not None), None)
        return self.requested()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    @property
    def exit_status(self) -> int:
        return 128 + int(self.signum or 0)


class TrainingStopped(Exception):
    """Training stopped on a stop signal after writing a checkpoint; ``run_cli`` exits with ``exit_status``."""

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status


@contextmanager
def deferred_interrupt():
    """Hold a Ctrl-C (SIGINT) that arrives inside the block and raise its KeyboardInterrupt when the block
    ends. For code that must not be interrupted half-way (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            signal.raise_signal(signal.SIGINT)  # now to the restored handler: KeyboardInterrupt by default


class Uninterruptible:
    """Calls to the wrapped object's methods finish before a Ctrl-C is raised (:func:`deferred_interrupt`).

    For tensorboardX's SummaryWriter: a KeyboardInterrupt raised inside its multiprocessing queue's
    ``put`` leaves the queue's condition variable without its waiter, and ``close()`` then waits
    forever for the logging thread (seen as a hung Ctrl-C during training)."""

    def __init__(self, wrapped) -> None:
        self._wrapped = wrapped

    def __getattr__(self, name):
        attribute = getattr(self._wrapped, name)
        if not callable(attribute):
            return attribute

        def call(*args, **kwargs):
            with deferred_interrupt():
                return attribute(*args, **kwargs)

        return call


def ignore_stop_signals(worker_id: int = 0) -> None:
    """``worker_init_fn`` of training DataLoaders: a cluster signals every process of the job, and a
    worker that died of it would fail the iteration the main process is finishing before it saves."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)

