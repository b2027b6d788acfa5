"""Configuration: the release's YAML layout plus ``KEY VALUE`` command-line overrides.

A config file has the sections ``DATA``, ``TRAIN``, ``Distributed`` and ``TEST``; their keys
are merged into one flat :class:`CfgNode` (``cfg.base_lr``), as the release did. Every key
this codebase knows is in :data:`SCHEMA` with its default, so

* a release YAML (which lacks the keys added here, e.g. ``precision``) loads unchanged,
* a typo, in the file or on the command line, is an error that names the nearest valid key,
* an override is type-checked against the value it replaces.

Keys live beside their code. The keys every tool shares (data, model, sizes, processes, test)
are listed below; a module that owns a concern declares its own keys, defaults and checks next
to the code that reads them, at import time::

    # util/engine/optim.py
    from util.config import check_choice, register_keys

    def _check(cfg):
        check_choice(cfg, "lr_schedule", SCHEDULES.names())     # one-line error with "did you mean"

    register_keys("TRAIN", {"lr_schedule": "poly", "warmup_iters": 0}, check=_check)

and, if it lives in this repository, is named in :data:`KEY_MODULES` so that it is imported before
any config is read; a user's own file is named in the config's ``custom_imports`` (a module name or
a ``.py`` path), which ``load_cfg`` imports before it reads the other keys. Its keys then join the
schema: they load from the file and from overrides,
are type-checked against the default, appear in :func:`dump_cfg`, and ``check(cfg)`` runs in
:func:`validate_cfg` with the other checks, before anything heavy is built. A check raises
:class:`ConfigError` (``check_choice`` / ``require`` help); one key has one owner.
"""
from __future__ import annotations

import ast
import copy
import difflib
import importlib
import importlib.util
import os
import sys
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Optional, Sequence

import yaml

