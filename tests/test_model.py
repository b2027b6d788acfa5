"""Model tests: release state-dict layout, output-stride semantics, output shapes, registries.

Layout tests build models on the ``meta`` device (shapes only, no memory, no init cost); forwards
use depth-50 models on 65x65 inputs.
"""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model import build_model, output_size, registered_archs, registered_backbones
from model.backbones import build_pyconvhgresnet, build_pyconvresnet, build_resnet
from model.pyconv import PyConv, split_channels
from model.registry import ARCHITECTURES, BACKBONES, register_backbone
from util.runtime.checkpoint_io import imagenet_to_segmentation_keys

import tiny_runs

ARCHS = ("pyconvsegnet", "psp")
FAMILIES = ("resnet", "pyconvresnet", "pyconvhgresnet")
DEPTHS = (50, 101, 152)
BACKBONE_BUILDERS = {"resnet": build_resnet, "pyconvresnet": build_pyconvresnet,
                     "pyconvhgresnet": build_pyconvhgresnet}


def make_cfg(validate=True, **overrides):
    return tiny_runs.make_cfg(validate=validate, **overrides)


def shapes(state_dict):
    return {key: list(value.shape) for key, value in state_dict.items()}


@pytest.fixture(scope="module")
def release_layouts(reference_dir):
    return json.loads((reference_dir / "state_dict_keys.json").read_text())


@pytest.fixture(scope="module")
def imagenet_layouts(reference_dir):
    path = reference_dir / "imagenet_backbone_keys.json"
    if not path.is_file():
        pytest.skip(f"release reference file not found: {path}")
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------
# Release layouts


@pytest.mark.parametrize("layers", DEPTHS)
@pytest.mark.parametrize("backbone", FAMILIES)
@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_matches_release(release_layouts, arch, backbone, layers):
    reference = release_layouts[f"{arch}_{backbone}{layers}"]
    with torch.device("meta"):
        model = build_model(make_cfg(arch=arch, backbone_net=backbone, layers=layers, classes=150))
    ours = shapes(model.state_dict())
    expected = reference["state_dict"]
    assert set(ours) == set(expected), (sorted(set(ours) - set(expected))[:10], sorted(set(expected) - set(ours))[:10])
    wrong = {k: (ours[k], expected[k]) for k in expected if ours[k] != expected[k]}
    assert not wrong
    assert sum(p.numel() for p in model.parameters()) == reference["num_parameters"]


@pytest.mark.parametrize("layers", DEPTHS)
@pytest.mark.parametrize("backbone", FAMILIES)
def test_imagenet_layout_maps_onto_backbone(imagenet_layouts, backbone, layers):
    reference = imagenet_layouts[f"{backbone}{layers}"]
    with torch.device("meta"):
        net = BACKBONE_BUILDERS[backbone](layers=layers, output_stride=32)
    imagenet = {key: torch.empty(shape, device="meta") for key, shape in reference["state_dict"].items()}
    mapped = shapes(imagenet_to_segmentation_keys(imagenet))
    assert mapped == shapes(net.state_dict())
    fc_parameters = sum(torch.Size(s).numel() for k, s in reference["state_dict"].items() if k.startswith("fc."))
    assert sum(p.numel() for p in net.parameters()) + fc_parameters == reference["num_parameters"]


# ---------------------------------------------------------------------------------------------
# Output stride: module attributes


def conv_levels(conv2):
    return list(conv2.children()) if isinstance(conv2, PyConv) else [conv2]


