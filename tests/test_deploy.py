"""Exported models (util/evaluation/deploy.py, tool/deployment/export.py): ONNX and TorchScript files of
PyConvSegNet and PSPNet match PyTorch, refuse other sizes, and tool/test.py scores them like the checkpoint.

ResNet-50 at output stride 32, 3 classes and 33x33 windows: the smallest model that still runs
both heads (PyConvSegNet's 9x9 global pooling, PSPNet's 1/2/3/6 pyramid). Each file is exported
once per module (an ONNX export takes about a minute on a busy 2-core machine).
"""
import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from util.config import load_cfg
from util.runtime.cli import run_cli

from tiny_runs import make_dataset

WINDOW = 33
ARCHS = ("pyconvsegnet", "psp")
FORMATS = ("onnx", "torchscript")
pytestmark = pytest.mark.slow  # the real networks, exported (the subject is their operators)


def _needs(fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxscript")
        pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 4-image dataset, one config per architecture and a checkpoint of each (random weights, BatchNorm
    statistics randomised so that folding them matters, classifier calibrated so every class wins)."""
    from model import build_model

    root = tmp_path_factory.mktemp("deploy")
    list_path = make_dataset(root / "data", count=3, classes=3, size=(40, 52))
    (root / "names.txt").write_text("sky\nroad\ntree\n")
    configs = {}
    for arch in ARCHS:
        body = {"DATA": {"data_root": str(root / "data"), "classes": 3, "names_path": str(root / "names.txt")},
                "TRAIN": {"arch": arch, "backbone_net": "resnet", "layers": 50, "backbone_output_stride": 32},
                "TEST": {"test_list": str(list_path), "split": "val", "base_size": 52, "test_h": WINDOW,
                         "test_w": WINDOW, "scales": [0.75, 1.0], "test_batch_size": 2, "device": "cpu",
                         "model_path": str(root / f"{arch}.pth"), "save_folder": str(root / arch / "checkpoint")}}
        path = root / f"{arch}.yaml"
        path.write_text(yaml.safe_dump(body))
        configs[arch] = path
        torch.manual_seed(0)
        model = build_model(load_cfg(str(path)))
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    n = module.num_features
                    module.running_mean.copy_(torch.rand(n, generator=generator) * 0.2 - 0.1)
                    module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                    module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
            model.eval()
            model.cls[-1].weight.mul_(20.0)
            logits = model(torch.randn(2, 3, WINDOW, WINDOW, generator=generator))
            model.cls[-1].bias.sub_(logits.mean(dim=(0, 2, 3)))
        torch.save({"state_dict": model.state_dict()}, root / f"{arch}.pth")
    yield {"root": root, "configs": configs, "files": {}}
    shutil.rmtree(root)  # about 1 GB of checkpoints and exported files: not kept until the session ends


def exported_file(setup, arch, fmt):
    """The checkpoint of ``arch`` exported to ``fmt`` by tool/deployment/export.py (once per module)."""
    from tool.deployment.export import main

    key = (arch, fmt)
    if key not in setup["files"]:
        output = setup["root"] / arch / f"model{'.onnx' if fmt == 'onnx' else '.torchscript'}"
        assert run_cli(lambda: main(["--config", str(setup["configs"][arch]), "--format", fmt, "--output",
                                     str(output), "--check-batches", "1", "3"])) == 0
        setup["files"][key] = output
    return setup["files"][key]


def _reference(setup, arch):
    from model import build_model
    from util.runtime.checkpoint_io import load_model_weights

    cfg = load_cfg(str(setup["configs"][arch]))
    model = build_model(cfg)
    load_model_weights(model, cfg.model_path)
    return model.eval()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", ARCHS)
def test_exported_model_matches_pytorch(setup, arch, fmt, one_thread, capsys):
    from util.evaluation.deploy import compare_with_reference, load_exported_model

    _needs(fmt)
    path = exported_file(setup, arch, fmt)
    printed = capsys.readouterr().out
    assert "batch 1: max relative logit difference" in printed and "batch 3:" in printed
    exported = load_exported_model(path)
    metadata = exported.metadata
    assert metadata["class_names"] == ["sky", "road", "tree"] and metadata["classes"] == 3
    assert metadata["input_size"] == (WINDOW, WINDOW) and len(metadata["mean"]) == len(metadata["std"]) == 3
    assert metadata["arch"] == arch and (metadata.get("opset") == "20") == (fmt == "onnx")
    reference = _reference(setup, arch)
    checks = compare_with_reference(exported, reference, (WINDOW, WINDOW), batch_sizes=(1, 3), seed=7)
    for check in checks:
        assert check["ok"] and check["max_relative_diff"] < 1e-4 and check["argmax_agreement"] > 0.999
    # The comparison is not vacuous: a network with other weights fails it.
    other = _reference(setup, arch)
    with torch.no_grad():
        other.cls[-1].bias.add_(torch.tensor([3.0, 0.0, -3.0]))
    assert not any(c["ok"] for c in compare_with_reference(exported, other, (WINDOW, WINDOW), batch_sizes=(1,)))


@pytest.mark.parametrize("fmt", FORMATS)
def test_loading_torchscript_logs_that_it_runs_the_file(setup, fmt, one_thread, capsys):
    """torch.jit.load runs the archive's program (weights_only does not cover it): a one-line note in the log.
    (After test_exported_model_matches_pytorch, which reads the export's output of the shared files.)"""
    from util.evaluation.deploy import load_exported_model
    from util.runtime.log import get_logger

    _needs(fmt)
    path = exported_file(setup, "psp", fmt)
    get_logger()
    capsys.readouterr()
    load_exported_model(path)
    notes = [line for line in capsys.readouterr().out.splitlines() if "torch.jit.load" in line]
    if fmt == "torchscript":
        assert len(notes) == 1 and f"note: {path} was loaded with torch.jit.load" in notes[0]
        assert "only from a source you trust" in notes[0]
    else:
        assert notes == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_fixed_size_file_refuses_another_size(setup, fmt, one_thread):
    from util.evaluation.deploy import ExportedModelError, load_exported_model

    _needs(fmt)
    exported = load_exported_model(exported_file(setup, "pyconvsegnet", fmt))
    with pytest.raises(ExportedModelError) as caught:
        exported(torch.randn(1, 3, WINDOW + 8, WINDOW))
    message = str(caught.value)
    assert "\n" not in message and f"N x 3 x {WINDOW} x {WINDOW}" in message and "[1, 3, 41, 33]" in message
    if fmt == "torchscript":  # the file itself refuses too (for callers outside Python)
        with pytest.raises(Exception, match=f"takes N x 3 x {WINDOW} x {WINDOW} inputs"):
            exported.network(torch.randn(1, 3, WINDOW + 8, WINDOW))


@pytest.mark.parametrize("fmt", FORMATS)
def test_test_tool_on_the_exported_file_gives_the_same_metrics(setup, fmt, one_thread):
    from tool.test import main

    _needs(fmt)
    arch = "pyconvsegnet"
    config, root = str(setup["configs"][arch]), setup["root"]
    path = exported_file(setup, arch, fmt)
    checkpoint_folder = root / arch / "checkpoint"
    if not (checkpoint_folder / "metrics.json").is_file():
        assert run_cli(lambda: main(["--config", config])) == 0
    folder = root / arch / fmt
    assert run_cli(lambda: main(["--config", config, "model_path", str(path), "save_folder", str(folder)])) == 0
    expected = json.loads((checkpoint_folder / "metrics.json").read_text())
    got = json.loads((folder / "metrics.json").read_text())
    assert got.pop("model_path") == str(path) and expected.pop("model_path") == str(root / f"{arch}.pth")
    assert got == expected
    assert len(set(np.unique(expected["confusion_matrix"]))) > 1  # a real prediction, not one class everywhere
    for gray in (checkpoint_folder / "gray").iterdir():
        assert gray.read_bytes() == (folder / "gray" / gray.name).read_bytes()


@pytest.mark.parametrize("fmt", FORMATS)
def test_corrupt_or_mismatched_file_is_a_one_line_error(setup, fmt, capsys, tmp_path, one_thread):
    from tool.test import main

    _needs(fmt)
    config = str(setup["configs"]["pyconvsegnet"])
    suffix = ".onnx" if fmt == "onnx" else ".torchscript"
    corrupt = tmp_path / f"corrupt{suffix}"
    corrupt.write_bytes(np.random.default_rng(0).bytes(5000))
    good = exported_file(setup, "pyconvsegnet", fmt)
    cases = [
        (["model_path", str(corrupt)], f"is not a readable {'ONNX' if fmt == 'onnx' else 'TorchScript'} file"),
        (["model_path", str(good), "classes", "4", "names_path", ""],
         "predicts 3 classes but the config has classes 4"),
        (["model_path", str(good), "test_h", "41", "test_w", "41"],
         f"takes {WINDOW}x{WINDOW} inputs but test_h x test_w is 41x41"),
    ]
    capsys.readouterr()
    for overrides, reason in cases:
        argv = ["--config", config, *overrides, "save_folder", str(tmp_path / "out")]
        assert run_cli(lambda: main(argv)) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and reason in err[-1], err
        assert not any(line.startswith("Traceback") for line in err)


def test_export_refuses_a_wrong_extension_and_a_bad_checkpoint(setup, tmp_path, capsys):
    from tool.deployment.export import main

    config = str(setup["configs"]["psp"])
    with pytest.raises(SystemExit) as caught:
        main(["--config", config, "--format", "onnx", "--output", str(tmp_path / "model.pt")])
    assert caught.value.code == 2 and "--output must end with .onnx" in capsys.readouterr().err
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    output = tmp_path / "model.torchscript"
    assert run_cli(lambda: main(["--config", config, "model_path", str(bad), "--format", "torchscript",
                                 "--output", str(output)])) == 1
    assert "not a valid checkpoint" in capsys.readouterr().err and not output.exists()
