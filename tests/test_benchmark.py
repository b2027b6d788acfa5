"""tool/analysis_tools/benchmark.py and check_bf16.py smoke tests (tiny sizes; no timing assertions) and the
fast paths' equivalence."""
import json
import math

import pytest
import torch

from util.config import load_cfg
from util.runtime.cli import run_cli

from tiny_runs import load_script

CONFIG = "config/camvid/camvid_pyconvresnet50_pyconvsegnet.yaml"


@pytest.fixture(scope="module")
def bench_tool(repo_root):
    return load_script("tool/analysis_tools/benchmark.py", "benchmark_tool")


@pytest.fixture(scope="module")
def bf16_tool(repo_root):
    return load_script("tool/analysis_tools/check_bf16.py", "check_bf16_tool")


def test_warm_up_stops_at_the_first_call_without_new_pages(monkeypatch):
    """A job whose first two calls fault in new pages is steady from its third call on."""
    from tool.analysis_tools.benchmark_jobs import measure

    device = torch.device("cpu")
    faults = {"total": 0, "calls": 0}
    monkeypatch.setattr(measure, "minor_page_faults", lambda: faults["total"])

    def job():
        faults["calls"] += 1
        faults["total"] += 50_000 if faults["calls"] <= 2 else 10

    assert measure.warm_up(job, device) == 3
    faults.update(total=0, calls=0)
    assert measure.warm_up(job, device, max_calls=2) == 2  # never steady within the limit
    faults.update(total=0, calls=10)  # already past the growing calls: steady at once
    timing = measure.time_calls(job, 2, device)
    assert timing["warmup_calls"] == 1 and len(timing["times_s"]) == 2 and faults["calls"] == 13


def test_the_limit_is_the_fastest_probed_kernel(monkeypatch):
    """A convolution faster than the matmul sets the limit (and is named), so a model running at the
    convolution's speed is at 100 %, not above; each probe really runs (tiny sizes)."""
    from tool.analysis_tools.benchmark_jobs import measure

    device = torch.device("cpu")
    real = measure.peak_rate("fp32", device, 32, 1)
    assert len(real["probes"]) == 3 and all(rate > 0 for rate in real["probes"].values())
    assert real["gflops"] == max(real["probes"].values()) and real["probes"][real["kernel"]] == real["gflops"]
    monkeypatch.setattr(measure, "matmul_rate", lambda *args: {"gflops": 200.0})
    monkeypatch.setattr(measure, "conv_rate", lambda precision, device, channels, kernel_size, side, repeats:
                        {"gflops": 387.0 if kernel_size == 1 else 150.0})
    peak = measure.peak_rate("fp32", device, 4096, 3)
    assert peak["gflops"] == 387.0 and peak["kernel"] == "conv 1x1 4096ch 64x64 channels_last"
    assert peak["probes"] == {"matmul 4096^3": 200.0, "conv 1x1 4096ch 64x64 channels_last": 387.0,
                              "conv 3x3 512ch 64x64 channels_last": 150.0}
    assert measure.utilisation(387.0, 1.0, peak["gflops"]) == 1.0


def test_probes_count_their_flop(monkeypatch):
    """At one second per call a probe's GFLOP/s is its GFLOP: 2 N^3 for the matmul, 2 C^2 k^2 side^2 for a
    stride-1 convolution (which keeps the map's size)."""
    from tool.analysis_tools.benchmark_jobs import measure

    shapes = []

    def one_second(fn, repeats, device, warmup=None):
        shapes.append(tuple(fn().shape))
        return {"best_s": 1.0, "median_s": 1.0, "times_s": [1.0], "warmup_calls": 0}

    monkeypatch.setattr(measure, "time_calls", one_second)
    assert measure.conv_rate("fp32", torch.device("cpu"), 8, 3, 16, 1)["gflops"] == 2 * 8 * 8 * 9 * 16 * 16 / 1e9
    assert measure.conv_rate("bf16", torch.device("cpu"), 8, 1, 16, 1)["gflops"] == 2 * 8 * 8 * 16 * 16 / 1e9
    assert measure.matmul_rate("fp32", torch.device("cpu"), 8, 1)["gflops"] == 2 * 8 ** 3 / 1e9
    assert shapes == [(1, 8, 16, 16), (1, 8, 16, 16), (8, 8)]