def assert_stage(stage, stride, dilation):
    for index, block in enumerate(stage):
        for level in conv_levels(block.conv2):
            k = level.kernel_size[0]
            assert level.dilation == (dilation, dilation)
            assert level.padding == (dilation * (k // 2),) * 2
            assert level.stride == ((stride, stride) if index == 0 else (1, 1))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("output_stride, layer3, layer4", [(8, (1, 2), (1, 4)), (16, (2, 1), (1, 2)),
                                                           (32, (2, 1), (2, 1))])
def test_output_stride_dilation(family, output_stride, layer3, layer4):
    with torch.device("meta"):
        net = BACKBONE_BUILDERS[family](layers=50, output_stride=output_stride)
    assert net.output_stride == output_stride
    assert_stage(net.layer3, *layer3)
    assert_stage(net.layer4, *layer4)
    for stage in (net.layer1, net.layer2):
        for block in stage:
            assert all(level.dilation == (1, 1) for level in conv_levels(block.conv2))
    for stage, (stride, _) in ((net.layer3, layer3), (net.layer4, layer4)):
        shortcut = stage[0].downsample
        if family == "resnet":
            assert isinstance(shortcut[0], nn.Conv2d) and shortcut[0].stride == (stride, stride)
        else:
            # The release keeps the shortcut's max-pool when dilation removes the stride.
            pool = shortcut[0]
            assert isinstance(pool, nn.MaxPool2d)
            assert (pool.kernel_size, pool.stride, pool.padding) == (3, stride, 1)
            assert shortcut[1].stride == (1, 1)


def test_pyconv_levels_as_released():
    with torch.device("meta"):
        pyconv = build_pyconvresnet(layers=50, output_stride=8)
        hg = build_pyconvhgresnet(layers=50, output_stride=8)
    expected_pyconv = [((3, 5, 7, 9), (1, 4, 8, 16), [16] * 4), ((3, 5, 7), (1, 4, 8), [32, 32, 64]),
                       ((3, 5), (1, 4), [128, 128])]
    expected_hg = [((3, 5, 7, 9), (32,) * 4, [32] * 4), ((3, 5, 7), (32, 64, 64), [64, 64, 128]),
                   ((3, 5), (32, 64), [256, 256])]
    for net, expected, layer4_groups in ((pyconv, expected_pyconv, 1), (hg, expected_hg, 32)):
        for stage, (kernels, groups, channels) in zip((net.layer1, net.layer2, net.layer3), expected):
            levels = list(stage[1].conv2.children())
            assert [lv.kernel_size[0] for lv in levels] == list(kernels)
            assert [lv.groups for lv in levels] == list(groups)
            assert [lv.out_channels for lv in levels] == channels
            names = [name for name, _ in stage[1].conv2.named_children()]
            assert names == [f"conv2_{i + 1}" for i in range(len(levels))]
        assert isinstance(net.layer4[0].conv2, nn.Conv2d) and net.layer4[0].conv2.groups == layer4_groups
        assert all(lv.bias is None for lv in net.modules() if isinstance(lv, nn.Conv2d))
    assert split_channels(128, [4, 4, 2]) == [32, 32, 64]
    with pytest.raises(ValueError):
        split_channels(10, [4, 4, 2])


# ---------------------------------------------------------------------------------------------
# Output stride: numerics against a hand-written functional block


def randomize_batchnorm(module, generator):
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=generator) * 0.1)


def functional_bn(x, bn):
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps)


