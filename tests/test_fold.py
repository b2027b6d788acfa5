"""BatchNorm folding (model/fold.py): the folded copy computes the same function, checked in float32."""
import numpy as np
import pytest
import torch
from torch import nn

from util.config import load_cfg


class _ConvFeedsTwo(nn.Module):
    """conv -> bn, but the conv's output is also added after the BN: folding would change it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_fold_batchnorm_checks_in_float32_and_logs_which_path():
    import logging
    import warnings

    from model.fold import exact_float32, fold_batchnorm

    # A handler on the logger itself: the tools' get_logger() turns propagation to the root logger off.
    logger, messages = logging.getLogger("pyconvsegnet"), []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    previous_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        torch.manual_seed(0)
        plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        plain[1].running_mean.uniform_(-1, 1)
        plain[1].running_var.uniform_(0.5, 2)
        folded = fold_batchnorm(plain)
        assert isinstance(folded[1], nn.Identity)
        assert any(m.startswith("BatchNorm folded into 1 convolutions (checked in float32 with TF32 off")
                   for m in messages), messages

        messages.clear()
        branching = _ConvFeedsTwo()
        branching.bn.running_mean.uniform_(-1, 1)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            kept = fold_batchnorm(branching)
        assert isinstance(kept.bn, nn.BatchNorm2d)
        assert any(m.startswith("BatchNorm NOT folded: the folded model did not reproduce the original")
                   for m in messages), messages

        messages.clear()
        broken = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        broken[1].weight.data[0] = float("nan")  # a diverged run's weights
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            kept = fold_batchnorm(broken)
        assert isinstance(kept[1], nn.BatchNorm2d)
        assert any(m.startswith("BatchNorm NOT folded: the model's own output on a random probe is not finite")
                   for m in messages), messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    with exact_float32():
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before


def _randomise_batchnorm(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(n, generator=generator) * 0.4 - 0.2)


@pytest.mark.slow
def test_fold_batchnorm_keeps_the_function(repo_root, monkeypatch):
    from model import build_model
    from model.fold import fold_batchnorm
    from util.data.transforms import MEAN, STD
    from util.evaluation.inference import predict_multiscale, prepare_inference_model

    monkeypatch.chdir(repo_root)
    torch.manual_seed(0)
    model = build_model(load_cfg("config/camvid/camvid_pyconvresnet50_pyconvsegnet.yaml", []))
    _randomise_batchnorm(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model)
    # The original is untouched (still training mode, same weights); only the aux BN stays in the copy.
    assert model.training and all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == 1
    model.eval()
    x = torch.randn(2, 3, 41, 49)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-4)
    image = (np.random.default_rng(0).random((30, 40, 3)) * 255).astype(np.float32)
    fast = prepare_inference_model(model, torch.device("cpu"), channels_last=True)
    args = (11, 33, [0.8, 1.0], 50, MEAN, STD)  # 30x40 -> 30x40 (1 padded window) and 38x50 (2x2)
    reference = predict_multiscale(model, image, *args, return_probs=True, channels_last=False, batch_size=1)
    probs = predict_multiscale(fast, image, *args, return_probs=True, batch_size=8)
    torch.testing.assert_close(probs, reference, atol=1e-5, rtol=1e-4)
