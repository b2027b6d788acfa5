"""tool/analysis_tools/summary.py: parameter counts and GFLOP per crop, built on the meta device (no weights, fast)."""
from __future__ import annotations

import json

import pytest

from util.config import load_cfg

from conftest import REPO_ROOT
from tiny_runs import load_script

ADE20K_CONFIG = REPO_ROOT / "config" / "ade20k" / "ade20k_pyconvresnet50_pyconvsegnet.yaml"
DEMO_CONFIG = REPO_ROOT / "config" / "demo" / "demo_pyconvresnet50_pyconvsegnet.yaml"


@pytest.fixture(scope="module")
def summary_tool():
    return load_script("tool/analysis_tools/summary.py", "summary_tool_under_test")


def test_parameters_match_the_release(summary_tool, reference_dir):
    """The total equals the release's parameter count for PyConvSegNet on PyConvResNet-50 (150 classes)."""
    expected = json.loads((reference_dir / "state_dict_keys.json").read_text())["pyconvsegnet_pyconvresnet50"]
    info = summary_tool.summarize(load_cfg(str(ADE20K_CONFIG)), 65, 65)
    assert info["parameters"] == expected["num_parameters"]
    assert info["backbone_parameters"] + info["head_parameters"] == info["parameters"]
    assert info["backbone_parameters"] > info["head_parameters"] > 0


def test_gflop_scales_with_crop_area(summary_tool):
    cfg = load_cfg(str(DEMO_CONFIG))
    small = summary_tool.summarize(cfg, 97, 97)
    large = summary_tool.summarize(cfg, 193, 193)
    assert small["parameters"] == large["parameters"]
    assert small["feature_size"] == (13, 13) and large["feature_size"] == (25, 25)  # output stride 8
    assert small["output_stride"] == 8 and large["output_size"] == (193, 193)
    # Doubling the crop side ~quadruples the cost: convolutions cost per feature pixel (25^2 / 13^2
    # = 3.7); only the global context branch (pooled to 9x9 whatever the crop) is constant.
    ratio = large["gflop"] / small["gflop"]
    assert 3.3 < ratio < 4.2, ratio
    assert sum(small["gflop_by_module"].values()) == pytest.approx(small["gflop"], rel=1e-6)


def test_gflop_follows_the_convolution_formula(summary_tool):
    """2 x MACs: the classifier's 1x1 conv 256 -> classes at the feature size is counted exactly."""
    cfg = load_cfg(str(DEMO_CONFIG))
    info = summary_tool.summarize(cfg, 65, 65)
    h, w = info["feature_size"]
    assert info["gflop_by_module"]["cls"] * 1e9 == pytest.approx(2 * 256 * cfg.classes * h * w)


def test_cli_prints_the_summary(summary_tool, capsys):
    assert summary_tool.main(["--config", str(DEMO_CONFIG), "train_h", "33", "train_w", "33"]) == 0
    out = capsys.readouterr().out
    assert "parameters:" in out and "GFLOP per crop:" in out and "33x33" in out
    assert "output stride:    8" in out


def test_cli_rejects_a_bad_override(summary_tool, capsys):
    with pytest.raises(SystemExit) as exit_info:
        summary_tool.main(["--config", str(DEMO_CONFIG), "train_h", "64"])
    assert exit_info.value.code == 2
    assert "train_h" in capsys.readouterr().err
