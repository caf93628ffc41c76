"""The JAX/Flax/optax implementation behind `impls.base.Adapter`.

Pure functions in the style of Flax's examples: `forward`, `loss_and_grads` and
`train_step` are jitted functions of (variables, optimiser state, batch) that return new
values; the only mutation is the adapter storing those results back in `Model.state`
(`{"params", "batch_stats", "constants"}`) and `FlaxOptimizer.state`.

Canonical names map onto the variable tree by splitting on '.': `stem.bn.var` is
`batch_stats/stem/bn/var`, every other name lives under `params`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

# Must be in the environment before the GPU backend starts (ignored on CPU).
if "--xla_gpu_deterministic_ops" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_deterministic_ops=true").strip()

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib

from arbiter.data import Dataset
from arbiter.knobs import Knobs, KnobNotSupported
from arbiter.spec import ModelSpec, is_trainable, weight_shapes
from arbiter.weights import check_weights
from impls import base
from impls.flax import pipeline
from impls.flax.model import Net

B1, B2 = 0.9, 0.999
CLIP = 1e-7  # Keras' backend.epsilon(), the clip of from_logits=False cross-entropy


# -- canonical names <-> the variable tree -------------------------------------------------


def collection(name: str) -> str:
    return "params" if is_trainable(name) else "batch_stats"


def get_path(tree: dict, name: str):
    for part in name.split("."):
        tree = tree[part]
    return tree


def with_path(tree: dict, name: str, value) -> dict:
    """A copy of nested dict `tree` with leaf `name` replaced (the original is untouched)."""
    head, _, rest = name.partition(".")
    return {**tree, head: with_path(tree[head], rest, value) if rest else value}


def canonical_names(tree: dict, prefix: str = "") -> list[str]:
    names = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        names.extend(canonical_names(value, path + ".") if isinstance(value, dict) else [path])
    return names


def to_canonical(tree: dict) -> dict[str, np.ndarray]:
    """Flatten a params-shaped tree (params, grads, Adam moments) to canonical names."""
    return {name: np.array(get_path(tree, name), np.float32) for name in canonical_names(tree)}


# -- loss ------------------------------------------------------------------------------------


def cross_entropy(logits: jax.Array, labels: jax.Array, kind: str) -> jax.Array:
    if kind == "logits":
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    # Keras' from_logits=False path behind a softmax output layer: renormalise, clip, log
    p = jax.nn.softmax(logits)
    p = p / p.sum(axis=-1, keepdims=True)
    p = jnp.clip(p, CLIP, 1 - CLIP)
    return -jnp.log(jnp.take_along_axis(p, labels[:, None], axis=-1)[:, 0]).mean()


# -- Adam --------------------------------------------------------------------------------------


def adam(learning_rate: float, knobs: Knobs) -> optax.GradientTransformation:
    """optax.adam with its epsilon (and learning rate) exposed as per-step
    hyperparameters (see `adam_update`). b1 and b2 stay Python floats, as in plain
    optax.adam: injected, they would become float32 arrays and 1 - b2 would lose
    1.3e-5 of its value (float32(0.999) = 0.99900001)."""
    tx = optax.inject_hyperparams(optax.adam, static_args=("b1", "b2"))
    return tx(learning_rate=learning_rate, b1=B1, b2=B2, eps=knobs.adam_epsilon)


def adam_moments(opt_state) -> optax.ScaleByAdamState:
    is_adam = lambda s: isinstance(s, optax.ScaleByAdamState)  # noqa: E731
    (state,) = [s for s in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(s)]
    return state


def placed_epsilon(eps: float, count: jax.Array, placement: str) -> jax.Array:
    """optax adds eps to sqrt(v_hat) ('corrected'). Keras adds it to sqrt(v) before the
    bias correction: lr sqrt(1-b2^t)/(1-b1^t) m / (sqrt(v) + eps), which is exactly
    lr m_hat / (sqrt(v_hat) + eps / sqrt(1-b2^t)). So 'uncorrected' is optax's own Adam
    with eps_t = eps / sqrt(1 - b2^t), where 1 - b2^t is computed as optax computes
    it in its bias correction (float32, 1 - b2**t): the identity then holds exactly in
    real arithmetic, and only float32 round-off separates it from Keras."""
    if placement == "corrected":
        return jnp.asarray(eps, jnp.float32)
    t = count + 1
    return eps / jnp.sqrt(1 - jnp.asarray(B2, jnp.float32) ** t)


def adam_update(tx: optax.GradientTransformation, opt_state, grads, params, knobs: Knobs):
    """One Adam step: (new params, new optimiser state). Pure, jittable."""
    eps = placed_epsilon(knobs.adam_epsilon, adam_moments(opt_state).count, knobs.adam_epsilon_placement)
    opt_state = opt_state._replace(hyperparams={**opt_state.hyperparams, "eps": eps})
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


@dataclass
class FlaxOptimizer:
    """The optax transformation and its state: the harness's optimiser object."""

    tx: optax.GradientTransformation
    state: Any
    step: Callable  # the jitted train step bound to this model's network and knobs


