"""Config loading: release layout, overrides, type checks and the error messages."""
import glob
import sys

import pytest
import yaml

from util.config import dump_cfg, load_cfg, parse_cli, parse_value, register_keys, require, schema, unregister_keys
from util.data.dataset import read_colors, read_names
from util.engine.precision import check_device_support
from util.errors import ConfigError

from conftest import REPO_ROOT

PYCONV50 = "config/ade20k/ade20k_pyconvresnet50_pyconvsegnet.yaml"

# The release's layout, with its absolute paths and apex keys, must load unchanged.
RELEASE_LAYOUT_YAML = """\
DATA:
  data_root: /raid/data/datasets/semanticSegmentation/ade20k
  train_list: /raid/data/datasets/semanticSegmentation/ade20k/list/training.txt
  val_list: /raid/data/datasets/semanticSegmentation/ade20k/list/validation.txt
  classes: 150
TRAIN:
  arch: pyconvsegnet
  backbone_net: pyconvresnet
  layers: 50
  sync_bn: True
  train_h: 473
  train_w: 473
  scale_min: 0.5
  scale_max: 2.0
  rotate_min: -10
  rotate_max: 10
  zoom_factor: 8
  ignore_label: 255
  aux_weight: 0.4
  train_gpu: [0, 1, 2, 3, 4, 5, 6, 7]
  workers: 16
  batch_size: 16
  batch_size_val: 16
  base_lr: 0.01
  epochs: 100
  start_epoch: 0
  power: 0.9
  momentum: 0.9
  weight_decay: 0.0001
  manual_seed: 1
  print_freq: 10
  save_freq: 1
  save_path: exp/ade20k/ade20k_pyconvresnet50_pyconvsegnet/model
  weight:
  resume:
  evaluate: True
  pretrained: /raid/tmp/pyconvresnet50.pth
  use_ppm: False
  backbone_output_stride: 8
Distributed:
  dist_url: tcp://127.0.0.1:6789
  dist_backend: 'nccl'
  multiprocessing_distributed: True
  world_size: 1
  rank: 0
  use_apex: True
  opt_level: 'O0'
  keep_batchnorm_fp32:
  loss_scale:
TEST:
  test_list: /raid/data/datasets/semanticSegmentation/ade20k/list/validation.txt
  split: val
  base_size: 512
  test_h: 473
  test_w: 473
  scales: [1.0]
  has_prediction: False
  index_start: 0
  index_step: 0
  test_gpu: [0]
  model_path: exp/ade20k/ade20k_pyconvresnet50_pyconvsegnet/model/train_epoch_100.pth
  save_folder: exp/ade20k/ade20k_pyconvresnet50_pyconvsegnet/result/epoch_100/val/ss
  colors_path: dataset/ade20k/ade20k_colors.txt
  names_path: dataset/ade20k/ade20k_names.txt
  best_mIoU_model_path: exp/ade20k/ade20k_pyconvresnet50_pyconvsegnet/model/best_mIoU.pth
  best_mIoU_save_folder: exp/ade20k/ade20k_pyconvresnet50_pyconvsegnet/result/best_mIoU/val/ss
"""


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_release_layout_loads_flat(tmp_path, capsys):
    cfg = load_cfg(write(tmp_path, RELEASE_LAYOUT_YAML))
    assert cfg.backbone_net == "pyconvresnet" and cfg["layers"] == 50
    assert cfg.weight is None and cfg.resume is None
    # the release's keys that nothing reads load with one note each saying what replaces them, and are gone
    notes = capsys.readouterr().err.splitlines()
    for key, replacement in (("use_ppm", "'arch'"), ("use_apex", "'precision'"), ("opt_level", "'precision'"),
                             ("keep_batchnorm_fp32", "'precision'"), ("loss_scale", "precision fp16"),
                             ("test_gpu", "'device'")):
        assert key not in cfg
        assert len([line for line in notes if f"'{key}' is ignored" in line and replacement in line]) == 1, key
    assert cfg.train_gpu == [0, 1, 2, 3, 4, 5, 6, 7]
    # keys the release did not have take their defaults
    assert cfg.precision == "fp32" and cfg.test_batch_size == 8
    assert isinstance(cfg.to_dict(), dict) and not isinstance(cfg.to_dict(), type(cfg))