def test_crop_count_and_flop_counts(repo_root, monkeypatch):
    from tool.analysis_tools.benchmark_jobs.evaluation import eval_crop_count
    from tool.analysis_tools.benchmark_jobs.flops import forward_gflop, train_step_gflop

    monkeypatch.chdir(repo_root)
    # The benchmark's default: a 384x512 image at scale 1.0 is 2 windows of 473, times 2 flips.
    assert eval_crop_count((384, 512), (473, 473), [1.0], 512) == 4
    assert eval_crop_count((384, 512), (473, 473), [0.5, 1.0], 512) == 6
    cfg = load_cfg(CONFIG, ["classes", "150"])
    forward = forward_gflop(cfg, 473, 473)
    assert 200 < forward < 220  # PyConvSegNet / PyConvResNet-50 at 473: 209 GFLOP
    step = train_step_gflop(cfg, 1, 473, 473)
    # backward = grad-input + grad-weight of every conv (the stem has no grad-input): just under 3x
    assert step["forward"] > forward and 2.9 * step["forward"] < step["total"] < 3 * step["forward"]


TINY = ["--device", "cpu", "--image-size", "33", "41", "--crop", "33", "--base-size", "41", "--train-crop", "33",
        "--train-batch", "2", "--train-iters", "1", "--eval-iters", "1", "--matmul-size", "128",
        "--matmul-repeats", "1", "--data-batches", "2", "--default-malloc"]  # (leave this process's allocator)
TINY_KEYS = ["base_size", "40", "batch_size", "2", "workers", "0", "train_h", "33", "train_w", "33", "test_h", "33",
             "test_w", "33", "backbone_output_stride", "32"]


@pytest.mark.slow
def test_benchmark_smoke(bench_tool, repo_root, monkeypatch, capsys, tmp_path, one_thread):
    monkeypatch.chdir(repo_root)
    argv = ["--output", str(tmp_path / "bench.json"), "--markdown", str(tmp_path / "bench.md"), "--config", CONFIG,
            *TINY, "--compare-naive", "--skip-data", *TINY_KEYS, "model_path", "exp/does/not/exist.pth"]
    assert run_cli(lambda: bench_tool.main(argv)) == 0
    result = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "bench.json").read_text()) == result
    table = (tmp_path / "bench.md").read_text()
    assert "| peak GFLOP/s at the start (the limit: the fastest of the matmul and convolution probes) |" in table
    assert "| kernel that set the limit |" in table
    assert "| training, utilisation (of the peak rate just before it) |" in table
    for key in ("machine", "peak", "model", "eval", "train", "peak_memory", "warnings"):
        assert key in result
    assert result["model"]["weights"] == "random" and any("random weights" in w for w in result["warnings"])
    for precision in ("fp32", "bf16"):
        peak = result["peak"][precision]
        assert peak["gflops"] > 0 and peak["gflops"] == max(peak["probes"].values())
        assert peak["probes"][peak["kernel"]] == peak["gflops"]
        assert sorted(peak["probes"]) == ["conv 1x1 128ch 64x64 channels_last", "conv 3x3 16ch 64x64 channels_last",
                                          "matmul 128^3"]
        assert result["eval"][precision]["seconds_per_image"] > 0
        assert 0 < result["eval"][precision]["utilisation"] < 100
        for job in ("eval", "train"):  # each job's ratio uses a peak rate measured right before it
            job_result = result[job][precision]
            assert job_result["peak_gflops_before"] > 0
            gflops = job_result["gflops"]
            assert math.isclose(job_result["utilisation"], gflops / job_result["peak_gflops_before"])
        assert result["train"][precision]["images_per_s"] > 0
        assert math.isfinite(result["train"][precision]["loss"])
    assert result["eval"]["crops_per_image"] == 4  # 33x41: 1x2 windows of 33, 2 flips
    naive = result["eval"]["naive_fp32"]
    assert naive["seconds_per_image"] > 0 and naive["speedup_fp32"] > 0
    # Same function: the fast fp32 path predicts what the release's loop (tests/release_reference.py) predicts.
    assert naive["fp32_equal_naive_fraction"] > 0.99
    assert result["peak_memory"]["rss_gib"] > 0


