"""The hybrid Gabor-CNN as a torch.nn.Module, top to bottom as in `arbiter.spec`'s diagram.

NCHW throughout. Submodules are named after the canonical layers (`stem.conv`,
`block2.se.reduce`, ...), so the state_dict spells the canonical names (see `layout`).
`forward` returns the logits, as any PyTorch model does; the adapter reads the other
activations with forward hooks on the modules named in `ACTIVATION_MODULES`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from arbiter.gabor import gabor_bank
from arbiter.knobs import Knobs
from arbiter.padding import conv_padding
from arbiter.spec import ModelSpec

from .layout import hwio_to_oihw

# canonical activation -> the module whose output it is ('input' is the model input)
ACTIVATION_MODULES = {
    "gabor": "gabor",
    "stem": "stem",
    "down1": "down1",
    "block1": "block1",
    "down2": "down2",
    "block2.se_gate": "block2.se",
    "block2": "block2",
    "pool": "pool",
    "logits": "head",
}


class GaborNet(nn.Module):
    def __init__(self, spec: ModelSpec, knobs: Knobs):
        super().__init__()
        self.spec = spec
        k, s, c1, c2 = spec.conv_kernel, spec.stem_width, spec.stage1_width, spec.stage2_width
        self.gabor = FixedConv(gabor_bank(spec.gabor, knobs.gabor_normalization))
        self.stem = ConvBN(spec.gabor.channels, s, k, 1, knobs)
        self.down1 = ConvBN(s, c1, k, 2, knobs)
        self.block1 = ResidualBlock(c1, k, knobs)
        self.down2 = ConvBN(c1, c2, k, 2, knobs)
        self.block2 = ResidualBlock(c2, k, knobs, se_width=spec.se_width)
        # pooled to 1x1, so flattening is layout-free
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c2, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gabor(x)
        x = self.stem(x)
        x = self.down1(x)
        x = self.block1(x)
        x = self.down2(x)
        x = self.block2(x)
        return self.head(self.pool(x))


class FixedConv(nn.Module):
    """The Gabor bank: a buffer, not a Parameter, so no optimiser or initialiser sees it."""

    def __init__(self, bank_hwio: np.ndarray):
        super().__init__()
        self.register_buffer("kernel", hwio_to_oihw(bank_hwio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernel, padding=self.kernel.shape[-1] // 2)


class ConvBN(nn.Module):
    """conv -> BN -> ReLU, or conv -> ReLU -> BN under bn_relu_order='relu_bn'."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, knobs: Knobs):
        super().__init__()
        self.conv = conv2d(cin, cout, k, stride, knobs.stride2_padding)
        self.bn = batch_norm(cout, knobs)
        self.relu = nn.ReLU()
        self.relu_first = knobs.bn_relu_order == "relu_bn"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.relu_first:
            return self.bn(self.relu(x))
        return self.relu(self.bn(x))


class ResidualBlock(nn.Module):
    """conv-BN-ReLU, conv-BN, [SE gate], + x, ReLU."""

    def __init__(self, channels: int, k: int, knobs: Knobs, se_width: int | None = None):
        super().__init__()
        self.conv1 = conv2d(channels, channels, k, 1, knobs.stride2_padding)
        self.bn1 = batch_norm(channels, knobs)
        self.conv2 = conv2d(channels, channels, k, 1, knobs.stride2_padding)
        self.bn2 = batch_norm(channels, knobs)
        self.se = SqueezeExcite(channels, se_width) if se_width else None
        self.relu = nn.ReLU()
        self.relu_first = knobs.bn_relu_order == "relu_bn"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.conv1(x)
        r = self.bn1(self.relu(r)) if self.relu_first else self.relu(self.bn1(r))
        # no ReLU follows bn2, so bn_relu_order does not touch it
        r = self.bn2(self.conv2(r))
        if self.se is not None:
            r = r * self.se(r)[:, :, None, None]
        return self.relu(x + r)


