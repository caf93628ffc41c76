"""The Gabor-CNN as a Keras functional model, read top to bottom like `arbiter.spec`'s diagram.

One functional model returns every activation of `arbiter.spec.ACTIVATIONS` as a dict,
so the intermediates of a pass come from the same call that produces the logits.
The input has free spatial dimensions: one model serves 28, 64, 128 and 224 pixels.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers, ops

from arbiter.gabor import gabor_bank
from arbiter.knobs import Knobs
from arbiter.padding import conv_padding
from arbiter.spec import ModelSpec, bn_name, conv_shapes, conv_stride, dense_shapes

# Canonical layer <-> Keras layer name. Keras names carry '_' where canonical names carry
# '.', so a variable path reads "stem_conv/kernel" for "stem.conv.kernel".
KERAS_LAYER = {
    "gabor": "gabor",
    "stem.conv": "stem_conv",
    "stem.bn": "stem_bn",
    "down1.conv": "down1_conv",
    "down1.bn": "down1_bn",
    "block1.conv1": "block1_conv1",
    "block1.bn1": "block1_bn1",
    "block1.conv2": "block1_conv2",
    "block1.bn2": "block1_bn2",
    "down2.conv": "down2_conv",
    "down2.bn": "down2_bn",
    "block2.conv1": "block2_conv1",
    "block2.bn1": "block2_bn1",
    "block2.conv2": "block2_conv2",
    "block2.bn2": "block2_bn2",
    "block2.se.reduce": "block2_se_reduce",
    "block2.se.expand": "block2_se_expand",
    "head": "head",
}
# Canonical leaf -> Keras variable name, for BatchNormalization and for Conv2D/Dense.
BN_LEAF = {"scale": "gamma", "bias": "beta", "mean": "moving_mean", "var": "moving_variance"}
WEIGHT_LEAF = {"kernel": "kernel", "bias": "bias"}


def keras_path(canonical: str) -> str:
    """'stem.bn.scale' -> 'stem_bn/gamma': the Keras variable path of a canonical tensor."""
    layer, leaf = canonical.rsplit(".", 1)
    leaves = BN_LEAF if ".bn" in layer else WEIGHT_LEAF
    return f"{KERAS_LAYER[layer]}/{leaves[leaf]}"


def keras_variable(net: keras.Model, canonical: str) -> keras.Variable:
    layer, leaf = canonical.rsplit(".", 1)
    leaves = BN_LEAF if ".bn" in layer else WEIGHT_LEAF
    return getattr(net.get_layer(KERAS_LAYER[layer]), leaves[leaf])


# -- the network ------------------------------------------------------------------------


def build_network(spec: ModelSpec, knobs: Knobs) -> keras.Model:
    """Initialisers draw from Keras's global RNG: seed it (keras.utils.set_random_seed) first."""
    x = inputs = keras.Input(shape=(None, None, 1), name="input")
    out = {"input": inputs}
    h = out["gabor"] = gabor_conv(spec, knobs)(x)
    h = out["stem"] = conv_bn(h, "stem.conv", spec, knobs)
    h = out["down1"] = conv_bn(h, "down1.conv", spec, knobs)
    h = out["block1"] = residual_block(h, "block1", spec, knobs)
    h = out["down2"] = conv_bn(h, "down2.conv", spec, knobs)
    h, out["block2.se_gate"] = se_residual_block(h, "block2", spec, knobs)
    out["block2"] = h
    h = out["pool"] = layers.GlobalAveragePooling2D(name="pool")(h)
    out["logits"] = dense(spec.num_classes, "head", spec, knobs)(h)
    return keras.Model(inputs, out, name="gabor_cnn")


def gabor_conv(spec: ModelSpec, knobs: Knobs) -> layers.Conv2D:
    """The fixed bank: stride 1 and an odd kernel, so 'same' is k//2 on every side."""
    bank = gabor_bank(spec.gabor, knobs.gabor_normalization)
    conv = layers.Conv2D(
        bank.shape[-1], bank.shape[0], padding="same", use_bias=False, kernel_initializer="zeros", trainable=False, name="gabor"
    )
    conv.build((None, None, None, 1))
    conv.kernel.assign(bank)
    return conv


def residual_block(x, name: str, spec: ModelSpec, knobs: Knobs):
    r = conv_bn(x, f"{name}.conv1", spec, knobs)
    r = conv_bn(r, f"{name}.conv2", spec, knobs, relu=False)
    return layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([x, r]))


def se_residual_block(x, name: str, spec: ModelSpec, knobs: Knobs):
    r = conv_bn(x, f"{name}.conv1", spec, knobs)
    r = conv_bn(r, f"{name}.conv2", spec, knobs, relu=False)
    gate = se_gate(r, f"{name}.se", spec, knobs)
    # (N, C) -> (N, 1, 1, C): broadcasting (N, C) against NHWC would align C with W.
    r = layers.Multiply(name=f"{name}_se_scale")([r, layers.Reshape((1, 1, gate.shape[-1]), name=f"{name}_se_bcast")(gate)])
    return layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([x, r])), gate


