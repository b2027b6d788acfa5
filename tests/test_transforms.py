"""Paired transforms: shapes, padding values, crops, label integrity under random augmentation."""
import random

import numpy as np
import pytest
import torch

from util.data import transforms as T

import tiny_runs


def make_cfg(validate=True, **overrides):
    return tiny_runs.make_cfg(validate=validate, **{"train_h": 33, "train_w": 41, **overrides})


def random_pair(rng, height, width, num_values=5):
    image = rng.uniform(0, 255, (height, width, 3)).astype(np.float32)
    label = rng.integers(0, num_values, (height, width)).astype(np.uint8)
    return image, label


def test_mean_std_constants():
    assert T.MEAN == pytest.approx([123.675, 116.28, 103.53])
    assert T.STD == pytest.approx([58.395, 57.12, 57.375])


def test_crop_pads_small_image_centered_with_mean_and_ignore():
    image = np.full((10, 12, 3), 7.0, np.float32)
    label = np.full((10, 12), 3, np.uint8)
    crop = T.Crop((15, 19), crop_type="center", padding=T.MEAN, ignore_label=255)
    out_image, out_label = crop(image, label)
    assert out_image.shape == (15, 19, 3) and out_label.shape == (15, 19)
    # pad_h = 5 -> top 2, bottom 3; pad_w = 7 -> left 3, right 4
    assert (out_label[2:12, 3:15] == 3).all()
    assert (out_image[2:12, 3:15] == 7.0).all()
    inside = np.zeros((15, 19), bool)
    inside[2:12, 3:15] = True
    assert (out_label[~inside] == 255).all()
    assert np.allclose(out_image[~inside], np.array(T.MEAN, np.float32))


def test_center_crop_of_large_image_takes_middle():
    image = np.arange(20 * 30, dtype=np.float32).reshape(20, 30)[:, :, None].repeat(3, axis=2)
    label = (np.arange(20 * 30).reshape(20, 30) % 200).astype(np.uint8)
    out_image, out_label = T.Crop((10, 10), "center")(image, label)
    assert out_image[0, 0, 0] == image[5, 10, 0]
    assert (out_label == label[5:15, 10:20]).all()


def test_random_crop_is_a_window_of_the_input():
    rng = np.random.default_rng(0)
    image, label = random_pair(rng, 30, 40, num_values=250)
    random.seed(3)
    out_image, out_label = T.Crop((10, 12), "rand")(image, label)
    found = [(top, left) for top in range(21) for left in range(29)
             if np.array_equal(image[top:top + 10, left:left + 12], out_image)]
    assert len(found) == 1
    top, left = found[0]
    assert np.array_equal(label[top:top + 10, left:left + 12], out_label)


def test_rotate_pads_label_with_ignore_and_image_with_mean():
    image = np.zeros((40, 40, 3), np.float32)
    label = np.ones((40, 40), np.uint8)
    random.seed(0)
    rotate = T.RandRotate((30, 30), padding=T.MEAN, ignore_label=255, p=1.0)
    out_image, out_label = rotate(image, label)
    assert out_label[0, 0] == 255 and out_label[20, 20] == 1
    assert set(np.unique(out_label).tolist()) == {1, 255}
    assert np.allclose(out_image[0, 0], T.MEAN)


def test_rotate_probability_zero_is_identity():
    rng = np.random.default_rng(1)
    image, label = random_pair(rng, 9, 11)
    out_image, out_label = T.RandRotate((-10, 10), p=0.0)(image, label)
    assert out_image is image and out_label is label


def test_scale_sizes_and_nearest_labels():
    rng = np.random.default_rng(2)
    image, label = random_pair(rng, 20, 30, num_values=7)
    random.seed(0)
    out_image, out_label = T.RandScale((2.0, 2.0))(image, label)
    assert out_image.shape == (40, 60, 3) and out_label.shape == (40, 60)
    assert np.array_equal(out_label[::2, ::2], label)
    out_image, out_label = T.RandScale((0.01, 0.01))(image, label)
    assert out_image.shape == (1, 1, 3) and out_label.shape == (1, 1)


def test_flip_mirrors_both():
    rng = np.random.default_rng(3)
    image, label = random_pair(rng, 5, 6)
    out_image, out_label = T.RandomHorizontalFlip(p=1.0)(image, label)
    assert np.array_equal(out_image, image[:, ::-1]) and np.array_equal(out_label, label[:, ::-1])


def test_blur_keeps_shape_and_label():
    rng = np.random.default_rng(4)
    image, label = random_pair(rng, 12, 13)
    out_image, out_label = T.RandomGaussianBlur(5, p=1.0)(image, label)
    assert out_image.shape == image.shape and out_image.dtype == np.float32
    assert out_label is label
    assert out_image.std() < image.std()


