"""The Gabor-CNN of `arbiter.spec` in Flax linen, every convention written out.

Nothing is left to a Flax default that another framework might not share: each
convolution gets explicit padding tuples from `arbiter.padding.conv_padding` (never
'SAME'), each layer its initialisers, float32 dtypes and HIGHEST precision, each
BatchNorm its momentum, epsilon and variance formula. Module and variable names are the
canonical ones, so the variable tree reads `params/block2/se/reduce/kernel` for the
canonical `block2.se.reduce.kernel` and `batch_stats/stem/bn/var` for `stem.bn.var`.

`Net.__call__` returns every activation of `arbiter.spec.ACTIVATIONS`, NHWC.
"""

from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from arbiter.gabor import gabor_bank
from arbiter.knobs import Knobs
from arbiter.padding import conv_padding
from arbiter.spec import GaborSpec, ModelSpec

DTYPE = jnp.float32
# No TF32 / bf16 passes on accelerators: the reference must be float32 throughout.
PRECISION = jax.lax.Precision.HIGHEST

KERNEL_INITS: dict[str, Callable] = {
    "glorot_uniform": nn.initializers.glorot_uniform(),
    # PyTorch's kaiming_uniform_(a=sqrt(5)): gain^2 = 2 / (1 + 5) = 1/3, so the bound
    # sqrt(3 * (1/3) / fan_in) = 1 / sqrt(fan_in)
    "kaiming_uniform_a_sqrt5": nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
    "lecun_normal": nn.initializers.lecun_normal(),
    "he_normal": nn.initializers.he_normal(),
}


def fan_in_uniform(fan_in: int) -> Callable:
    """PyTorch's Linear bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in)). A bias initialiser
    never sees the kernel's shape, so the fan-in is closed over."""
    bound = 1 / math.sqrt(fan_in)

    def init(key, shape, dtype=DTYPE):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def bias_init(knobs: Knobs, fan_in: int) -> Callable:
    return fan_in_uniform(fan_in) if knobs.bias_init == "fan_in_uniform" else nn.initializers.zeros_init()


