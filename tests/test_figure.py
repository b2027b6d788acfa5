"""The architecture figure script: runs with the standard library, writes valid, deterministic SVG."""
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "figure" / "make_architecture.py"
SVG_NS = "{http://www.w3.org/2000/svg}"


def _run(output: Path) -> str:
    result = subprocess.run([sys.executable, str(SCRIPT), "--output", str(output)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return output.read_text(encoding="utf-8")


def test_figure_is_valid_svg_with_key_labels(tmp_path):
    out = tmp_path / "sub" / "arch.svg"
    content = _run(out)
    root = ET.fromstring(content)
    assert root.tag == SVG_NS + "svg"
    assert 1000 <= float(root.get("width")) <= 1400
    texts = " ".join("".join(t.itertext()) for t in root.iter(SVG_NS + "text"))
    for label in ["layer0", "layer1", "layer2", "layer3", "layer4", "Local PyConv", "Global PyConv", "Merge",
                  "aux", "k 3/5/7/9", "g 1/4/8/16", "dilation 2", "dilation 4", "1/8", "Upsample ×8",
                  "Dropout2d", "0.4", "AvgPool", "Legend", "pyramidal convolution"]:
        assert label in texts, label
    # arrows use markers, and the auxiliary branch is drawn dashed
    assert root.find(f"{SVG_NS}defs/{SVG_NS}marker") is not None
    assert any(p.get("stroke-dasharray") for p in root.iter(SVG_NS + "path"))


def test_figure_is_deterministic(tmp_path):
    assert _run(tmp_path / "a.svg") == _run(tmp_path / "b.svg")


def test_validation_curve_from_tensorboard_events(tmp_path):
    """figure/make_validation_curve.py reads the scalars tool/train.py writes (two event files, as a
    resumed run leaves: the later one wins for a repeated step) and draws a PNG."""
    import pytest

    pytest.importorskip("tensorboard")
    pytest.importorskip("matplotlib")
    import os

    from tensorboardX import SummaryWriter

    from tiny_runs import load_script

    for run, values in enumerate(({1: 0.1, 2: 0.05}, {2: 0.2, 4: 0.3})):
        writer = SummaryWriter(str(tmp_path), filename_suffix=f".{run}")
        for epoch, value in values.items():
            writer.add_scalar("mIoU_val", value, epoch)
            writer.add_scalar("loss_train", 1.0 / epoch, epoch)
            writer.add_scalar("lr/head", 0.1 / epoch, epoch * 10)
            writer.add_scalar("loss_train_batch", 1.0, epoch * 10)
        writer.close()
        for path in tmp_path.glob(f"events.out.tfevents.*.{run}"):
            os.utime(path, (run + 1, run + 1))  # the script reads the oldest file first, by mtime
    script = load_script("figure/make_validation_curve.py", "make_validation_curve")
    scalars = script.read_scalars(str(tmp_path))
    assert scalars["mIoU_val"] == pytest.approx({1: 0.1, 2: 0.2, 4: 0.3})
    output = tmp_path / "curve.png"
    assert script.main(["--events", str(tmp_path), "--output", str(output)]) == 0
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
