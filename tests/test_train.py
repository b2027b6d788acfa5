"""Training: optimiser/schedule, engine, tool/train.py (resume, NaN, checks) and tool/train.sh. CPU, tiny."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from util import errors
from util.engine import training, validation
from util.engine.losses import LOSSES, SegmentationCrossEntropy, build_criterion, match_target_size, register_loss
from util.engine.optim import PolyDecay, build_optimizer, build_param_groups, build_scheduler
from util.errors import ConfigError
from util.evaluation import whole_images

from conftest import REPO_ROOT
from tiny_runs import make_cfg, write_tiny_config

# ---------------------------------------------------------------------------------------------
# Helpers


class ToySegModel(nn.Module):
    """A few-parameter stand-in with the segmentation model's interface."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.layer0 = nn.Conv2d(3, 4, 3, padding=1)
        self.cls = nn.Conv2d(4, classes, 1)
        self.aux = nn.Conv2d(4, classes, 1)

    def backbone_modules(self):
        return [self.layer0]

    def head_modules(self):
        return [self.cls, self.aux]

    def forward(self, x):
        features = F.relu(self.layer0(x))
        logits = self.cls(features)
        return (logits, self.aux(features)) if self.training else logits


def write_config(tmp_path: Path, **train_keys) -> Path:
    """A tiny CPU config (the test-only network of tests/tiny_model.py, 3 classes, 65x65 crops, 2 epochs of
    2 iterations)."""
    return write_tiny_config(tmp_path, **{"base_lr": 0.01, **train_keys})


class SimulatedCrash(Exception):
    pass


def crash_on_epoch_call(monkeypatch, crash_call: int):
    """Make tool/train.py's ``training.train_iterations`` raise on its ``crash_call``-th call (1-based)."""
    real = training.train_iterations
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == crash_call:
            raise SimulatedCrash(f"killed before epoch call {crash_call}")
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "train_iterations", wrapper)


def load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------
# Optimiser and schedule


def test_param_groups_backbone_and_10x_head():
    model = ToySegModel()
    groups = build_param_groups(model, base_lr=0.02)
    assert [g["name"] for g in groups] == ["backbone", "head"]
    assert groups[0]["lr"] == 0.02 and groups[1]["lr"] == pytest.approx(0.2)
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.layer0.parameters()}
    assert len(groups[1]["params"]) == 4

    class Forgetful(ToySegModel):
        def head_modules(self):
            return [self.cls]  # aux missing: it would never train

    with pytest.raises(ValueError, match="aux.weight"):
        build_param_groups(Forgetful(), 0.01)


def test_poly_schedule_after_each_iteration_keeps_ratio():
    model = ToySegModel()
    optimizer = build_optimizer(model, base_lr=0.01, momentum=0.9, weight_decay=1e-4)
    assert optimizer.defaults["momentum"] == 0.9 and optimizer.defaults["weight_decay"] == 1e-4
    scheduler = build_scheduler(optimizer, make_cfg(power=0.9), iters_per_epoch=10, epochs=1)
    assert [g["lr"] for g in optimizer.param_groups] == [0.01, pytest.approx(0.1)]  # iteration 1 at base lr
    for it in range(1, 6):
        optimizer.step()
        scheduler.step()
        expected = 0.01 * (1 - it / 10) ** 0.9
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected)
        assert optimizer.param_groups[1]["lr"] == pytest.approx(10 * expected)

    # state round trip, then a longer run re-positions the schedule
    fresh_opt = build_optimizer(ToySegModel(), base_lr=0.01, momentum=0.9, weight_decay=1e-4)
    fresh = build_scheduler(fresh_opt, make_cfg(power=0.9), iters_per_epoch=5, epochs=2)
    fresh_opt.load_state_dict(optimizer.state_dict())
    fresh.load_state_dict(scheduler.state_dict())
    assert fresh.last_epoch == 5 and fresh.lr_lambdas[0].max_iter == 10
    fresh.reposition(5, 20)
    assert fresh_opt.param_groups[0]["lr"] == pytest.approx(0.01 * (1 - 5 / 20) ** 0.9)
    assert fresh.get_last_lr()[1] == pytest.approx(0.1 * (1 - 5 / 20) ** 0.9)
    assert PolyDecay(10, 0.9)(12) == 0.0  # never negative past the end