def se_gate(r, name: str, spec: ModelSpec, knobs: Knobs):
    z = layers.GlobalAveragePooling2D(name=name.replace(".", "_") + "_squeeze")(r)
    z = dense(spec.se_width, f"{name}.reduce", spec, knobs, activation="relu")(z)
    return dense(spec.stage2_width, f"{name}.expand", spec, knobs, activation="sigmoid")(z)


def conv_bn(x, conv: str, spec: ModelSpec, knobs: Knobs, relu: bool = True):
    """conv -> BN -> ReLU, or conv -> ReLU -> BN under bn_relu_order='relu_bn'; a BN with
    no ReLU after it is the same under both."""
    h = conv2d(x, conv, spec, knobs)
    bn = batch_norm(bn_name(conv), knobs)
    if not relu:
        return bn(h)
    act = layers.ReLU(name=KERAS_LAYER[conv] + "_relu")
    return act(bn(h)) if knobs.bn_relu_order == "bn_relu" else bn(act(h))


def conv2d(x, conv: str, spec: ModelSpec, knobs: Knobs):
    k, _, _, filters = conv_shapes(spec)[conv]
    stride = conv_stride(conv)
    padding = "same"  # stride 1, odd k: k//2 on both sides under either knob value
    if stride == 2 and knobs.stride2_padding == "symmetric":
        # The PyTorch-port grid: pad explicitly, then a 'valid' conv. (tf_same is Keras's
        # own padding="same": TF 'SAME', odd pixel bottom/right, which conv_padding's
        # tf_same split reproduces; the tests pin the two against each other.)
        pads = (conv_padding(x.shape[1], k, stride, "symmetric"), conv_padding(x.shape[2], k, stride, "symmetric"))
        x = layers.ZeroPadding2D(pads, name=KERAS_LAYER[conv] + "_pad")(x)
        padding = "valid"
    return layers.Conv2D(
        filters,
        k,
        strides=stride,
        padding=padding,
        use_bias=False,  # a bias before BN has an analytically zero gradient
        kernel_initializer=kernel_initializer(knobs.kernel_init),
        name=KERAS_LAYER[conv],
    )(x)


def dense(units: int, name: str, spec: ModelSpec, knobs: Knobs, activation=None) -> layers.Dense:
    fan_in = dense_shapes(spec)[name][0]
    return layers.Dense(
        units,
        activation=activation,
        kernel_initializer=kernel_initializer(knobs.kernel_init),
        bias_initializer=bias_initializer(knobs.bias_init, fan_in),
        name=KERAS_LAYER[name],
    )


def batch_norm(name: str, knobs: Knobs) -> layers.BatchNormalization:
    # Keras's momentum is the weight of the OLD statistic, the knob's convention.
    cls = UnbiasedVarianceBatchNormalization if knobs.bn_running_var == "unbiased" else layers.BatchNormalization
    return cls(momentum=knobs.bn_momentum, epsilon=knobs.bn_epsilon, name=KERAS_LAYER[name])


# -- knob-driven components ------------------------------------------------------------


def kernel_initializer(name: str) -> keras.initializers.Initializer:
    """Keras's own initialisers. Keras fans match PyTorch's for conv (kh*kw*in) and
    dense (in). Keras's HeNormal and LecunNormal draw from a truncated normal."""
    if name == "glorot_uniform":
        return keras.initializers.GlorotUniform()
    if name == "kaiming_uniform_a_sqrt5":
        # PyTorch's default kaiming_uniform_(a=sqrt(5)): bound sqrt(6/((1+a^2) fan_in))
        # = 1/sqrt(fan_in) = sqrt(3 * scale / fan_in) with scale 1/3.
        return keras.initializers.VarianceScaling(scale=1 / 3, mode="fan_in", distribution="uniform")
    if name == "lecun_normal":
        return keras.initializers.LecunNormal()
    if name == "he_normal":
        return keras.initializers.HeNormal()
    raise ValueError(f"unknown kernel_init {name!r}")


def bias_initializer(name: str, fan_in: int) -> keras.initializers.Initializer:
    if name == "zeros":
        return keras.initializers.Zeros()
    if name == "fan_in_uniform":
        bound = 1 / np.sqrt(fan_in)
        return keras.initializers.RandomUniform(-bound, bound)
    raise ValueError(f"unknown bias_init {name!r}")