# -- pure, jittable steps ---------------------------------------------------------------------


def forward_fn(net: Net, variables: dict, x: jax.Array, train: bool) -> dict[str, jax.Array]:
    if train:
        # batch statistics are computed; their running update is returned and dropped
        acts, _ = net.apply(variables, x, train=True, mutable=["batch_stats"])
        return acts
    return net.apply(variables, x, train=False)


def loss_fn(net: Net, params: dict, variables: dict, x: jax.Array, y: jax.Array):
    acts, updates = net.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
    return cross_entropy(acts["logits"], y, net.knobs.loss), updates["batch_stats"]


def loss_and_grads_fn(net: Net, variables: dict, x: jax.Array, y: jax.Array):
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, net), has_aux=True)
    (loss, _), grads = grad_fn(variables["params"], variables, x, y)
    return loss, grads


def train_step_fn(net: Net, tx: optax.GradientTransformation, variables: dict, opt_state, x: jax.Array, y: jax.Array):
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, net), has_aux=True)
    (loss, batch_stats), grads = grad_fn(variables["params"], variables, x, y)
    params, opt_state = adam_update(tx, opt_state, grads, variables["params"], net.knobs)
    return loss, {**variables, "params": params, "batch_stats": batch_stats}, opt_state


# -- ReduceLROnPlateau -------------------------------------------------------------------------


def plateau_transformation(knobs: Knobs) -> optax.GradientTransformationExtraArgs:
    """optax.contrib.reduce_on_plateau set up to follow the Keras callback, the reference
    for the cross-framework lr sequence.

    What optax does natively, and how each knob maps onto it:
    * improvement iff  value < (1 - rtol) best - atol : 'abs' is rtol=0, atol=min_delta
      (Keras), 'rel' is rtol=min_delta, atol=0 (PyTorch). optax rejects rtol = atol = 0,
      so min_delta=0 passes atol = the smallest normal float32: best - 1.2e-38 rounds to
      best for any loss above ~1e-31, which is Keras' plain current < best.
    * reduces when the bad-epoch count == patience, then restarts the count: Keras'
      "reaches patience" for patience >= 1. optax's patience=0 would reduce on IMPROVING
      epochs (count 0); Keras' patience 0 reduces on every bad epoch, as patience 1 does,
      so 'keras' counting passes max(patience, 1). 'torch' counting (reduce once the count
      exceeds patience) is Keras' rule with patience + 1.
    * cooldown differs: optax (like PyTorch) ignores the `cooldown` epochs after a
      reduction; Keras decrements its cooldown counter BEFORE testing it, so the epoch on
      which it reaches 0 already counts as bad, and only cooldown - 1 epochs are ignored.
      Keras' cooldown c is therefore optax's cooldown max(c - 1, 0).
    * factor: optax needs 0 < factor < 1 (Keras also rejects factor >= 1).
    """
    if not 0 < knobs.plateau_factor < 1:
        raise KnobNotSupported("flax", "plateau_factor", knobs.plateau_factor, "optax.contrib.reduce_on_plateau needs 0 < factor < 1")
    if knobs.plateau_threshold_mode == "rel" and knobs.plateau_min_delta > 1:
        raise KnobNotSupported("flax", "plateau_min_delta", knobs.plateau_min_delta, "optax needs a relative tolerance <= 1")
    delta = knobs.plateau_min_delta or float(np.finfo(np.float32).tiny)
    rtol, atol = (delta, 0.0) if knobs.plateau_threshold_mode == "rel" else (0.0, delta)
    patience = knobs.plateau_patience + 1 if knobs.plateau_counting == "torch" else max(knobs.plateau_patience, 1)
    return optax.contrib.reduce_on_plateau(
        factor=knobs.plateau_factor,
        patience=patience,
        rtol=rtol,
        atol=atol,
        cooldown=max(knobs.plateau_cooldown - 1, 0),
        accumulation_size=1,  # one value per epoch
        min_scale=0.0,
    )