def _two_scaled_steps(model, optimizer):
    """fp16-style training on the CPU: a first step whose gradients overflow (the GradScaler skips it),
    then a good one. Junk left in freed memory makes an uninitialised buffer visible."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    image = torch.randn(2, 3, 17, 17, generator=torch.Generator().manual_seed(0))
    for overflow in (True, False):
        optimizer.zero_grad(set_to_none=True)
        logits, aux = model(image)
        loss = logits.float().square().mean() + aux.float().square().mean()
        scaler.scale(loss * (float("inf") if overflow else 1.0)).backward()
        junk = [torch.full_like(p, 3e19) for p in model.parameters()]
        del junk  # the allocator hands this memory out again
        scaler.step(optimizer)
        scaler.update()
    assert scaler.get_scale() == 2.0 ** 15  # the first step was skipped
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_fp16_skipped_first_step_leaves_momentum_clean():
    # Fused SGD (the default on CPU and CUDA) allocated its momentum buffers with empty_like() and
    # returned early on the skipped step: the next step added garbage (weights of -6e19).
    torch.manual_seed(0)
    model = ToySegModel()
    reference = ToySegModel()
    reference.load_state_dict(model.state_dict())
    fused = build_optimizer(model, 0.01, 0.9, 1e-4)
    assert fused.defaults["fused"]
    plain = torch.optim.SGD(build_param_groups(reference, 0.01), lr=0.01, momentum=0.9, weight_decay=1e-4,
                            foreach=False)
    got, expected = _two_scaled_steps(model, fused), _two_scaled_steps(reference, plain)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------------------------------------
# Engine


def test_criterion_and_target_resizing():
    criterion = build_criterion(make_cfg(ignore_label=255))
    logits = torch.randn(2, 3, 5, 5)
    target = torch.randint(0, 3, (2, 5, 5))
    target[0, 0] = 255
    assert torch.allclose(criterion(logits, target), F.cross_entropy(logits, target, ignore_index=255))
    assert criterion(logits, torch.full((2, 5, 5), 255)).item() == 0.0  # all void: 0, not NaN
    label = torch.arange(17 * 17).reshape(1, 17, 17)
    small = match_target_size(label, (5, 5))  # zoom 2 of a 17x17 input: every 4th pixel
    assert torch.equal(small, label[:, ::4, ::4])
    assert match_target_size(label, (17, 17)) is label


def _toy_loader(n_batches=3, classes=3, seed=0, nan_at=None):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(n_batches):
        image = torch.randn(2, 3, 9, 9, generator=g)
        if nan_at == i:
            image[0, 0, 0, 0] = float("nan")
        batches.append((image, torch.randint(0, classes, (2, 9, 9), generator=g)))
    return batches


def test_train_one_epoch_and_evaluate_toy():
    from util.evaluation.metrics import confusion_matrix, metrics_from_confusion

    torch.manual_seed(0)
    model = ToySegModel()
    optimizer = build_optimizer(model, 0.01, 0.9, 1e-4)
    scheduler = build_scheduler(optimizer, make_cfg(), 6, epochs=1)
    criterion = build_criterion(make_cfg(aux_weight=0.4))
    written = []

    values = {}

    class Writer:
        def add_scalar(self, name, value, step):
            written.append((name, step))
            values[name, step] = value

    loader = _toy_loader()
    stats = training.train_iterations(model, loader, criterion, optimizer, scheduler, torch.device("cpu"), 0,
                                   max_epochs=2, num_classes=3, print_freq=1, writer=Writer())
    assert set(stats) >= {"loss", "mIoU", "mAcc", "allAcc"} and np.isfinite(stats["loss"])
    assert stats["loss"] == pytest.approx(stats["main_loss"] + 0.4 * stats["aux_loss"])
    assert scheduler.last_epoch == 3
    assert ("loss_train_batch", 3) in written and ("mIoU_train_batch", 1) in written
    assert {name for name, _ in written} == {"loss_train_batch", "mIoU_train_batch", "mAcc_train_batch",
                                             "allAcc_train_batch", "lr/backbone", "lr/head"}
    # The learning rate after each step, per parameter group (the head's is 10x the backbone's).
    assert values["lr/backbone", 1] == pytest.approx(0.01 * (1 - 1 / 6) ** 0.9)
    assert values["lr/head", 3] == pytest.approx(10 * values["lr/backbone", 3])
    one_group = torch.optim.SGD(model.parameters(), lr=0.5)
    assert training.learning_rate_scalars(one_group) == {"lr": 0.5}

    result = validation.evaluate_crops(model, loader, criterion, torch.device("cpu"), 3, 255)
    model.eval()
    with torch.no_grad():
        cm = sum(confusion_matrix(model(x).argmax(1), y, 3) for x, y in loader)
    assert result["mIoU"] == pytest.approx(metrics_from_confusion(cm)["mIoU"])
    assert len(result["iou"]) == 3 and len(result["acc"]) == 3


def test_bf16_autocast_on_cpu():
    model = ToySegModel()
    optimizer = build_optimizer(model, 0.01, 0.9, 1e-4)
    scheduler = build_scheduler(optimizer, make_cfg(), 3, epochs=1)
    criterion = build_criterion(make_cfg())
    stats = training.train_iterations(model, _toy_loader(), criterion, optimizer, scheduler, torch.device("cpu"), 0,
                                   num_classes=3, amp_dtype=torch.bfloat16)
    assert np.isfinite(stats["loss"]) and model.layer0.weight.dtype == torch.float32
    result = validation.evaluate_crops(model, _toy_loader(), criterion, torch.device("cpu"), 3,
                                       amp_dtype=torch.bfloat16)
    assert 0.0 <= result["allAcc"] <= 1.0


def test_nan_loss_names_epoch_and_iteration():
    model = ToySegModel()
    optimizer = build_optimizer(model, 0.01, 0.9, 1e-4)
    scheduler = build_scheduler(optimizer, make_cfg(), 6, epochs=1)
    with pytest.raises(errors.NonFiniteLossError, match=r"epoch 2, iteration 2/3"):
        training.train_iterations(model, _toy_loader(nan_at=1), build_criterion(make_cfg()), optimizer, scheduler,
                               torch.device("cpu"), 1, max_epochs=2, num_classes=3)


# ---------------------------------------------------------------------------------------------
# tool/train.py


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory, train_tool):
    """Final checkpoint of 2 uninterrupted epochs (workers 0; the data order does not depend on workers)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    config = write_config(root, workers=0, save_freq=2)
    train_tool.main(["--config", str(config)])
    return load(root / "model" / "train_epoch_2.pth")


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_matches_uninterrupted_run(tmp_path, monkeypatch, train_tool, uninterrupted_run, workers):
    config = write_config(tmp_path, workers=workers, resume="auto")
    resumed = tmp_path / "model"
    with monkeypatch.context() as patch:
        crash_on_epoch_call(patch, crash_call=2)  # dies at the start of epoch 2
        with pytest.raises(SimulatedCrash):
            train_tool.main(["--config", str(config)])
    assert "train_epoch_2.pth" not in os.listdir(resumed)

    # after epoch 1 of 2: backbone lr = base * (1 - 1/2) ** 0.9, head 10x
    first = load(resumed / "train_epoch_1.pth")
    assert first["epoch"] == 1
    lrs = {g["name"]: g["lr"] for g in first["optimizer"]["param_groups"]}
    assert lrs["backbone"] == pytest.approx(0.01 * 0.5 ** 0.9, rel=1e-9)
    assert lrs["head"] == pytest.approx(0.1 * 0.5 ** 0.9, rel=1e-9)

    train_tool.main(["--config", str(config)])  # resume auto
    a, b = uninterrupted_run, load(resumed / "train_epoch_2.pth")
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.allclose(a["state_dict"][key].float(), b["state_dict"][key].float()), key
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 4
    assert [g["lr"] for g in b["optimizer"]["param_groups"]] == [0.0, 0.0]