def explicit_padding(x: jax.Array, kernel: int, stride: int, mode: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """((top, bottom), (left, right)) for this input's actual height and width."""
    return conv_padding(x.shape[1], kernel, stride, mode), conv_padding(x.shape[2], kernel, stride, mode)


# -- layers -------------------------------------------------------------------------------


class BatchNorm(nn.BatchNorm):
    """nn.BatchNorm with a choice of running-variance estimator.

    Flax stores the biased (/N) batch variance in `batch_stats/var`, as Keras 3 does;
    PyTorch stores the unbiased (/(N-1)) one. For `running_var="unbiased"`, Flax's own
    update  var <- m var + (1-m) biased  is corrected in place by (1-m) (unbiased - biased)
    = (1-m) biased (N/(N-1) - 1), so the stored value is m var + (1-m) unbiased. The
    normalisation itself always uses the biased batch variance, as in every framework.
    """

    running_var: str = "biased"

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        y = super().__call__(x, use_running_average)
        if self.running_var == "unbiased" and not use_running_average and not self.is_initializing():
            n = x.size // x.shape[-1]
            biased = jnp.var(x, axis=tuple(range(x.ndim - 1)))  # two-pass, as Flax's with use_fast_variance=False
            var = self.get_variable("batch_stats", "var")
            self.put_variable("batch_stats", "var", var + (1 - self.momentum) * biased * (n / (n - 1) - 1))
        return y


def conv(x: jax.Array, features: int, stride: int, spec: ModelSpec, knobs: Knobs, name: str) -> jax.Array:
    k = spec.conv_kernel
    return nn.Conv(
        features,
        (k, k),
        strides=(stride, stride),
        padding=explicit_padding(x, k, stride, knobs.stride2_padding),
        use_bias=False,  # a bias before BatchNorm has an analytically zero gradient
        kernel_init=KERNEL_INITS[knobs.kernel_init],
        dtype=DTYPE,
        param_dtype=DTYPE,
        precision=PRECISION,
        name=name,
    )(x)


def dense(x: jax.Array, features: int, knobs: Knobs, name: str) -> jax.Array:
    return nn.Dense(
        features,
        kernel_init=KERNEL_INITS[knobs.kernel_init],
        bias_init=bias_init(knobs, x.shape[-1]),
        dtype=DTYPE,
        param_dtype=DTYPE,
        precision=PRECISION,
        name=name,
    )(x)


def batch_norm(x: jax.Array, train: bool, knobs: Knobs, name: str) -> jax.Array:
    return BatchNorm(
        use_running_average=not train,
        momentum=knobs.bn_momentum,  # weight of the old value, as in Keras
        epsilon=knobs.bn_epsilon,
        # Flax's default E[x^2] - E[x]^2 cancels badly when |mean| >> std; the two-pass
        # E[(x - mean)^2] is what Keras and PyTorch compute, so they agree to round-off.
        use_fast_variance=False,
        scale_init=nn.initializers.ones_init(),
        bias_init=nn.initializers.zeros_init(),
        dtype=DTYPE,
        param_dtype=DTYPE,
        running_var=knobs.bn_running_var,
        name=name,
    )(x)


def bn_relu(x: jax.Array, train: bool, knobs: Knobs, name: str) -> jax.Array:
    if knobs.bn_relu_order == "bn_relu":
        return nn.relu(batch_norm(x, train, knobs, name))
    return batch_norm(nn.relu(x), train, knobs, name)


# -- blocks ---------------------------------------------------------------------------------


class GaborConv(nn.Module):
    """The fixed bank, held in the 'constants' collection: not a param, so neither
    gradients nor the optimiser ever see it."""

    gabor: GaborSpec
    normalization: str
    padding_mode: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        bank = self.variable("constants", "kernel", lambda: jnp.asarray(gabor_bank(self.gabor, self.normalization))).value
        k = bank.shape[0]
        return jax.lax.conv_general_dilated(
            x,
            bank,
            window_strides=(1, 1),
            padding=explicit_padding(x, k, 1, self.padding_mode),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=PRECISION,
        )


class ConvBNReLU(nn.Module):
    """stem, down1, down2: conv -> BN -> ReLU (or conv -> ReLU -> BN)."""

    features: int
    stride: int
    spec: ModelSpec
    knobs: Knobs

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        h = conv(x, self.features, self.stride, self.spec, self.knobs, "conv")
        return bn_relu(h, train, self.knobs, "bn")


class SqueezeExcite(nn.Module):
    """A per-channel gate in (0, 1) from the globally pooled residual branch."""

    width: int
    knobs: Knobs

    @nn.compact
    def __call__(self, r: jax.Array) -> jax.Array:
        squeezed = r.mean(axis=(1, 2))
        z = nn.relu(dense(squeezed, self.width, self.knobs, "reduce"))
        return nn.sigmoid(dense(z, r.shape[-1], self.knobs, "expand"))


class ResidualBlock(nn.Module):
    """conv-BN-ReLU, conv-BN, [SE gate], + x, ReLU. Returns (output, gate or None)."""

    features: int
    spec: ModelSpec
    knobs: Knobs
    se_width: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array | None]:
        r = bn_relu(conv(x, self.features, 1, self.spec, self.knobs, "conv1"), train, self.knobs, "bn1")
        r = batch_norm(conv(r, self.features, 1, self.spec, self.knobs, "conv2"), train, self.knobs, "bn2")
        gate = None
        if self.se_width:
            gate = SqueezeExcite(self.se_width, self.knobs, name="se")(r)
            r = r * gate[:, None, None, :]
        return nn.relu(x + r), gate


# -- the network ------------------------------------------------------------------------------


class Net(nn.Module):
    spec: ModelSpec
    knobs: Knobs

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
        s, k = self.spec, self.knobs
        acts = {"input": x}
        h = acts["gabor"] = GaborConv(s.gabor, k.gabor_normalization, k.stride2_padding, name="gabor")(x)
        h = acts["stem"] = ConvBNReLU(s.stem_width, 1, s, k, name="stem")(h, train)
        h = acts["down1"] = ConvBNReLU(s.stage1_width, 2, s, k, name="down1")(h, train)
        h = acts["block1"] = ResidualBlock(s.stage1_width, s, k, name="block1")(h, train)[0]
        h = acts["down2"] = ConvBNReLU(s.stage2_width, 2, s, k, name="down2")(h, train)
        h, acts["block2.se_gate"] = ResidualBlock(s.stage2_width, s, k, se_width=s.se_width, name="block2")(h, train)
        acts["block2"] = h
        h = acts["pool"] = h.mean(axis=(1, 2))
        acts["logits"] = dense(h, s.num_classes, k, "head")
        return acts