@pytest.mark.parametrize("path", sorted(glob.glob("config/*/*.yaml")))
def test_repo_configs_load_with_relative_paths(path):
    cfg = load_cfg(path)
    named = ("names_path", "colors_path") if "custom" not in path else ()  # your own classes: ids, default palette
    for key in ("data_root", "train_list", "val_list", "test_list", "save_path", *named):
        assert cfg[key] and not str(cfg[key]).startswith("/"), key
    assert (cfg.base_lr, cfg.power, cfg.momentum, cfg.weight_decay, cfg.aux_weight) == (0.01, 0.9, 0.9, 0.0001, 0.4)
    # (classes, train crop, batch, epochs, base_size, test crop, train list) of the release / semseg recipes.
    recipes = {"ade20k": (150, 473, 16, 100, 512, 473, "ADEChallengeData2016/list/training.txt"),
               "trainval": (150, 473, 16, 120, 512, 473, "ADEChallengeData2016/list/trainval.txt"),
               "cityscapes": (19, 713, 16, 200, 2048, 713, "data/cityscapes/list/train.txt"),
               "voc2012": (21, 473, 16, 50, 512, 473, "VOCdevkit/VOC2012/list/train_aug.txt")}
    kind = next((k for k in ("trainval", "cityscapes", "voc2012", "ade20k") if k in path), None)
    if kind is not None:
        *numbers, train_list = recipes[kind]
        assert [cfg.classes, cfg.train_h, cfg.batch_size, cfg.epochs, cfg.base_size, cfg.test_h] == numbers
        assert cfg.train_h == cfg.train_w and cfg.test_h == cfg.test_w and cfg.train_list.endswith(train_list)
        assert (cfg.scale_min, cfg.scale_max) == (0.5, 2.0)
        assert cfg.split == ("test" if kind == "trainval" else "val")
        assert len(read_names(cfg.names_path, cfg.classes)) == len(read_colors(cfg.colors_path, cfg.classes))
    if "camvid" in path:  # a user path; the tests point it at ../shared by override
        assert cfg.data_root == "data/camvid"


def test_all_ade20k_backbone_configs_exist():
    for backbone in ("resnet", "pyconvresnet", "pyconvhgresnet"):
        for layers in (50, 101, 152):
            cfg = load_cfg(f"config/ade20k/ade20k_{backbone}{layers}_pyconvsegnet.yaml")
            assert (cfg.arch, cfg.backbone_net, cfg.layers) == ("pyconvsegnet", backbone, layers)
    cfg = load_cfg("config/ade20k/ade20k_resnet50_pspnet.yaml")
    assert (cfg.arch, cfg.backbone_net, cfg.layers) == ("psp", "resnet", 50)


def test_overrides_are_literals_and_type_checked():
    cfg = load_cfg(PYCONV50, ["layers", "101", "base_lr", "0.02", "scales", "[0.5, 1.0]", "sync_bn", "False",
                              "train_h", "65", "train_w", "65", "test_h", "65", "test_w", "65"])
    assert cfg.layers == 101 and cfg.base_lr == 0.02 and cfg.scales == [0.5, 1.0] and cfg.sync_bn is False
    assert load_cfg(PYCONV50, ["base_lr", "1"]).base_lr == 1.0  # int where a float is expected is fine
    assert load_cfg(PYCONV50, ["scales", "1.0"]).scales == [1.0]
    with pytest.raises(ConfigError, match=r"'layers' must be of type int"):
        load_cfg(PYCONV50, ["layers", "fifty"])
    with pytest.raises(ConfigError, match=r"'sync_bn' must be of type bool"):
        load_cfg(PYCONV50, ["sync_bn", "1"])


def test_empty_yaml_value_accepts_any_type_and_null_means_none():
    cfg = load_cfg(PYCONV50, ["weight", "exp/x.pth", "resume", "auto"])
    assert cfg.weight == "exp/x.pth" and cfg.resume == "auto"
    cfg = load_cfg(PYCONV50, ["pretrained", "''", "best_mIoU_model_path", "null"])
    assert cfg.pretrained is None and cfg.best_mIoU_model_path is None
    assert load_cfg(PYCONV50, ["manual_seed", "7"]).manual_seed == 7
    assert parse_value("None") is None and parse_value("") is None and parse_value("abc") == "abc"