class SqueezeExcite(nn.Module):
    """Returns the (N, C) gate, not the gated map, so the gate can be observed."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.reduce = nn.Linear(channels, width)
        self.expand = nn.Linear(width, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeezed = x.mean(dim=(2, 3))
        return torch.sigmoid(self.expand(F.relu(self.reduce(squeezed))))


# -- convolutions ---------------------------------------------------------------------------
def conv2d(cin: int, cout: int, k: int, stride: int, stride2_padding: str) -> nn.Conv2d:
    """What a PyTorch port writes (padding=k//2) unless TF 'SAME' is asked for a strided
    conv; stride-1 convs with odd kernels are padded k//2 under both modes."""
    if stride == 1 or stride2_padding == "symmetric":
        return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)
    return SamePadConv2d(cin, cout, k, stride=stride, padding=0, bias=False)


class SamePadConv2d(nn.Conv2d):
    """TF/XLA 'SAME' for a strided conv: the odd pixel padded bottom/right, which
    nn.Conv2d's symmetric `padding` cannot express. Pads depend on the input size, so
    they are computed per call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (k, _), (s, _) = self.kernel_size, self.stride
        top, bottom = conv_padding(x.shape[-2], k, s, "tf_same")
        left, right = conv_padding(x.shape[-1], k, s, "tf_same")
        return super().forward(F.pad(x, (left, right, top, bottom)))


# -- batch normalisation --------------------------------------------------------------------
def batch_norm(channels: int, knobs: Knobs) -> nn.BatchNorm2d:
    # torch's momentum weighs the NEW batch statistic; the knob weighs the old value
    momentum = 1.0 - knobs.bn_momentum
    if knobs.bn_running_var == "unbiased":
        return nn.BatchNorm2d(channels, eps=knobs.bn_epsilon, momentum=momentum)
    return BiasedVarBatchNorm2d(channels, eps=knobs.bn_epsilon, momentum=momentum)


class BiasedVarBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d normalises with the biased batch variance but stores the unbiased
    one in running_var; Keras and Flax store the biased one. Train mode here lets torch
    normalise without touching the running statistics, then updates them with torch's
    own formula (1 - momentum) * old + momentum * batch, using the biased variance."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        y = F.batch_norm(x, None, None, self.weight, self.bias, training=True, momentum=0.0, eps=self.eps)
        with torch.no_grad():
            dims = (0, 2, 3)
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(x.mean(dim=dims), alpha=m)
            self.running_var.mul_(1 - m).add_(x.var(dim=dims, correction=0), alpha=m)
            self.num_batches_tracked.add_(1)
        return y


# -- initialisation -------------------------------------------------------------------------
# Keras's and Flax's truncated-normal initialisers divide the std by this constant: the
# std of a unit normal truncated to [-2, 2], so the truncated draw has the target std.
_TRUNCATED_NORMAL_STD = 0.87962566103423978


def initialise(net: nn.Module, knobs: Knobs) -> None:
    """Re-draws every conv and dense kernel and every dense bias with the knobs'
    initialisers, in module order, from torch's global RNG (seeded by the caller)."""
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            init_kernel(module.weight, knobs.kernel_init)
        if isinstance(module, nn.Linear):
            init_bias(module.bias, module.in_features, knobs.bias_init)


def init_kernel(weight: torch.Tensor, how: str) -> None:
    fan_in = weight[0].numel()  # OIHW and (out, in) both put fan_in after dim 0
    if how == "glorot_uniform":
        nn.init.xavier_uniform_(weight)
    elif how == "kaiming_uniform_a_sqrt5":
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # torch's default: U(+-1/sqrt(fan_in))
    elif how == "lecun_normal":
        std = math.sqrt(1.0 / fan_in) / _TRUNCATED_NORMAL_STD
        nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)
    elif how == "he_normal":
        # torch's is an untruncated normal; Keras's HeNormal is truncated at 2 std (same variance)
        nn.init.kaiming_normal_(weight, mode="fan_in", nonlinearity="relu")
    else:
        raise ValueError(f"unknown kernel_init {how!r}")


def init_bias(bias: torch.Tensor, fan_in: int, how: str) -> None:
    if how == "zeros":
        nn.init.zeros_(bias)
    elif how == "fan_in_uniform":
        bound = 1.0 / math.sqrt(fan_in)
        nn.init.uniform_(bias, -bound, bound)
    else:
        raise ValueError(f"unknown bias_init {how!r}")
