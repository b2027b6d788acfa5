"""Checkpoint I/O: release layouts, strict mismatch messages, damaged and unsafe files, atomic saves."""
import os
import pickle
from collections import OrderedDict

import pytest
import torch
from torch import nn

from model import build_model
from util.errors import CheckpointError
from util.runtime.checkpoint_io import (
    add_module_prefix,
    extract_state_dict,
    load_checkpoint_file,
    load_model_weights,
    load_pretrained_backbone,
    save_checkpoint,
    strip_wrapper_prefixes,
    unwrap_model,
)

import tiny_runs


def make_cfg(**overrides):
    return tiny_runs.make_cfg(**{"backbone_net": "resnet", "classes": 3, **overrides})


def meta_model(**overrides):
    with torch.device("meta"):
        return build_model(make_cfg(**overrides))


class Tiny(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.cls = nn.Conv2d(4, classes, 1)

    def forward(self, x):
        return self.cls(torch.relu(self.bn(self.conv(x))))


def randomized(module, seed):
    """Seeded random weights and BN statistics that keep activations finite through a deep network."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if tensor.dim() > 1:  # conv weights: He (fan-in) scale
                fan_in = tensor[0].numel()
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
            elif name.endswith(("running_var", "weight")):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.5 + 0.5)
            else:  # running_mean, bias
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
    return module


class RunsCode:
    """Unpickling this runs a shell command (what weights_only loading must refuse)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("wrapped", [True, False], ids=["state_dict-key", "bare"])
@pytest.mark.parametrize("prefixed", [True, False], ids=["module-prefix", "no-prefix"])
@torch.no_grad()
def test_round_trip_layouts(tmp_path, wrapped, prefixed):
    source = randomized(Tiny(), seed=1).eval()
    state = add_module_prefix(source.state_dict()) if prefixed else source.state_dict()
    obj = {"state_dict": state, "epoch": 7, "best_mIoU": 0.25} if wrapped else state
    path = tmp_path / "model.pth"
    save_checkpoint(obj, path)
    target = randomized(Tiny(), seed=2).eval()
    x = torch.randn(1, 3, 9, 9)
    assert not torch.equal(target(x), source(x))
    load_model_weights(target, path)
    assert torch.equal(target(x), source(x))
    loaded = load_checkpoint_file(path)
    if wrapped:
        assert loaded["epoch"] == 7 and loaded["best_mIoU"] == 0.25


@torch.no_grad()
def test_release_layout_real_model(tmp_path):
    """A release-style checkpoint ({'state_dict': module.-prefixed, 'epoch', 'optimizer'}) of a real model."""
    torch.manual_seed(0)
    source = randomized(build_model(make_cfg()), seed=3).eval()
    optimizer = torch.optim.SGD(source.parameters(), lr=0.01, momentum=0.9)
    path = tmp_path / "train_epoch_1.pth"
    save_checkpoint({"epoch": 1, "state_dict": add_module_prefix(source.state_dict()),
                     "optimizer": optimizer.state_dict()}, path)
    target = build_model(make_cfg()).eval()
    load_model_weights(target, path)
    x = torch.randn(1, 3, 33, 33)
    expected = source(x)
    assert torch.isfinite(expected).all()
    assert torch.equal(target(x), expected)


def test_prefix_helpers_and_wrappers():
    state = OrderedDict([("a.weight", torch.zeros(1)), ("b", torch.ones(1))])
    assert list(add_module_prefix(state)) == ["module.a.weight", "module.b"]
    assert list(add_module_prefix(add_module_prefix(state))) == ["module.a.weight", "module.b"]
    for prefix in ("module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."):
        assert list(strip_wrapper_prefixes({prefix + k: v for k, v in state.items()})) == list(state)
    # A prefix only some keys carry is part of the names, not a wrapper's.
    mixed = {"module.a": torch.zeros(1), "b": torch.zeros(1)}
    assert list(strip_wrapper_prefixes(mixed)) == ["module.a", "b"]
    tiny = Tiny()
    assert unwrap_model(nn.DataParallel(tiny)) is tiny


def test_not_a_state_dict():
    with pytest.raises(CheckpointError, match="not tensors"):
        extract_state_dict({"epoch": 3, "state_dict": None}, "x.pth")
    with pytest.raises(CheckpointError, match="holds no model weights"):
        extract_state_dict({}, "x.pth")
    with pytest.raises(CheckpointError, match="not tensors"):
        extract_state_dict({"epoch": 3, "optimizer": {}}, "x.pth")
    with pytest.raises(CheckpointError, match="holds no model weights"):
        extract_state_dict([1, 2], "x.pth")


# ---------------------------------------------------------------------------------------------
# Mismatches (meta models: only keys and shapes matter)


def test_mismatch_another_class_count():
    model = meta_model(classes=150)
    state = meta_model(classes=11).state_dict()
    with pytest.raises(CheckpointError) as info:
        load_model_weights(model, {"state_dict": add_module_prefix(state)}, source="ade.pth")
    message = str(info.value)
    assert "\n" not in message and message.startswith("ade.pth does not match the model")
    assert "4 wrongly shaped" in message
    assert "cls.1.weight (file [11, 256, 1, 1] vs model [150, 256, 1, 1])" in message
    assert "missing" not in message and "unexpected" not in message


def test_mismatch_another_architecture():
    model = meta_model(arch="pyconvsegnet")
    state = meta_model(arch="psp").state_dict()
    with pytest.raises(CheckpointError) as info:
        load_model_weights(model, state)
    message = str(info.value)
    assert "\n" not in message
    assert "missing: pyconvhead.local_context.layers.0.weight" in message
    assert "unexpected: ppm.features.0.1.weight" in message
    assert "more)" in message  # long lists are shortened
    assert "wrongly shaped: cls.1.weight" in message  # cls.1 is a conv in one and a BN in the other
    assert len(message) < 3000


# ---------------------------------------------------------------------------------------------
# Damaged and unsafe files


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint_file(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="is not a file"):
        load_checkpoint_file(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "truncated-20KB", "empty", "garbage", "legacy-truncated"])
