"""Fault suite, part 1: a training run that is killed, loses a peer, fills the disk or gets a bad config.

Every test drives the real entry point (``tool/train.py`` as a subprocess, or its ``main``/``cli``
in-process where a fault has to be injected) on a tiny CPU run: the test-only network of tests/tiny_model.py,
33x33 crops, 4 synthetic images, batch 2, one thread per process. The tests that must act while a run is in
a given step (a kill inside a checkpoint write, a rank killed mid-training) train ResNet-50 at output stride 32
instead, whose steps and 275 MB checkpoint writes last long enough to be caught. The fault table of docs/faults.md
lists what each test shows.
"""
from __future__ import annotations

import errno
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from util.runtime.checkpoint_io import load_checkpoint_file, save_checkpoint
from util.runtime.cli import run_cli

from conftest import REPO_ROOT
from tiny_model import ARCH, BACKBONE
from tiny_runs import REAL_MODEL_KEYS, write_tiny_config

TRAIN_PY = REPO_ROOT / "tool" / "train.py"
TEMPORARY = re.compile(r"^\..+\.pth\.\d+\.[0-9a-f]{8}\.tmp$")  # util.runtime.checkpoint_io.save_checkpoint's temp files
MODEL_BUILT = f"{ARCH} on {BACKBONE}"  # logged by tool/train.py right after build_model


# ---------------------------------------------------------------------------------------------
# Helpers


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def write_config(tmp_path: Path, images: int = 4, **train_keys) -> Path:
    """A tiny CPU training config: 33x33 crops of ``images`` 40x44 PNGs, batch 2 (2 iterations per epoch), a
    checkpoint every epoch."""
    keys = dict(train_h=33, train_w=33, manual_seed=7, save_freq=1, keep_checkpoints=2)
    keys.update(train_keys)
    return write_tiny_config(tmp_path, dataset=dict(count=images, size=(40, 44), image_ext="png", void_rows=0),
                             **keys)


def child_env(**extra) -> dict:
    """One thread per process, unbuffered logs, no torchrun variables inherited from the test runner."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO_ROOT))
    env.update(extra)
    return env


def start_train(config: Path, log: Path, *opts, **popen) -> subprocess.Popen:
    handle = open(log, "w")
    try:
        return subprocess.Popen([sys.executable, str(TRAIN_PY), "--config", str(config), *map(str, opts)],
                                cwd=REPO_ROOT, env=child_env(), stdout=handle, stderr=subprocess.STDOUT, **popen)
    finally:
        handle.close()  # the child keeps its own descriptor


def wait_for(condition, process: subprocess.Popen, timeout: float, poll: float = 0.002) -> bool:
    """Poll ``condition()`` until it holds (True) or ``process`` ends / ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return condition()
        time.sleep(poll)
    return False


def sigkill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)


def epoch_checkpoints(save_path: Path) -> dict:
    return {int(m.group(1)): save_path / name for name in os.listdir(save_path)
            if (m := re.match(r"^train_epoch_(\d+)\.pth$", name))} if save_path.is_dir() else {}


def temporaries(save_path: Path) -> list:
    return [name for name in os.listdir(save_path) if TEMPORARY.match(name)] if save_path.is_dir() else []


def assert_checkpoints_whole(save_path: Path) -> int:
    """Every checkpoint on disk loads with weights_only=True and holds the epoch its name says.
    Returns the newest saved epoch (0 if none)."""
    found = epoch_checkpoints(save_path)
    for epoch, path in found.items():
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # raises on a truncated file
        assert checkpoint["epoch"] == epoch, path
        assert len(checkpoint["state_dict"]) > 100 and checkpoint["optimizer"]["state"], path
    return max(found, default=0)


