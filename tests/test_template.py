"""The network template: a backbone / head registered by name is selectable from YAML and trains.

Registrations made here never leak into other tests: the ``clean_registries`` fixture gives each
test private copies of the registries' tables and puts the originals back afterwards.
"""
from __future__ import annotations

import importlib.util
import math
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

from model import build_model
from model.registry import ARCHITECTURES, BACKBONES, register_arch, register_backbone
from model.segmentation import SegmentationModel, auxiliary_classifier
from util.config import load_cfg
from util.engine import training
from util.engine.losses import build_criterion
from util.engine.optim import build_optimizer, build_scheduler

from test_docs import python_example
from tiny_runs import make_cfg


@pytest.fixture
def clean_registries():
    """Names a test registers are unregistered at teardown."""
    before = {registry: set(registry.names()) for registry in (BACKBONES, ARCHITECTURES)}
    yield
    for registry, names in before.items():
        for name in set(registry.names()) - names:
            registry.unregister(name)


def test_unregister_removes_a_name_and_allows_registering_it_again(clean_registries):
    name = unique("tiny_again")
    first = register_backbone(name)(lambda layers=50, output_stride=8: None)
    with pytest.raises(ValueError, match="already registered"):
        register_backbone(name)(lambda layers=50, output_stride=8: None)
    assert BACKBONES.unregister(name) is first and name not in BACKBONES
    with pytest.raises(ValueError, match="is not registered"):
        BACKBONES.unregister(name)
    second = register_backbone(name)(lambda layers=50, output_stride=8: None)
    assert BACKBONES.get(name) is second


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


class TinyBackbone(nn.Module):
    """Five 3x3 conv stages; output stride 8/16/32 by striding or dilating layer3 and layer4."""

    def __init__(self, output_stride: int = 8, width: int = 8):
        super().__init__()
        (stride3, dilation3), (stride4, dilation4) = {8: ((1, 2), (1, 4)), 16: ((2, 1), (1, 2)),
                                                      32: ((2, 1), (2, 1))}[output_stride]

        def stage(cin, cout, stride=2, dilation=1):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.layer0 = stage(3, width)
        self.layer1 = stage(width, width)
        self.layer2 = stage(width, 2 * width)
        self.layer3 = stage(2 * width, 4 * width, stride3, dilation3)
        self.layer4 = stage(4 * width, 4 * width, stride4, dilation4)
        self.layer3_channels = 4 * width
        self.layer4_channels = 4 * width
        self.output_stride = output_stride


def register_tiny_backbone() -> str:
    name = unique("tiny")

    @register_backbone(name)
    def build_tiny(layers: int = 50, output_stride: int = 8) -> TinyBackbone:
        return TinyBackbone(output_stride=output_stride)

    return name


def write_yaml(path: Path, backbone: str, arch: str = "pyconvsegnet", classes: int = 3) -> Path:
    path.write_text(
        "DATA:\n"
        f"  classes: {classes}\n"
        "TRAIN:\n"
        f"  arch: {arch}\n"
        f"  backbone_net: {backbone}\n"
        "  train_h: 33\n"
        "  train_w: 33\n"
        "  base_lr: 0.01\n"
        "TEST:\n"
        "  test_h: 33\n"
        "  test_w: 33\n")
    return path


