"""util.cli: the one place the tools turn known errors into a line and an exit status."""
import pytest

from util.checkpoint import CheckpointError
from util.cli import EXIT_CONFIG, EXIT_ERROR, one_line_reason, run_cli
from util.config import ConfigError
from util.dataset import DataError
from util.engine import NonFiniteLossError


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
    wrapped = DataError("Caught DataError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
                        "  File \"x.py\", line 1\nutil.dataset.DataError: list.txt line 9: label b.png not found\n")
    assert one_line_reason(wrapped) == "list.txt line 9: label b.png not found"
