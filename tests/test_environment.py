"""util/runtime/environment.py: where a run ran (versions, hardware, code version), as data and log lines."""
import json
import platform
import shutil
import subprocess

import cv2
import numpy as np
import pytest
import torch

from util.runtime import environment
from util.runtime.environment import code_version, collect_environment, cpu_from_cpuinfo, cuda_info, format_environment

from conftest import REPO_ROOT

X86_BF16 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9B45 128-Core Processor
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni
"""
X86_PLAIN = X86_BF16.replace(" avx512_bf16", "").replace("AMD EPYC 9B45 128-Core Processor", "Intel(R) Xeon(R)")
ARM_BF16 = """processor\t: 0
Features\t: fp asimd sve bf16 i8mm
CPU implementer\t: 0x41
"""


def test_record_is_json_and_names_the_versions():
    record = collect_environment()
    assert json.loads(json.dumps(record)) == record
    assert record["python"] == platform.python_version() and record["torch"] == torch.__version__
    assert record["numpy"] == np.__version__ and record["opencv"] == cv2.__version__
    assert record["torchvision"] is None or isinstance(record["torchvision"], str)
    assert (record["cuda"] is None) == (not torch.cuda.is_available())
    assert record["cpu"]["cores"] >= 1 and record["cpu"]["native_bf16"] in (True, False, None)
    if (REPO_ROOT / ".git").exists() and shutil.which("git"):  # this checkout's own commit
        assert len(record["code"]["commit"]) == 40 and record["code"]["dirty"] in (True, False)


def test_cpu_model_and_native_bf16_from_cpuinfo(tmp_path):
    assert cpu_from_cpuinfo(X86_BF16) == {"model": "AMD EPYC 9B45 128-Core Processor", "native_bf16": True}
    assert cpu_from_cpuinfo(X86_PLAIN) == {"model": "Intel(R) Xeon(R)", "native_bf16": False}
    assert cpu_from_cpuinfo(ARM_BF16)["native_bf16"] is True
    assert cpu_from_cpuinfo(X86_BF16.replace("avx512_bf16", "amx_bf16"))["native_bf16"] is True
    path = tmp_path / "cpuinfo"
    path.write_text(X86_BF16 + "\n" + X86_PLAIN)  # the first processor's lines count
    info = environment.cpu_info(str(path))
    assert info["model"] == "AMD EPYC 9B45 128-Core Processor" and info["native_bf16"] is True
    assert environment.cpu_info(str(tmp_path / "absent"))["native_bf16"] is None  # not Linux: unknown


def test_cuda_versions_and_gpu_names(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: f"NVIDIA H100 #{index}")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 90100)
    info = cuda_info()
    assert info == {"cuda": "12.8", "cudnn": 90100, "gpus": ["NVIDIA H100 #0", "NVIDIA H100 #1"]}
    lines = format_environment({**collect_environment(), "cuda": info})
    assert "CUDA 12.8, cuDNN 90100, GPU 0: NVIDIA H100 #0, 1: NVIDIA H100 #1" in lines
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cuda_info() is None


def _git(folder, *args):
    subprocess.run(["git", "-C", str(folder), *args], check=True, capture_output=True)


def test_commit_and_uncommitted_changes_of_a_checkout(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    _git(tmp_path, "add", "a.py")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert code_version(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "untracked.txt").write_text("a run's output")  # not the code: still clean
    assert code_version(tmp_path)["dirty"] is False
    (tmp_path / "a.py").write_text("x = 2\n")
    assert code_version(tmp_path) == {"commit": head, "dirty": True}
    assert f"code: git commit {head} (with uncommitted changes)" in format_environment(
        {**collect_environment(), "code": code_version(tmp_path)})
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / ".git").write_text("not a repository")  # git fails here: no commit, no crash
    assert code_version(plain) is None


def test_git_missing_or_slow_is_no_commit(tmp_path, monkeypatch):
    def missing(*args, **kwargs):
        raise FileNotFoundError("git")

    def slow(command, **kwargs):
        assert kwargs["timeout"] == environment.GIT_TIMEOUT_S
        raise subprocess.TimeoutExpired(command, kwargs["timeout"])

    for fake in (missing, slow):
        monkeypatch.setattr(environment.subprocess, "run", fake)
        assert code_version(tmp_path) is None
    record = collect_environment(tmp_path)
    assert record["code"] is None
    assert "code: not a git checkout (no commit recorded)" in format_environment(record)


def test_log_lines(monkeypatch):
    record = collect_environment()
    lines = format_environment(record)
    assert 3 <= len(lines) <= 4 and all("\n" not in line for line in lines)
    assert lines[0].startswith(f"environment: Python {platform.python_version()}, torch {torch.__version__}, ")
    assert f"numpy {np.__version__}, OpenCV {cv2.__version__}" in lines[0]
    cpu = {**record["cpu"], "model": "AMD EPYC", "native_bf16": True, "capability": "AVX512", "cores": 2}
    assert "CPU AMD EPYC (2 cores, native bf16, kernels AVX512)" in format_environment({**record, "cpu": cpu})
    assert "not installed" in format_environment({**record, "torchvision": None})[0]


def test_training_logs_it_once_and_every_checkpoint_and_metrics_json_carry_it(tmp_path, monkeypatch, train_tool,
                                                                             test_tool):
    """A run records where it ran: the training log at its start, each checkpoint (loadable with
    weights_only=True) under "environment", collected once per run; tool/test.py's metrics.json too."""
    from util.engine import training
    from util.runtime.environment import format_environment

    from tiny_runs import write_tiny_config

    calls = []

    def counted():
        calls.append(1)
        return collect_environment()

    monkeypatch.setattr(train_tool, "collect_environment", counted)
    monkeypatch.setattr(training, "train_iterations", lambda *a, **k: {
        "loss": 1.0, "main_loss": 1.0, "aux_loss": 0.0, "mIoU": 0.1, "mAcc": 0.1, "allAcc": 0.1})
    config = write_tiny_config(tmp_path, epochs=2, evaluate=True, save_freq=1, keep_checkpoints=5)
    train_tool.main(["--config", str(config)])
    assert len(calls) == 1  # once per run, not per checkpoint
    expected = collect_environment()
    log = next((tmp_path / "model").glob("train-*.log")).read_text()
    for line in format_environment(expected):
        assert line in log
    checkpoints = sorted((tmp_path / "model").glob("*.pth"))
    assert [p.name for p in checkpoints] == ["best_mIoU.pth", "train_epoch_1.pth", "train_epoch_2.pth"]
    for path in checkpoints:
        assert torch.load(path, weights_only=True)["environment"] == expected, path

    folder = tmp_path / "result"
    assert test_tool.main(["--config", str(config), "test_list", str(tmp_path / "data" / "list.txt"),
                           "model_path", str(checkpoints[-1]), "save_folder", str(folder)]) == 0
    assert json.loads((folder / "metrics.json").read_text())["environment"] == json.loads(json.dumps(expected))
