"""util/distributed.py and a real 2-process CPU training run under torchrun."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from util import distributed as dist_utils
from util.config import load_cfg

REPO_ROOT = Path(__file__).resolve().parents[1]


def _clean_env(**extra):
    """The environment for a child launcher: no inherited torchrun variables, one thread each."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
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
    from util import distributed as D

    cfg = load_cfg(None, ["device", "cpu", "dist_timeout", "2"])
    ctx = D.init_distributed(cfg)
    t = torch.tensor([float(ctx.rank + 1)])
    D.all_reduce_sum(t)
    seed = D.broadcast_object(100 + ctx.rank)
    result = dict(rank=ctx.rank, world=ctx.world_size, local=ctx.local_rank, device=str(ctx.device),
                  is_main=ctx.is_main, distributed=ctx.distributed, backend=torch.distributed.get_backend(),
                  sum=t.item(), seed=seed, get_rank=D.get_rank(), get_world=D.get_world_size())
    if ctx.rank == 1:
        time.sleep(8)  # alive but never joins the next collective
    else:
        start = time.time()
        try:
            D.all_reduce_sum(torch.ones(1))
            result["timeout"] = None
        except Exception as exc:
            result["timeout"] = time.time() - start
    print("RESULT " + json.dumps(result), flush=True)
    os._exit(0)  # the group is broken on purpose: skip the clean-up that would wait on the peer
""")


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


def test_torchrun_two_process_camvid_run(tmp_path, camvid_root):
    from model import build_model
    from util.checkpoint import load_checkpoint_file

    lines = (camvid_root / "train.txt").read_text().splitlines()[:4]
    list_file = tmp_path / "camvid4.txt"
    list_file.write_text("\n".join(lines) + "\n")
    config = tmp_path / "camvid_tiny.yaml"
    config.write_text(textwrap.dedent(f"""
        DATA:
          data_root: {camvid_root}
          train_list: {list_file}
          val_list: {list_file}
          classes: 11
        TRAIN:
          arch: pyconvsegnet
          backbone_net: pyconvresnet
          layers: 50
          train_h: 65
          train_w: 65
          batch_size: 2
          batch_size_val: 2
          workers: 2
          epochs: 1
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
    assert "2 process(es)" in output and "1 per process per step, 2 iterations per epoch" in output
    assert "crop-level score" in output

    path = tmp_path / "model" / "train_epoch_1.pth"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # plain data only
    assert load_checkpoint_file(path)["epoch"] == 1
    assert set(checkpoint) == {"epoch", "state_dict", "optimizer", "scheduler", "scaler", "best_mIoU", "cfg"}
    assert checkpoint["scaler"] is None and isinstance(checkpoint["cfg"], dict)
    assert checkpoint["cfg"]["classes"] == 11

    reference = build_model(load_cfg(str(config))).state_dict()
    assert list(checkpoint["state_dict"]) == [f"module.{key}" for key in reference]
    for key, value in reference.items():
        assert checkpoint["state_dict"][f"module.{key}"].shape == value.shape, key
    assert checkpoint["state_dict"]["module.cls.1.weight"].shape[0] == 11
    assert (tmp_path / "model" / "best_mIoU.pth").is_file()
    # the poly schedule ran to its end (1 epoch of 1): lr 0 in both groups
    assert [g["lr"] for g in checkpoint["optimizer"]["param_groups"]] == [0.0, 0.0]


# ---------------------------------------------------------------------------------------------
# The release's launch mode (train.py spawns one process per train_gpu entry), exercised on the CPU

SPAWN_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])  # tool/: the spawned children import `train` by this name
    import train
    from util.config import load_cfg

    if __name__ == "__main__":  # the spawned children re-import this file as __mp_main__
        config, opts = sys.argv[2], sys.argv[3:]
        cfg = load_cfg(config, opts)
        train.check_run_config(cfg)
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


def test_spawn_mode_on_cpu(tmp_path):
    list_path = _synthetic_list(tmp_path)
    port = dist_utils._free_port()
    config = tmp_path / "spawn.yaml"
    config.write_text(textwrap.dedent(f"""
        DATA: {{data_root: {tmp_path}, train_list: {list_path}, classes: 3}}
        TRAIN: {{backbone_net: resnet, layers: 50, train_h: 65, train_w: 65, batch_size: 2, workers: 0,
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
    assert "1 per process per step, 2 iterations per epoch" in output
    checkpoint = torch.load(tmp_path / "model" / "train_epoch_1.pth", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["cfg"]["train_gpu"] == [0, 1]