def plateau_scales(tx: optax.GradientTransformationExtraArgs, values: Sequence[float]) -> list[float]:
    """The scale in effect after each value: one `update` per epoch, scanned in one jit."""
    dummy = jnp.zeros((), jnp.float32)

    def epoch(state, value):
        _, state = tx.update(dummy, state, value=value)
        return state, state.scale

    run = jax.jit(lambda vs: jax.lax.scan(epoch, tx.init(dummy), vs)[1])
    return [float(s) for s in np.asarray(run(jnp.asarray(values, jnp.float32)))]


# -- the adapter ---------------------------------------------------------------------------------


class Adapter(base.Adapter):
    name = "flax"
    display_name = "JAX/Flax"

    def __init__(self, device: str = "auto"):
        super().__init__(device)
        # float32 dots and convs at full precision on every backend (no TF32, no bf16 passes)
        jax.config.update("jax_default_matmul_precision", "highest")
        self.device = self._select_device(device)

    @staticmethod
    def _select_device(device: str):
        if device == "auto":
            return jax.devices()[0]
        if device == "cpu":
            return jax.devices("cpu")[0]
        try:  # 'gpu' (base.Adapter has checked the name)
            return jax.devices("gpu")[0]
        except RuntimeError:
            raise base.DeviceUnavailable("flax: --device gpu asked for, but JAX sees no GPU") from None

    def _on_device(self):
        return jax.default_device(self.device)

    def environment(self) -> dict[str, Any]:
        import jaxlib

        on_gpu = self.device.platform == "gpu"
        return {
            "versions": {
                "jax": jax.__version__,
                "jaxlib": jaxlib.__version__,
                "flax": flax.__version__,
                "optax": optax.__version__,
                "numpy": np.__version__,
            },
            "device": f"{self.device.platform}: {self.device.device_kind} ({self.device})",
            "precision": "float32 throughout; jax_default_matmul_precision=highest and Precision.HIGHEST on every conv/dense (no TF32/bf16)",
            "determinism": (
                f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}"
                if on_gpu
                else "CPU XLA: a fixed compiled program is deterministic; PRNG jax.random.key(seed)"
            ),
        }

    # -- model ---------------------------------------------------------------------------------
    def build(self, spec: ModelSpec, knobs: Knobs, seed: int) -> base.Model:
        net = Net(spec, knobs)
        x = jnp.zeros((1, spec.image_size, spec.image_size, 1), jnp.float32)
        with self._on_device():
            # eager: jitting init compiles a whole program per knob set, while eager ops
            # are compiled once per shape and reused by every later build
            variables = net.init(jax.random.key(seed), x, train=False)
        return base.Model(spec=spec, knobs=knobs, net=net, state=dict(variables))

    def parameter_count(self, model: base.Model) -> int:
        return sum(int(leaf.size) for leaf in jax.tree.leaves(model.state["params"]))

    def export_weights(self, model: base.Model) -> dict[str, np.ndarray]:
        return {
            name: np.array(get_path(model.state[collection(name)], name), np.float32)
            for name in weight_shapes(model.spec)
        }

    def import_weights(self, model: base.Model, weights: dict[str, np.ndarray]) -> None:
        check_weights(weights, model.spec)
        shapes = weight_shapes(model.spec)
        state = dict(model.state)
        with self._on_device():
            for name in shapes:
                col = collection(name)
                state[col] = with_path(state[col], name, jnp.asarray(np.asarray(weights[name], np.float32)))
        model.state.update(state)

    def gabor_kernel(self, model: base.Model) -> np.ndarray:
        return np.array(model.state["constants"]["gabor"]["kernel"], np.float32)

    # -- input pipeline ------------------------------------------------------------------------
    def preprocess(self, data: Dataset, split: str, indices: np.ndarray, knobs: Knobs, train: bool, seed: int) -> np.ndarray:
        with self._on_device():
            return pipeline.preprocess(data, split, indices, knobs, train, seed)

    # -- numerics --------------------------------------------------------------------------------
    @staticmethod
    def _jit(model: base.Model, fn: Callable, **static) -> Callable:
        """One jitted function per model and kind, kept with the model (jax.jit itself
        retraces per input shape)."""
        cache = model.extras.setdefault("jitted", {})
        key = (fn.__name__, tuple(sorted(static.items())))
        if key not in cache:
            cache[key] = jax.jit(functools.partial(fn, model.net, **static))
        return cache[key]

    def forward(self, model: base.Model, x: np.ndarray, train: bool) -> dict[str, np.ndarray]:
        with self._on_device():
            acts = self._jit(model, forward_fn, train=train)(model.state, jnp.asarray(x, jnp.float32))
            return {name: np.array(a, np.float32) for name, a in acts.items()}

    def loss_and_grads(self, model: base.Model, x: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        with self._on_device():
            fn = self._jit(model, loss_and_grads_fn)
            loss, grads = fn(model.state, jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32))
            return float(loss), to_canonical(grads)

    def make_optimizer(self, model: base.Model, learning_rate: float) -> FlaxOptimizer:
        # One transformation and compiled step per model: the learning rate is an injected
        # hyperparameter held in the state, so a fresh optimiser does not recompile.
        cache = model.extras.setdefault("jitted", {})
        if "train_step" not in cache:
            tx = adam(learning_rate, model.knobs)
            cache["train_step"] = tx, jax.jit(functools.partial(train_step_fn, model.net, tx))
        tx, step = cache["train_step"]
        with self._on_device():
            state = tx.init(model.state["params"])
            state.hyperparams["learning_rate"] = jnp.asarray(learning_rate, jnp.float32)
        return FlaxOptimizer(tx=tx, state=state, step=step)

    def train_step(self, model: base.Model, optimizer: FlaxOptimizer, x: np.ndarray, y: np.ndarray) -> float:
        with self._on_device():
            loss, variables, optimizer.state = optimizer.step(
                model.state, optimizer.state, jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)
            )
        model.state.update(variables)
        return float(loss)

    def optimizer_state(self, optimizer: FlaxOptimizer) -> dict[str, np.ndarray]:
        moments = adam_moments(optimizer.state)
        state: dict[str, Any] = {f"m/{k}": v for k, v in to_canonical(moments.mu).items()}
        state.update({f"v/{k}": v for k, v in to_canonical(moments.nu).items()})
        state["step"] = int(moments.count)
        return state

    def plateau_schedule(self, val_losses: Sequence[float], learning_rate: float, knobs: Knobs) -> list[float]:
        with self._on_device():
            scales = plateau_scales(plateau_transformation(knobs), val_losses)
        return [learning_rate * s for s in scales]
