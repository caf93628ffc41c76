"""Full training in TensorFlow/Keras, the way its users write it: `model.compile` and
`model.fit` on tf.data pipelines, with Keras's own callbacks: ReduceLROnPlateau (the
adapter's, which honours the plateau knobs), ModelCheckpoint(save_best_only) on the
validation loss, and one callback of ours that writes the per-epoch checkpoint and the
ledger row. Checkpoints are Keras `.weights.h5` files, which hold the optimizer's
variables (Adam moments, iterations, learning rate) beside the model's.

`fit` is called once per epoch (`initial_epoch=e, epochs=e + 1`), a common Keras idiom
for per-epoch data: the batch order of epoch e (the harness's shared permutation, or
tf.data's shuffle seeded for that epoch) is a function of (seed, e), so a resumed run
reads exactly the batches an uninterrupted one reads. Keras's callbacks reset their
counters in `on_train_begin`; our callback, listed after them, puts back the state they
had at the end of the previous epoch (or in the checkpoint), so the plateau schedule
and the best-checkpoint rule run exactly as in one long `fit`.
"""

from __future__ import annotations

import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from arbiter.data import Dataset
from arbiter.train import (
    EpochRecord,
    Progress,
    TrainConfig,
    best_dir,
    epoch_plan,
    latest_epoch,
    new_history_state,
    save_epoch,
    steps_per_epoch,
)
from impls.base import Model

from . import pipeline
from .model import cross_entropy, make_plateau_callback

WEIGHTS = "model.weights.h5"


def set_determinism(seed: int) -> dict:
    """The switches that make a CPU run repeat bit for bit; returned for the ledger."""
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    return {
        "keras.utils.set_random_seed": seed,
        "tf.config.experimental.enable_op_determinism": True,
        "tf.data": "shuffle and flips seeded per epoch (stateless flips keyed by example)",
    }


def training_model(net: keras.Model) -> keras.Model:
    """input -> logits, sharing the layers (and variables) of the all-activations network."""
    return keras.Model(net.inputs, net.get_layer("head").output, name="gabor_cnn_logits")


def freeze_all_but_head(model: keras.Model) -> None:
    """Keras's own freezing: trainable=False layers get no gradient, and a frozen
    BatchNormalization runs in inference mode (its moving statistics stay put)."""
    for layer in model.layers:
        layer.trainable = layer.name == "head"


def compiled(adapter, model: Model, config: TrainConfig) -> keras.Model:
    """The compiled input -> logits model, cached on `model` (the optimizer is built once)."""
    if "train_model" not in model.extras:
        net = training_model(model.net)
        if config.freeze_all_but_head:
            freeze_all_but_head(net)
        optimizer = adapter.make_optimizer(model, config.learning_rate)
        kind = config.knobs.loss
        net.compile(
            optimizer=optimizer,
            loss=lambda y, logits: cross_entropy(kind, y, logits),
            metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        )
        model.extras["train_model"] = net
    return model.extras["train_model"]