def assert_one_line_error(output: str, prefix: str, *fragments: str) -> str:
    """``output`` (stderr) ends with a single ``prefix ...`` line holding every fragment; no traceback."""
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines, "no error message"
    message = lines[-1]
    assert message.startswith(prefix), output[-3000:]
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# SIGKILL at any moment: resume auto finishes the run, nothing on disk is ever truncated


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_auto_finishes(tmp_path):
    """Kill -9 during an iteration, during a checkpoint write and at random moments; after each kill every
    checkpoint on disk is whole, and ``resume auto`` restarts from the newest one (losing only the work
    done since) until the run completes with the right epoch count."""
    epochs = 4
    config = write_config(tmp_path, epochs=epochs, resume="auto", **REAL_MODEL_KEYS)
    save_path = tmp_path / "model"
    rng = random.Random(8)  # fixed seed: the "random" kill moments are the same on every CI run
    launches = []

    def launch(kill):
        """Start (resuming), apply ``kill(process, log)``, check the invariants. Returns the log text."""
        saved_before = assert_checkpoints_whole(save_path)
        log = tmp_path / f"launch{len(launches)}.log"
        process = start_train(config, log)
        try:
            kill(process, log)
        finally:
            sigkill(process)
        text = log.read_text()
        launches.append(text)
        # The restart continued exactly from the newest checkpoint that existed when it started.
        if saved_before:
            path = save_path / f"train_epoch_{saved_before}.pth"
            expected = f"resumed from {path}: {saved_before} epoch(s) done"
        else:
            expected = "starting from scratch"
        if "Epoch: [" in text or "resumed from" in text:  # got as far as loading the checkpoint
            assert expected in text, text[-3000:]
        assert_checkpoints_whole(save_path)
        return text

    # 1. during an iteration of epoch 2 (epoch 1's checkpoint is on disk)
    def during_iteration(process, log):
        assert wait_for(lambda: "Epoch: [2/4][1/2]" in log.read_text(), process, 300, poll=0.01), log.read_text()
    launch(during_iteration)
    assert sorted(epoch_checkpoints(save_path)) == [1]

    # 2. during a checkpoint write: the temporary file of save_checkpoint exists, the rename has not happened
    def during_checkpoint_write(process, log):
        assert wait_for(lambda: temporaries(save_path), process, 300), log.read_text()[-3000:]
    launch(during_checkpoint_write)
    stale = temporaries(save_path)
    assert stale, "the kill was meant to land inside a checkpoint write"
    assert stale[0].startswith(".train_epoch_2.pth.") and sorted(epoch_checkpoints(save_path)) == [1]

    # 3. at two random moments once training has resumed: inside iterations, checkpoint writes or
    #    between them (the stale temporary file of step 2 must not confuse resume)
    for _ in range(2):
        delay = rng.uniform(0.0, 3.0)

        def at_random_moment(process, log, delay=delay):
            assert wait_for(lambda: "resumed from" in log.read_text(), process, 300, poll=0.01), log.read_text()
            time.sleep(delay)
        text = launch(at_random_moment)
        if len(launches) == 3:
            assert f"removed {save_path / stale[0]}" in text  # a killed write's leftovers are cleaned up
    assert not [name for name in temporaries(save_path) if name in stale]

    # 4. no more kills: the run completes
    final_log = tmp_path / "final.log"
    saved_before = assert_checkpoints_whole(save_path)
    process = start_train(config, final_log)
    assert process.wait(timeout=600) == 0, final_log.read_text()[-3000:]
    text = final_log.read_text()
    assert f"resumed from {save_path / f'train_epoch_{saved_before}.pth'}: {saved_before} epoch(s) done" in text
    assert "training finished" in text
    assert sorted(epoch_checkpoints(save_path)) == [3, 4]  # keep_checkpoints 2
    final = torch.load(save_path / "train_epoch_4.pth", map_location="cpu", weights_only=True)
    assert final["epoch"] == epochs and final["scheduler"]["last_epoch"] == epochs * 2  # 2 iterations per epoch
    assert [group["lr"] for group in final["optimizer"]["param_groups"]] == [0.0, 0.0]
    assert not temporaries(save_path)
    # every epoch was trained (at least once), none was skipped
    all_logs = "".join(launches) + text
    for epoch in range(1, epochs + 1):
        assert f"Train result at epoch [{epoch}/{epochs}]" in all_logs
    shutil.rmtree(save_path)  # 275 MB checkpoints: do not keep them in pytest's retained temp folders


# ---------------------------------------------------------------------------------------------
# A dead or hung peer in a distributed run: the others stop within a bounded time


