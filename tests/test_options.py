"""Recipe options chosen from the config (loss, class_weight, lr_schedule, warmup_iters, photometric):
each is off by default, trains from the command line and changes the result; schedules resume bit
for bit; misspelled values are one-line errors; a loss registered from a file is selectable by name."""
from __future__ import annotations

import math
import random
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from util.config import unregister_keys
from util.data.transforms import PhotometricDistortion, build_train_transform
from util.engine.losses import LOSSES, OhemCrossEntropy, SegmentationCrossEntropy, build_criterion
from util.engine.optim import build_scheduler
from util.errors import ConfigError
from util.runtime.cli import EXIT_CONFIG, run_cli

from test_docs import python_example
from tiny_runs import make_cfg, write_tiny_config


def one_param_optimizer():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)


def lrs_over(cfg, iterations: int, iters_per_epoch: int = 4):
    optimizer = one_param_optimizer()
    scheduler = build_scheduler(optimizer, cfg, iters_per_epoch)
    lrs = []
    for _ in range(iterations):
        lrs.append(optimizer.param_groups[0]["lr"])  # the lr this iteration trains with
        optimizer.step()
        scheduler.step()
    return lrs


# ---------------------------------------------------------------------------------------------
# Units


def test_warmup_follows_the_formula():
    """Iteration it (0-based) trains at base_lr * schedule(it) * (it + 1) / warmup_iters while it < warmup_iters."""
    for schedule, decay in (("poly", lambda it, n: (1 - it / n) ** 0.9),
                            ("cosine", lambda it, n: 0.5 * (1 + math.cos(math.pi * it / n)))):
        cfg = make_cfg(lr_schedule=schedule, warmup_iters=5, base_lr=0.01, epochs=3)
        lrs = lrs_over(cfg, 12)
        for it, lr in enumerate(lrs):
            expected = 0.01 * decay(it, 12) * (min(it + 1, 5) / 5)
            assert lr == pytest.approx(expected, rel=1e-12), (schedule, it)
        assert lrs[0] == pytest.approx(0.01 / 5) and lrs[4] == pytest.approx(0.01 * decay(4, 12))
    # off by default: the release's poly from the first iteration
    assert lrs_over(make_cfg(), 3)[0] == 0.01


def test_cosine_ends_at_zero_and_repositions():
    optimizer = one_param_optimizer()
    scheduler = build_scheduler(optimizer, make_cfg(lr_schedule="cosine", epochs=1), 8)
    scheduler.reposition(8, 16)  # a longer resumed run: halfway through
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5)
    scheduler.reposition(16, 16)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-18)


def test_ohem_keeps_hard_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, 6)
    target = torch.randint(0, 4, (2, 6, 6))
    target[0, 0] = 255
    prob = torch.softmax(logits, 1).gather(1, target.clamp(0, 3)[:, None])[:, 0]
    labelled = target != 255
    # thresh only (min_kept 0 never raises it above the easiest kept pixel here)
    hard = labelled & (prob < 0.3)
    expected = F.cross_entropy(logits.permute(0, 2, 3, 1)[hard], target[hard])
    assert OhemCrossEntropy(255, thresh=0.3, min_kept=0)(logits, target) == pytest.approx(expected.item(), rel=1e-5)
    # min_kept larger than the hard set: the min_kept hardest pixels
    order = prob[labelled].sort().values
    kept = labelled & (prob < order[20])
    assert int(kept.sum()) == 20
    expected = F.cross_entropy(logits.permute(0, 2, 3, 1)[kept], target[kept])
    assert OhemCrossEntropy(255, thresh=0.01, min_kept=20)(logits, target) == pytest.approx(expected.item(), rel=1e-5)
    assert OhemCrossEntropy(255)(logits, torch.full_like(target, 255)).item() == 0.0  # all void: 0, not NaN


def test_class_weight_is_the_weighted_mean_and_checked_against_classes():
    torch.manual_seed(1)
    logits, target = torch.randn(2, 3, 5, 5), torch.randint(0, 3, (2, 5, 5))
    target[1, 2] = 255
    weights = [0.5, 1.0, 2.0]
    got = SegmentationCrossEntropy(255, weights)(logits, target)
    expected = F.cross_entropy(logits, target, weight=torch.tensor(weights), ignore_index=255)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert isinstance(build_criterion(make_cfg(classes=3, class_weight=weights)).pixel_loss, SegmentationCrossEntropy)
    with pytest.raises(ConfigError, match="class_weight has 2 weights but classes is 3"):
        make_cfg(classes=3, class_weight=[1.0, 2.0])
    with pytest.raises(ConfigError, match="class_weight must be a list of numbers >= 0"):
        make_cfg(classes=2, class_weight=[1.0, -1.0])


