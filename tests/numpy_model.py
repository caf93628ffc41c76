"""A plain-numpy oracle of the model's forward pass, for tests only.

It is the executable reading of `arbiter.spec`'s diagram, against which each framework's
implementation can be checked on its own (the cross-framework parity tests compare the
frameworks with each other). float64 throughout, so its own round-off is negligible.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from arbiter.knobs import Knobs
from arbiter.padding import conv_padding
from arbiter.spec import ModelSpec, bn_name, conv_stride
from arbiter.weights import probe_weights as random_weights  # noqa: F401  (canonical weights for tests)


def conv2d(x: np.ndarray, kernel: np.ndarray, stride: int, padding_mode: str) -> np.ndarray:
    """x NHWC, kernel HWIO."""
    k = kernel.shape[0]
    ph = conv_padding(x.shape[1], k, stride, padding_mode)
    pw = conv_padding(x.shape[2], k, stride, padding_mode)
    xp = np.pad(x, ((0, 0), ph, pw, (0, 0)))
    windows = sliding_window_view(xp, (k, k), axis=(1, 2))[:, ::stride, ::stride]  # N,H,W,C,kh,kw
    return np.einsum("nhwcij,ijco->nhwo", windows, kernel, optimize=True)


def batch_norm(x, w, prefix, knobs: Knobs, train: bool):
    axes = tuple(range(x.ndim - 1))
    if train:
        mean, var = x.mean(axes), x.var(axes)
    else:
        mean, var = w[f"{prefix}.mean"], w[f"{prefix}.var"]
    return (x - mean) / np.sqrt(var + knobs.bn_epsilon) * w[f"{prefix}.scale"] + w[f"{prefix}.bias"]


def relu(x):
    return np.maximum(x, 0)


def forward(spec: ModelSpec, knobs: Knobs, weights: dict, bank: np.ndarray, x: np.ndarray, train: bool) -> dict:
    w = {k: np.asarray(v, np.float64) for k, v in weights.items()}
    out = {"input": np.asarray(x, np.float64)}

    def conv_bn(h, conv, act=True):
        h = conv2d(h, w[f"{conv}.kernel"], conv_stride(conv), knobs.stride2_padding)
        bn = bn_name(conv)
        if not act:
            return batch_norm(h, w, bn, knobs, train)
        if knobs.bn_relu_order == "bn_relu":
            return relu(batch_norm(h, w, bn, knobs, train))
        return batch_norm(relu(h), w, bn, knobs, train)

    h = out["gabor"] = conv2d(out["input"], np.asarray(bank, np.float64), 1, "tf_same")
    h = out["stem"] = conv_bn(h, "stem.conv")
    h = out["down1"] = conv_bn(h, "down1.conv")
    r = conv_bn(conv_bn(h, "block1.conv1"), "block1.conv2", act=False)
    h = out["block1"] = relu(h + r)
    h = out["down2"] = conv_bn(h, "down2.conv")
    r = conv_bn(conv_bn(h, "block2.conv1"), "block2.conv2", act=False)
    squeezed = r.mean(axis=(1, 2))
    z = relu(squeezed @ w["block2.se.reduce.kernel"] + w["block2.se.reduce.bias"])
    gate = out["block2.se_gate"] = 1 / (1 + np.exp(-(z @ w["block2.se.expand.kernel"] + w["block2.se.expand.bias"])))
    h = out["block2"] = relu(h + r * gate[:, None, None, :])
    pooled = out["pool"] = h.mean(axis=(1, 2))
    out["logits"] = pooled @ w["head.kernel"] + w["head.bias"]
    return out


def preprocess(images: np.ndarray, knobs: Knobs) -> np.ndarray:
    """uint8 (N, H, W, C) -> float model input (N, H, W, 1), no augmentation.

    'uint8' rounding follows PIL's convert('L') for the ITU coefficients: fixed-point
    (R*19595 + G*38470 + B*7471 + 0x8000) >> 16; for other coefficients, floor(x + 0.5)."""
    x = images.astype(np.float64)
    if images.shape[-1] == 3:
        c = np.asarray(knobs.grayscale_coefficients, np.float64)
        if knobs.grayscale_rounding == "uint8" and tuple(knobs.grayscale_coefficients) == (0.299, 0.587, 0.114):
            rgb = images.astype(np.int64)
            x = ((rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16)[..., None] / 255.0
        elif knobs.grayscale_rounding == "uint8":
            x = np.floor(x @ c + 0.5)[..., None]
            x = x / 255.0
        else:
            x = (x / 255.0) @ c
            x = x[..., None]
    else:
        x = x / 255.0
    if knobs.input_scaling == "symmetric":
        x = (x - 0.5) / 0.5
    return x