def _descendants(pid: int) -> list:
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid:
            children.append(int(entry))
            children.extend(_descendants(int(entry)))
    return children


def _rank_of(pid: int):
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            variables = handle.read().split(b"\0")
    except OSError:
        return None
    for variable in variables:
        if variable.startswith(b"RANK="):
            return int(variable[5:])
    return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_torchrun_rank_killed_whole_run_stops(tmp_path):
    """SIGKILL one of two torchrun workers mid-training: the launcher exits non-zero within a bound and
    no worker is left behind."""
    config = write_config(tmp_path, images=8, batch_size=4, epochs=50, save_freq=100, dist_timeout=15,  # 2 per rank
                          **REAL_MODEL_KEYS)
    log = tmp_path / "torchrun.log"
    with open(log, "w") as handle:
        launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                     "--nproc_per_node=2", str(TRAIN_PY), "--config", str(config)],
                                    cwd=REPO_ROOT, env=child_env(), stdout=handle, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    try:
        assert wait_for(lambda: "Epoch: [2/50][1/2]" in log.read_text(), launcher, 300, poll=0.05), \
            log.read_text()[-3000:]
        workers = {_rank_of(pid): pid for pid in _descendants(launcher.pid) if _rank_of(pid) is not None}
        assert set(workers) == {0, 1}, workers
        start = time.monotonic()
        os.kill(workers[1], signal.SIGKILL)
        returncode = launcher.wait(timeout=90)
        elapsed = time.monotonic() - start
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert returncode != 0 and elapsed < 90
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers.values() if _alive(pid)], "a worker outlived the launcher"


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["hung-peer", "dead-main"])
def test_peer_lost_without_launcher_survivor_exits(tmp_path, fault):
    """Two ranks started separately (as on two machines: no torchrun agent to tear the group down).
    ``hung-peer``: rank 1 is frozen (SIGSTOP); rank 0 must fail by ``dist_timeout`` instead of waiting forever.
    ``dead-main``: rank 0 is killed (SIGKILL); rank 1 must fail promptly."""
    timeout = 8
    config = write_config(tmp_path, images=8, batch_size=4, epochs=50, save_freq=100, dist_timeout=timeout,
                          **REAL_MODEL_KEYS)
    port = free_port()
    processes, logs = [], []
    for rank in range(2):
        logs.append(tmp_path / f"rank{rank}.log")
        env = child_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(port))
        with open(logs[-1], "w") as handle:
            processes.append(subprocess.Popen([sys.executable, str(TRAIN_PY), "--config", str(config)], cwd=REPO_ROOT,
                                              env=env, stdout=handle, stderr=subprocess.STDOUT))
    victim, survivor = (1, 0) if fault == "hung-peer" else (0, 1)
    try:
        assert wait_for(lambda: "Epoch: [2/50][1/2]" in logs[0].read_text(), processes[0], 300, poll=0.05), \
            logs[0].read_text()[-3000:] + logs[1].read_text()[-3000:]
        start = time.monotonic()
        os.kill(processes[victim].pid, signal.SIGSTOP if fault == "hung-peer" else signal.SIGKILL)
        returncode = processes[survivor].wait(timeout=120)
        elapsed = time.monotonic() - start
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()  # SIGKILL also ends a stopped process
            process.wait()
    output = logs[survivor].read_text()
    assert returncode != 0, output[-3000:]
    assert elapsed < timeout + 50, elapsed
    if fault == "hung-peer":
        assert elapsed >= timeout - 1  # it waited for the configured timeout, then gave up
        assert re.search(r"time(d)? ?out", output, re.IGNORECASE), output[-3000:]


# ---------------------------------------------------------------------------------------------
# Full disk during a checkpoint write


class DiskFull:
    """A file whose writes fail with ENOSPC once ``capacity`` bytes have been written."""

    def __init__(self, handle, capacity: int):
        self._handle, self._capacity, self._written = handle, capacity, 0

    def write(self, data):
        if self._written + len(data) > self._capacity:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._written += len(data)
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