class EpochCheckpoint(keras.callbacks.Callback):
    """Per-epoch checkpoint, history and ledger row; restores the Keras callbacks' state
    at every `on_train_begin`."""

    def __init__(self, config: TrainConfig, run_dir: Path, progress: Progress, state: dict,
                 plateau: keras.callbacks.ReduceLROnPlateau, best: keras.callbacks.ModelCheckpoint, steps: int):
        super().__init__()
        self.config, self.run_dir, self.progress, self.state = config, run_dir, progress, state
        self.plateau, self.best, self.steps = plateau, best, steps
        self.carry = state["framework"].get("plateau")

    def on_train_begin(self, logs=None):
        if self.carry is not None:
            self.plateau.best, self.plateau.wait, self.plateau.cooldown_counter = (
                self.carry["best"], self.carry["wait"], self.carry["cooldown_counter"])
        if self.state["best_epoch"]:
            self.best.best = self.state["best_val_loss"]

    def on_epoch_begin(self, epoch, logs=None):
        self.lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        self.best_before = self.best.best
        self.t0 = time.perf_counter()
        self.train_seconds = None
        self.progress.epoch_begin(epoch, self.steps, self.lr)

    def on_train_batch_end(self, batch, logs=None):
        self.progress.batch_end(batch, float(logs["loss"]), float(logs["accuracy"]))

    def on_test_begin(self, logs=None):
        if self.train_seconds is None:
            self.train_seconds = time.perf_counter() - self.t0

    def on_epoch_end(self, epoch, logs=None):
        record = EpochRecord(epoch + 1, float(logs["loss"]), float(logs["accuracy"]), float(logs["val_loss"]),
                             float(logs["val_accuracy"]), self.lr, time.perf_counter() - self.t0, self.train_seconds)
        self.state["history"].append(record.to_dict())
        if self.best.best is not self.best_before:  # ModelCheckpoint saved: its rule decides (float32 ops.less)
            self.state["best_val_loss"], self.state["best_epoch"] = float(self.best.best), epoch + 1
        self.carry = {"best": self.plateau.best, "wait": self.plateau.wait, "cooldown_counter": self.plateau.cooldown_counter,
                      "learning_rate": float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))}
        self.state["framework"]["plateau"] = self.carry
        save_epoch(self.run_dir, epoch + 1, self.state, lambda folder: self.model.save_weights(folder / WEIGHTS))
        self.progress.epoch_end(record)


def _ordered(data: Dataset, split: str, config: TrainConfig, train: bool = False) -> tf.data.Dataset:
    """`split` in npz order (TFDS stores examples shuffled by key hash)."""
    order = np.arange(len(data.labels[split]))
    return pipeline.make_tf_dataset(data, split, config.knobs, train, config.seed, config.eval_batch_size, order=order)


def evaluate(adapter, model: Model, data: Dataset, split: str, config: TrainConfig) -> np.ndarray:
    """Softmax probabilities (N, classes) on `split`, in the npz order, inference mode."""
    net = compiled(adapter, model, config)
    with adapter._on_device():
        logits = net.predict(_ordered(data, split, config), verbose=0)
    return np.asarray(keras.ops.convert_to_numpy(keras.ops.softmax(logits, axis=-1)), np.float64)


def fit(adapter, model: Model, data: Dataset, config: TrainConfig, run_dir: Path, progress: Progress) -> list[dict]:
    """Train for config.epochs (resuming from the last epoch checkpoint in run_dir), leave
    the best-by-validation-loss weights in `model`, return the per-epoch history."""
    net = compiled(adapter, model, config)
    state = new_history_state(config)
    start = 0
    resumed = latest_epoch(run_dir)
    if resumed is not None:
        folder, state = resumed
        net.load_weights(folder / WEIGHTS)  # model and optimizer variables
        net.optimizer.learning_rate = state["framework"]["plateau"]["learning_rate"]
        start = state["epoch"]

    plateau = make_plateau_callback(config.knobs)
    best_path = best_dir(run_dir) / WEIGHTS
    best_path.parent.mkdir(parents=True, exist_ok=True)
    best = keras.callbacks.ModelCheckpoint(best_path, monitor="val_loss", mode="min", save_best_only=True,
                                           save_weights_only=True)
    n = len(data.labels["train"])
    steps = steps_per_epoch(n, config.batch_size)
    ours = EpochCheckpoint(config, run_dir, progress, state, plateau, best, steps)
    val = _ordered(data, "val", config)
    with adapter._on_device():
        for epoch in range(start, config.epochs):
            order, seed = epoch_plan(config, epoch, n)
            train = pipeline.make_tf_dataset(data, "train", config.knobs, True, seed, config.batch_size, order=order)
            net.fit(train, validation_data=val, initial_epoch=epoch, epochs=epoch + 1, callbacks=[plateau, best, ours],
                    verbose=0, shuffle=False)
        net.load_weights(best_path)
    return state["history"]
