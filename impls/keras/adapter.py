"""The TensorFlow/Keras side of the `impls.base.Adapter` door.

Native Keras 3 behaviours the knobs move away from, and how:
* BatchNorm stores the BIASED batch variance: 'unbiased' uses
  `model.UnbiasedVarianceBatchNormalization`. Its momentum already weighs the old value.
* Adam adds eps to the UNcorrected sqrt(v): 'corrected' uses `model.CorrectedEpsilonAdam`
  (a per-step eps).
* ReduceLROnPlateau (the callback) reduces once `wait >= patience`, improvement means
  `current < best - min_delta` compared in float32, and the epoch that ends a cooldown
  already counts. 'torch' counting is patience + 1; 'rel' thresholds use
  `model.RelativeReduceLROnPlateau`. Keras's semantics are the cross-framework reference.
  The callback reads and writes the learning rate through the optimizer's float32
  variable, so the returned rates are float32 values (1e-3 * 0.1 -> 1.0000000474974513e-04).
* SparseCategoricalCrossentropy(from_logits=False) on a Keras softmax output never clips
  on the TF backend (see `model.cross_entropy`): 'clipped_probs' is written out.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Sequence

import keras
import numpy as np
import tensorflow as tf

from arbiter.data import Dataset
from arbiter.knobs import Knobs
from arbiter.spec import ACTIVATIONS, ModelSpec, is_trainable, weight_shapes
from arbiter.weights import check_weights
from impls import base

from . import pipeline
from .model import build_network, cross_entropy, keras_path, keras_variable, make_adam, make_plateau_callback

if keras.backend.backend() != "tensorflow":  # keras imported before impls.keras could pin it
    raise base.FrameworkUnavailable(f"keras runs on the {keras.backend.backend()!r} backend; set KERAS_BACKEND=tensorflow")


class Adapter(base.Adapter):
    name = "tf"
    display_name = "TensorFlow/Keras"

    def __init__(self, device: str = "auto"):
        super().__init__(device)
        gpus = tf.config.list_physical_devices("GPU")
        if device == "gpu" and not gpus:
            raise base.DeviceUnavailable("TensorFlow sees no GPU (tf.config.list_physical_devices('GPU') is empty)")
        if device == "cpu" and gpus:
            try:
                tf.config.set_visible_devices([], "GPU")
            except RuntimeError:  # the runtime already started: pin ops by scope instead
                pass
        self.device = "/GPU:0" if device != "cpu" and gpus else "/CPU:0"
        tf.config.experimental.enable_tensor_float_32_execution(False)
        tf.config.experimental.enable_op_determinism()

    @contextlib.contextmanager
    def _on_device(self) -> Iterator[None]:
        with tf.device(self.device):
            yield

    # -- environment ------------------------------------------------------------------
    def environment(self) -> dict[str, Any]:
        import tensorflow_datasets as tfds

        onednn_env = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
        # oneDNN is on by default on x86 Linux builds; TF_ENABLE_ONEDNN_OPTS=0 switches it off
        onednn = "off" if onednn_env == "0" else "on" if _built_with_onednn() else "not built in"
        if self.device.startswith("/GPU"):
            details = tf.config.experimental.get_device_details(tf.config.list_physical_devices("GPU")[0])
            device = f"GPU ({details.get('device_name', 'unknown')}, compute capability {details.get('compute_capability')})"
        else:
            device = "CPU"
        return {
            "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "tensorflow-datasets": tfds.__version__, "numpy": np.__version__},
            "device": device,
            "precision": "float32; TensorFloat-32 off (tf.config.experimental.enable_tensor_float_32_execution(False))",
            "determinism": (
                "keras.utils.set_random_seed(seed) at build; tf.config.experimental.enable_op_determinism(); "
                f"oneDNN {onednn} (TF_ENABLE_ONEDNN_OPTS={onednn_env if onednn_env is not None else 'unset'})"
            ),
        }

    # -- model --------------------------------------------------------------------------
    def build(self, spec: ModelSpec, knobs: Knobs, seed: int) -> base.Model:
        keras.utils.set_random_seed(seed)
        with self._on_device():
            net = build_network(spec, knobs)
        return base.Model(spec=spec, knobs=knobs, net=net, extras={"canonical": canonical_names(spec)})

    def parameter_count(self, model: base.Model) -> int:
        # Keras decides what is trainable: the Gabor layer and the BN moving statistics are not
        return int(sum(np.prod(v.shape) for v in model.net.trainable_weights))

    def export_weights(self, model: base.Model) -> dict[str, np.ndarray]:
        return {name: np.array(keras_variable(model.net, name).value.numpy(), dtype=np.float32) for name in weight_shapes(model.spec)}

    def import_weights(self, model: base.Model, weights: dict[str, np.ndarray]) -> None:
        check_weights(weights, model.spec)
        shapes = weight_shapes(model.spec)
        for name in shapes:
            keras_variable(model.net, name).assign(np.asarray(weights[name], dtype=np.float32))

    def gabor_kernel(self, model: base.Model) -> np.ndarray:
        return np.array(model.net.get_layer("gabor").kernel.value.numpy())

    # -- input pipeline -------------------------------------------------------------------
    def preprocess(self, data: Dataset, split: str, indices: np.ndarray, knobs: Knobs, train: bool, seed: int) -> np.ndarray:
        with self._on_device():
            return pipeline.preprocess(data, split, indices, knobs, train, seed)

    # -- numerics -------------------------------------------------------------------------
    def forward(self, model: base.Model, x: np.ndarray, train: bool) -> dict[str, np.ndarray]:
        fn = _compiled(model, "forward", lambda: compiled_forward(model.net))
        with self._on_device():
            outputs = fn(tf.constant(x, tf.float32), bool(train))
        return {name: outputs[name].numpy() for name in ACTIVATIONS}

    def loss_and_grads(self, model: base.Model, x: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        fn = _compiled(model, "loss_and_grads", lambda: compiled_loss_and_grads(model.net, model.knobs.loss))
        with self._on_device():
            loss, grads = fn(tf.constant(x, tf.float32), tf.constant(y, tf.int64))
        names = model.extras["canonical"]
        return float(loss), {names[v.path]: g.numpy() for v, g in zip(model.net.trainable_variables, grads)}

    def make_optimizer(self, model: base.Model, learning_rate: float) -> Any:
        with self._on_device():
            optimizer = make_adam(learning_rate, model.knobs)
            optimizer.build(model.net.trainable_variables)  # before any tf.function traces it
        return optimizer

    def train_step(self, model: base.Model, optimizer: Any, x: np.ndarray, y: np.ndarray) -> float:
        # keyed by the optimizer object itself (kept alive here), not by a reusable id()
        steps = model.extras.setdefault("train_steps", [])
        step = next((fn for opt, fn in steps if opt is optimizer), None)
        if step is None:
            step = compiled_train_step(model.net, optimizer, model.knobs.loss)
            steps.append((optimizer, step))
        with self._on_device():
            loss = step(tf.constant(x, tf.float32), tf.constant(y, tf.int64))
        return float(loss)

    def optimizer_state(self, optimizer: Any) -> dict[str, np.ndarray]:
        state: dict[str, Any] = {}
        for var in optimizer._trainable_variables:
            name = _canonical_from_path(var.path)
            index = optimizer._get_variable_index(var)
            state[f"m/{name}"] = np.array(optimizer._momentums[index].value.numpy())
            state[f"v/{name}"] = np.array(optimizer._velocities[index].value.numpy())
        state["step"] = int(optimizer.iterations.value.numpy())
        return state

    def plateau_schedule(self, val_losses: Sequence[float], learning_rate: float, knobs: Knobs) -> list[float]:
        """Keras's ReduceLROnPlateau driven by hand, as fit() would: on_train_begin, then
        on_epoch_end with {'val_loss': v} per epoch; reads back the optimizer's rate."""
        callback = make_plateau_callback(knobs)
        callback.set_model(_optimizer_holder(learning_rate))
        callback.on_train_begin()
        rates = []
        for epoch, loss in enumerate(val_losses):
            callback.on_epoch_end(epoch, {"val_loss": float(loss)})
            rates.append(float(callback.model.optimizer.learning_rate.value.numpy()))
        return rates