def test_resume_continues_the_checkpoints_recipe_unless_overridden(tmp_path, monkeypatch, capsys, train_tool):
    """Issue 24 item 14: a run of lr_schedule cosine warmup_iters 3 resumed with no overrides continues with
    cosine (the same learning rate as the uninterrupted run), each differing key logged on its own line."""
    recipe = ["lr_schedule", "cosine", "warmup_iters", "3"]
    reference = write_config(tmp_path / "reference", epochs=3)
    train_tool.main(["--config", str(reference), *recipe])
    expected = load(tmp_path / "reference" / "model" / "train_epoch_2.pth")["optimizer"]["param_groups"]

    config = write_config(tmp_path, epochs=3, resume="auto")
    with monkeypatch.context() as patch:
        crash_on_epoch_call(patch, crash_call=2)  # dies at the start of epoch 2
        with pytest.raises(SimulatedCrash):
            train_tool.main(["--config", str(config), *recipe])
    capsys.readouterr()
    train_tool.main(["--config", str(config), "keep_checkpoints", "3"])  # resume auto, the recipe not repeated
    log = capsys.readouterr().out
    resumed = load(tmp_path / "model" / "train_epoch_2.pth")
    assert [g["lr"] for g in resumed["optimizer"]["param_groups"]] == [g["lr"] for g in expected]
    assert resumed["cfg"]["lr_schedule"] == "cosine" and resumed["cfg"]["warmup_iters"] == 3
    lines = [line.split("] ", 1)[1] for line in log.splitlines() if "] resume: " in line]
    assert lines == ["resume: keep_checkpoints 3 from the command line (the checkpoint's run used 2)",
                     "resume: lr_schedule 'cosine' as in the checkpoint's run (this config says 'poly'; "
                     "give lr_schedule on the command line to change it)",
                     "resume: warmup_iters 3 as in the checkpoint's run (this config says 0; "
                     "give warmup_iters on the command line to change it)"]


