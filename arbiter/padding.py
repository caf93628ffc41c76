"""Convolution padding, the one convention that moves the sampling grid.

TF/Keras, XLA and Flax 'SAME': out = ceil(in / s), total = max((out - 1) * s + k - in, 0),
split (total // 2, total - total // 2): the odd pixel goes bottom/right.
The usual PyTorch port of a stride-2 'SAME' conv uses padding = k // 2 on both sides:
same output size on even inputs, but the grid is shifted by one pixel.
"""

from __future__ import annotations

PADDING_MODES = ("tf_same", "symmetric")


def same_padding(in_size: int, kernel: int, stride: int) -> tuple[int, int]:
    out = -(-in_size // stride)
    total = max((out - 1) * stride + kernel - in_size, 0)
    return total // 2, total - total // 2


def conv_padding(in_size: int, kernel: int, stride: int, mode: str) -> tuple[int, int]:
    """(before, after) padding of one spatial axis. Stride-1 convs with odd kernels are
    (k//2, k//2) under both modes."""
    if mode == "tf_same":
        return same_padding(in_size, kernel, stride)
    if mode == "symmetric":
        return kernel // 2, kernel // 2
    raise ValueError(f"padding mode must be one of {PADDING_MODES}, got {mode!r}")