def test_photometric_changes_the_image_only_reproducibly():
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, (20, 24, 3)).astype(np.float32)
    label = rng.integers(0, 5, (20, 24)).astype(np.uint8)
    changed = 0
    for seed in range(8):
        random.seed(seed)
        out_image, out_label = PhotometricDistortion()(image.copy(), label.copy())
        random.seed(seed)
        again, _ = PhotometricDistortion()(image.copy(), label.copy())
        assert np.array_equal(out_image, again) and np.array_equal(out_label, label)
        assert out_image.dtype == np.float32 and out_image.min() >= 0 and out_image.max() <= 255
        changed += not np.allclose(out_image, image, atol=1e-3)
    assert changed >= 6  # each of 4 jitters with p 1/2: all off for 1 seed in 16
    names = [type(t).__name__ for t in build_train_transform(make_cfg(photometric=True)).transforms]
    assert names.index("PhotometricDistortion") == names.index("Crop") + 1
    assert "PhotometricDistortion" not in [type(t).__name__ for t in build_train_transform(make_cfg()).transforms]


@pytest.mark.parametrize("key, value, hint", [("loss", "ohme", "ohem"), ("lr_schedule", "cosin", "cosine")])
def test_misspelled_value_is_one_line_with_suggestion(tmp_path, capsys, train_tool, key, value, hint):
    with pytest.raises(ConfigError, match=rf"{key} must be one of .*got '{value}' \(did you mean '{hint}'\?\)"):
        make_cfg(**{key: value})
    config = write_tiny_config(tmp_path)
    assert run_cli(lambda: train_tool.main(["--config", str(config), key, value])) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"did you mean '{hint}'" in err


# ---------------------------------------------------------------------------------------------
# From the command line (tool/train.py, 1 epoch of 2 iterations on the tiny dataset)


def final_weights(save_path, epoch=1):
    return torch.load(save_path / f"train_epoch_{epoch}.pth", weights_only=True)


def run(train_tool, tmp_path, name, *overrides, epochs=1, **train_keys):
    config = write_tiny_config(tmp_path, epochs=epochs, **train_keys)
    save = tmp_path / name
    train_tool.main(["--config", str(config), "save_path", str(save), *overrides])
    return save


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, train_tool):
    return final_weights(run(train_tool, tmp_path_factory.mktemp("default"), "model"))


@pytest.mark.parametrize("overrides", [
    ("loss", "ohem", "ohem_thresh", "0.5", "ohem_min_kept", "50"),
    ("class_weight", "[0.2, 1.0, 5.0]"),
    ("lr_schedule", "cosine"),
    ("warmup_iters", "2"),
    ("photometric", "True"),
])
def test_each_option_trains_and_changes_the_result(tmp_path, one_thread, train_tool, default_run, overrides):
    checkpoint = final_weights(run(train_tool, tmp_path, "model", *overrides))
    assert checkpoint["cfg"][overrides[0]] != make_cfg()[overrides[0]]
    state, default = checkpoint["state_dict"], default_run["state_dict"]
    assert all(torch.isfinite(state[k]).all() for k in state if state[k].is_floating_point())
    assert any(not torch.equal(state[k], default[k]) for k in state), f"{overrides} changed nothing"


@pytest.mark.parametrize("schedule", ["poly", "cosine"])
def test_every_schedule_resumes_bit_for_bit(tmp_path, one_thread, train_tool, schedule):
    """A run resumed from its epoch-1 checkpoint ends with the uninterrupted run's weights. Warm-up
    over 3 iterations of 2 per epoch: the resume point falls inside it."""
    options = ("lr_schedule", schedule, "warmup_iters", "3")
    whole_path = run(train_tool, tmp_path, "whole", *options, epochs=2)
    whole = final_weights(whole_path, epoch=2)
    resumed_path = run(train_tool, tmp_path, "resumed", *options, "resume", str(whole_path / "train_epoch_1.pth"),
                       epochs=2)
    resumed = final_weights(resumed_path, epoch=2)
    for key in whole["state_dict"]:
        assert torch.equal(whole["state_dict"][key], resumed["state_dict"][key]), key
    assert whole["optimizer"]["param_groups"][0]["lr"] == resumed["optimizer"]["param_groups"][0]["lr"]
    assert whole["scheduler"]["lr_lambdas"] == resumed["scheduler"]["lr_lambdas"]