# -- helpers --------------------------------------------------------------------------------


def canonical_names(spec: ModelSpec) -> dict[str, str]:
    """Keras variable path -> canonical name, for every trainable tensor."""
    return {keras_path(name): name for name in weight_shapes(spec) if is_trainable(name)}


def _canonical_from_path(path: str) -> str:
    return canonical_names(ModelSpec())[path]  # names do not depend on the widths


def _values(variables) -> list[tf.Tensor]:
    """Snapshots of variables: what the stateless call and the tape see."""
    return [tf.identity(v.value) for v in variables]


# forward, loss_and_grads and train_step all run as tf.function graphs: the same graph
# optimisations (grappler, oneDNN fusions) in all three, so the gradients train_step
# applies are those loss_and_grads reports (eager and graph differ by ~1e-6 relative).


def _compiled(model: base.Model, key: str, make):
    fns = model.extras.setdefault("compiled", {})
    if key not in fns:
        fns[key] = make()
    return fns[key]


def _stateless_forward(net: keras.Model, trainable: list, x: tf.Tensor, train) -> dict:
    """Keras 3's pure call: BN's moving-statistic updates land in the returned
    non-trainable values, which are dropped, never in the model's variables."""
    non_trainable = _values(net.non_trainable_variables)
    outputs, _ = net.stateless_call(trainable, non_trainable, x, training=train)
    return outputs


def compiled_forward(net: keras.Model):
    @tf.function(reduce_retracing=True)
    def forward(x, train: bool):  # a Python bool: one graph per mode
        return _stateless_forward(net, _values(net.trainable_variables), x, train)

    return forward


def compiled_loss_and_grads(net: keras.Model, loss_kind: str):
    @tf.function(reduce_retracing=True)
    def loss_and_grads(x, y):
        trainable = _values(net.trainable_variables)
        with tf.GradientTape() as tape:
            tape.watch(trainable)
            outputs = _stateless_forward(net, trainable, x, True)
            loss = cross_entropy(loss_kind, y, outputs["logits"])
        return loss, tape.gradient(loss, trainable)

    return loss_and_grads


def compiled_train_step(net: keras.Model, optimizer: keras.optimizers.Optimizer, loss_kind: str):
    """A Keras custom training step: train-mode call (moves BN's moving statistics),
    loss, tape gradients, optimizer.apply. One graph per (model, optimizer)."""

    @tf.function(reduce_retracing=True)
    def step(x, y):
        with tf.GradientTape() as tape:
            outputs = net(x, training=True)
            loss = cross_entropy(loss_kind, y, outputs["logits"])
        grads = tape.gradient(loss, net.trainable_variables)
        optimizer.apply(grads, net.trainable_variables)
        return loss

    return step


def _optimizer_holder(learning_rate: float) -> keras.Model:
    """The smallest model the callback can be set on: it only reads model.optimizer."""
    holder = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    holder.compile(optimizer=keras.optimizers.Adam(learning_rate=learning_rate))
    return holder


def _built_with_onednn() -> bool:
    try:
        from tensorflow.python.util import _pywrap_util_port

        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return False