def test_damaged_file(tmp_path, damage):
    good = tmp_path / "good.pth"
    # 20 KB cut short: torch's zip reader fails with OSError EINVAL (it seeks before the file's start)
    state = {"state_dict": Tiny().state_dict(), **({"extra": torch.zeros(10000)} if damage == "truncated-20KB" else {})}
    torch.save(state, good, _use_new_zipfile_serialization=damage != "legacy-truncated")
    data = good.read_bytes()
    bad = tmp_path / "bad.pth"
    bad.write_bytes({"truncated": data[: len(data) // 2], "truncated-20KB": data[: len(data) // 2], "empty": b"",
                     "garbage": b"not a checkpoint at all", "legacy-truncated": data[: len(data) // 2]}[damage])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_file(bad)
    message = str(info.value)
    assert message.startswith(f"{bad} is not a valid checkpoint (truncated or corrupted?): ")
    assert "\n" not in message


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_code_running_pickle_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": Tiny().state_dict(), "payload": RunsCode(marker)}, path)
    with pytest.raises(CheckpointError) as info:
        load_model_weights(Tiny(), path)
    message = str(info.value)
    assert "refused: it contains Python objects that weights_only loading does not allow" in message
    assert "system" in message and "\n" not in message
    assert not marker.exists()
    # A plain pickle (not written by torch.save) is refused as well, whatever the protocol.
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        raw = tmp_path / f"evil_{protocol}.pkl"
        raw.write_bytes(pickle.dumps(RunsCode(marker), protocol=protocol))
        with pytest.raises(CheckpointError):
            load_checkpoint_file(raw)
    assert not marker.exists()


def test_numpy_scalar_is_refused_with_its_name(tmp_path):
    np = pytest.importorskip("numpy")
    path = tmp_path / "np.pth"
    torch.save({"best_mIoU": np.float64(0.5)}, path)
    with pytest.raises(CheckpointError, match=r"refused: .*numpy"):
        load_checkpoint_file(path)


# ---------------------------------------------------------------------------------------------
# Atomic save


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "latest.pth"
    save_checkpoint({"epoch": 1}, path)
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"partial bytes")  # the write has started when the failure happens
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint_file(path) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pth"]  # no temporary file left


def test_save_creates_directory_and_replaces(tmp_path):
    path = tmp_path / "run" / "model" / "train_epoch_1.pth"
    save_checkpoint({"epoch": 1}, path)
    save_checkpoint({"epoch": 2}, str(path))
    assert load_checkpoint_file(path) == {"epoch": 2}
    assert [p.name for p in path.parent.iterdir()] == ["train_epoch_1.pth"]


# ---------------------------------------------------------------------------------------------
# ImageNet backbone


def imagenet_layout(segmentation_state, classes=1000):
    """Backbone part of a segmentation state dict renamed to the classification layout, plus fc."""
    state = OrderedDict()
    for key, value in segmentation_state.items():
        if key.startswith("layer0.0."):
            state["conv1." + key[len("layer0.0."):]] = value
        elif key.startswith("layer0.1."):
            state["bn1." + key[len("layer0.1."):]] = value
        elif key.startswith(("layer1.", "layer2.", "layer3.", "layer4.")):
            state[key] = value
    state["fc.weight"] = torch.randn(classes, 2048)
    state["fc.bias"] = torch.randn(classes)
    return state


@torch.no_grad()
def test_load_pretrained_backbone(tmp_path):
    donor = randomized(build_model(make_cfg(backbone_net="pyconvresnet")), seed=4)
    path = tmp_path / "pyconvresnet50.pth"
    save_checkpoint(imagenet_layout(donor.state_dict()), path)
    model = build_model(make_cfg(backbone_net="pyconvresnet"))
    load_pretrained_backbone(model, path)
    loaded, expected = model.state_dict(), donor.state_dict()
    for key in expected:
        if key.startswith("layer"):
            assert torch.equal(loaded[key], expected[key]), key
    assert not torch.equal(loaded["cls.1.weight"], expected["cls.1.weight"])  # head keeps its own init
    # build_model only builds: `pretrained` is the caller's to load (tests/resume replace all weights anyway).
    fresh = build_model(make_cfg(backbone_net="pyconvresnet", pretrained=str(tmp_path / "absent.pth")))
    assert not torch.equal(fresh.state_dict()["layer0.0.weight"], expected["layer0.0.weight"])


def test_pretrained_backbone_mismatch_lists_keys(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(imagenet_layout(meta_model(backbone_net="resnet").state_dict()), path)  # meta tensors save as such
    with pytest.raises(CheckpointError) as info:
        load_pretrained_backbone(meta_model(backbone_net="pyconvresnet"), path)
    message = str(info.value)
    assert message.startswith(f"pretrained backbone {path} does not match the model's backbone")
    assert "missing: layer1.0.conv2.conv2_1.weight" in message
    assert "unexpected: layer1.0.conv2.weight" in message
    assert "\n" not in message
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained_backbone(meta_model(), tmp_path / "absent.pth")


def test_fine_tuning_loads_everything_but_the_classifiers_of_another_class_count():
    from util.runtime.checkpoint_io import load_weights_for_fine_tuning

    source = randomized(build_model(make_cfg(classes=5, backbone_output_stride=32)), seed=1)
    file_state = {"state_dict": add_module_prefix(source.state_dict())}
    model = build_model(make_cfg(classes=3, backbone_output_stride=32))
    assert model.classifier_layers() == ["cls.1", "aux.4"]
    fresh = {key: value.clone() for key, value in model.state_dict().items()}
    assert load_weights_for_fine_tuning(model, file_state, source="ade.pth") == ["cls.1", "aux.4"]
    reinitialised = {"cls.1.weight", "cls.1.bias", "aux.4.weight", "aux.4.bias"}
    for key, value in model.state_dict().items():
        expected = fresh[key] if key in reinitialised else source.state_dict()[key]
        assert torch.equal(value, expected), key
    # the same class count: every tensor is the file's, nothing re-initialised
    same = build_model(make_cfg(classes=5, backbone_output_stride=32))
    assert load_weights_for_fine_tuning(same, file_state) == []
    assert all(torch.equal(value, source.state_dict()[key]) for key, value in same.state_dict().items())


@pytest.mark.parametrize("other", [dict(arch="psp"), dict(layers=101), dict(backbone_net="pyconvresnet")])
def test_fine_tuning_still_refuses_another_network(other):
    from util.runtime.checkpoint_io import load_weights_for_fine_tuning

    model = meta_model(classes=3)
    state = meta_model(classes=150, **other).state_dict()
    with pytest.raises(CheckpointError, match="does not match the model beyond its number of classes"):
        load_weights_for_fine_tuning(model, state, source="other.pth")
