"""Configuration: the release's YAML layout plus ``KEY VALUE`` command-line overrides.

A config file has the sections ``DATA``, ``TRAIN``, ``Distributed`` and ``TEST``; their keys
are merged into one flat :class:`CfgNode` (``cfg.base_lr``), as the release did. Every key
this codebase knows is listed in :data:`SCHEMA` with its default, so

* a release YAML (which lacks the keys added here, e.g. ``precision``) loads unchanged,
* a typo, in the file or on the command line, is an error that names the nearest valid key,
* an override is type-checked against the value it replaces.
"""
from __future__ import annotations

import ast
import copy
import difflib
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says what is allowed."""


# Section -> key -> default. ``None`` means "empty in YAML": such a key accepts any type.
SCHEMA: Dict[str, Dict[str, Any]] = {
    "DATA": {
        "data_root": None,
        "train_list": None,
        "val_list": None,
        "classes": 150,
    },
    "TRAIN": {
        "arch": "pyconvsegnet",
        "backbone_net": "pyconvresnet",
        "layers": 50,
        "backbone_output_stride": 8,
        "sync_bn": True,
        "train_h": 473,
        "train_w": 473,
        "scale_min": 0.5,
        "scale_max": 2.0,
        "rotate_min": -10,
        "rotate_max": 10,
        "zoom_factor": 8,
        "ignore_label": 255,
        "aux_weight": 0.4,
        "train_gpu": [0],
        "workers": 16,
        "batch_size": 16,
        "batch_size_val": 16,
        "base_lr": 0.01,
        "epochs": 100,
        "start_epoch": 0,
        "power": 0.9,
        "momentum": 0.9,
        "weight_decay": 0.0001,
        "manual_seed": None,
        "print_freq": 10,
        "save_freq": 1,
        "save_path": None,
        "weight": None,
        "resume": None,
        "evaluate": False,
        "pretrained": None,
        "use_ppm": False,  # legacy key of the release; the arch decides the head
        "precision": "fp32",
        "channels_last": True,
        "compile": False,
        "keep_checkpoints": 2,
    },
    "Distributed": {
        "dist_url": "env://",
        "dist_backend": None,
        "multiprocessing_distributed": True,
        "world_size": 1,
        "rank": 0,
        "dist_timeout": 1800,
        # Legacy apex keys of the release: accepted so release YAMLs load, otherwise unused.
        "use_apex": False,
        "opt_level": "O0",
        "keep_batchnorm_fp32": None,
        "loss_scale": None,
    },
    "TEST": {
        "test_list": None,
        "split": "val",
        "base_size": 512,
        "test_h": 473,
        "test_w": 473,
        "scales": [1.0],
        "has_prediction": False,
        "index_start": 0,
        "index_step": 0,
        "test_gpu": [0],
        "model_path": None,
        "save_folder": None,
        "colors_path": None,
        "names_path": None,
        "best_mIoU_model_path": None,
        "best_mIoU_save_folder": None,
        "test_batch_size": 8,
        "device": None,
    },
}

ALL_DEFAULTS: Dict[str, Any] = {k: v for section in SCHEMA.values() for k, v in section.items()}

ARCHS = ("pyconvsegnet", "psp")
BACKBONES = ("resnet", "pyconvresnet", "pyconvhgresnet")
LAYERS = (50, 101, 152)
ZOOM_FACTORS = (1, 2, 4, 8)
OUTPUT_STRIDES = (8, 16, 32)
PRECISIONS = ("fp32", "bf16", "fp16")
SPLITS = ("train", "val", "test")


class CfgNode(dict):
    """A flat dict whose keys are also attributes: ``cfg.base_lr == cfg["base_lr"]``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key '{name}'{_suggestion(name, self.keys())}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __deepcopy__(self, memo):
        return CfgNode(copy.deepcopy(dict(self), memo))

    def to_dict(self) -> Dict[str, Any]:
        """Plain data (for checkpoints: loadable with ``weights_only=True``)."""
        return copy.deepcopy(dict(self))


def _suggestion(key: str, valid: Iterable[str]) -> str:
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _is_none_text(text: str) -> bool:
    return text.strip() in ("", "null", "None", "none", "~", "''", '""')