def test_recipe_overrides_win_and_a_checkpoint_without_config_keeps_this_one(caplog):
    import logging

    from util.engine.checkpoints import adopt_checkpoint_recipe

    logger = logging.getLogger("test_recipe")
    saved = make_cfg(base_lr=0.02, lr_schedule="cosine", val_every=3).to_dict()
    cfg = make_cfg(base_lr=0.05)  # an override
    with caplog.at_level(logging.INFO, logger="test_recipe"):
        adopt_checkpoint_recipe(cfg, {"cfg": saved}, "x.pth", logger)
    assert cfg.base_lr == 0.05 and cfg.lr_schedule == "cosine" and cfg.val_every == 1
    assert "resume: base_lr 0.05 from the command line (the checkpoint's run used 0.02)" in caplog.messages
    assert "resume: val_every 1 from this config (the checkpoint's run used 3)" in caplog.messages
    caplog.clear()
    cfg = make_cfg(validate=False)
    before = dict(cfg)
    with caplog.at_level(logging.INFO, logger="test_recipe"):
        adopt_checkpoint_recipe(cfg, {"epoch": 1}, "old.pth", logger)
    assert dict(cfg) == before and caplog.messages == [
        "old.pth holds no saved config (an older or foreign checkpoint): the training recipe is this run's "
        "config as it is"]


