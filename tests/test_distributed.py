"""util/runtime/distributed.py and a real 2-process CPU training run under torchrun."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from util.config import load_cfg
from util.runtime import distributed as dist_utils

from conftest import REPO_ROOT


def _clean_env(**extra):
    """The environment for a child launcher: no inherited torchrun variables, one thread each."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), **extra)
    return env


def _torchrun(args, cwd, timeout=240):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# Single-process behaviour


def test_single_process_context(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    cfg = load_cfg(None, ["device", "cpu"])
    ctx = dist_utils.init_distributed(cfg)
    assert ctx == dist_utils.DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"),
                                         is_main=True, distributed=False)
    assert not dist_utils.is_distributed()
    assert dist_utils.get_rank() == 0 and dist_utils.get_world_size() == 1
    t = torch.tensor([1.0, 2.0])
    assert dist_utils.all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]
    assert dist_utils.broadcast_object({"a": 1}) == {"a": 1}
    dist_utils.barrier()
    dist_utils.cleanup()


def test_spawn_decision(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    cfg = load_cfg(None, ["train_gpu", "[0, 1]"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not dist_utils.should_spawn(cfg)  # CPU: one process
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dist_utils.should_spawn(cfg)
    assert not dist_utils.should_spawn(load_cfg(None, ["train_gpu", "[0, 1]", "device", "cpu"]))
    assert not dist_utils.should_spawn(load_cfg(None, ["train_gpu", "[0]"]))
    assert not dist_utils.should_spawn(load_cfg(None, ["train_gpu", "[0, 1]", "multiprocessing_distributed", "False"]))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert not dist_utils.should_spawn(cfg)  # torchrun already made the processes
    assert dist_utils.spawn_world(load_cfg(None, ["train_gpu", "[0, 1, 2]", "world_size", "2"])) == (3, 6)


def test_rendezvous_address(monkeypatch):
    assert dist_utils.rendezvous_address("tcp://10.0.0.5:23456") == ("10.0.0.5", 23456)
    monkeypatch.setenv("MASTER_ADDR", "node1")
    monkeypatch.setenv("MASTER_PORT", "1234")
    assert dist_utils.rendezvous_address("env://") == ("node1", 1234)
    monkeypatch.delenv("MASTER_ADDR")
    host, port = dist_utils.rendezvous_address("env://")
    assert host == "127.0.0.1" and 0 < port < 65536
    with pytest.raises(ValueError, match="tcp://HOST:PORT"):
        dist_utils.rendezvous_address("tcp://nohost")
    with pytest.raises(ValueError):
        dist_utils.rendezvous_address("file:///tmp/x")


SLURM_VARIABLES = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_STEP_ID", "SLURM_STEPID",
                   "SLURM_JOB_ID", "SLURM_JOBID", "SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST")


def _no_launcher(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", *SLURM_VARIABLES):
        monkeypatch.delenv(name, raising=False)


def test_nodelist_compact_forms():
    assert dist_utils.parse_nodelist("node[01-03,07]") == ["node01", "node02", "node03", "node07"]
    assert dist_utils.parse_nodelist("gpu5,gpu6") == ["gpu5", "gpu6"]
    assert dist_utils.parse_nodelist("gpu5") == ["gpu5"]
    assert dist_utils.parse_nodelist("a[8-10],b3") == ["a8", "a9", "a10", "b3"]
    assert dist_utils.parse_nodelist("n[098-100]") == ["n098", "n099", "n100"]  # zero padding kept
    assert dist_utils.parse_nodelist("r[1-2]-n[1,3]") == ["r1-n1", "r1-n3", "r2-n1", "r2-n3"]
    for bad in ("node[01-03", "node[3-1]", "node[a-b]", ""):
        with pytest.raises(ValueError, match="node list"):
            dist_utils.parse_nodelist(bad)


def test_nodelist_asks_scontrol_where_it_exists(tmp_path, monkeypatch):
    stub = tmp_path / "scontrol"
    stub.write_text("#!/bin/sh\n[ \"$1 $2\" = \"show hostnames\" ] && echo \"$3-expanded\" && echo other\n")
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert dist_utils.expand_nodelist("node[1-2]") == ["node[1-2]-expanded", "other"]
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert dist_utils.expand_nodelist("node[1-2]") == ["node1", "node2"]


def test_launcher_detection_and_slurm_rendezvous(monkeypatch):
    _no_launcher(monkeypatch)
    assert dist_utils.detect_launcher() == "single process" and dist_utils.launcher_world_size() == 1
    monkeypatch.setenv("PATH", "")  # no scontrol: the compact form is parsed
    srun = dict(SLURM_PROCID="3", SLURM_NTASKS="4", SLURM_LOCALID="1", SLURM_JOB_ID="123456",
                SLURM_JOB_NODELIST="gpu[07-08]")
    for name, value in srun.items():
        monkeypatch.setenv(name, value)
    # A job script running python without srun has these too, but no (real) step: one process.
    assert dist_utils.detect_launcher() == "single process"
    monkeypatch.setenv("SLURM_STEP_ID", str(0xFFFFFFFB))  # the batch script's pseudo step
    assert dist_utils.detect_launcher() == "single process"
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert dist_utils.detect_launcher() == "slurm" and dist_utils.launcher_world_size() == 4
    assert dist_utils.slurm_rendezvous() == ("gpu07", 20000 + 123456 % 10000)
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu08")  # the step's own nodes win over the job's
    monkeypatch.setenv("MASTER_PORT", "31000")
    assert dist_utils.slurm_rendezvous() == ("gpu08", 31000)
    monkeypatch.setenv("MASTER_ADDR", "10.1.2.3")
    assert dist_utils.slurm_rendezvous() == ("10.1.2.3", 31000)
    # torchrun started inside an srun task: torchrun's variables win
    for name, value in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0").items():
        monkeypatch.setenv(name, value)
    assert dist_utils.detect_launcher() == "torchrun" and dist_utils.launcher_world_size() == 2
    assert not dist_utils.launched_by_slurm()


def test_slurm_single_task_is_one_process(monkeypatch):
    _no_launcher(monkeypatch)
    for name, value in dict(SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_LOCALID="0", SLURM_STEP_ID="0").items():
        monkeypatch.setenv(name, value)
    ctx = dist_utils.init_distributed(load_cfg(None, ["device", "cpu"]))
    assert not ctx.distributed and ctx.world_size == 1 and ctx.launcher == "slurm"
    assert dist_utils.describe_launch(ctx).startswith("launcher: slurm, rank 0 of 1")


def test_multi_node_spawn_without_rendezvous_is_refused(monkeypatch):
    from util.errors import ConfigError

    _no_launcher(monkeypatch)
    with pytest.raises(ConfigError, match="MASTER_ADDR and MASTER_PORT.*tcp://HOST:PORT"):
        dist_utils.rendezvous_address("env://", nodes=2)
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    with pytest.raises(ConfigError, match="needs MASTER_PORT"):
        dist_utils.rendezvous_address("env://", nodes=2)
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert dist_utils.rendezvous_address("env://", nodes=2) == ("10.0.0.1", 29500)
    assert dist_utils.rendezvous_address("tcp://10.0.0.2:1234", nodes=2) == ("10.0.0.2", 1234)


def test_shard_sampler_scores_every_item_once():
    shards = [list(dist_utils.ShardSampler(7, num_replicas=3, rank=r)) for r in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(7))
    assert [len(dist_utils.ShardSampler(7, 3, r)) for r in range(3)] == [3, 2, 2]


# ---------------------------------------------------------------------------------------------
# Two real processes (gloo): collectives, and a bounded wait for a dead peer

COLLECTIVE_SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    import torch
    from util.config import load_cfg
    from util.runtime import distributed

    cfg = load_cfg(None, ["device", "cpu", "dist_timeout", "2"])
    ctx = distributed.init_distributed(cfg)
    t = torch.tensor([float(ctx.rank + 1)])
    distributed.all_reduce_sum(t)
    seed = distributed.broadcast_object(100 + ctx.rank)
    result = dict(rank=ctx.rank, world=ctx.world_size, local=ctx.local_rank, device=str(ctx.device),
                  is_main=ctx.is_main, distributed=ctx.distributed, backend=torch.distributed.get_backend(),
                  sum=t.item(), seed=seed, get_rank=distributed.get_rank(), get_world=distributed.get_world_size())
    if ctx.rank == 1:
        time.sleep(8)  # alive but never joins the next collective
    else:
        start = time.time()
        try:
            distributed.all_reduce_sum(torch.ones(1))
            result["timeout"] = None
        except Exception as exc:
            result["timeout"] = time.time() - start
    print("RESULT " + json.dumps(result), flush=True)
    os._exit(0)  # the group is broken on purpose: skip the clean-up that would wait on the peer
""")


@pytest.mark.slow
def test_two_process_collectives_and_timeout(tmp_path):
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVE_SCRIPT)
    proc = _torchrun([script], cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = sorted((json.loads(line.split("RESULT ", 1)[1]) for line in proc.stdout.splitlines()
                      if line.startswith("RESULT ")), key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert r["world"] == 2 and r["local"] == r["rank"] and r["device"] == "cpu" and r["distributed"]
        assert r["backend"] == "gloo" and r["sum"] == 3.0 and r["seed"] == 100
        assert r["get_rank"] == r["rank"] and r["get_world"] == 2
    assert results[0]["is_main"] and not results[1]["is_main"]
    # dist_timeout 2 s: rank 0 gives up long before its peer (asleep for 8 s) would answer.
    assert results[0]["timeout"] is not None and results[0]["timeout"] < 7


# ---------------------------------------------------------------------------------------------
# A real 2-process training run on CamVid


@pytest.mark.slow
def test_torchrun_two_process_camvid_run(tmp_path, camvid_root):
    from model import build_model
    from util.runtime.checkpoint_io import load_checkpoint_file

    lines = (camvid_root / "train.txt").read_text().splitlines()[:8]
    list_file = tmp_path / "camvid8.txt"
    list_file.write_text("\n".join(lines) + "\n")
    val_list = tmp_path / "camvid4.txt"
    val_list.write_text("\n".join(lines[:4]) + "\n")
    config = tmp_path / "camvid_tiny.yaml"
    config.write_text(textwrap.dedent(f"""
        DATA:
          data_root: {camvid_root}
          train_list: {list_file}
          val_list: {val_list}
          classes: 11
        TRAIN:
          arch: pyconvsegnet
          backbone_net: pyconvresnet
          layers: 50
          train_h: 65
          train_w: 65
          batch_size: 4
          batch_size_val: 2
          workers: 2
          epochs: 2
          base_lr: 0.001
          manual_seed: 3
          print_freq: 1
          save_path: {tmp_path / 'model'}
          evaluate: True
        TEST:
          device: cpu
    """))
    proc = _torchrun([REPO_ROOT / "tool" / "train.py", "--config", config], cwd=REPO_ROOT)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "2 process(es)" in output and "batch_size 4 in total over 2 process(es): 2 per process per step, " \
        "2 iterations per epoch" in output
    # validation is tool/test.py's whole-image protocol by default (val_mode whole), once per epoch
    assert "Val result at epoch [1/2] (whole images" in output and "Val result at epoch [2/2] (whole images" in output

    # (2 epochs: after 2 steps at 2 images per process, BatchNorm's running statistics give mIoU 0 on val)
    path = tmp_path / "model" / "train_epoch_2.pth"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # plain data only
    assert load_checkpoint_file(path)["epoch"] == 2
    assert set(checkpoint) == {"epoch", "state_dict", "optimizer", "scheduler", "scaler", "best_mIoU", "val_protocol",
                               "cfg", "environment"}
    assert checkpoint["scaler"] is None and isinstance(checkpoint["cfg"], dict)
    assert checkpoint["environment"]["torch"] == torch.__version__  # where the run ran (rank 0's record)
    assert checkpoint["cfg"]["classes"] == 11

    reference = build_model(load_cfg(str(config))).state_dict()
    assert list(checkpoint["state_dict"]) == [f"module.{key}" for key in reference]
    for key, value in reference.items():
        assert checkpoint["state_dict"][f"module.{key}"].shape == value.shape, key
    assert checkpoint["state_dict"]["module.cls.1.weight"].shape[0] == 11
    assert (tmp_path / "model" / "best_mIoU.pth").is_file()
    # the poly schedule ran to its end (2 epochs of 2): lr 0 in both groups
    assert [g["lr"] for g in checkpoint["optimizer"]["param_groups"]] == [0.0, 0.0]


# ---------------------------------------------------------------------------------------------
# The release's launch mode (train.py spawns one process per train_gpu entry), exercised on the CPU

SPAWN_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])  # tool/: the spawned children import `train` by this name
    import train
    from util.config import load_cfg
    from util.engine.run_checks import check_run_config

    if __name__ == "__main__":  # the spawned children re-import this file as __mp_main__
        config, opts = sys.argv[2], sys.argv[3:]
        cfg = load_cfg(config, opts)
        check_run_config(cfg)
        train.launch_spawned(cfg, config, opts)
        print("SPAWN DONE", flush=True)
""")


def _synthetic_list(root: Path, count: int = 4) -> Path:
    import cv2
    import numpy as np

    rng = np.random.default_rng(1)
    lines = []
    for i in range(count):
        cv2.imwrite(str(root / f"{i}.jpg"), rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
        cv2.imwrite(str(root / f"{i}.png"), rng.integers(0, 3, (40, 48), dtype=np.uint8))
        lines.append(f"{i}.jpg {i}.png")
    path = root / "list.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_spawn_mode_on_cpu(tmp_path):
    from tiny_model import TINY_MODEL_KEYS

    list_path = _synthetic_list(tmp_path)
    port = dist_utils._free_port()
    config = tmp_path / "spawn.yaml"
    config.write_text(textwrap.dedent(f"""
        DATA: {{data_root: {tmp_path}, train_list: {list_path}, classes: 3}}
        TRAIN: {{custom_imports: {TINY_MODEL_KEYS["custom_imports"]}, arch: {TINY_MODEL_KEYS["arch"]},
                 backbone_net: {TINY_MODEL_KEYS["backbone_net"]}, train_h: 65, train_w: 65, batch_size: 4, workers: 0,
                 epochs: 1, manual_seed: 2, print_freq: 1, save_path: {tmp_path / 'model'}, train_gpu: [0, 1]}}
        Distributed: {{dist_url: 'tcp://127.0.0.1:{port}'}}
        TEST: {{device: cpu}}
    """))
    script = tmp_path / "spawn_run.py"
    script.write_text(SPAWN_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(REPO_ROOT / "tool"), str(config)], cwd=REPO_ROOT,
                          env=_clean_env(), capture_output=True, text=True, timeout=240)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "SPAWN DONE" in output, output[-4000:]
    assert "2 process(es), this one rank 0 on cpu" in output
    assert "2 per process per step, 1 iterations per epoch" in output
    checkpoint = torch.load(tmp_path / "model" / "train_epoch_1.pth", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["cfg"]["train_gpu"] == [0, 1]


# ---------------------------------------------------------------------------------------------
# SLURM: two local tasks with the variables srun sets give torchrun's result


def _free_slurm_job_id() -> int:
    """A job id whose derived MASTER_PORT (SLURM_PORT_BASE + id % SLURM_PORT_SPAN) is free right now."""
    import socket

    for offset in range(1, dist_utils.SLURM_PORT_SPAN):
        port = dist_utils.SLURM_PORT_BASE + (os.getpid() * 7 + offset) % dist_utils.SLURM_PORT_SPAN
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return 4_000_000 + port - dist_utils.SLURM_PORT_BASE  # 4_000_000 % SLURM_PORT_SPAN == 0
    pytest.skip("no free port in the SLURM port range")


def _srun_locally(command, cwd, tasks=2, timeout=240):
    """What ``srun --ntasks=2`` on one node does to the environment, without SLURM; returns (status, output)."""
    job_id = _free_slurm_job_id()
    processes = []
    for rank in range(tasks):
        env = _clean_env(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS=str(tasks),
                         SLURM_NODEID="0", SLURM_STEP_ID="0", SLURM_JOB_ID=str(job_id),
                         SLURM_JOB_NODELIST="localhost", SLURM_STEP_NODELIST="localhost",
                         PATH=os.path.dirname(sys.executable) + os.pathsep + "/usr/bin:/bin")
        processes.append(subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
    outputs = [process.communicate(timeout=timeout)[0] for process in processes]
    return max(process.returncode for process in processes), "\n".join(outputs)


@pytest.mark.slow
def test_slurm_tasks_train_like_torchrun(tmp_path):
    from tiny_runs import write_tiny_config

    config = write_tiny_config(tmp_path, dataset=dict(count=4), batch_size=4, epochs=1)
    train = REPO_ROOT / "tool" / "train.py"
    proc = _torchrun([train, "--config", config, "save_path", tmp_path / "torchrun"], cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    status, output = _srun_locally([sys.executable, str(train), "--config", str(config),
                                    "save_path", str(tmp_path / "slurm")], cwd=tmp_path)
    assert status == 0, output[-4000:]
    first_line = output.splitlines()[0]
    assert "launcher: slurm, rank 0 of 2 (local rank 0)" in first_line and "rendezvous localhost:" in first_line
    assert "2 process(es)" in output
    expected = torch.load(tmp_path / "torchrun" / "train_epoch_1.pth", map_location="cpu", weights_only=True)
    got = torch.load(tmp_path / "slurm" / "train_epoch_1.pth", map_location="cpu", weights_only=True)
    assert list(got["state_dict"]) == list(expected["state_dict"])
    for key, value in expected["state_dict"].items():
        assert torch.equal(got["state_dict"][key], value), key


# ---------------------------------------------------------------------------------------------
# Start-up checks of a multi-process run: a problem on one rank stops every rank at once


def _ranks_by_hand(command_of_rank, cwd, timeout=240):
    """Two ranks started separately with torchrun's variables (as on two machines); returns their outputs."""
    port = dist_utils._free_port()
    processes = []
    for rank in range(2):
        env = _clean_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=str(port))
        processes.append(subprocess.Popen(command_of_rank(rank), cwd=cwd, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
    return [(process.communicate(timeout=timeout)[0], process.returncode) for process in processes]


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["pretrained-missing-on-rank-1", "save-path-not-shared"])
def test_a_problem_on_one_rank_stops_all_at_start(tmp_path, fault):
    from tiny_runs import write_tiny_config

    config = write_tiny_config(tmp_path, batch_size=4, epochs=1, dist_timeout=600)
    pretrained = tmp_path / "backbone.pth"
    pretrained.write_bytes(b"checked for existence only")

    def command(rank):
        opts = ["save_path", str(tmp_path / f"model_rank{rank}")] if fault == "save-path-not-shared" else \
            ["pretrained", str(pretrained if rank == 0 else tmp_path / "absent.pth")]
        return [sys.executable, str(REPO_ROOT / "tool" / "train.py"), "--config", str(config), *opts]

    results = _ranks_by_hand(command, cwd=tmp_path)
    expected = (r"rank 1 on [^:]+: save_path \S+model_rank1 is not the directory rank 0 writes to"
                if fault == "save-path-not-shared" else r"rank 1 on [^:]+: pretrained file not found: \S+absent.pth")
    for output, status in results:  # both ranks, long before dist_timeout (600 s)
        assert status == 2, output[-3000:]
        assert re.search("config error: " + expected, output), output[-3000:]
        assert "save_path must be a shared directory" in output
        assert "Traceback" not in output


BROADCAST_BUFFERS_SCRIPT = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {repo!r})
from util.runtime.distributed import broadcast_buffers
dist.init_process_group("gloo")
bn = torch.nn.BatchNorm2d(3)
bn.running_mean.fill_(float(dist.get_rank() + 1))  # each process's own statistics, as after a DDP step
broadcast_buffers(bn)
assert torch.all(bn.running_mean == 1.0), bn.running_mean
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_broadcast_buffers_gives_every_process_rank0s_statistics(tmp_path):
    """After DDP training each process holds BatchNorm statistics updated by its own last batch; the
    validation first copies rank 0's (the checkpoint's) to all, so every shard scores the saved model."""
    script = tmp_path / "bb.py"
    script.write_text(BROADCAST_BUFFERS_SCRIPT.format(repo=str(Path(__file__).resolve().parents[1])))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout + result.stderr