@keras.saving.register_keras_serializable(package="arbiter")
class UnbiasedVarianceBatchNormalization(layers.BatchNormalization):
    """Keras BN whose moving variance takes the UNBIASED batch variance (n/(n-1) times the
    biased one, PyTorch's convention); the batch is still normalised with the biased
    variance. Keras 3 has no switch for it (tf_keras 2's fused BN did this), so the
    training branch of `call` is restated with that one factor; inference is Keras's."""

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable) or mask is not None or self.renorm:
            return super().call(inputs, training=training, mask=mask)
        inputs = ops.cast(inputs, "float32")
        mean, variance = self._moments(inputs, mask)
        n = ops.cast(ops.size(inputs) // ops.shape(inputs)[self.axis], inputs.dtype)
        m = self.momentum
        self.moving_mean.assign(ops.cast(self.moving_mean, inputs.dtype) * m + mean * (1.0 - m))
        self.moving_variance.assign(ops.cast(self.moving_variance, inputs.dtype) * m + variance * (n / (n - 1.0)) * (1.0 - m))
        outputs = ops.batch_normalization(
            inputs, mean=mean, variance=variance, axis=self.axis, offset=self.beta, scale=self.gamma, epsilon=self.epsilon
        )
        return ops.cast(outputs, self.compute_dtype)


# -- loss and optimiser -------------------------------------------------------------------


def cross_entropy(kind: str, y, logits):
    """Mean cross-entropy under knob `loss`.

    'clipped_probs' is written out with keras.ops instead of handing softmax output to
    SparseCategoricalCrossentropy(from_logits=False): on the TensorFlow backend that loss
    finds the logits behind a Keras softmax (`_keras_logits`, eager and graph alike; or a
    raw tf Softmax op in graph mode) and silently computes the unclipped from-logits loss;
    on a plain probability tensor it clips but then takes a log-softmax of log(p), adding
    log(sum(clip(p))). The knob means exactly: softmax, renormalise, clip, -log p[y].
    """
    if kind == "logits":
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits)
    if kind == "clipped_probs":
        eps = keras.config.epsilon()  # 1e-7, the clip Keras applies
        p = ops.softmax(logits, axis=-1)
        p = p / ops.sum(p, axis=-1, keepdims=True)
        p = ops.clip(p, eps, 1.0 - eps)
        picked = ops.take_along_axis(ops.log(p), ops.expand_dims(ops.cast(y, "int32"), -1), axis=-1)
        return -ops.mean(picked)
    raise ValueError(f"unknown loss {kind!r}")


@keras.saving.register_keras_serializable(package="arbiter")
class CorrectedEpsilonAdam(keras.optimizers.Adam):
    """Keras's Adam with epsilon added to the bias-CORRECTED sqrt(v_hat) (PyTorch, optax).

    Keras updates p -= lr * sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps), i.e. eps sits on
    the uncorrected sqrt(v): in corrected terms it is eps / sqrt(1-b2^t). Running Keras's
    own update with eps_t = eps * sqrt(1-b2^t) gives m_hat / (sqrt(v_hat) + eps) exactly
    in real arithmetic; nothing else in the update changes.
    """

    def update_step(self, gradient, variable, learning_rate):
        eps = self.epsilon
        t = ops.cast(self.iterations + 1, variable.dtype)
        self.epsilon = eps * ops.sqrt(1 - ops.power(ops.cast(self.beta_2, variable.dtype), t))
        try:
            super().update_step(gradient, variable, learning_rate)
        finally:
            self.epsilon = eps


def make_adam(learning_rate: float, knobs: Knobs) -> keras.optimizers.Adam:
    cls = CorrectedEpsilonAdam if knobs.adam_epsilon_placement == "corrected" else keras.optimizers.Adam
    return cls(learning_rate=learning_rate, beta_1=0.9, beta_2=0.999, epsilon=knobs.adam_epsilon)


# -- ReduceLROnPlateau ---------------------------------------------------------------------


class RelativeReduceLROnPlateau(keras.callbacks.ReduceLROnPlateau):
    """Keras's callback with PyTorch's/optax's relative improvement test,
    current < best * (1 - min_delta), in place of Keras's current < best - min_delta.
    Keras compares through keras.ops.less, i.e. in float32; so does this."""

    def __init__(self, *, min_delta: float, **kwargs):
        super().__init__(mode="min", min_delta=0.0, **kwargs)
        self.rel_delta = min_delta

    def _is_improvement(self, monitor_value, reference_value):
        if reference_value is None:
            return True
        return self.monitor_op(monitor_value, reference_value * (1.0 - self.rel_delta))


def make_plateau_callback(knobs: Knobs) -> keras.callbacks.ReduceLROnPlateau:
    """Keras reduces once `wait >= patience`; PyTorch once num_bad_epochs > patience, one
    epoch later: 'torch' counting is Keras's callback with patience + 1. Cooldown keeps
    Keras's semantics (the reference for all three frameworks): the epoch that ends the
    cooldown already counts, so cooldown=c suppresses counting for c - 1 epochs after a
    reduction (PyTorch's scheduler suppresses c)."""
    patience = knobs.plateau_patience + (1 if knobs.plateau_counting == "torch" else 0)
    common = dict(monitor="val_loss", factor=knobs.plateau_factor, patience=patience, cooldown=knobs.plateau_cooldown, min_lr=0.0)
    if knobs.plateau_threshold_mode == "rel":
        return RelativeReduceLROnPlateau(min_delta=knobs.plateau_min_delta, **common)
    return keras.callbacks.ReduceLROnPlateau(mode="min", min_delta=knobs.plateau_min_delta, **common)
