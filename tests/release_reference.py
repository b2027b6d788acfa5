"""The release's test-time loop, one window (and its flip) per forward, float64 numpy accumulation,
cv2 resizing: the reference that tests/test_inference.py checks util/evaluation/inference.py against and that
tool/analysis_tools/benchmark.py --compare-naive times for the speed-up. Written after the release's
tool/test.py (net_process, scale_process and the scale loop of its test function).
"""
import cv2
import numpy as np
import torch
import torch.nn.functional as F


def release_net_process(model, image, mean, std, flip=True):
    inputs = torch.from_numpy(image.transpose((2, 0, 1))).float()
    for channel, m, s in zip(inputs, mean, std):
        channel.sub_(m).div_(s)
    inputs = inputs.unsqueeze(0)
    if flip:
        inputs = torch.cat([inputs, inputs.flip(3)], 0)
    inputs = inputs.to(next((p.device for p in model.parameters()), torch.device("cpu")))  # (.cuda() in the release)
    with torch.no_grad():
        output = model(inputs)
    _, _, h_i, w_i = inputs.shape
    _, _, h_o, w_o = output.shape
    if (h_o != h_i) or (w_o != w_i):
        output = F.interpolate(output, (h_i, w_i), mode="bilinear", align_corners=True)
    output = F.softmax(output, dim=1)
    output = (output[0] + output[1].flip(2)) / 2 if flip else output[0]
    return output.cpu().numpy().transpose(1, 2, 0)


def release_scale_process(model, image, classes, crop_h, crop_w, h, w, mean, std, flip=True, stride_rate=2 / 3):
    ori_h, ori_w, _ = image.shape
    pad_h = max(crop_h - ori_h, 0)
    pad_w = max(crop_w - ori_w, 0)
    pad_h_half = int(pad_h / 2)
    pad_w_half = int(pad_w / 2)
    if pad_h > 0 or pad_w > 0:
        image = cv2.copyMakeBorder(image, pad_h_half, pad_h - pad_h_half, pad_w_half, pad_w - pad_w_half,
                                   cv2.BORDER_CONSTANT, value=mean)
    new_h, new_w, _ = image.shape
    stride_h = int(np.ceil(crop_h * stride_rate))
    stride_w = int(np.ceil(crop_w * stride_rate))
    grid_h = int(np.ceil(float(new_h - crop_h) / stride_h) + 1)
    grid_w = int(np.ceil(float(new_w - crop_w) / stride_w) + 1)
    prediction_crop = np.zeros((new_h, new_w, classes), dtype=float)
    count_crop = np.zeros((new_h, new_w), dtype=float)
    for index_h in range(grid_h):
        for index_w in range(grid_w):
            s_h = index_h * stride_h
            e_h = min(s_h + crop_h, new_h)
            s_h = e_h - crop_h
            s_w = index_w * stride_w
            e_w = min(s_w + crop_w, new_w)
            s_w = e_w - crop_w
            image_crop = image[s_h:e_h, s_w:e_w].copy()
            count_crop[s_h:e_h, s_w:e_w] += 1
            prediction_crop[s_h:e_h, s_w:e_w, :] += release_net_process(model, image_crop, mean, std, flip)
    prediction_crop /= np.expand_dims(count_crop, 2)
    prediction_crop = prediction_crop[pad_h_half:pad_h_half + ori_h, pad_w_half:pad_w_half + ori_w]
    # cv2 (OpenCV 5) refuses many-channel maps: resize channel by channel (same arithmetic).
    return np.stack([cv2.resize(prediction_crop[:, :, c], (w, h), interpolation=cv2.INTER_LINEAR)
                     for c in range(classes)], axis=2)


def release_predict(model, image, classes, crop_h, crop_w, scales, base_size, mean, std, flip=True):
    """(H, W, classes) float64 scale-averaged probabilities of an HxWx3 float image in 0..255."""
    h, w, _ = image.shape
    prediction = np.zeros((h, w, classes), dtype=float)
    for scale in scales:
        long_size = round(scale * base_size)
        new_h = long_size
        new_w = long_size
        if h > w:
            new_w = round(long_size / float(h) * w)
        else:
            new_h = round(long_size / float(w) * h)
        image_scale = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        prediction += release_scale_process(model, image_scale, classes, crop_h, crop_w, h, w, mean, std, flip)
    prediction /= len(scales)
    return prediction