def test_lists_on_the_command_line_take_the_yaml_form():
    """A list override is written as in a config file: YAML's flow form, Python literals too."""
    assert parse_value("[a.py, b.py]") == ["a.py", "b.py"]
    assert parse_value("[0.5, 0.75, 1.0]") == [0.5, 0.75, 1.0] and parse_value("['a.py']") == ["a.py"]
    assert parse_value("[not closed") == "[not closed" and parse_value("a.py") == "a.py"


def test_custom_imports_list_override_and_syntax_error(tmp_path, monkeypatch, capsys):
    """custom_imports "[a.py, b.py]" imports both files; a file with a syntax error is a one-line config error
    naming the file and line, exit status 2 (as an import error is)."""
    config = str(REPO_ROOT / PYCONV50)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg_import_a.py").write_text("LOADED = 'a'\n")
    (tmp_path / "cfg_import_b.py").write_text("LOADED = 'b'\n")
    (tmp_path / "cfg_import_broken.py").write_text("x = 1\ndef f(:\n    pass\n")
    monkeypatch.setattr(sys, "modules", dict(sys.modules))  # the imported files leave with the test
    load_cfg(config, ["custom_imports", "[cfg_import_a.py, cfg_import_b.py]"])
    assert sys.modules["cfg_import_a"].LOADED == "a" and sys.modules["cfg_import_b"].LOADED == "b"
    with pytest.raises(SystemExit) as exit_info:
        parse_cli(["--config", config, "custom_imports", "cfg_import_broken.py"], "test")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{tmp_path / 'cfg_import_broken.py'}, line 2: SyntaxError" in err
    assert err.startswith("config error: custom_imports: cannot import 'cfg_import_broken.py'")
    assert "cfg_import_broken" not in sys.modules


def test_unknown_override_names_nearest_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'bse_lr'.*did you mean 'base_lr'"):
        load_cfg(PYCONV50, ["bse_lr", "0.1"])
    with pytest.raises(ConfigError, match="KEY VALUE pairs"):
        load_cfg(PYCONV50, ["layers"])


