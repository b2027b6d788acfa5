"""tool/benchmark.py smoke test (tiny sizes; no timing assertions) and the fast paths' equivalence."""
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from tiny_runs import load_script
from util.config import load_cfg

CONFIG = "config/camvid/camvid_pyconvresnet50_pyconvsegnet.yaml"


@pytest.fixture(scope="module")
def bench_tool(repo_root):
    return load_script("tool/benchmark.py", "benchmark_tool")


def _randomise_batchnorm(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(n, generator=generator) * 0.4 - 0.2)


def test_warm_up_stops_at_the_first_call_without_new_pages(bench_tool, monkeypatch):
    """A job whose first two calls fault in new pages is steady from its third call on."""
    device = torch.device("cpu")
    faults = {"total": 0, "calls": 0}
    monkeypatch.setattr(bench_tool, "minor_page_faults", lambda: faults["total"])

    def job():
        faults["calls"] += 1
        faults["total"] += 50_000 if faults["calls"] <= 2 else 10

    assert bench_tool.warm_up(job, device) == 3
    faults.update(total=0, calls=0)
    assert bench_tool.warm_up(job, device, max_calls=2) == 2  # never steady within the limit
    faults.update(total=0, calls=10)  # already past the growing calls: steady at once
    timing = bench_tool.time_calls(job, 2, device)
    assert timing["warmup_calls"] == 1 and len(timing["times_s"]) == 2 and faults["calls"] == 13


def test_crop_count_and_flop_counts(bench_tool, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    # The setting: a 384x512 image at scale 1.0 is 2 windows of 473, times 2 flips.
    assert bench_tool.eval_crop_count((384, 512), (473, 473), [1.0], 512) == 4
    assert bench_tool.eval_crop_count((384, 512), (473, 473), [0.5, 1.0], 512) == 6
    cfg = load_cfg(CONFIG, ["classes", "150"])
    forward = bench_tool.forward_gflop(cfg, 473, 473)
    assert 200 < forward < 220  # PyConvSegNet / PyConvResNet-50 at 473: 209 GFLOP
    step = bench_tool.train_step_gflop(cfg, 1, 473, 473)
    # backward = grad-input + grad-weight of every conv (the stem has no grad-input): just under 3x
    assert step["forward"] > forward and 2.9 * step["forward"] < step["total"] < 3 * step["forward"]


def test_benchmark_smoke(bench_tool, repo_root, monkeypatch, capsys, tmp_path, camvid_overrides):
    monkeypatch.chdir(repo_root)
    # --default-malloc: leave this pytest process's allocator alone.
    argv = ["--output", str(tmp_path / "bench.json"), "--markdown", str(tmp_path / "bench.md"), "--default-malloc",
            "--config", CONFIG, "--device", "cpu", "--image-size", "33", "41", "--crop", "33", "--base-size", "41",
            "--train-crop", "33", "--train-batch", "2", "--train-iters", "1", "--eval-iters", "1",
            "--matmul-size", "128", "--matmul-repeats", "1", "--data-batches", "1", "--agree-images", "1",
            "--compare-naive", "--loss-curve", "2",
            "base_size", "40", "batch_size", "2", "workers", "0", "train_h", "33", "train_w", "33",
            "test_h", "33", "test_w", "33", "model_path", "exp/does/not/exist.pth", *camvid_overrides]
    assert bench_tool.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "bench.json").read_text()) == result
    table = (tmp_path / "bench.md").read_text()
    assert "| matmul 4096^3" in table and "| training, utilisation (of the matmul rate just before it) |" in table
    for key in ("machine", "matmul", "model", "eval", "train", "data", "peak_memory", "warnings"):
        assert key in result
    assert result["model"]["weights"] == "random" and any("random weights" in w for w in result["warnings"])
    for precision in ("fp32", "bf16"):
        assert result["matmul"][precision]["gflops"] > 0
        assert result["eval"][precision]["seconds_per_image"] > 0
        assert 0 < result["eval"][precision]["utilisation"] < 100
        for job in ("eval", "train"):  # each job's ratio uses a matmul rate measured right before it
            job_result = result[job][precision]
            assert job_result["matmul_gflops_before"] > 0
            gflops = job_result["gflops"]
            assert math.isclose(job_result["utilisation"], gflops / job_result["matmul_gflops_before"])
        assert result["train"][precision]["images_per_s"] > 0
        assert math.isfinite(result["train"][precision]["loss"])
    assert result["eval"]["crops_per_image"] == 4  # 33x41: 1x2 windows of 33, 2 flips
    naive = result["eval"]["naive_fp32"]
    assert naive["seconds_per_image"] > 0 and naive["speedup_fp32"] > 0
    # Same function: the fast fp32 path predicts what the release's loop predicts.
    assert naive["fp32_equal_naive_fraction"] > 0.99
    assert result["peak_memory"]["rss_gib"] > 0
    if "skipped" not in result["data"]:  # CamVid present
        assert result["data"]["samples_per_s"] > 0
        curve = result["loss_curve"]
        assert len(curve["fp32"]) == len(curve["bf16"]) == len(curve["fp32_other_dropout"]) == 2
        assert curve["fp32"][0] == pytest.approx(curve["bf16"][0], rel=0.1)
        assert 0 <= result["agreement"]["bf16_equal_fp32_fraction"] <= 1


def test_fold_batchnorm_keeps_the_function(repo_root, monkeypatch):
    from model import build_model
    from util.inference import fold_batchnorm, predict_multiscale, prepare_inference_model
    from util.transforms import MEAN, STD

    monkeypatch.chdir(repo_root)
    torch.manual_seed(0)
    model = build_model(load_cfg(CONFIG, []))
    _randomise_batchnorm(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model)
    # The original is untouched (still training mode, same weights); only the aux BN stays in the copy.
    assert model.training and all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == 1
    model.eval()
    x = torch.randn(2, 3, 41, 49)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-4)
    image = (np.random.default_rng(0).random((30, 40, 3)) * 255).astype(np.float32)
    fast = prepare_inference_model(model, torch.device("cpu"), channels_last=True)
    args = (11, 33, [0.8, 1.0], 50, MEAN, STD)  # 30x40 -> 30x40 (1 padded window) and 38x50 (2x2)
    reference = predict_multiscale(model, image, *args, return_probs=True, channels_last=False, batch_size=1)
    probs = predict_multiscale(fast, image, *args, return_probs=True, batch_size=8)
    torch.testing.assert_close(probs, reference, atol=1e-5, rtol=1e-4)


def test_keep_freed_memory_for_reuse_in_a_subprocess(repo_root):
    import os
    import subprocess
    import sys

    code = "from util.perf import keep_freed_memory_for_reuse as k; import torch; k(); x = torch.ones(1 << 24); print(k())"
    env = dict(os.environ)
    done = subprocess.run([sys.executable, "-c", code], cwd=repo_root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    if sys.platform.startswith("linux"):
        assert done.stdout.strip() == "True"
    env["PYCONV_DEFAULT_MALLOC"] = "1"
    done = subprocess.run([sys.executable, "-c", code], cwd=repo_root, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "False"