def fill_disk_on_checkpoint_write(monkeypatch, from_call: int, capacity: int = 4096):
    """Checkpoint writes number ``from_call`` and later hit a full disk after ``capacity`` bytes (a checkpoint
    of the tiny network is about 45 KB)
    (util.runtime.checkpoint_io.save_checkpoint opens its temporary file with os.fdopen(fd, "wb"))."""
    real_fdopen = os.fdopen
    calls = []

    def fdopen(fd, mode="r", *args, **kwargs):
        handle = real_fdopen(fd, mode, *args, **kwargs)
        if mode != "wb":
            return handle
        calls.append(fd)
        return DiskFull(handle, capacity) if len(calls) >= from_call else handle

    monkeypatch.setattr(os, "fdopen", fdopen)
    return calls


def test_disk_full_save_checkpoint_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "latest.pth"
    save_checkpoint({"epoch": 1, "weights": torch.arange(10.0)}, path)
    fill_disk_on_checkpoint_write(monkeypatch, from_call=1, capacity=4096)
    with pytest.raises(OSError) as info:
        save_checkpoint({"epoch": 2, "weights": torch.zeros(1 << 20)}, path)  # 4 MB: fails midway
    # the cause, not torch's opaque "unexpected pos" RuntimeError
    assert info.value.errno == errno.ENOSPC and str(path) in str(info.value)
    monkeypatch.undo()
    previous = load_checkpoint_file(path)
    assert previous["epoch"] == 1 and torch.equal(previous["weights"], torch.arange(10.0))
    assert sorted(os.listdir(tmp_path)) == ["latest.pth"]  # no temporary file left


def test_disk_full_during_training_previous_checkpoint_intact_then_resume(tmp_path, monkeypatch, train_tool,
                                                                          capsys):
    config = write_config(tmp_path, epochs=2, resume="auto")
    save_path = tmp_path / "model"
    calls = fill_disk_on_checkpoint_write(monkeypatch, from_call=2)  # epoch 1 saves, epoch 2 finds the disk full
    monkeypatch.setattr(sys, "argv", ["train.py", "--config", str(config)])
    assert run_cli(train_tool.main) == 1
    assert len(calls) == 2
    message = assert_one_line_error(capsys.readouterr().err, "error: could not write checkpoint",
                                    str(save_path / "train_epoch_2.pth"), "No space left on device", "intact")
    assert "\n" not in message
    # (the run's TensorBoard events and its log + effective config, train-STAMP.{log,yaml}, live there too)
    assert sorted(os.listdir(save_path)) == sorted(["train_epoch_1.pth"] +
                                                   [n for n in os.listdir(save_path) if n.startswith("events.")
                                                    or re.fullmatch(r"train-\d{8}_\d{6}\.(log|yaml)", n)])
    assert load_checkpoint_file(save_path / "train_epoch_1.pth")["epoch"] == 1

    monkeypatch.undo()  # space freed: resume auto redoes only epoch 2
    summary = train_tool.main(["--config", str(config)])
    assert summary["epochs"] == 2
    assert "resumed from" in capsys.readouterr().out
    assert load_checkpoint_file(save_path / "train_epoch_2.pth")["epoch"] == 2
    shutil.rmtree(save_path)