def test_unknown_yaml_key_and_section_name_nearest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'zoom_facter'.*did you mean 'zoom_factor'"):
        load_cfg(write(tmp_path, "TRAIN:\n  zoom_facter: 8\n"))
    with pytest.raises(ConfigError, match=r"unknown section 'TRIAN'.*did you mean 'TRAIN'"):
        load_cfg(write(tmp_path, "TRIAN:\n  layers: 50\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_cfg(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_cfg(write(tmp_path, "TRAIN: [\n"))


@pytest.mark.parametrize("overrides, message", [
    (["layers", "34"], r"layers must be one of \[50, 101, 152\]"),
    (["zoom_factor", "3"], r"zoom_factor must be one of \[1, 2, 4, 8\]"),
    (["train_h", "472"], r"train_h must satisfy \(train_h - 1\) % 8 == 0"),
    (["test_w", "100"], r"test_w must satisfy"),
    (["classes", "1"], r"classes must be an integer >= 2"),
    # (after the built-in names, those a test registered: the tests' tiny network, tests/tiny_model.py)
    (["arch", "deeplab"], r"arch must be one of \['psp', 'pyconvsegnet'(, '\w+')*\], got 'deeplab'"),
    (["backbone_net", "pyconvresnt"], r"backbone_net must be one of .*did you mean 'pyconvresnet'"),
    (["backbone_output_stride", "4"], r"backbone_output_stride must be one of \[8, 16, 32\]"),
    (["precision", "fp8"], r"precision must be one of"),
    (["split", "dev"], r"split must be one of"),
    (["scale_min", "3.0"], r"scale_min <= scale_max"),
    (["batch_size", "0"], r"batch_size must be an integer >= 1"),
    (["base_size", "-1"], r"base_size must be a number of pixels \(0 or empty: each image at its own size\)"),
])
def test_invalid_values_say_what_is_allowed(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_cfg(PYCONV50, overrides)


def test_base_size_zero_or_empty_means_own_size():
    """The release's configs say ``base_size: 0`` for "test each image at its own size"; they load."""
    from util.evaluation.inference import inference_kwargs, scaled_size

    for value in ("0", "null"):
        base_size = inference_kwargs(load_cfg(PYCONV50, ["base_size", value]))["base_size"]
        assert scaled_size(300, 400, 1.0, base_size) == (300, 400)


def test_fp16_needs_cuda():
    cfg = load_cfg(PYCONV50, ["precision", "fp16"])
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        check_device_support(cfg, "cpu")
    check_device_support(cfg, "cuda")
    check_device_support(load_cfg(PYCONV50, ["precision", "bf16"]), "cpu")


def test_bf16_needs_native_gpu_support(monkeypatch):
    import torch

    cfg = load_cfg(PYCONV50, ["precision", "bf16"])
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Tesla V100")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: asked.append(
        including_emulation) or False)
    with pytest.raises(ConfigError, match=r"bf16: this GPU \(Tesla V100\) has no native bfloat16.*fp16 or fp32"):
        check_device_support(cfg, "cuda")
    assert asked == [False]  # emulated bf16 does not count
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    check_device_support(cfg, "cuda")
    check_device_support(load_cfg(PYCONV50, ["precision", "fp32"]), "cuda")


def test_dump_round_trips(tmp_path):
    cfg = load_cfg(PYCONV50, ["layers", "152", "resume", "auto"])
    out = tmp_path / "copy.yaml"
    dump_cfg(cfg, str(out))
    assert load_cfg(str(out)) == cfg


def test_attribute_errors_suggest():
    cfg = load_cfg(PYCONV50)
    with pytest.raises(AttributeError, match="did you mean 'base_lr'"):
        cfg.baselr


def test_module_keys_join_the_schema(tmp_path):
    """A module's own keys (register_keys): loaded, type-checked, suggested, checked up front, dumped."""
    def check(cfg):
        require(cfg.test_gamma > 0, f"test_gamma must be > 0, got {cfg.test_gamma}")

    register_keys("TRAIN", {"test_gamma": 2.0}, check=check)
    try:
        assert load_cfg(PYCONV50).test_gamma == 2.0
        assert load_cfg(write(tmp_path, "TRAIN:\n  test_gamma: 3\n")).test_gamma == 3.0
        with pytest.raises(ConfigError, match=r"unknown config key 'test_gama'.*did you mean 'test_gamma'"):
            load_cfg(PYCONV50, ["test_gama", "1"])
        with pytest.raises(ConfigError, match=r"'test_gamma' must be of type float"):
            load_cfg(PYCONV50, ["test_gamma", "large"])
        with pytest.raises(ConfigError, match="test_gamma must be > 0, got -1.0"):
            load_cfg(PYCONV50, ["test_gamma", "-1"])
        dump_cfg(load_cfg(PYCONV50, ["test_gamma", "0.5"]), str(tmp_path / "out.yaml"))
        assert yaml.safe_load((tmp_path / "out.yaml").read_text())["TRAIN"]["test_gamma"] == 0.5
        with pytest.raises(ValueError, match="'base_lr' is already declared by util.engine.optim"):
            register_keys("TRAIN", {"base_lr": 0.1})
        with pytest.raises(ValueError, match="did you mean 'TRAIN'"):
            register_keys("TRIAN", {"test_delta": 1})
    finally:
        unregister_keys(["test_gamma"])
    assert "test_gamma" not in schema()["TRAIN"]
    with pytest.raises(ConfigError, match="unknown config key 'test_gamma'"):
        load_cfg(PYCONV50, ["test_gamma", "1"])
    load_cfg(PYCONV50)  # its check went with it


def test_model_values_come_from_model_registries():
    """The config accepts what model/ can build, read from its registries and constants."""
    from model import BACKBONES, OUTPUT_STRIDES, ZOOM_FACTORS
    from model.backbones import STAGE_BLOCKS

    assert BACKBONES.get("resnet").supported_layers == tuple(STAGE_BLOCKS)
    for stride in OUTPUT_STRIDES:
        assert load_cfg(PYCONV50, ["backbone_output_stride", str(stride)]).backbone_output_stride == stride
    for zoom in ZOOM_FACTORS:
        assert load_cfg(PYCONV50, ["zoom_factor", str(zoom)]).zoom_factor == zoom


def test_no_key_is_unused():
    """Every schema key is read somewhere, not only declared (a key is used or gone)."""
    import re
    from pathlib import Path

    from util.config import defaults

    root = Path(__file__).resolve().parents[1]
    sources = "\n".join(path.read_text() for folder in ("tool", "util", "model", "figure")
                        for path in (root / folder).rglob("*.py"))
    # read as cfg.KEY, cfg["KEY"], cfg.get("KEY"), check_choice(cfg, "KEY") ...; not a declaration "KEY": default
    unused = [key for key in defaults() if not re.search(rf"(\.{key}\b|[\"']{key}[\"'](?!\s*:))", sources)]
    assert unused == []