def synthetic_batches(classes: int, count: int = 2, batch: int = 2, size: int = 33, seed: int = 0):
    """A list of ``(image, label)`` batches: what a DataLoader would yield (labels with some 255)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        image = torch.randn(batch, 3, size, size, generator=generator)
        label = torch.randint(0, classes, (batch, size, size), generator=generator)
        label[:, :2] = 255
        batches.append((image, label))
    return batches


def train_one_step_like_train_py(model: nn.Module, classes: int):
    """One epoch of two SGD steps through the optimiser, schedule and engine that tool/train.py uses."""
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = build_optimizer(model, base_lr=0.01, momentum=0.9, weight_decay=1e-4)
    loader = synthetic_batches(classes)
    scheduler = build_scheduler(optimizer, make_cfg(), iters_per_epoch=len(loader), epochs=1)
    stats = training.train_iterations(model, loader, build_criterion(make_cfg()), optimizer, scheduler,
                                   torch.device("cpu"), 0, num_classes=classes,
                                   channels_last=False)
    changed = [name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])]
    return stats, changed, before


def test_registered_backbone_is_selected_from_yaml_and_trains(tmp_path, clean_registries):
    name = register_tiny_backbone()
    cfg = load_cfg(str(write_yaml(tmp_path / "tiny.yaml", name)))
    assert cfg.backbone_net == name
    model = build_model(cfg)
    assert isinstance(model.layer0, nn.Sequential) and model.layer4_channels == 32
    # The PyConvSegNet head sits on the new backbone: its input width follows layer4_channels.
    assert model.pyconvhead.local_context.layers[0].in_channels == 32

    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 33, 33)).shape == (1, 3, 33, 33)

    stats, changed, before = train_one_step_like_train_py(model, classes=3)
    assert math.isfinite(stats["loss"]) and stats["loss"] > 0
    backbone_names = {n for n, _ in model.named_parameters() if n.startswith("layer")}
    assert backbone_names & set(changed), "the backbone's parameters did not train"
    assert {n for n in changed if n.startswith(("pyconvhead", "cls", "aux"))}, "the head did not train"
    assert len(changed) == len(before), f"parameters that never changed: {sorted(set(before) - set(changed))[:5]}"


def test_output_stride_reaches_the_registered_backbone(clean_registries):
    name = register_tiny_backbone()
    for stride, feature in ((8, 5), (16, 3), (32, 2)):
        cfg = load_cfg(None, ["backbone_net", name, "classes", "3", "backbone_output_stride", str(stride)])
        model = build_model(cfg).eval()
        assert model.backbone_output_stride == stride
        with torch.no_grad():
            x = model.layer0(torch.zeros(1, 3, 33, 33))
            for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
                x = layer(x)
        assert tuple(x.shape[-2:]) == (feature, feature)


def test_registered_head_trains_on_registered_backbone(tmp_path, clean_registries):
    backbone = register_tiny_backbone()
    arch = unique("fcn")

    @register_arch(arch)
    class TinyFCN(SegmentationModel):
        def __init__(self, backbone: nn.Module, classes: int, zoom_factor: int = 8):
            super().__init__(backbone, classes, zoom_factor)
            self.head = nn.Sequential(nn.Conv2d(self.layer4_channels, 16, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.Conv2d(16, classes, 1))
            self.aux = auxiliary_classifier(self.layer3_channels, classes, hidden=16)

        def decode(self, features):
            return self.head(features)

        def head_modules(self):
            return [self.head, self.aux]

    model = build_model(load_cfg(str(write_yaml(tmp_path / "fcn.yaml", backbone, arch=arch))))
    assert isinstance(model, TinyFCN)
    stats, changed, before = train_one_step_like_train_py(model, classes=3)
    assert math.isfinite(stats["loss"])
    assert len(changed) == len(before)


def test_names_do_not_leak_between_tests():
    assert not any(name.startswith(("tiny_", "fcn_")) for name in BACKBONES.names() + ARCHITECTURES.names())
    assert "simplenet" not in BACKBONES and "fcn" not in ARCHITECTURES


def test_duplicate_name_is_refused(clean_registries):
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("pyconvresnet")(lambda layers=50, output_stride=8: None)


def _readme_example_code() -> str:
    """The Python block of docs/extending.md's 'A backbone or head' section (the example file)."""
    return python_example("docs/extending.md", "A backbone or head")


def test_readme_example_file_works(tmp_path, clean_registries):
    """The docs' example file, saved as a module of the `model` package, registers and trains."""
    path = tmp_path / "simplenet.py"
    path.write_text(_readme_example_code(), encoding="utf-8")
    spec = importlib.util.spec_from_file_location("model._readme_simplenet", path)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "model"  # the example uses `from .registry import ...`, as a file in model/ would
    spec.loader.exec_module(module)

    assert "simplenet" in BACKBONES and "fcn" in ARCHITECTURES
    cfg = load_cfg(None, ["arch", "fcn", "backbone_net", "simplenet", "classes", "3", "train_h", "33",
                          "train_w", "33"])
    model = build_model(cfg)
    stats, changed, before = train_one_step_like_train_py(model, classes=3)
    assert math.isfinite(stats["loss"])
    assert len(changed) == len(before)
