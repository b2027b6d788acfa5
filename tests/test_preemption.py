"""Preemption: a stop signal (SIGTERM, or SIGUSR1 sent ahead by sbatch --signal) ends training after the
current iteration with a mid-epoch checkpoint, from which ``resume auto`` finishes exactly as an
uninterrupted run would."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from util.engine.checkpoints import find_resume_checkpoint, prune_checkpoints
from util.runtime.cli import StopSignals
from util.runtime.distributed import TrainSampler
from util.runtime.runs import checkpoint_path, list_training_checkpoints

from conftest import REPO_ROOT
from tiny_runs import REAL_MODEL_KEYS, write_tiny_config

TRAIN_PY = REPO_ROOT / "tool" / "train.py"


def test_stop_signals_set_a_flag_and_the_exit_status():
    previous = signal.getsignal(signal.SIGUSR1)
    with StopSignals() as stop:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGUSR1)  # would end the process without the handler
        deadline = time.monotonic() + 10
        while not stop.requested() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal keeps the first one's name
        time.sleep(0.05)
    assert stop.requested() and stop.name == "SIGUSR1" and stop.exit_status == 128 + signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is previous  # handlers restored


def test_mid_epoch_checkpoints_are_resumed_first_and_pruned_once_superseded(tmp_path):
    assert checkpoint_path(tmp_path, 3) == str(tmp_path / "train_epoch_3.pth")
    assert checkpoint_path(tmp_path, 3, iteration=7) == str(tmp_path / "train_epoch_4_iter_7.pth")
    for name in ("train_epoch_2.pth", "train_epoch_3.pth", "train_epoch_3_iter_5.pth", "train_epoch_4_iter_7.pth"):
        (tmp_path / name).write_bytes(b"x")
    assert [position for position, _ in list_training_checkpoints(tmp_path)] == [(2, 0), (2, 5), (3, 0), (3, 7)]
    assert find_resume_checkpoint("auto", tmp_path) == str(tmp_path / "train_epoch_4_iter_7.pth")
    prune_checkpoints(tmp_path, keep=5)  # the stale mid-epoch file of epoch 3 goes, epoch files stay
    assert sorted(os.listdir(tmp_path)) == ["train_epoch_2.pth", "train_epoch_3.pth", "train_epoch_4_iter_7.pth"]
    (tmp_path / "train_epoch_4.pth").write_bytes(b"x")  # epoch 4 finished: its mid-epoch file is done with
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["train_epoch_3.pth", "train_epoch_4.pth"]


def test_train_sampler_continues_an_epoch_part_way():
    full = TrainSampler(range(10), num_replicas=2, rank=1, shuffle=True, seed=4)
    full.set_epoch(3)
    order = list(full)
    part = TrainSampler(range(10), num_replicas=2, rank=1, shuffle=True, seed=4)
    part.set_epoch(3, start=2)
    assert list(part) == order[2:] and len(part) == len(order) - 2
    part.set_epoch(4)
    assert len(part) == len(order)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO_ROOT))
    return env


def _train(config: Path, save_path: Path, *opts, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TRAIN_PY), "--config", str(config), "save_path", str(save_path),
                           *opts], cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _train_result(output: str, epoch: int) -> str:
    """The epoch's summary line without its duration."""
    match = re.search(rf"Train result at epoch \[{epoch}/\d+\]: [^(]*", output)
    assert match, output[-3000:]
    return match.group(0)


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_auto_equals_uninterrupted(tmp_path):
    # 8 images, batch 2: 4 iterations per epoch, 2 epochs; DataLoader workers as in a real run (the
    # signal goes to the whole process group, workers included, as SLURM sends it).
    # ResNet-50: its steps last long enough for the signal to land inside epoch 1 on a busy machine.
    config = write_tiny_config(tmp_path, dataset=dict(count=8), epochs=2, workers=2, save_freq=1, **REAL_MODEL_KEYS)
    reference = _train(config, tmp_path / "uninterrupted")
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]

    save_path = tmp_path / "preempted"
    log = tmp_path / "preempted.log"
    with open(log, "w") as handle:
        process = subprocess.Popen([sys.executable, str(TRAIN_PY), "--config", str(config), "save_path",
                                    str(save_path)], cwd=REPO_ROOT, env=_env(), stdout=handle,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while "Epoch: [1/2][1/4]" not in log.read_text() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert process.poll() is None, log.read_text()[-3000:]
        os.killpg(process.pid, signal.SIGTERM)
        status = process.wait(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    output = log.read_text()
    assert status == 128 + signal.SIGTERM, output[-3000:]
    saved = [name for name in os.listdir(save_path) if name.endswith(".pth")]
    assert len(saved) == 1 and re.fullmatch(r"train_epoch_1_iter_[123]\.pth", saved[0]), saved
    iteration = int(re.search(r"iter_(\d)", saved[0]).group(1))
    assert f"SIGTERM received: stopped at epoch 1, iteration {iteration}/4; saved {save_path / saved[0]}" in output
    assert "stopped: SIGTERM received" in output and "Traceback" not in output
    assert re.search(r"resume with: python \S*train.py --config \S+ save_path \S+ resume auto", output)

    resumed = _train(config, save_path, "resume", "auto")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "0 epoch(s) done" in resumed.stdout
    assert f"was written mid-epoch: epoch 1 continues after {iteration}/4 iterations" in resumed.stdout
    # the interrupted epoch's statistics include the iterations before the signal
    assert _train_result(resumed.stdout, 1) == _train_result(reference.stdout, 1)
    assert sorted(os.listdir(save_path)).count(saved[0]) == 0  # superseded by train_epoch_1.pth, pruned

    expected = torch.load(tmp_path / "uninterrupted" / "train_epoch_2.pth", map_location="cpu", weights_only=True)
    got = torch.load(save_path / "train_epoch_2.pth", map_location="cpu", weights_only=True)
    for key, value in expected["state_dict"].items():
        assert torch.equal(got["state_dict"][key], value), key
    for index, state in expected["optimizer"]["state"].items():
        assert torch.equal(got["optimizer"]["state"][index]["momentum_buffer"], state["momentum_buffer"]), index
    assert got["scheduler"] == expected["scheduler"]


@pytest.mark.slow
def test_signal_to_one_srun_task_stops_both_at_the_same_iteration(tmp_path):
    """SLURM may signal the tasks at slightly different times; here only task 1 gets SIGUSR1. Both stop
    after the same iteration (the flag rides on the iteration's collective), rank 0 saves every rank's
    random state, and the two tasks resumed with 'resume auto' finish the run."""
    from util.runtime.distributed import _free_port

    config = write_tiny_config(tmp_path, dataset=dict(count=16), epochs=1, batch_size=4, print_freq=1,  # 4 iterations
                               **REAL_MODEL_KEYS)  # ResNet-50: slow enough steps for the signal to land mid-epoch
    save_path = tmp_path / "model"
    port = _free_port()

    def start(rank, *opts):
        env = _env()
        env.update(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS="2", SLURM_STEP_ID="0",
                   SLURM_JOB_ID="77", SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(port))
        log = open(tmp_path / f"task{rank}-{len(opts)}.log", "w")
        try:
            return subprocess.Popen([sys.executable, str(TRAIN_PY), "--config", str(config), "save_path",
                                     str(save_path), *opts], cwd=REPO_ROOT, env=env, stdout=log,
                                    stderr=subprocess.STDOUT)
        finally:
            log.close()

    tasks = [start(rank) for rank in range(2)]
    try:
        log0 = tmp_path / "task0-0.log"
        deadline = time.monotonic() + 300
        while "Epoch: [1/1][1/4]" not in log0.read_text() and time.monotonic() < deadline \
                and all(task.poll() is None for task in tasks):
            time.sleep(0.02)
        assert all(task.poll() is None for task in tasks), log0.read_text()[-3000:]
        os.kill(tasks[1].pid, signal.SIGUSR1)
        statuses = [task.wait(timeout=300) for task in tasks]
    finally:
        for task in tasks:
            if task.poll() is None:
                task.kill()
                task.wait()
    output = log0.read_text()
    assert statuses == [128 + signal.SIGUSR1] * 2, output[-3000:] + (tmp_path / "task1-0.log").read_text()[-3000:]
    saved = [name for name in os.listdir(save_path) if name.endswith(".pth")]
    assert len(saved) == 1 and re.fullmatch(r"train_epoch_1_iter_[123]\.pth", saved[0]), saved
    assert "SIGUSR1 received: stopped at epoch 1, iteration" in output
    checkpoint = torch.load(save_path / saved[0], map_location="cpu", weights_only=True)
    assert checkpoint["world_size"] == 2 and len(checkpoint["rng_states"]) == 2
    assert checkpoint["iters_per_epoch"] == 4 and checkpoint["epoch"] == 0

    port = _free_port()
    tasks = [start(rank, "resume", "auto") for rank in range(2)]
    statuses = [task.wait(timeout=300) for task in tasks]
    output = (tmp_path / "task0-2.log").read_text()
    assert statuses == [0, 0], output[-3000:]
    assert f"epoch 1 continues after {checkpoint['epoch_progress']['iteration']}/4 iterations" in output
    assert sorted(name for name in os.listdir(save_path) if name.endswith(".pth")) == ["train_epoch_1.pth"]