def parse_value(text: Any) -> Any:
    """A command-line value as a Python literal (``'0.01'`` -> 0.01, ``'[1.0]'`` -> [1.0]);
    ``''``/``null``/``None`` -> None; anything else stays a string."""
    if not isinstance(text, str):
        return text
    if _is_none_text(text):
        return None
    if text in ("true", "True"):
        return True
    if text in ("false", "False"):
        return False
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _check_type(key: str, value: Any, reference: Any, source: str) -> Any:
    """``value`` converted to the type of ``reference`` where that is lossless, else ConfigError."""
    if value is None or reference is None:
        return value
    if isinstance(reference, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(reference, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(reference, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(reference, (list, tuple)):
        if isinstance(value, (list, tuple)):
            return list(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return [value]  # "scales 1.0" means [1.0]
    elif isinstance(reference, str):
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(
        f"{source}: '{key}' must be of type {type(reference).__name__} (like {reference!r}), got {value!r}"
    )


def _read_yaml(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, "r", encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected sections {list(SCHEMA)} at the top level")
    return data


def load_cfg(path: Optional[str], overrides: Optional[Sequence[str]] = None, validate: bool = True) -> CfgNode:
    """Read ``path`` (YAML in the release's layout), apply ``overrides`` and validate.

    Args:
        path: a YAML file, or None for the defaults alone.
        overrides: ``[KEY, VALUE, KEY, VALUE, ...]`` as given on the command line.
        validate: check values (layers, zoom, sizes, ...) after merging.
    """
    cfg = CfgNode(copy.deepcopy(ALL_DEFAULTS))
    if path is not None:
        data = _read_yaml(path)
        for section, entries in data.items():
            if section not in SCHEMA:
                if section in ALL_DEFAULTS:
                    raise ConfigError(f"{path}: key '{section}' must be inside one of the sections {list(SCHEMA)}")
                raise ConfigError(f"{path}: unknown section '{section}'{_suggestion(section, SCHEMA)}")
            for key, value in (entries or {}).items():
                if key not in ALL_DEFAULTS:
                    raise ConfigError(f"{path}: unknown key '{key}' in section {section}"
                                      f"{_suggestion(key, ALL_DEFAULTS)}")
                if isinstance(value, str) and _is_none_text(value):
                    value = None
                cfg[key] = _check_type(key, value, ALL_DEFAULTS[key], path)
    apply_overrides(cfg, overrides or [])
    if validate:
        validate_cfg(cfg)
    return cfg


def apply_overrides(cfg: CfgNode, overrides: Sequence[str]) -> CfgNode:
    """Apply ``KEY VALUE`` pairs in place, type-checked against the current value."""
    if len(overrides) % 2 != 0:
        raise ConfigError(f"overrides must be KEY VALUE pairs, got an odd number of items: {list(overrides)}")
    for key, text in zip(overrides[0::2], overrides[1::2]):
        key = key.lstrip("-")
        if key not in cfg:
            raise ConfigError(f"unknown config key '{key}'{_suggestion(key, cfg.keys())}")
        value = parse_value(text)
        reference = cfg[key] if cfg[key] is not None else ALL_DEFAULTS.get(key)
        # A key left empty in the YAML and by default accepts any type (as in the release).
        cfg[key] = _check_type(key, value, reference, "override")
    return cfg


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _registered_names():
    """Names of the architectures and backbones ``build_model`` can make (including user registrations)."""
    try:
        from model.registry import registered_archs, registered_backbones
    except ImportError:  # model package not importable: fall back to the release's names
        return set(ARCHS), set(BACKBONES)
    return set(registered_archs()), set(registered_backbones())


def validate_cfg(cfg: CfgNode) -> None:
    """Raise ConfigError for values no run can use. Nothing heavy is imported or built."""
    archs, backbones = _registered_names()
    _require(cfg.arch in archs, f"arch '{cfg.arch}' is not one of {sorted(archs)}{_suggestion(str(cfg.arch), archs)}")
    _require(cfg.backbone_net in backbones, f"backbone_net '{cfg.backbone_net}' is not one of "
             f"{sorted(backbones)}{_suggestion(str(cfg.backbone_net), backbones)}")
    if cfg.backbone_net in BACKBONES:
        _require(cfg.layers in LAYERS, f"layers must be one of {list(LAYERS)}, got {cfg.layers}")
    _require(cfg.zoom_factor in ZOOM_FACTORS, f"zoom_factor must be one of {list(ZOOM_FACTORS)}, got {cfg.zoom_factor}")
    _require(cfg.backbone_output_stride in OUTPUT_STRIDES,
             f"backbone_output_stride must be one of {list(OUTPUT_STRIDES)}, got {cfg.backbone_output_stride}")
    _require(isinstance(cfg.classes, int) and cfg.classes >= 2, f"classes must be an integer >= 2, got {cfg.classes}")
    for key in ("train_h", "train_w", "test_h", "test_w"):
        value = cfg[key]
        _require(isinstance(value, int) and value > 0 and (value - 1) % 8 == 0,
                 f"{key} must satisfy ({key} - 1) % 8 == 0 (e.g. 65, 473, 713), got {value}")
    _require(cfg.precision in PRECISIONS, f"precision must be one of {list(PRECISIONS)}, got '{cfg.precision}'")
    _require(cfg.split in SPLITS, f"split must be one of {list(SPLITS)}, got '{cfg.split}'")
    _require(cfg.scale_min > 0 and cfg.scale_min <= cfg.scale_max,
             f"need 0 < scale_min <= scale_max, got {cfg.scale_min} and {cfg.scale_max}")
    _require(cfg.rotate_min <= cfg.rotate_max, f"need rotate_min <= rotate_max, got {cfg.rotate_min} and {cfg.rotate_max}")
    _require(isinstance(cfg.scales, list) and len(cfg.scales) > 0 and all(s > 0 for s in cfg.scales),
             f"scales must be a non-empty list of positive numbers, got {cfg.scales}")
    # 0 or empty = each image at its own size (what the release's `base_size: 0` meant).
    _require(cfg.base_size is None or (isinstance(cfg.base_size, int) and cfg.base_size >= 0),
             f"base_size must be a number of pixels (0 or empty: each image at its own size), got {cfg.base_size}")
    for key in ("batch_size", "batch_size_val", "test_batch_size", "epochs", "save_freq", "print_freq",
                "keep_checkpoints"):
        _require(isinstance(cfg[key], int) and cfg[key] >= 1, f"{key} must be an integer >= 1, got {cfg[key]}")
    _require(isinstance(cfg.workers, int) and cfg.workers >= 0, f"workers must be an integer >= 0, got {cfg.workers}")
    _require(cfg.aux_weight >= 0, f"aux_weight must be >= 0, got {cfg.aux_weight}")
    _require(cfg.index_start >= 0 and cfg.index_step >= 0, "index_start and index_step must be >= 0")
    _require(cfg.dist_timeout > 0, f"dist_timeout must be a positive number of seconds, got {cfg.dist_timeout}")


def check_device_support(cfg: CfgNode, device_type: str) -> None:
    """Combinations that depend on the machine: fp16 needs CUDA (there is no fp16 training path on CPU)."""
    if cfg.precision == "fp16" and device_type != "cuda":
        raise ConfigError("precision fp16 needs a CUDA device (it trains with a gradient scaler on the GPU); "
                          "on the CPU use precision bf16 or fp32")


def dump_cfg(cfg: CfgNode, path: str) -> None:
    """Write ``cfg`` back in the sectioned layout (e.g. beside a run's checkpoints)."""
    sections: Dict[str, Dict[str, Any]] = {s: {k: cfg[k] for k in keys if k in cfg} for s, keys in SCHEMA.items()}
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(sections, f, sort_keys=False)


def parse_cli(argv: Optional[List[str]], description: str, extra=None):
    """The tools' common command line: ``--config CFG [KEY VALUE ...]`` (+ tool-specific flags).

    Returns ``(args, cfg)``; config errors exit with the message and status 2 before anything is built.
    """
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config, e.g. config/ade20k/ade20k_pyconvresnet50_pyconvsegnet.yaml")
    if extra is not None:
        extra(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides of config keys")
    args = parser.parse_args(argv)
    try:
        cfg = load_cfg(args.config, args.opts)
    except ConfigError as exc:
        parser.exit(2, f"config error: {exc}\n")
    return args, cfg