def test_nan_loss_stops_run_and_keeps_last_checkpoint(tmp_path, monkeypatch, train_tool):
    config = write_config(tmp_path)
    calls = []

    class Diverging(SegmentationCrossEntropy):
        def forward(self, logits, target):
            calls.append(1)
            loss = super().forward(logits, target)
            return loss * float("nan") if len(calls) > 4 else loss  # epoch 1 (2 iterations x 2 losses) is fine

    register_loss("test_diverging")(lambda cfg: Diverging(cfg.ignore_label))
    try:
        with pytest.raises(errors.NonFiniteLossError) as error:
            train_tool.main(["--config", str(config), "loss", "test_diverging"])
    finally:
        LOSSES.unregister("test_diverging")
    message = str(error.value)
    assert "epoch 2" in message and "iteration 1/2" in message and "last saved checkpoint" in message
    saved = sorted(os.listdir(tmp_path / "model"))
    assert "train_epoch_1.pth" in saved and "train_epoch_2.pth" not in saved
    assert load(tmp_path / "model" / "train_epoch_1.pth")["epoch"] == 1


def test_best_miou_survives_resume_and_old_checkpoints_are_pruned(tmp_path, monkeypatch, train_tool):
    """Validation mIoU 0.5, then (after a crash and resume) 0.3, 0.4: best_mIoU.pth stays at epoch 1;
    the end of training re-validates best_mIoU.pth (0.5) and reuses the last epoch's result (0.4)."""
    config = write_config(tmp_path, evaluate=True, epochs=3, resume="auto")
    scores = iter([0.5, 0.3, 0.4, 0.5])

    def fake_train(*args, **kwargs):
        return {"loss": 1.0, "main_loss": 1.0, "aux_loss": 0.0, "mIoU": 0.1, "mAcc": 0.1, "allAcc": 0.1}

    def fake_evaluate(*args, **kwargs):
        value = next(scores)
        return {"mIoU": value, "mAcc": value, "allAcc": value, "iou": [value] * 3, "acc": [value] * 3,
                "num_images": 4}

    monkeypatch.setattr(whole_images, "evaluate_images", fake_evaluate)
    monkeypatch.setattr(training, "train_iterations", fake_train)
    crash_on_epoch_call(monkeypatch, crash_call=2)
    with pytest.raises(SimulatedCrash):
        train_tool.main(["--config", str(config)])
    model_dir = tmp_path / "model"
    assert load(model_dir / "best_mIoU.pth")["best_mIoU"] == 0.5

    monkeypatch.setattr(training, "train_iterations", fake_train)
    summary = train_tool.main(["--config", str(config)])
    assert summary["best_mIoU"] == 0.5
    assert summary["end"]["final"]["mIoU"] == 0.4 and summary["end"]["best"]["mIoU"] == 0.5
    best = load(model_dir / "best_mIoU.pth")
    assert best["epoch"] == 1 and best["best_mIoU"] == 0.5  # not overwritten by the worse epochs 2 and 3
    assert load(model_dir / "train_epoch_3.pth")["best_mIoU"] == 0.5
    assert sorted(p for p in os.listdir(model_dir) if p.startswith("train_epoch")) == \
        ["train_epoch_2.pth", "train_epoch_3.pth"]  # keep_checkpoints 2


def test_resume_at_the_last_epoch_applies_keep_checkpoints(tmp_path, monkeypatch, train_tool):
    """A run killed after writing its last train_epoch_N.pth but before pruning the older ones:
    resuming it has nothing left to train, and still leaves only the newest keep_checkpoints files."""
    config = write_config(tmp_path, epochs=3, save_freq=1, keep_checkpoints=3, resume="auto")

    def fake_train(*args, **kwargs):
        return {"loss": 1.0, "main_loss": 1.0, "aux_loss": 0.0, "mIoU": 0.1, "mAcc": 0.1, "allAcc": 0.1}

    monkeypatch.setattr(training, "train_iterations", fake_train)
    train_tool.main(["--config", str(config)])
    model_dir = tmp_path / "model"
    assert sorted(p for p in os.listdir(model_dir) if p.startswith("train_epoch")) == \
        ["train_epoch_1.pth", "train_epoch_2.pth", "train_epoch_3.pth"]
    summary = train_tool.main(["--config", str(config), "keep_checkpoints", "2"])
    assert summary["epochs"] == 3
    assert sorted(p for p in os.listdir(model_dir) if p.startswith("train_epoch")) == \
        ["train_epoch_2.pth", "train_epoch_3.pth"]


