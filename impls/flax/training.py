"""Full training in JAX/Flax, the way Flax's examples write it: a jitted train step over
(variables, optax state, batch), the adapter's optax Adam (epsilon knobs honoured), and
`optax.contrib.reduce_on_plateau` fed the validation loss once per epoch; checkpoints are
written with orbax.

The plateau transformation is used as the chain `adam -> reduce_on_plateau` uses it: it
multiplies Adam's updates by its `scale`. Its state is advanced once per epoch with the
validation loss (its `value`), not once per training step, so it counts epochs as the
Keras callback and the PyTorch scheduler do.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from arbiter.data import Dataset
from arbiter.train import (
    EpochRecord,
    Progress,
    TrainConfig,
    best_dir,
    epoch_plan,
    is_better,
    latest_epoch,
    new_history_state,
    replace_dir,
    save_epoch,
    steps_per_epoch,
)
from impls.base import Model

from . import pipeline
from .adapter import adam_moments, cross_entropy, placed_epsilon, plateau_transformation

CHECKPOINT = "orbax"


def set_determinism(seed: int) -> dict:
    """XLA on CPU runs a fixed compiled program deterministically; every random draw is
    an explicit jax.random key derived from the seed. Returned for the ledger."""
    return {
        "jax.random.key": seed,
        "XLA CPU": "deterministic for a fixed compiled program",
        "XLA_FLAGS(gpu)": "--xla_gpu_deterministic_ops=true (set by impls.flax.adapter)",
    }


def _is_head(path) -> bool:
    return getattr(path[0], "key", None) == "head"


def make_train_step(net, tx: optax.GradientTransformation, config: TrainConfig):
    """(variables, opt_state, scale, x, y) -> (variables, opt_state, loss, correct)."""
    knobs, frozen = config.knobs, config.freeze_all_but_head

    def loss_of(params, variables, x, y):
        if frozen:  # everything but the head in inference mode, running statistics untouched
            acts = net.apply({**variables, "params": params}, x, train=False)
            stats = variables["batch_stats"]
        else:
            acts, updates = net.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
            stats = updates["batch_stats"]
        return cross_entropy(acts["logits"], y, knobs.loss), (stats, acts["logits"])

    def step(variables, opt_state, scale, x, y):
        (loss, (stats, logits)), grads = jax.value_and_grad(loss_of, has_aux=True)(variables["params"], variables, x, y)
        if frozen:
            # Adam turns an all-zero gradient into an all-zero update: frozen weights stay bit-exact
            grads = jax.tree_util.tree_map_with_path(lambda p, g: g if _is_head(p) else jnp.zeros_like(g), grads)
        eps = placed_epsilon(knobs.adam_epsilon, adam_moments(opt_state).count, knobs.adam_epsilon_placement)
        opt_state = opt_state._replace(hyperparams={**opt_state.hyperparams, "eps": eps})
        updates, opt_state = tx.update(grads, opt_state, variables["params"])
        updates = jax.tree.map(lambda u: scale * u, updates)  # what reduce_on_plateau does to updates
        params = optax.apply_updates(variables["params"], updates)
        correct = jnp.sum(jnp.argmax(logits, axis=-1) == y)
        return {**variables, "params": params, "batch_stats": stats}, opt_state, loss, correct

    return jax.jit(step)


def make_eval_step(net, config: TrainConfig):
    """(variables, x, y, valid) -> (loss sum, correct, probabilities) over the valid rows,
    inference mode."""

    def step(variables, x, y, valid):
        logits = net.apply(variables, x, train=False)["logits"]
        losses = jax.vmap(lambda l, t: cross_entropy(l[None], t[None], config.knobs.loss))(logits, y)
        correct = jnp.sum(jnp.where(valid, jnp.argmax(logits, axis=-1) == y, False))
        return jnp.sum(jnp.where(valid, losses, 0.0)), correct, jax.nn.softmax(logits)

    return jax.jit(step)


def _eval(adapter, model: Model, data: Dataset, split: str, config: TrainConfig):
    if "eval_step" not in model.extras:
        model.extras["eval_step"] = make_eval_step(model.net, config)
    step = model.extras["eval_step"]
    # one batch shape for every evaluation (val and test), so one compilation
    size = min(config.eval_batch_size, max(len(data.labels[s]) for s in ("val", "test")))
    total, correct, n, probs = 0.0, 0, 0, []
    with adapter._on_device():
        for x, y in pipeline.batches(data, split, config.knobs, False, config.seed, size):
            b = len(y)
            # inference mode is per example, so padding the last batch to the common size
            # changes nothing but spares a second compilation for its shape
            x, y = np.pad(x, ((0, size - b), (0, 0), (0, 0), (0, 0))), np.pad(y, (0, size - b))
            loss, c, p = step(model.state, jnp.asarray(x), jnp.asarray(y, jnp.int32), jnp.arange(size) < b)
            total += float(loss)
            correct += int(c)
            n += b
            probs.append(np.asarray(p)[:b])
    return total / n, correct / n, np.concatenate(probs)


def evaluate(adapter, model: Model, data: Dataset, split: str, config: TrainConfig) -> np.ndarray:
    """Softmax probabilities (N, classes) on `split`, in the npz order, inference mode."""
    return _eval(adapter, model, data, split, config)[2]


def _checkpointer() -> ocp.StandardCheckpointer:
    return ocp.StandardCheckpointer()


def _save(tree, folder: Path) -> None:
    ckpt = _checkpointer()
    ckpt.save(folder.resolve() / CHECKPOINT, tree)
    ckpt.wait_until_finished()
    ckpt.close()


def _restore(folder: Path, target):
    ckpt = _checkpointer()
    try:
        return ckpt.restore(folder.resolve() / CHECKPOINT, target)
    finally:
        ckpt.close()


def fit(adapter, model: Model, data: Dataset, config: TrainConfig, run_dir: Path, progress: Progress) -> list[dict]:
    """Train for config.epochs (resuming from the last epoch checkpoint in run_dir), leave
    the best-by-validation-loss variables in `model`, return the per-epoch history."""
    knobs = config.knobs
    optimizer = adapter.make_optimizer(model, config.learning_rate)
    tx, opt_state = optimizer.tx, optimizer.state
    plateau = plateau_transformation(knobs)
    with adapter._on_device():
        plateau_state = plateau.init(model.state["params"])
    plateau_update = jax.jit(plateau.update)
    train_step = make_train_step(model.net, tx, config)
    trained = lambda: {"params": model.state["params"], "batch_stats": model.state["batch_stats"]}  # noqa: E731

    state = new_history_state(config)
    start = 0
    resumed = latest_epoch(run_dir)
    if resumed is not None:
        folder, state = resumed
        restored = _restore(folder, {"model": trained(), "opt_state": opt_state, "plateau": plateau_state})
        model.state.update(restored["model"])
        opt_state, plateau_state = restored["opt_state"], restored["plateau"]
        start = state["epoch"]

    n = len(data.labels["train"])
    steps = steps_per_epoch(n, config.batch_size)
    for epoch in range(start, config.epochs):
        order, seed = epoch_plan(config, epoch, n)
        scale = plateau_state.scale
        lr = float(config.learning_rate * scale)
        progress.epoch_begin(epoch, steps, lr)
        t0 = time.perf_counter()
        total, correct, seen = 0.0, 0, 0
        variables = model.state
        with adapter._on_device():
            for step, (x, y) in enumerate(pipeline.batches(data, "train", knobs, True, seed, config.batch_size, order=order)):
                variables, opt_state, loss, c = train_step(variables, opt_state, scale, jnp.asarray(x), jnp.asarray(y, jnp.int32))
                b = len(y)
                total += float(loss) * b
                correct += int(c)
                seen += b
                progress.batch_end(step, total / seen, correct / seen)
        model.state.update(variables)
        train_seconds = time.perf_counter() - t0
        val_loss, val_acc, _ = _eval(adapter, model, data, "val", config)
        with adapter._on_device():
            _, plateau_state = plateau_update(model.state["params"], plateau_state, value=jnp.asarray(val_loss, jnp.float32))
        record = EpochRecord(epoch + 1, total / seen, correct / seen, val_loss, val_acc, lr,
                             time.perf_counter() - t0, train_seconds)
        state["history"].append(record.to_dict())
        if is_better(val_loss, state["best_val_loss"]):
            state["best_val_loss"], state["best_epoch"] = val_loss, epoch + 1
            replace_dir(best_dir(run_dir), functools.partial(_save, trained()))
        save_epoch(run_dir, epoch + 1, state,
                   functools.partial(_save, {"model": trained(), "opt_state": opt_state, "plateau": plateau_state}))
        progress.epoch_end(record)

    model.state.update(_restore(best_dir(run_dir), trained()))
    return state["history"]