def functional_bottleneck(block, x, dilation, kernels, groups, shortcut):
    """A bottleneck written out with explicit stride 1 / dilation / padding (independent of the module's attributes)."""
    out = F.relu(functional_bn(F.conv2d(x, block.conv1.weight), block.bn1))
    levels = conv_levels(block.conv2)
    assert len(levels) == len(kernels)
    out = torch.cat([F.conv2d(out, lv.weight, stride=1, padding=dilation * (k // 2), dilation=dilation, groups=g)
                     for lv, k, g in zip(levels, kernels, groups)], dim=1)
    out = F.relu(functional_bn(out, block.bn2))
    out = functional_bn(F.conv2d(out, block.conv3.weight), block.bn3)
    if shortcut == "maxpool":
        identity = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        identity = functional_bn(F.conv2d(identity, block.downsample[1].weight), block.downsample[2])
    elif shortcut == "conv":
        identity = functional_bn(F.conv2d(x, block.downsample[0].weight), block.downsample[1])
    else:
        identity = x
    return F.relu(out + identity)


@torch.no_grad()
def test_os8_blocks_match_functional_reference():
    generator = torch.Generator().manual_seed(0)
    pyconv = build_pyconvresnet(layers=50, output_stride=8).eval()
    hg = build_pyconvhgresnet(layers=50, output_stride=8).eval()
    resnet = build_resnet(layers=50, output_stride=8).eval()
    cases = [(pyconv.layer3[0], 512, 2, (3, 5), (1, 4), "maxpool"),
             (hg.layer3[1], 1024, 2, (3, 5), (32, 64), None),
             (pyconv.layer4[0], 1024, 4, (3,), (1,), "maxpool"),
             (resnet.layer3[0], 512, 2, (3,), (1,), "conv"),
             (resnet.layer4[0], 1024, 4, (3,), (1,), "conv")]
    for block, channels, dilation, kernels, groups, shortcut in cases:
        randomize_batchnorm(block, generator)
        x = torch.randn(1, channels, 9, 9, generator=generator)
        expected = functional_bottleneck(block, x, dilation, kernels, groups, shortcut)
        assert torch.allclose(block(x), expected, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Forward shapes


def layer4_size(model, x):
    sizes = []
    handle = model.layer4.register_forward_hook(lambda module, inputs, output: sizes.append(tuple(output.shape)))
    try:
        result = model(x)
    finally:
        handle.remove()
    return sizes[0], result


# Shapes on the meta device (no compute: the fast tier), and the same forwards computed on the CPU (slow tier).
DEVICES = ["meta", pytest.param("cpu", marks=pytest.mark.slow)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backbone", FAMILIES)
@pytest.mark.parametrize("output_stride, feature", [(8, 9), (16, 5), (32, 3)])
@torch.no_grad()
def test_feature_and_logit_sizes(backbone, output_stride, feature, device):
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(make_cfg(backbone_net=backbone, classes=5, backbone_output_stride=output_stride)).eval()
        size, logits = layer4_size(model, torch.randn(1, 3, 65, 65))
    assert size == (1, 2048, feature, feature)
    assert logits.shape == (1, 5, 65, 65)
    if device == "cpu":
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("output_stride", [8, 16, 32])
@torch.no_grad()
def test_every_zoom_in_eval_and_train(arch, output_stride, device):
    torch.manual_seed(0)
    with torch.device(device):
        _every_zoom_in_eval_and_train(arch, output_stride)


def _every_zoom_in_eval_and_train(arch, output_stride):
    model = build_model(make_cfg(arch=arch, backbone_net="resnet", classes=3, backbone_output_stride=output_stride))
    x = torch.randn(2, 3, 33, 25)  # small but non-square: (33 - 1) / 8 = 4, (25 - 1) / 8 = 3
    model.eval()
    feature = tuple(model.layer4(model.layer3(model.layer2(model.layer1(model.layer0(x[:1]))))).shape[-2:])
    assert feature == {8: (5, 4), 16: (3, 2), 32: (2, 1)}[output_stride]
    for zoom in (1, 2, 4, 8):
        model.zoom_factor = zoom
        expected = (1, 3, 4 * zoom + 1, 3 * zoom + 1)
        assert output_size(33, 25, zoom) == expected[2:]
        if zoom == 1:
            # As in the release, zoom 1 never resizes: the logits keep the feature resolution,
            # which is the (H-1)/8+1 grid only at output stride 8.
            expected = (1, 3) + feature
        assert model(x[:1]).shape == expected
    # Train mode returns (logits, aux) at the same size, also with zoom 1 (the release crashed there).
    model.train()
    for zoom in (1, 8):
        model.zoom_factor = zoom
        logits, aux = model(x)
        expected = (2, 3) + (feature if zoom == 1 else (4 * zoom + 1, 3 * zoom + 1))
        assert logits.shape == aux.shape == expected


def test_invalid_input_size_and_zoom():
    with torch.device("meta"):
        model = build_model(make_cfg(arch="psp", backbone_net="resnet", classes=3)).eval()
        with pytest.raises(ValueError, match=r"\(size - 1\) % 8 == 0"):
            model(torch.empty(1, 3, 64, 65))
    with pytest.raises(ValueError, match="zoom_factor"):
        with torch.device("meta"):
            build_model(make_cfg(zoom_factor=3, validate=False))


@pytest.mark.slow
@torch.no_grad()
def test_channels_last_gives_same_logits():
    torch.manual_seed(0)
    model = build_model(make_cfg(classes=4)).eval()
    x = torch.randn(1, 3, 33, 33)
    reference = model(x)
    model = model.to(memory_format=torch.channels_last)
    assert torch.allclose(model(x.contiguous(memory_format=torch.channels_last)), reference, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Parameter groups, registries, config


@pytest.mark.parametrize("arch, head", [("pyconvsegnet", "pyconvhead"), ("psp", "ppm")])
def test_backbone_and_head_modules_partition_parameters(arch, head):
    with torch.device("meta"):
        model = build_model(make_cfg(arch=arch, classes=7))
    backbone = {id(p) for m in model.backbone_modules() for p in m.parameters()}
    heads = {id(p) for m in model.head_modules() for p in m.parameters()}
    assert not backbone & heads
    assert backbone | heads == {id(p) for p in model.parameters()}
    assert model.head_modules() == [getattr(model, head), model.cls, model.aux]
    assert model.cls[-1].bias is not None and model.aux[-1].bias is not None
    biased = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.bias is not None]
    assert sorted(biased) == ["aux.4", "cls.1" if arch == "pyconvsegnet" else "cls.4"]


def test_unknown_names_list_registered_ones():
    """build_model's own errors, for a config that skipped validation (the config check is in test_config)."""
    assert {"pyconvsegnet", "psp"} <= set(registered_archs())
    assert set(FAMILIES) <= set(registered_backbones())
    with pytest.raises(ValueError, match="registered: .*psp.*pyconvsegnet"):
        build_model(make_cfg(arch="deeplab", validate=False))
    with pytest.raises(ValueError, match="registered: .*pyconvhgresnet.*pyconvresnet.*resnet"):
        build_model(make_cfg(backbone_net="vgg", validate=False))
    with pytest.raises(ValueError, match="layers"):
        build_model(make_cfg(layers=34, validate=False))
    with pytest.raises(ValueError, match="output stride"):
        build_model(make_cfg(backbone_output_stride=4, validate=False))


def test_new_backbone_is_selectable_by_name():
    def build_small(layers=50, output_stride=8):
        return build_resnet(layers=layers, output_stride=output_stride)

    register_backbone("test_small_resnet")(build_small)
    try:
        assert "test_small_resnet" in registered_backbones()
        with torch.device("meta"):
            model = build_model(make_cfg(backbone_net="test_small_resnet", arch="psp", classes=2))
        assert model.cls[-1].out_channels == 2
        with pytest.raises(ValueError, match="already registered"):
            register_backbone("resnet")(build_small)
    finally:
        BACKBONES.unregister("test_small_resnet")
    assert "test_small_resnet" not in BACKBONES and "psp" in ARCHITECTURES


def test_build_from_release_yaml(repo_root):
    config = pytest.importorskip("util.config")
    path = repo_root / "config" / "ade20k" / "ade20k_resnet50_pspnet.yaml"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    cfg = config.load_cfg(str(path), ["backbone_net", "pyconvresnet", "classes", "11"])
    with torch.device("meta"):
        model = build_model(cfg)  # pretrained is set in the YAML but not loaded by default
    assert type(model).__name__ == "PSPNet"
    assert model.cls[-1].out_channels == 11 and model.zoom_factor == cfg.zoom_factor
    assert isinstance(model.layer1[0].conv2, PyConv)