def test_to_tensor_and_normalize():
    image = np.zeros((4, 5, 3), np.float32)
    image[..., 0] = T.MEAN[0] + T.STD[0]
    label = np.full((4, 5), 2, np.uint8)
    tensor_image, tensor_label = T.ToTensor()(image, label)
    assert tensor_image.shape == (3, 4, 5) and tensor_image.dtype == torch.float32
    assert tensor_label.shape == (4, 5) and tensor_label.dtype == torch.int64
    normalized, _ = T.Normalize(T.MEAN, T.STD)(tensor_image, tensor_label)
    assert torch.allclose(normalized[0], torch.ones(4, 5))
    assert torch.allclose(normalized[1], torch.full((4, 5), -T.MEAN[1] / T.STD[1]))


@pytest.mark.parametrize("image_shape,label_shape,message", [
    ((4, 5, 3), (4, 6), "label"),
    ((4, 5, 3), (4, 5, 1), "HxW"),
    ((4,), (4, 5), "image must be"),
])
def test_to_tensor_rejects_bad_shapes(image_shape, label_shape, message):
    with pytest.raises(ValueError, match=message):
        T.ToTensor()(np.zeros(image_shape, np.float32), np.zeros(label_shape, np.uint8))


def test_normalize_requires_tensor():
    with pytest.raises(ValueError, match="ToTensor"):
        T.Normalize()(np.zeros((4, 5, 3), np.float32), np.zeros((4, 5), np.uint8))


def test_compose_reports_size_mismatch():
    with pytest.raises(ValueError, match="4x5 but label is 4x6"):
        T.build_val_transform(make_cfg())(np.zeros((4, 5, 3), np.float32), np.zeros((4, 6), np.uint8))


def test_build_transforms_output_shapes():
    cfg = make_cfg()
    rng = np.random.default_rng(5)
    image, label = random_pair(rng, 20, 50)
    random.seed(1)
    for build in (T.build_train_transform, T.build_val_transform):
        out_image, out_label = build(cfg)(image, label)
        assert out_image.shape == (3, 33, 41) and out_label.shape == (33, 41)
        assert out_image.dtype == torch.float32 and out_label.dtype == torch.int64
    names = [type(t).__name__ for t in T.build_train_transform(cfg).transforms]
    assert names == ["RandScale", "RandRotate", "RandomGaussianBlur", "RandomHorizontalFlip", "Crop",
                     "ToTensor", "Normalize"]


def test_train_transform_is_reproducible_with_seeded_random():
    cfg = make_cfg()
    rng = np.random.default_rng(6)
    image, label = random_pair(rng, 25, 35)
    transform = T.build_train_transform(cfg)
    random.seed(42)
    first = transform(image, label)
    random.seed(42)
    second = transform(image, label)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_property_labels_only_take_input_values_or_ignore():
    """Hundreds of random images/labels/parameters: labels are never interpolated or invented."""
    rng = np.random.default_rng(1234)
    random.seed(1234)
    for trial in range(300):
        height, width = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        values = rng.choice(np.arange(0, 255), size=int(rng.integers(1, 6)), replace=False)
        label = rng.choice(values, size=(height, width)).astype(np.uint8)
        image = rng.uniform(0, 255, (height, width, 3)).astype(np.float32)
        scale_min = float(rng.uniform(0.2, 1.5))
        rotate = float(rng.uniform(0, 60))
        cfg = make_cfg(scale_min=scale_min, scale_max=scale_min + float(rng.uniform(0, 1.5)),
                       rotate_min=-rotate, rotate_max=rotate,
                       train_h=int(rng.integers(1, 50)), train_w=int(rng.integers(1, 50)),
                       validate=False)  # any crop size: the transforms do not need the model's 8k + 1
        transform = T.build_train_transform(cfg) if trial % 4 else T.build_val_transform(cfg)
        out_image, out_label = transform(image, label)
        allowed = set(values.tolist()) | {255}
        assert set(torch.unique(out_label).tolist()) <= allowed, f"trial {trial}"
        assert out_label.shape == (cfg.train_h, cfg.train_w)
        assert out_image.shape == (3, cfg.train_h, cfg.train_w)
        assert torch.isfinite(out_image).all()


def test_int32_labels_are_supported():
    rng = np.random.default_rng(7)
    image, label = random_pair(rng, 15, 15)
    random.seed(0)
    out_image, out_label = T.build_train_transform(make_cfg(train_h=9, train_w=9))(image, label.astype(np.int64))
    assert out_label.dtype == torch.int64 and out_label.shape == (9, 9)