LOSS_FILE = '''
"""A user's loss in a file of its own: registered by name, with its own key."""
import torch.nn.functional as F
from torch import nn

from util.config import register_keys
from util.engine.losses import register_loss

register_keys("TRAIN", {"test_smoothing": 0.1})
CALLS = []


class SmoothedCrossEntropy(nn.Module):
    def __init__(self, ignore_index, smoothing):
        super().__init__()
        self.ignore_index, self.smoothing = ignore_index, smoothing

    def forward(self, logits, target):
        CALLS.append(self.smoothing)
        return F.cross_entropy(logits, target, ignore_index=self.ignore_index, label_smoothing=self.smoothing)


@register_loss("test_smoothed")
def build(cfg):
    return SmoothedCrossEntropy(cfg.ignore_label, cfg.test_smoothing)
'''


def test_loss_registered_in_a_file_is_selectable_by_name(tmp_path, one_thread, train_tool, default_run):
    """One file, named in custom_imports on the command line: tool/train.py is not touched."""
    path = tmp_path / "smoothed_loss.py"
    path.write_text(LOSS_FILE)
    try:
        # The YAML names no file (the tiny network is registered in this process already, by tiny_runs).
        save = run(train_tool, tmp_path, "model", "custom_imports", str(path), "loss", "test_smoothed",
                   "test_smoothing", "0.2", custom_imports=None)
        calls = sys.modules["smoothed_loss"].CALLS
        assert len(calls) == 2 * 2 and set(calls) == {0.2}  # main and aux, both iterations
        state, default = final_weights(save)["state_dict"], default_run["state_dict"]
        assert any(not torch.equal(state[k], default[k]) for k in state)
    finally:
        if "test_smoothed" in LOSSES:
            LOSSES.unregister("test_smoothed")
            unregister_keys(["test_smoothing"])
        sys.modules.pop("smoothed_loss", None)
    with pytest.raises(ConfigError, match="custom_imports: file not found: absent.py"):
        make_cfg(custom_imports="absent.py")
    with pytest.raises(ConfigError, match="custom_imports: cannot import 'no_such_module_here'"):
        make_cfg(custom_imports=["no_such_module_here"])


# ---------------------------------------------------------------------------------------------
# docs/extending.md: the loss, schedule and augmentation examples, each saved as its own file


def readme_example(tmp_path, heading: str, file_name: str) -> str:
    path = tmp_path / file_name
    path.write_text(python_example("docs/extending.md", heading))
    return str(path)


@pytest.fixture
def readme_examples(tmp_path):
    files = [readme_example(tmp_path, "A loss", "readme_focal.py"),
             readme_example(tmp_path, "A learning-rate schedule", "readme_step.py"),
             readme_example(tmp_path, "An augmentation", "readme_cutout.py")]
    yield files
    from util.data.transforms import TRAIN_TRANSFORMS
    from util.engine.optim import SCHEDULES

    for registry, name in ((LOSSES, "focal"), (SCHEDULES, "step"), (TRAIN_TRANSFORMS, "cutout")):
        if name in registry:
            registry.unregister(name)
    unregister_keys([k for k in ("focal_gamma", "cutout_size") if k in make_cfg(validate=False)])
    for name in ("readme_focal", "readme_step", "readme_cutout"):
        sys.modules.pop(name, None)


def test_readme_extension_examples_work(readme_examples):
    cfg = make_cfg(custom_imports=readme_examples, loss="focal", focal_gamma=0.0, lr_schedule="step",
                   epochs=1, cutout_size=8, classes=3, train_h=33, train_w=33)
    torch.manual_seed(0)
    logits, target = torch.randn(2, 3, 9, 9), torch.randint(0, 3, (2, 9, 9))
    target[0, 0] = 255
    focal = build_criterion(cfg)(logits, target)  # gamma 0: plain cross entropy
    assert focal.item() == pytest.approx(F.cross_entropy(logits, target, ignore_index=255).item(), rel=1e-5)
    with pytest.raises(ConfigError, match="focal_gamma must be >= 0"):
        make_cfg(custom_imports=readme_examples, loss="focal", focal_gamma=-1.0)

    lrs = lrs_over(cfg, 9, iters_per_epoch=9)
    assert lrs[:6] == [0.01] * 6 and lrs[6] == pytest.approx(0.001) and lrs[8] == pytest.approx(0.0001)

    random.seed(0)
    rng = np.random.default_rng(0)
    image, label = rng.uniform(0, 255, (40, 50, 3)).astype(np.float32), rng.integers(0, 3, (40, 50)).astype(np.uint8)
    transform = build_train_transform(cfg)
    assert [type(t).__name__ for t in transform.transforms][-3:] == ["Cutout", "ToTensor", "Normalize"]
    out_image, out_label = transform(image, label)
    assert (out_label == 255).sum() >= 8 * 8 and out_image.shape == (3, 33, 33)
    assert "Cutout" not in [type(t).__name__ for t in build_train_transform(make_cfg(
        custom_imports=readme_examples)).transforms]  # cutout_size 0: off
