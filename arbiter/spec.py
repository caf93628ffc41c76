"""The architecture, written once: every implementation reads these numbers.

A reconstruction of the hybrid Gabor-CNN of Ahmed et al. ("A Lightweight Hybrid Gabor
Deep Learning Approach and its Application to Medical Image Classification"):

    uint8 RGB (H, W, 3)
      -> grayscale in [0, 1] (H, W, 1)        [input pipeline, knobs `grayscale_*`]
      -> scaled                               [input pipeline, knob `input_scaling`]
    model:
      gabor   fixed Gabor bank, k x k, stride 1, padding k//2, no bias, not trainable
      stem    conv3x3 s1            -> BN -> ReLU
      down1   conv3x3 s2            -> BN -> ReLU        (stride-2: 'SAME' differs)
      block1  residual: conv-BN-ReLU, conv-BN, + x, ReLU
      down2   conv3x3 s2            -> BN -> ReLU        (stride-2: 'SAME' differs)
      block2  residual with squeeze-and-excitation:
              conv-BN-ReLU, conv-BN, SE gate, + x, ReLU
      pool    global average pooling
      logits  dense -> num_classes

Convolutions followed by BatchNorm carry no bias (a bias before BN has an analytically
zero gradient; its round-off gradient would be amplified by Adam's first step).
Under knob `bn_relu_order = "relu_bn"`, every "BN -> ReLU" above reads "ReLU -> BN";
a BN with no ReLU after it (the second conv of a residual block) is unaffected.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class GaborSpec:
    """The fixed filter bank: see `arbiter.gabor` for the formula."""

    kernel_size: int = 7
    orientations: int = 8
    # cycles per pixel; Nyquist is 0.5
    low_frequencies: tuple[float, ...] = (0.08, 0.14)
    high_frequencies: tuple[float, ...] = (0.25, 0.36)
    # sigma = bandwidth / frequency, clipped to [sigma_min, (kernel_size - 1) / 2]
    bandwidth: float = 0.56
    sigma_min: float = 1.0
    aspect_ratio: float = 0.5  # gamma: elongation of the Gaussian envelope
    phase: float = 0.0  # psi: 0 -> even (cosine) filters

    @property
    def channels(self) -> int:
        return self.orientations * (len(self.low_frequencies) + len(self.high_frequencies))


@dataclass(frozen=True)
class ModelSpec:
    num_classes: int = 7
    image_channels: int = 3  # 3: RGB converted to grayscale in the pipeline; 1: already gray
    image_size: int = 28
    gabor: GaborSpec = field(default_factory=GaborSpec)
    stem_width: int = 32
    stage1_width: int = 64
    stage2_width: int = 96
    conv_kernel: int = 3
    se_reduction: int = 4

    @property
    def se_width(self) -> int:
        return self.stage2_width // self.se_reduction

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        d = dict(d)
        g = d.pop("gabor", {})
        g = {k: tuple(v) if isinstance(v, list) else v for k, v in g.items()}
        return cls(gabor=GaborSpec(**g), **d)


# Canonical layer and tensor names, in pipeline order. Every implementation exposes
# its intermediate activations under exactly these names, in NHWC layout (N, C for
# `pool` and `logits`).
ACTIVATIONS = ("input", "gabor", "stem", "down1", "block1", "down2", "block2.se_gate", "block2", "pool", "logits")

# (layer name, stride) of every trainable convolution, in pipeline order.
CONV_LAYERS = (
    ("stem.conv", 1),
    ("down1.conv", 2),
    ("block1.conv1", 1),
    ("block1.conv2", 1),
    ("down2.conv", 2),
    ("block2.conv1", 1),
    ("block2.conv2", 1),
)
DENSE_LAYERS = ("block2.se.reduce", "block2.se.expand", "head")


def bn_name(conv_name: str) -> str:
    """The BatchNorm that follows a conv: 'stem.conv' -> 'stem.bn', 'block1.conv2' -> 'block1.bn2'."""
    return conv_name.replace(".conv", ".bn")


def conv_shapes(spec: ModelSpec) -> dict[str, tuple[int, int, int, int]]:
    """HWIO kernel shape of every trainable convolution."""
    k = spec.conv_kernel
    g, s, c1, c2 = spec.gabor.channels, spec.stem_width, spec.stage1_width, spec.stage2_width
    io = {
        "stem.conv": (g, s),
        "down1.conv": (s, c1),
        "block1.conv1": (c1, c1),
        "block1.conv2": (c1, c1),
        "down2.conv": (c1, c2),
        "block2.conv1": (c2, c2),
        "block2.conv2": (c2, c2),
    }
    return {name: (k, k, cin, cout) for name, (cin, cout) in io.items()}


def dense_shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """(in, out) kernel shape of every dense layer."""
    c2, r = spec.stage2_width, spec.se_width
    return {"block2.se.reduce": (c2, r), "block2.se.expand": (r, c2), "head": (c2, spec.num_classes)}


def weight_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor (trainable and BN running statistics), in pipeline order.

    Layout: conv kernels HWIO, dense kernels (in, out), BN `scale`/`bias` (trainable),
    `mean`/`var` (running statistics, not trainable).
    """
    shapes: dict[str, tuple[int, ...]] = {}
    dense = dense_shapes(spec)
    for conv, kshape in conv_shapes(spec).items():
        shapes[f"{conv}.kernel"] = kshape
        bn = bn_name(conv)
        for leaf in ("scale", "bias", "mean", "var"):
            shapes[f"{bn}.{leaf}"] = (kshape[-1],)
        if conv == "block2.conv2":  # the SE gate sits between block2's last BN and the add
            for d in ("block2.se.reduce", "block2.se.expand"):
                shapes[f"{d}.kernel"] = dense[d]
                shapes[f"{d}.bias"] = (dense[d][1],)
    shapes["head.kernel"] = dense["head"]
    shapes["head.bias"] = (spec.num_classes,)
    return shapes


def is_trainable(name: str) -> bool:
    return not (name.endswith(".mean") or name.endswith(".var"))


def trainable_parameter_count(spec: ModelSpec) -> int:
    total = 0
    for name, shape in weight_shapes(spec).items():
        if is_trainable(name):
            n = 1
            for d in shape:
                n *= d
            total += n
    return total


def stride2_convs(spec: ModelSpec) -> tuple[str, ...]:
    return tuple(name for name, stride in CONV_LAYERS if stride == 2)


def conv_stride(name: str) -> int:
    return dict(CONV_LAYERS)[name]
