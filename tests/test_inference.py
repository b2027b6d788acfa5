"""Sliding-window / multi-scale inference (util/evaluation/inference.py) against the release's algorithm."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from util.evaluation.inference import (
    model_is_channels_last,
    multiscale_probs,
    predict_multiscale,
    scaled_size,
    sliding_window_probs,
    window_starts,
    window_stride,
)

from release_reference import release_predict

MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]


class TinySegNet(nn.Module):
    """A random, not flip-symmetric conv net whose output is (H-1)/4+1 pixels (zoom < 8 semantics)."""

    def __init__(self, num_classes=4, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, num_classes, 3, stride=4, padding=1)
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.7)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


class RampModel(nn.Module):
    """Logits: class 0 = normalised red channel, class 1 = a left-to-right ramp (position dependent)."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        n, _, h, w = x.shape
        ramp = torch.linspace(-2.0, 2.0, w).view(1, 1, 1, w).expand(n, 1, h, w)
        return torch.cat([x[:, :1], ramp], 1)


def _random_image(rng, height, width):
    return (rng.random((height, width, 3)) * 255).astype(np.float32)


# ---------------------------------------------------------------- geometry
def test_window_starts_and_stride():
    assert window_stride(473) == 316
    assert window_stride(65) == 44
    assert window_starts(600, 473, 316) == [0, 127]
    assert window_starts(473, 473, 316) == [0]
    assert window_starts(1000, 473, 316) == [0, 316, 527]
    assert window_starts(789, 473, 316) == [0, 316]  # exactly fits: no duplicate window
    assert window_starts(790, 473, 316) == [0, 316, 317]
    with pytest.raises(ValueError):
        window_starts(400, 473, 316)


def test_scaled_size_rounding():
    assert scaled_size(360, 480, 1.0, 512) == (384, 512)
    assert scaled_size(480, 360, 1.0, 512) == (512, 384)
    assert scaled_size(480, 360, 0.75, 512) == (384, 288)
    # Python's round: halves go to the even neighbour, both for the long and the short side.
    assert scaled_size(65, 65, 0.5, 65) == (32, 32)       # round(32.5) == 32
    assert scaled_size(75, 75, 0.5, 75) == (38, 38)       # round(37.5) == 38
    assert scaled_size(25, 200, 1.0, 100) == (12, 100)    # round(12.5) == 12
    assert scaled_size(200, 75, 1.0, 100) == (100, 38)    # round(37.5) == 38
    assert scaled_size(100, 100, 1.0, 64) == (64, 64)     # square: width is the "long" side
    # base_size None / 0: each image at its own size times the scale.
    assert scaled_size(360, 480, 0.5, None) == (180, 240)
    assert scaled_size(360, 480, 1.0, 0) == (360, 480)