@pytest.mark.slow
def test_benchmark_onnxruntime_job(bench_tool, repo_root, monkeypatch, capsys, one_thread):
    """The onnxruntime job times the same sliding-window test through an exported file of the same weights."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    monkeypatch.chdir(repo_root)
    argv = ["--config", CONFIG, *TINY, "--precisions", "fp32", "--onnxruntime", "--skip-train", "--skip-data",
            *TINY_KEYS, "arch", "psp", "backbone_net", "resnet", "classes", "3", "names_path", ""]
    assert run_cli(lambda: bench_tool.main(argv)) == 0
    result = json.loads(capsys.readouterr().out)
    ort = result["eval"]["onnxruntime_fp32"]
    assert ort["seconds_per_image"] > 0 and ort["threads"] == 1 and ort["export_seconds"] > 0
    assert ort["pytorch_fp32_over_onnxruntime"] == pytest.approx(
        result["eval"]["fp32"]["seconds_per_image"] / ort["seconds_per_image"])
    assert ort["equal_pytorch_fp32_fraction"] > 0.99  # the same network, through another runtime


@pytest.mark.slow
def test_data_job_times_the_real_training_step(bench_tool, camvid_root, repo_root, monkeypatch, capsys, one_thread):
    monkeypatch.chdir(repo_root)
    argv = ["--config", CONFIG, *TINY, "--precisions", "fp32", "--skip-eval", "--skip-train", *TINY_KEYS,
            "data_root", str(camvid_root), "train_list", str(camvid_root / "train.txt")]
    assert run_cli(lambda: bench_tool.main(argv)) == 0
    data = json.loads(capsys.readouterr().out)["data"]
    assert data["samples_per_s"] > 0 and data["workers"] == 0 and data["crop"] == [33, 33] and data["batches"] == 2
    assert data["train_images_per_s_from_memory"] > 0 and data["train_images_per_s_from_loader"] > 0
    assert data["loading_slowdown"] == pytest.approx(
        data["train_images_per_s_from_memory"] / data["train_images_per_s_from_loader"] - 1)


@pytest.mark.slow
def test_check_bf16_on_real_images(bf16_tool, camvid_root, repo_root, monkeypatch, capsys, tmp_path, one_thread):
    monkeypatch.chdir(repo_root)
    argv = ["--config", CONFIG, "--device", "cpu", "--default-malloc", "--images", "1", "--loss-curve", "2",
            "--markdown", str(tmp_path / "bf16.md"), *TINY_KEYS, "data_root", str(camvid_root),
            "train_list", str(camvid_root / "train.txt"), "val_list", str(camvid_root / "val.txt"), "scales", "[1.0]"]
    assert run_cli(lambda: bf16_tool.main(argv)) == 0
    result = json.loads(capsys.readouterr().out)
    curve = result["loss_curve"]
    assert len(curve["fp32"]) == len(curve["bf16"]) == len(curve["fp32_other_dropout"]) == 2
    assert curve["fp32"][0] == pytest.approx(curve["bf16"][0], rel=0.1)
    assert 0 <= result["agreement"]["bf16_equal_fp32_fraction"] <= 1 and result["agreement"]["images"] == 1
    assert "| bf16 pixels equal to fp32 (1 real images) |" in (tmp_path / "bf16.md").read_text()
