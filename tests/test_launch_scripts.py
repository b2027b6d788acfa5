"""The launch scripts that need hardware this machine lacks: tool/slurm_train.sh and tool/slurm_test.sh
with a stub ``srun`` on PATH (no cluster needed), and tool/gpu_check.sh without CUDA. The SLURM
launcher itself (srun's variables -> ranks, rendezvous) is tested in test_distributed.py."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import REPO_ROOT

# Prints every argument on its own line (quoting stays visible) and what the task would inherit.
STUB_SRUN = """#!/bin/sh
printf 'ARG %s\\n' "$@"
echo "NPROC=${NPROC:-unset}"
"""


def _run(script: str, args, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    stub = tmp_path / "bin" / "srun"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text(STUB_SRUN)
    stub.chmod(0o755)
    environment = {k: v for k, v in os.environ.items() if k not in ("GPUS", "GPUS_PER_NODE", "CPUS_PER_TASK",
                                                                     "SRUN_ARGS", "SLURM_TASK_SCRIPT")}
    environment.update(PATH=f"{stub.parent}{os.pathsep}{os.environ['PATH']}", **env)
    return subprocess.run(["sh", str(REPO_ROOT / "tool" / script), *args], cwd=tmp_path, env=environment,
                          capture_output=True, text=True, timeout=60)


CAMVID = ("camvid", "pyconvresnet50_pyconvsegnet")  # a DATASET EXP whose config exists


@pytest.mark.parametrize("script, task", [("slurm_train.sh", "train.sh"), ("slurm_test.sh", "test.sh")])
def test_srun_gets_tasks_partition_and_the_command(tmp_path, script, task):
    proc = _run(script, ["gpu-long", "psp50", "ade20k", "pyconvresnet50_pyconvsegnet", "epochs", "2",
                         "scales", "[0.5, 1.0]"], tmp_path, GPUS="16", CPUS_PER_TASK="6",
                SRUN_ARGS="--time=2-00:00:00 --qos=high", NPROC="4")
    assert proc.returncode == 0, proc.stderr
    args = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ARG ")]
    command = args.index("sh")
    assert args[:command] == ["-p", "gpu-long", "--job-name=psp50", "--gres=gpu:8", "--ntasks=16",
                              "--ntasks-per-node=8", "--cpus-per-task=6", "--kill-on-bad-exit=1",
                              "--time=2-00:00:00", "--qos=high"]
    # the same wrapper as a single-machine run, from any directory, every KEY VALUE kept whole
    assert args[command + 1:] == [str(REPO_ROOT / "tool" / task), "ade20k", "pyconvresnet50_pyconvsegnet",
                                  "epochs", "2", "scales", "[0.5, 1.0]"]
    assert "NPROC=unset" in proc.stdout  # srun made the processes: no torchrun inside each task


def test_defaults_and_fewer_gpus_than_a_node(tmp_path):
    args = [line[4:] for line in _run("slurm_train.sh", ["p", "j", *CAMVID], tmp_path).stdout.splitlines()
            if line.startswith("ARG ")]
    assert "--ntasks=8" in args and "--ntasks-per-node=8" in args and "--cpus-per-task=5" in args
    args = [line[4:] for line in _run("slurm_train.sh", ["p", "j", *CAMVID], tmp_path,
                                      GPUS="2").stdout.splitlines() if line.startswith("ARG ")]
    assert "--ntasks=2" in args and "--ntasks-per-node=2" in args and "--gres=gpu:2" in args


def test_usage_without_enough_arguments(tmp_path):
    proc = _run("slurm_test.sh", ["gpu", "job"], tmp_path)
    assert proc.returncode == 2 and "usage:" in proc.stderr and "slurm_test.sh PARTITION JOB_NAME" in proc.stderr
    assert "ARG" not in proc.stdout  # srun never ran


@pytest.mark.parametrize("script", ["slurm_train.sh", "slurm_test.sh"])
def test_help_and_mistyped_config_before_srun(tmp_path, script):
    """--help is status 0 (as train.sh --help); a config that does not exist is status 2, srun never runs."""
    for flag in ("--help", "-h"):
        proc = _run(script, [flag], tmp_path)
        assert proc.returncode == 0 and f"{script} PARTITION JOB_NAME" in proc.stderr and "ARG" not in proc.stdout
    proc = _run(script, ["gpu", "job", "camvid", "pyconvresnet50_pyconvsegnt", "epochs", "2"], tmp_path)
    assert proc.returncode == 2 and "ARG" not in proc.stdout
    missing = REPO_ROOT / "config" / "camvid" / "camvid_pyconvresnet50_pyconvsegnt.yaml"
    assert proc.stderr.splitlines()[0] == f"config not found: {missing}"


@pytest.mark.slow  # runs Python (torch) in a process
def test_gpu_check_without_cuda_says_so_and_passes(tmp_path):
    environment = dict(os.environ, CUDA_VISIBLE_DEVICES="", GPU_CHECK_DIR=str(tmp_path / "work"))
    proc = subprocess.run(["bash", str(REPO_ROOT / "tool" / "gpu_check.sh")], cwd=tmp_path, env=environment,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("gpu_check: no CUDA device visible") and "every check skipped" in proc.stdout
    assert not list((tmp_path / "work").iterdir())  # nothing ran
