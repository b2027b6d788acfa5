"""util.runtime.cli: the one place the tools turn known errors into a line and an exit status."""
import pytest

from util.errors import CheckpointError, ConfigError, DataError, NonFiniteLossError
from util.runtime.cli import EXIT_CONFIG, EXIT_ERROR, one_line_reason, run_cli


def _raising(exc):
    def main():
        raise exc
    return main


@pytest.mark.parametrize("exc, status", [
    (ConfigError("unknown key 'base_lrr' (did you mean 'base_lr'?)"), EXIT_CONFIG),
    (DataError("list.txt line 3: image a.jpg not found"), EXIT_ERROR),
    (CheckpointError("x.pth is not a checkpoint"), EXIT_ERROR),
    (NonFiniteLossError("loss is nan at iteration 7"), EXIT_ERROR),
    (FileNotFoundError("missing.png"), EXIT_ERROR),
])
def test_known_errors_become_one_line_and_a_status(exc, status, capsys):
    assert run_cli(_raising(exc)) == status
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(exc) in err and "Traceback" not in err


def test_status_of_main_is_kept_and_non_int_results_mean_success():
    assert run_cli(lambda: 3) == 3
    assert run_cli(lambda: {"mIoU": 0.5}) == 0
    assert run_cli(lambda: None) == 0


def test_bugs_still_raise_with_their_traceback():
    with pytest.raises(ZeroDivisionError):
        run_cli(_raising(ZeroDivisionError("a bug")))


def test_worker_traceback_is_cut_to_the_reason():
    wrapped = DataError("Caught DataError in DataLoader worker process 1.\n"
                        "Original Traceback (most recent call last):\n"
                        "  File \"x.py\", line 1\nutil.dataset.DataError: list.txt line 9: label b.png not found\n")
    assert one_line_reason(wrapped) == "list.txt line 9: label b.png not found"


def test_a_ctrl_c_inside_deferred_interrupt_is_raised_when_the_block_ends():
    """The SIGINT arrives inside the block; the block still finishes, then KeyboardInterrupt is raised."""
    import os
    import signal

    from util.runtime.cli import deferred_interrupt

    finished = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs between bytecodes: give it plenty of them
                pass
            finished.append(True)
    assert finished == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_deferred_interrupt_hands_the_signal_to_the_handler_it_restores():
    """A process that ignores SIGINT (started in the background by a shell) still ignores it after the block."""
    import os
    import signal

    from util.runtime.cli import deferred_interrupt

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with deferred_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):
                pass
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_uninterruptible_writer_calls_finish_before_the_interrupt(tmp_path):
    """The TensorBoard writer as tool/train.py opens it: a Ctrl-C during add_scalar is raised after the
    call, and the writer still closes (a KeyboardInterrupt inside its queue made close() hang)."""
    import os
    import signal

    from tensorboardX import SummaryWriter

    from util.runtime.cli import Uninterruptible

    writer = Uninterruptible(SummaryWriter(str(tmp_path)))
    original_put = writer.file_writer.event_writer._event_queue.put
    calls = []

    def put_then_signal(event, *args, **kwargs):  # the signal lands inside the queue's put
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):
            pass
        calls.append("put finished")
        return original_put(event, *args, **kwargs)

    writer.file_writer.event_writer._event_queue.put = put_then_signal
    with pytest.raises(KeyboardInterrupt):
        writer.add_scalar("loss", 1.0, 1)
    assert calls == ["put finished"]
    writer.file_writer.event_writer._event_queue.put = original_put
    writer.close()
    assert any(path.name.startswith("events.out.tfevents") for path in tmp_path.iterdir())