# ---------------------------------------------------------------- windows, padding, flip
def _manual_padded_forward(model, image, crop, flip):
    """Pad (centred, mean colour) to the crop, one forward (+ flip), softmax, un-pad."""
    h, w, _ = image.shape
    top, left = (crop - h) // 2, (crop - w) // 2
    padded = np.empty((crop, crop, 3), np.float32)
    padded[:] = np.asarray(MEAN, np.float32)
    padded[top:top + h, left:left + w] = image
    x = (torch.from_numpy(padded).permute(2, 0, 1) - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    x = x.unsqueeze(0)
    with torch.no_grad():
        logits = model(torch.cat([x, x.flip(3)]) if flip else x)
    logits = F.interpolate(logits, (crop, crop), mode="bilinear", align_corners=True)
    probs = logits.softmax(1)
    probs = (probs[0] + probs[1].flip(2)) / 2 if flip else probs[0]
    return probs[:, top:top + h, left:left + w]


def test_window_larger_than_image_is_one_padded_forward():
    rng = np.random.default_rng(0)
    model = TinySegNet(4).eval()
    image = _random_image(rng, 40, 50)
    for flip in (True, False):
        got = sliding_window_probs(model, image, 4, 65, MEAN, STD, batch_size=2, flip=flip)
        assert got.shape == (4, 40, 50) and got.dtype == torch.float32
        expected = _manual_padded_forward(model, image, 65, flip)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_flip_averaging_with_position_dependent_model():
    rng = np.random.default_rng(1)
    model = RampModel().eval()
    image = _random_image(rng, 33, 33)
    no_flip = sliding_window_probs(model, image, 2, 33, MEAN, STD, flip=False)
    with_flip = sliding_window_probs(model, image, 2, 33, MEAN, STD, flip=True)
    x = (torch.from_numpy(image).permute(2, 0, 1) - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    ramp = torch.linspace(-2.0, 2.0, 33).view(1, 33).expand(33, 33)
    direct = torch.stack([x[0], ramp]).softmax(0)
    # The mirrored input sees the ramp reversed relative to the image; mapping back mirrors the red channel again.
    mirrored = torch.stack([x[0], ramp.flip(1)]).softmax(0)
    torch.testing.assert_close(no_flip, direct, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(with_flip, (direct + mirrored) / 2, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(no_flip, with_flip, atol=1e-3)


def test_overlapping_windows_are_averaged():
    """A model whose output does not depend on the crop's content: the window average of a
    constant is that constant, so every pixel gets the same probabilities whatever its count."""
    class ConstantModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.tensor([0.3, -0.2, 1.0]))

        def forward(self, x):
            return self.bias.view(1, 3, 1, 1).expand(x.shape[0], 3, x.shape[2], x.shape[3])

    model = ConstantModel().eval()
    image = _random_image(np.random.default_rng(2), 70, 100)
    probs = sliding_window_probs(model, image, 3, 33, MEAN, STD, batch_size=4)
    expected = torch.tensor([0.3, -0.2, 1.0]).softmax(0).view(3, 1, 1).expand(3, 70, 100)
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- batched path == release loop
@pytest.mark.parametrize("height,width,scales,batch_size", [
    (50, 70, [0.5, 1.0, 1.25], 3),
    (90, 41, [0.75, 1.5], 1),
    (66, 66, [1.0], 16),
])
def test_batched_equals_release_reference(height, width, scales, batch_size):
    rng = np.random.default_rng(height * width)
    classes, crop, base_size = 5, 33, 64
    model = TinySegNet(classes, seed=height).eval()
    image = _random_image(rng, height, width)
    reference = release_predict(model, image, classes, crop, crop, scales, base_size, MEAN, STD)
    probs = multiscale_probs(model, image, classes, (crop, crop), scales, base_size, MEAN, STD,
                             batch_size=batch_size)
    assert probs.shape == (classes, height, width)
    np.testing.assert_allclose(probs.permute(1, 2, 0).numpy(), reference, atol=2e-5, rtol=0)
    prediction = predict_multiscale(model, image, classes, crop, scales, base_size, MEAN, STD,
                                    batch_size=batch_size)
    assert prediction.dtype == torch.int64 and prediction.shape == (height, width)
    expected = reference.argmax(2)
    sorted_ref = np.sort(reference, axis=2)
    clear = (sorted_ref[:, :, -1] - sorted_ref[:, :, -2]) > 1e-4  # float32 vs float64 may flip exact near-ties
    assert clear.mean() > 0.95
    assert np.array_equal(prediction.numpy()[clear], expected[clear])


def test_tensor_input_autocast_and_channels_last():
    rng = np.random.default_rng(3)
    model = TinySegNet(3).eval()
    image = _random_image(rng, 40, 45)
    reference = multiscale_probs(model, image, 3, 33, [1.0], 48, MEAN, STD)
    from_tensor = multiscale_probs(model, torch.from_numpy(image).permute(2, 0, 1), 3, 33, [1.0], 48, MEAN, STD)
    torch.testing.assert_close(from_tensor, reference)
    model_cl = TinySegNet(3).eval().to(memory_format=torch.channels_last)
    assert model_is_channels_last(model_cl) and not model_is_channels_last(model)
    torch.testing.assert_close(multiscale_probs(model_cl, image, 3, 33, [1.0], 48, MEAN, STD), reference,
                               atol=1e-5, rtol=1e-4)
    bf16 = multiscale_probs(model, image, 3, 33, [1.0], 48, MEAN, STD, autocast_dtype=torch.bfloat16)
    assert bf16.dtype == torch.float32
    assert (bf16 - reference).abs().max() < 0.1


def test_training_mode_is_refused():
    model = TinySegNet(3).train()
    with pytest.raises(ValueError, match="eval"):
        sliding_window_probs(model, np.zeros((33, 33, 3), np.float32), 3, 33, MEAN, STD)
    assert math.isclose(sum(MEAN), 0.485 * 255 + 0.456 * 255 + 0.406 * 255)