def _limit_file_size():
    """In the child: files larger than 20 KB cannot be written (EFBIG; Python ignores SIGXFSZ): the run's log,
    config copy and events stay below, a checkpoint of the tiny network (about 45 KB) does not."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (20 << 10, 20 << 10))


@pytest.mark.slow
def test_real_write_failure_through_the_cli(tmp_path):
    """A write the kernel refuses (file size limit: the same path as a full disk or quota) stops the run
    with one line naming the checkpoint; no partial file is left."""
    config = write_config(tmp_path, epochs=1)
    proc = subprocess.run([sys.executable, str(TRAIN_PY), "--config", str(config)], cwd=REPO_ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=600, preexec_fn=_limit_file_size)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert_one_line_error(proc.stderr, "error: could not write checkpoint",
                          str(tmp_path / "model" / "train_epoch_1.pth"), "File too large")
    assert not epoch_checkpoints(tmp_path / "model") and not temporaries(tmp_path / "model")


# ---------------------------------------------------------------------------------------------
# Config errors and an unwritable save_path: reported before any model (or data) is built


def _forbid_heavy_work(monkeypatch):
    import model
    import util.data.dataset

    def fail(*args, **kwargs):
        raise AssertionError("a model or dataset was built before the config was checked")

    monkeypatch.setattr(model, "build_model", fail)
    monkeypatch.setattr(util.data.dataset, "SegDataset", fail)


# case -> (YAML edit (old, new) or None, overrides ({tmp} = the test's folder), expected message fragment)
CONFIG_CASES = {
    "yaml-typo": (("TRAIN:\n", "TRAIN:\n  base_lrr: 0.01\n"), [], "did you mean 'base_lr'"),
    "yaml-wrong-type": (("epochs: 2", "epochs: three"), [], "'epochs' must be of type int"),
    "override-typo": (None, ["epoch", "3"], "did you mean 'epochs'"),
    "override-wrong-type": (None, ["batch_size", "2.5"], "'batch_size' must be of type int"),
    "fp16-on-cpu": (None, ["precision", "fp16"], "fp16 needs a CUDA device"),
    "evaluate-without-val-list": (None, ["evaluate", "True", "val_list", "''"], "val_list is not set"),
    "empty-val-list": (None, ["evaluate", "True", "val_list", "{tmp}/empty.txt"],
                       "val_list: list file {tmp}/empty.txt has no entries; evaluate False trains without validation"),
    "empty-train-list": (None, ["train_list", "{tmp}/empty.txt"],
                         "train_list: list file {tmp}/empty.txt has no entries"),
    "crop-size": (None, ["train_h", "64"], "(train_h - 1) % 8 == 0"),
    "start-epoch": (None, ["start_epoch", "2", "epochs", "2"], "start_epoch must be in [0, epochs)"),
    "missing-resume": (None, ["resume", "{tmp}/nope.pth"], "resume checkpoint not found"),
    "missing-weight": (None, ["weight", "{tmp}/nope.pth"], "weight file not found"),
    "save-path-under-file": (None, ["save_path", "{tmp}/a_file/model"], "is not a writable directory"),
    "save-path-is-file": (None, ["save_path", "{tmp}/a_file"], "is not a writable directory"),
}


def _config_case(tmp_path: Path, case: str):
    """(config path, overrides, expected message fragment) for one kind of config error."""
    yaml_edit, overrides, fragment = CONFIG_CASES[case]
    config = write_config(tmp_path)
    if yaml_edit is not None:
        text = config.read_text()
        assert text.count(yaml_edit[0]) == 1
        config.write_text(text.replace(*yaml_edit))
    (tmp_path / "a_file").write_text("a file where a directory should be")
    (tmp_path / "empty.txt").write_text("\n")
    return config, [item.format(tmp=tmp_path) for item in overrides], fragment.format(tmp=tmp_path)


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_error_before_model_is_built(tmp_path, monkeypatch, capsys, train_tool, case):
    config, overrides, fragment = _config_case(tmp_path, case)
    _forbid_heavy_work(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["train.py", "--config", str(config), *overrides])
    assert run_cli(train_tool.main) == 2
    assert_one_line_error(capsys.readouterr().err, "config error: ", fragment)
    if not case.startswith("save-path"):
        assert not (tmp_path / "model").exists()  # nothing written either


@pytest.mark.slow
def test_config_errors_through_the_command_line(tmp_path):
    """The real entry point: status 2, one line, no model built (its log line never appears); run concurrently."""
    cases = ["override-typo", "yaml-wrong-type", "fp16-on-cpu", "save-path-under-file"]
    running = []
    for case in cases:
        folder = tmp_path / case
        folder.mkdir()
        config, overrides, fragment = _config_case(folder, case)
        running.append((case, fragment, folder, subprocess.Popen(
            [sys.executable, str(TRAIN_PY), "--config", str(config), *overrides], cwd=REPO_ROOT, env=child_env(),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    for case, fragment, folder, process in running:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 2, (case, out[-2000:], err[-2000:])
        assert_one_line_error(err, "config error: ", fragment)
        assert MODEL_BUILT not in out and not (folder / "model").exists(), case