def _forbid_model_build(monkeypatch):
    import model

    def fail(*args, **kwargs):
        raise AssertionError("the model was built before the config was checked")

    monkeypatch.setattr(model, "build_model", fail)


def test_unwritable_save_path_reported_before_training(tmp_path, monkeypatch, train_tool):
    config = write_config(tmp_path)
    _forbid_model_build(monkeypatch)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="save_path .* is not a writable directory"):
        train_tool.main(["--config", str(config), "save_path", str(blocker / "model")])


def test_one_image_per_process_refused_before_model_build(tmp_path, monkeypatch, train_tool):
    # BatchNorm in training mode over a single image (PSPNet's 1x1 pooling branch cannot run at all)
    config = write_config(tmp_path)
    _forbid_model_build(monkeypatch)
    with pytest.raises(ConfigError, match=r"batch_size 1 over 1 process\(es\) is 1 image per process: BatchNorm "
                                          r".*use batch_size 2 or more$"):
        train_tool.main(["--config", str(config), "batch_size", "1"])


@pytest.mark.slow
def test_fp16_on_cpu_rejected_before_model_build(tmp_path, monkeypatch, train_tool):
    config = write_config(tmp_path)
    _forbid_model_build(monkeypatch)
    with pytest.raises(ConfigError, match="fp16"):
        train_tool.main(["--config", str(config), "precision", "fp16"])
    # the command line says so in one line, with status 2
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "tool" / "train.py"), "--config", str(config),
                           "precision", "fp16"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "config error" in proc.stderr and "fp16" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# tool/train.sh

STUB = textwrap.dedent("""\
    #!/bin/sh
    echo "STUB $*"
""")


@pytest.mark.parametrize("shell", ["sh", "dash", "bash"])
def test_train_sh_runs_under_posix_sh_from_any_directory(tmp_path, shell):
    """What the script documents (sh tool/train.sh ...) works under dash too, from another directory: the
    repository's config, the user's arguments unchanged, and nothing written before train.py checks them."""
    if not shutil.which(shell):
        pytest.skip(f"{shell} not installed")
    repo = tmp_path / "repo"
    (repo / "tool").mkdir(parents=True)
    for name in ("train.sh", "wrapper_common.sh"):  # the wrapper and what it sources
        shutil.copy(REPO_ROOT / "tool" / name, repo / "tool" / name)
    (repo / "config" / "toy").mkdir(parents=True)
    (repo / "config" / "toy" / "toy_exp1.yaml").write_text("TRAIN:\n  epochs: 1\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    usage = subprocess.run([shell, str(repo / "tool" / "train.sh")], cwd=elsewhere, capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr

    stub = tmp_path / "fake_python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    env = dict(os.environ, PYTHON=str(stub))
    proc = subprocess.run([shell, str(repo / "tool" / "train.sh"), "toy", "exp1", "epochs", "3", "save_path",
                           "run1/model"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    expected = (f"STUB {repo / 'tool' / 'train.py'} --config {repo / 'config' / 'toy' / 'toy_exp1.yaml'} "
                f"epochs 3 save_path run1/model")
    assert expected in proc.stdout
    assert list(elsewhere.iterdir()) == [] and not (repo / "exp").exists()  # train.py writes its own files

    env["NPROC"] = "2"
    proc = subprocess.run([shell, str(repo / "tool" / "train.sh"), "toy", "exp1"], cwd=elsewhere, env=env,
                          capture_output=True, text=True)
    assert "STUB -m torch.distributed.run --standalone --nproc_per_node=2" in proc.stdout

    missing = subprocess.run([shell, str(repo / "tool" / "train.sh"), "toy", "nope"], cwd=elsewhere, env=env,
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "config not found" in missing.stderr