from util.errors import ConfigError

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
        "zoom_factor": 8,
        "ignore_label": 255,
        "train_gpu": [0],
        "workers": 16,
        "batch_size": 16,
        "batch_size_val": 16,
        "epochs": 100,
        "start_epoch": 0,
        "manual_seed": None,
        "print_freq": 10,
        "save_freq": 1,
        "save_path": None,
        "weight": None,
        "resume": None,
        "evaluate": False,
        "pretrained": None,
        "channels_last": True,
        "compile": False,
        "keep_checkpoints": 2,
        # A fresh run (no resume) into a save_path that holds another run's checkpoints is refused;
        # True starts it anyway and removes that run's checkpoints, best_mIoU.pth and TensorBoard events.
        "overwrite_run": False,
        # The user's modules to import before the config is read (their registrations and keys):
        # module names or .py files, e.g. [my_losses.py]. See docs/extending.md.
        "custom_imports": None,
    },
    "Distributed": {
        "dist_url": "env://",
        "dist_backend": None,
        "multiprocessing_distributed": True,
        "world_size": 1,
        "rank": 0,
        "dist_timeout": 1800,
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

# Keys of the release that nothing here reads: a YAML (or override) that has them still loads, with a
# one-line note naming what replaces them; they are not kept in the config.
RETIRED_KEYS: Dict[str, str] = {
    "use_apex": "apex is not used: 'precision' (fp32, bf16, fp16 with a gradient scaler) replaces it",
    "opt_level": "apex is not used: 'precision' (fp32, bf16, fp16 with a gradient scaler) replaces it",
    "keep_batchnorm_fp32": "apex is not used: 'precision' (fp32, bf16, fp16 with a gradient scaler) replaces it",
    "loss_scale": "apex is not used: 'precision fp16' scales the loss dynamically",
    "use_ppm": "'arch' chooses the head (pyconvsegnet, psp)",
    "test_gpu": "tool/test.py runs on 'device' (e.g. device cuda:1); several GPUs with torchrun, as 'train_gpu' "
                "does for training",
}


def _note_retired(key: str, source: str) -> None:
    """Print the one-line note for a retired key (once per process: rank 0 under torchrun)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"note: {source}: '{key}' is ignored: {RETIRED_KEYS[key]}", file=sys.stderr)

# Modules of this repository that declare keys with register_keys (imported before any config is read).
# Their keys appear in the schema (and in a dumped config) in this order, whatever order they were imported in.
KEY_MODULES = ("util.engine.losses", "util.engine.precision", "util.engine.validation", "util.engine.optim",
               "util.data.transforms", "util.evaluation.inference")

SPLITS = ("train", "val", "test")

# check functions of register_keys, by "module.qualname" (re-importing a module replaces, not adds)
_CHECKS: Dict[str, Any] = {}
_KEY_OWNERS: Dict[str, str] = {}
_key_modules_loaded = False


def register_keys(section: str, defaults: Dict[str, Any], check: Optional[Callable[["CfgNode"], None]] = None,
                  owner: Optional[str] = None) -> None:
    """Add ``defaults`` (key -> default; ``None`` = empty, any type) to ``section`` of the schema and,
    optionally, ``check(cfg)``, run by :func:`validate_cfg` on every loaded config (raise ConfigError).

    Call it at import time of the module that reads the keys (see the module docstring). ``owner``
    (default: the check's module, else the caller's) names who declared a key: another owner
    declaring the same key is an error, the same owner (a re-import) replaces its declaration.
    """
    if section not in SCHEMA:
        raise ValueError(f"unknown config section '{section}'{_suggestion(section, SCHEMA)}; one of {list(SCHEMA)}")
    if owner is None:
        owner = check.__module__ if check is not None else sys._getframe(1).f_globals.get("__name__", "?")
    for key, default in defaults.items():
        previous = _KEY_OWNERS.get(key, "util.config" if key in ALL_DEFAULTS else None)
        if previous is not None and previous != owner:
            raise ValueError(f"config key '{key}' is already declared by {previous}")
    for key, default in defaults.items():
        SCHEMA[section][key] = default
        ALL_DEFAULTS[key] = default
        _KEY_OWNERS[key] = owner
    if check is not None:
        _CHECKS[f"{check.__module__}.{check.__qualname__}"] = (owner, check)


def unregister_keys(keys: Iterable[str]) -> None:
    """Remove keys declared with :func:`register_keys` (e.g. in a test's cleanup); an owner's checks
    go with its last key."""
    for key in keys:
        if key not in _KEY_OWNERS:
            raise ValueError(f"config key '{key}' was not declared with register_keys")
        del _KEY_OWNERS[key], ALL_DEFAULTS[key]
        for section in SCHEMA.values():
            section.pop(key, None)
    owners = set(_KEY_OWNERS.values())
    for name in [name for name, (owner, _) in _CHECKS.items() if owner not in owners]:
        del _CHECKS[name]


def _load_key_modules() -> None:
    """Import :data:`KEY_MODULES` once, so that their keys are in the schema."""
    global _key_modules_loaded
    if not _key_modules_loaded:
        _key_modules_loaded = True
        for name in KEY_MODULES:
            importlib.import_module(name)
        rank = {name: index for index, name in enumerate(KEY_MODULES)}
        for section, keys in SCHEMA.items():
            # built-in keys first, then each key module's in KEY_MODULES order (stable within a module)
            ordered = sorted(keys, key=lambda key: rank.get(_KEY_OWNERS.get(key), -1))
            SCHEMA[section] = {key: keys[key] for key in ordered}


def schema() -> Dict[str, Dict[str, Any]]:
    """Section -> key -> default, every module's keys included."""
    _load_key_modules()
    return SCHEMA


def defaults() -> Dict[str, Any]:
    """Key -> default over all sections, every module's keys included."""
    _load_key_modules()
    return ALL_DEFAULTS


class CfgNode(dict):
    """A flat dict whose keys are also attributes: ``cfg.base_lr == cfg["base_lr"]``.

    :attr:`overridden` names the keys given as ``KEY VALUE`` overrides (:func:`apply_overrides`); it is
    not a key, so it is neither dumped nor saved in checkpoints."""

    @property
    def overridden(self) -> FrozenSet[str]:
        """The keys set by :func:`apply_overrides` (the command line), whatever the file says."""
        return self.__dict__.get("_overridden", frozenset())

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key '{name}'{_suggestion(name, self.keys())}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __deepcopy__(self, memo):
        copied = CfgNode(copy.deepcopy(dict(self), memo))
        copied.__dict__["_overridden"] = self.overridden
        return copied

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
    ``''``/``null``/``None`` -> None; a list in YAML's flow form, as a config file writes it
    (``'[a.py, b.py]'`` -> ['a.py', 'b.py']); anything else stays a string."""
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
        pass
    if text.strip().startswith("[") and text.strip().endswith("]"):
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            return text
        if isinstance(value, list):
            return value
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
    data = _read_yaml(path) if path is not None else {}
    import_custom_modules(_custom_import_names(data, overrides or []))  # their keys join the schema first
    all_defaults = defaults()
    cfg = CfgNode(copy.deepcopy(all_defaults))
    if path is not None:
        for section, entries in data.items():
            if section not in SCHEMA:
                if section in all_defaults:
                    raise ConfigError(f"{path}: key '{section}' must be inside one of the sections {list(SCHEMA)}")
                raise ConfigError(f"{path}: unknown section '{section}'{_suggestion(section, SCHEMA)}")
            for key, value in (entries or {}).items():
                if key in RETIRED_KEYS and key not in all_defaults:
                    _note_retired(key, path)
                    continue
                if key not in all_defaults:
                    raise ConfigError(f"{path}: unknown key '{key}' in section {section}"
                                      f"{_suggestion(key, all_defaults)}")
                if isinstance(value, str) and _is_none_text(value):
                    value = None
                cfg[key] = _check_type(key, value, all_defaults[key], path)
    apply_overrides(cfg, overrides or [])
    from util.runtime.runs import expand_user_paths, rebase_repository_paths

    # The repository's configs work from any directory; command-line paths are the shell's.
    rebase_repository_paths(cfg, path, [key.lstrip("-") for key in (overrides or [])[0::2]])
    expand_user_paths(cfg)
    if validate:
        validate_cfg(cfg)
    return cfg


def _as_names(value: Any) -> List[str]:
    if value is None or (isinstance(value, str) and _is_none_text(value)):
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f"custom_imports must be a module name, a .py file or a list of them, got {value!r}")


def _custom_import_names(data: Dict[str, Any], overrides: Sequence[str]) -> List[str]:
    names = []
    for entries in data.values():
        if isinstance(entries, dict) and "custom_imports" in entries:
            names += _as_names(entries["custom_imports"])
    for key, text in zip(overrides[0::2], overrides[1::2]):
        if str(key).lstrip("-") == "custom_imports":
            names += _as_names(parse_value(text))
    return names


def import_custom_modules(names: Iterable[str]) -> None:
    """Import the user's modules of ``custom_imports`` (module names, or ``.py`` files relative to the
    working directory), so that what they register (a loss, a schedule, a transform, a backbone)
    and the keys they declare are known before the config is read. Each is imported once."""
    for name in names:
        try:
            if name.endswith(".py"):
                file_path = os.path.abspath(name)
                module_name = os.path.splitext(os.path.basename(file_path))[0]
                loaded = sys.modules.get(module_name)
                if loaded is not None and os.path.abspath(getattr(loaded, "__file__", "") or "") == file_path:
                    continue
                if not os.path.isfile(file_path):
                    raise ConfigError(f"custom_imports: file not found: {name}")
                spec = importlib.util.spec_from_file_location(module_name, file_path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[module_name] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[module_name]
                    raise
            else:
                importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"custom_imports: cannot import '{name}' ({exc})") from None
        except SyntaxError as exc:  # IndentationError and TabError included
            raise ConfigError(f"custom_imports: cannot import '{name}': {exc.filename}, line {exc.lineno}: "
                              f"{type(exc).__name__}: {exc.msg}") from None


def apply_overrides(cfg: CfgNode, overrides: Sequence[str]) -> CfgNode:
    """Apply ``KEY VALUE`` pairs in place, type-checked against the current value; each key joins
    ``cfg.overridden``."""
    if len(overrides) % 2 != 0:
        raise ConfigError(f"overrides must be KEY VALUE pairs, got an odd number of items: {list(overrides)}")
    for key, text in zip(overrides[0::2], overrides[1::2]):
        key = key.lstrip("-")
        if key in RETIRED_KEYS and key not in cfg:
            _note_retired(key, "override")
            continue
        if key not in cfg:
            raise ConfigError(f"unknown config key '{key}'{_suggestion(key, cfg.keys())}")
        value = parse_value(text)
        reference = cfg[key] if cfg[key] is not None else defaults().get(key)
        # A key left empty in the YAML and by default accepts any type (as in the release).
        cfg[key] = _check_type(key, value, reference, "override")
        cfg.__dict__["_overridden"] = cfg.overridden | {key}
    return cfg


def require(cond: bool, message: str) -> None:
    """Raise ConfigError(``message``) unless ``cond``: the building block of a key's check."""
    if not cond:
        raise ConfigError(message)


def check_choice(cfg: CfgNode, key: str, allowed: Iterable[Any]) -> None:
    """``cfg[key]`` must be one of ``allowed`` (e.g. a registry's names); the error suggests the nearest."""
    allowed = list(allowed)
    value = cfg[key]
    if value not in allowed:
        shown = sorted(allowed) if all(isinstance(a, str) for a in allowed) else allowed
        raise ConfigError(f"{key} must be one of {shown}, got {value!r}"
                          f"{_suggestion(str(value), [str(a) for a in allowed])}")


def _check_model(cfg: CfgNode) -> None:
    """The model keys, against what model/ can build: its registries (user registrations included),
    each backbone's depths (a builder's ``supported_layers``), output strides and zoom factors."""
    from model import ARCHITECTURES, BACKBONES, OUTPUT_STRIDES, ZOOM_FACTORS

    check_choice(cfg, "arch", ARCHITECTURES.names())
    check_choice(cfg, "backbone_net", BACKBONES.names())
    supported_layers = getattr(BACKBONES.get(cfg.backbone_net), "supported_layers", None)
    if supported_layers is not None:
        check_choice(cfg, "layers", supported_layers)
    check_choice(cfg, "zoom_factor", ZOOM_FACTORS)
    check_choice(cfg, "backbone_output_stride", OUTPUT_STRIDES)
    require(isinstance(cfg.classes, int) and cfg.classes >= 2, f"classes must be an integer >= 2, got {cfg.classes}")


def _check_shared(cfg: CfgNode) -> None:
    for key in ("train_h", "train_w", "test_h", "test_w"):
        value = cfg[key]
        require(isinstance(value, int) and value > 0 and (value - 1) % 8 == 0,
                f"{key} must satisfy ({key} - 1) % 8 == 0 (e.g. 65, 473, 713), got {value}")
    check_choice(cfg, "split", SPLITS)
    require(isinstance(cfg.scales, list) and len(cfg.scales) > 0 and all(s > 0 for s in cfg.scales),
            f"scales must be a non-empty list of positive numbers, got {cfg.scales}")
    # 0 or empty = each image at its own size (what the release's `base_size: 0` meant).
    require(cfg.base_size is None or (isinstance(cfg.base_size, int) and cfg.base_size >= 0),
            f"base_size must be a number of pixels (0 or empty: each image at its own size), got {cfg.base_size}")
    for key in ("batch_size", "batch_size_val", "test_batch_size", "epochs", "save_freq", "print_freq",
                "keep_checkpoints"):
        require(isinstance(cfg[key], int) and cfg[key] >= 1, f"{key} must be an integer >= 1, got {cfg[key]}")
    require(isinstance(cfg.workers, int) and cfg.workers >= 0, f"workers must be an integer >= 0, got {cfg.workers}")
    require(cfg.index_start >= 0 and cfg.index_step >= 0, "index_start and index_step must be >= 0")
    require(cfg.dist_timeout > 0, f"dist_timeout must be a positive number of seconds, got {cfg.dist_timeout}")


def validate_cfg(cfg: CfgNode) -> None:
    """Raise ConfigError for values no run can use: the shared keys' checks, then every module's
    (see :func:`register_keys`). Nothing is built."""
    _load_key_modules()
    _check_model(cfg)
    _check_shared(cfg)
    for _, check in list(_CHECKS.values()):
        check(cfg)


def dump_cfg(cfg: CfgNode, path: str) -> None:
    """Write ``cfg`` back in the sectioned layout (e.g. beside a run's checkpoints)."""
    sections: Dict[str, Dict[str, Any]] = {s: {k: cfg[k] for k in keys if k in cfg} for s, keys in schema().items()}
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(sections, f, sort_keys=False)


def parse_cli(argv: Optional[List[str]], description: str, extra=None):
    """The tools' common command line: ``--config CFG [KEY VALUE ...]`` (+ tool-specific flags).

    Returns ``(args, cfg)``; config errors exit with the message and status 2 before anything is built.
    """
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True,
                        help="YAML config, e.g. config/ade20k/ade20k_pyconvresnet50_pyconvsegnet.yaml")
    if extra is not None:
        extra(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides of config keys")
    args = parser.parse_args(argv)
    try:
        cfg = load_cfg(args.config, args.opts)
    except ConfigError as exc:
        parser.exit(2, f"config error: {exc}\n")
    return args, cfg
