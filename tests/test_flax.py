"""The JAX/Flax/optax implementation on its own: against the float64 numpy oracle, against
hand-written Adam and ReduceLROnPlateau, and knob by knob."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("optax")

import chex  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax.contrib  # noqa: E402

import numpy_model as nm  # noqa: E402
from arbiter.data import Dataset  # noqa: E402
from arbiter.gabor import gabor_bank  # noqa: E402
from arbiter.knobs import KnobNotSupported, Knobs, preset  # noqa: E402
from arbiter.spec import ACTIVATIONS, ModelSpec, is_trainable, trainable_parameter_count, weight_shapes  # noqa: E402
from impls.base import DeviceUnavailable  # noqa: E402
from impls.flax import adapter as fa  # noqa: E402
from impls.flax import pipeline  # noqa: E402

SPEC = ModelSpec()
ALIGNED = preset("aligned")
# float32 against the float64 oracle: measured max abs error ~6e-6 on BN'd feature maps
# of magnitude ~1-5 (train mode, batch 2-8), ~5e-7 on logits.
ACT_TOL = dict(atol=3e-5, rtol=1e-5)
LOGIT_TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def adapter():
    return fa.Adapter(device="cpu")


@pytest.fixture(scope="module")
def weights():
    return nm.random_weights(SPEC, seed=0)


@pytest.fixture(scope="module")
def models(adapter, weights):
    """One model per knob set, loaded with the oracle's random weights (builds and jit
    caches are shared across tests)."""
    cache = {}

    def get(knobs: Knobs):
        if knobs not in cache:
            cache[knobs] = adapter.build(SPEC, knobs, seed=0)
        model = cache[knobs]
        adapter.import_weights(model, weights)
        return model

    return get


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Model inputs in [0, 1], (n, size, size, 1)."""
    return np.random.default_rng(seed).uniform(0, 1, (n, size, size, 1)).astype(np.float32)


def oracle(knobs: Knobs, weights: dict, x: np.ndarray, train: bool) -> dict:
    return nm.forward(SPEC, knobs, weights, gabor_bank(SPEC.gabor, knobs.gabor_normalization), x, train)


def assert_matches_oracle(acts: dict, ref: dict):
    for name in ACTIVATIONS:
        chex.assert_shape(acts[name], ref[name].shape)
        tol = LOGIT_TOL if name == "logits" else ACT_TOL
        chex.assert_trees_all_close(acts[name], ref[name].astype(np.float32), **tol, custom_message=name)


# -- structure and weights ------------------------------------------------------------------------


def test_parameter_count_as_flax_counts_it(adapter, models):
    model = models(ALIGNED)
    assert adapter.parameter_count(model) == trainable_parameter_count(SPEC) == 328_991
    assert "gabor" not in model.state["params"]  # the bank is a constant, not a parameter


def test_variable_tree_is_the_canonical_names(adapter, models):
    model = models(ALIGNED)
    exported = adapter.export_weights(model)
    assert list(exported) == list(weight_shapes(SPEC))
    assert {k: v.shape for k, v in exported.items()} == weight_shapes(SPEC)
    assert all(v.dtype == np.float32 for v in exported.values())
    assert set(fa.canonical_names(model.state["params"])) == {n for n in weight_shapes(SPEC) if is_trainable(n)}


def test_import_export_round_trip_is_bit_exact(adapter, models, weights):
    model = models(ALIGNED)
    exported = adapter.export_weights(model)
    for name, w in weights.items():
        np.testing.assert_array_equal(exported[name], w, err_msg=name)


def test_import_rejects_missing_and_misshapen_tensors(adapter, models, weights):
    model = models(ALIGNED)
    missing = {k: v for k, v in weights.items() if k != "block1.bn2.var"}
    with pytest.raises(ValueError, match=r"block1\.bn2\.var"):
        adapter.import_weights(model, missing)
    bad = {**weights, "head.kernel": weights["head.kernel"].T}
    with pytest.raises(ValueError, match=r"head\.kernel"):
        adapter.import_weights(model, bad)


def test_gabor_bank_is_the_arbiter_bank(adapter, models):
    for norm in ("l2", "none"):
        held = adapter.gabor_kernel(models(ALIGNED.replace(gabor_normalization=norm)))
        np.testing.assert_array_equal(held, gabor_bank(SPEC.gabor, norm))
    assert not np.allclose(gabor_bank(SPEC.gabor, "l2"), gabor_bank(SPEC.gabor, "none"))


def test_build_is_seeded(adapter):
    a, b, c = (adapter.build(SPEC, ALIGNED, seed=s) for s in (3, 3, 4))
    wa, wb, wc = (adapter.export_weights(m)["block1.conv1.kernel"] for m in (a, b, c))
    np.testing.assert_array_equal(wa, wb)
    assert not np.array_equal(wa, wc)


# -- forward against the oracle --------------------------------------------------------------------


@pytest.mark.parametrize("preset_name", ["aligned", "flax-native"])
@pytest.mark.parametrize("size,batch", [(28, 4), (64, 2)])
def test_forward_matches_oracle(adapter, models, weights, preset_name, size, batch):
    knobs = preset(preset_name)
    model = models(knobs)
    x = images(batch, size)
    for train in (False, True):
        assert_matches_oracle(adapter.forward(model, x, train), oracle(knobs, weights, x, train))


def test_forward_any_input_size(adapter, models):
    acts = adapter.forward(models(ALIGNED), images(1, 224), train=False)
    chex.assert_shape([acts["down1"], acts["down2"], acts["logits"]], [(1, 112, 112, 64), (1, 56, 56, 96), (1, 7)])


def test_stride2_padding_moves_the_grid(adapter, models, weights):
    x = images(2, 28)
    down1 = {}
    for mode in ("tf_same", "symmetric"):
        knobs = ALIGNED.replace(stride2_padding=mode)
        acts = adapter.forward(models(knobs), x, train=False)
        assert_matches_oracle(acts, oracle(knobs, weights, x, False))
        down1[mode] = acts["down1"]
    assert np.abs(down1["tf_same"] - down1["symmetric"]).max() > 0.1


def test_bn_relu_order(adapter, models, weights):
    x = images(2, 28)
    knobs = ALIGNED.replace(bn_relu_order="relu_bn")
    acts = adapter.forward(models(knobs), x, train=True)
    assert_matches_oracle(acts, oracle(knobs, weights, x, True))
    assert (acts["stem"] < 0).any()  # BN after the ReLU: negative outputs survive
    assert not np.allclose(acts["stem"], adapter.forward(models(ALIGNED), x, train=True)["stem"])


def test_forward_and_gradients_leave_the_model_unchanged(adapter, models):
    model = models(ALIGNED)
    before = adapter.export_weights(model)
    x, y = images(4, 28), np.array([0, 1, 2, 3])
    adapter.forward(model, x, train=True)
    adapter.forward(model, x, train=False)
    adapter.loss_and_grads(model, x, y)
    after = adapter.export_weights(model)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


# -- BatchNorm running statistics --------------------------------------------------------------------


def pre_bn(ref: dict, weights: dict, knobs: Knobs) -> dict[str, np.ndarray]:
    """The inputs of stem.bn, down1.bn and down2.bn (bn_relu order), from oracle activations."""
    conv = lambda h, name, stride: nm.conv2d(h, weights[f"{name}.kernel"].astype(np.float64), stride, knobs.stride2_padding)  # noqa: E731
    return {
        "stem.bn": conv(ref["gabor"], "stem.conv", 1),
        "down1.bn": conv(ref["stem"], "down1.conv", 2),
        "down2.bn": conv(ref["block1"], "down2.conv", 2),
    }


@pytest.mark.parametrize("running_var", ["biased", "unbiased"])
def test_bn_running_statistics_after_one_step(adapter, models, weights, running_var):
    knobs = ALIGNED.replace(bn_momentum=0.9, bn_running_var=running_var)
    model = models(knobs)
    x, y = images(8, 28), np.arange(8) % 7
    # the running-variance estimator (and momentum) change nothing in the forward pass:
    # two compilations of the same ops, equal to round-off
    chex.assert_trees_all_close(adapter.forward(model, x, True)["logits"], adapter.forward(models(ALIGNED), x, True)["logits"], atol=1e-5)
    ref = oracle(knobs, weights, x, train=True)
    adapter.train_step(model, adapter.make_optimizer(model, 1e-3), x, y)
    after = adapter.export_weights(model)
    m = knobs.bn_momentum
    for bn, h in pre_bn(ref, weights, knobs).items():
        axes = (0, 1, 2)
        ddof = 1 if running_var == "unbiased" else 0
        expected_var = m * weights[f"{bn}.var"] + (1 - m) * h.var(axes, ddof=ddof)
        expected_mean = m * weights[f"{bn}.mean"] + (1 - m) * h.mean(axes)
        # float32 batch statistics: ~1e-6 relative
        np.testing.assert_allclose(after[f"{bn}.var"], expected_var, rtol=1e-5, err_msg=bn)
        np.testing.assert_allclose(after[f"{bn}.mean"], expected_mean, rtol=1e-5, atol=1e-6, err_msg=bn)
    # down2.bn sees 8*7*7 = 392 values: the two estimators differ by (1-m)/391 ~ 2.6e-4, far above the tolerance
    other = m * weights["down2.bn.var"] + (1 - m) * pre_bn(ref, weights, knobs)["down2.bn"].var((0, 1, 2), ddof=1 - (running_var == "unbiased"))
    assert np.abs(after["down2.bn.var"] / other - 1).max() > 1e-4


# -- loss and gradients ----------------------------------------------------------------------------------


def numpy_losses(logits: np.ndarray, y: np.ndarray) -> dict[str, float]:
    logits = logits.astype(np.float64)
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    p = np.clip(np.exp(log_p), 1e-7, 1 - 1e-7)
    rows = np.arange(len(y))
    return {"logits": float(-log_p[rows, y].mean()), "clipped_probs": float(-np.log(p[rows, y]).mean())}


@pytest.mark.parametrize("loss", ["logits", "clipped_probs"])
def test_loss_knob(adapter, models, weights, loss):
    knobs = ALIGNED.replace(loss=loss)
    model = models(knobs)
    x, y = images(4, 28), np.array([0, 3, 5, 6])
    logits = oracle(knobs, weights, x, train=True)["logits"]
    value, _ = adapter.loss_and_grads(model, x, y)
    assert value == pytest.approx(numpy_losses(logits, y)[loss], rel=1e-5)  # float32 logits, ~1e-7
    # saturated probabilities: the clip caps each term at -log(1e-7) = 16.1, the logits loss does not
    saturated = {**weights, "head.kernel": weights["head.kernel"] * 300}
    adapter.import_weights(model, saturated)
    logits = oracle(knobs, saturated, x, train=True)["logits"]
    expected = numpy_losses(logits, y)
    assert expected["logits"] > expected["clipped_probs"] + 1
    value, _ = adapter.loss_and_grads(model, x, y)
    # large logits in float32: relative round-off ~1e-6 of their magnitude (~1e2)
    assert value == pytest.approx(expected[loss], rel=1e-4)


def test_head_gradients_are_softmax_minus_onehot(adapter, models):
    model = models(ALIGNED)
    x, y = images(4, 28), np.array([1, 1, 4, 6])
    acts = adapter.forward(model, x, train=True)
    _, grads = adapter.loss_and_grads(model, x, y)
    assert set(grads) == {n for n in weight_shapes(SPEC) if is_trainable(n)}
    logits = acts["logits"].astype(np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    delta = (p - np.eye(SPEC.num_classes)[y]) / len(y)
    # float32 softmax and matmul: ~1e-7 absolute
    np.testing.assert_allclose(grads["head.bias"], delta.sum(0), atol=1e-6)
    np.testing.assert_allclose(grads["head.kernel"], acts["pool"].astype(np.float64).T @ delta, atol=1e-6)


def test_gradient_matches_oracle_finite_difference(adapter, models, weights):
    """<grad, d> against a central difference of the float64 oracle's train-mode loss
    along a random direction d through each stage's trainable tensors (BN's batch
    statistics included)."""
    model = models(ALIGNED)
    x, y = images(4, 28, seed=1), np.array([0, 2, 4, 6])
    _, grads = adapter.loss_and_grads(model, x, y)
    rng = np.random.default_rng(7)
    # tiny step: a larger one moves some of the ~10^5 ReLU inputs across 0 (h=1e-6 is
    # off by ~1%); float64 round-off stays ~1e-8 at h=1e-8
    h = 1e-8
    for stage in ("stem", "down1", "block1", "down2", "block2", "head"):
        d = {n: rng.normal(size=w.shape) for n, w in weights.items() if is_trainable(n) and n.split(".")[0] == stage}

        def loss_at(t):
            w = {n: v.astype(np.float64) + t * d[n] if n in d else v.astype(np.float64) for n, v in weights.items()}  # noqa: B023
            return numpy_losses(oracle(ALIGNED, w, x, train=True)["logits"], y)["logits"]

        fd = (loss_at(h) - loss_at(-h)) / (2 * h)
        analytic = sum(float((grads[n].astype(np.float64) * d[n]).sum()) for n in d)
        # float32 gradients against float64: measured <= 1e-5 relative
        assert analytic == pytest.approx(fd, rel=1e-4), stage


# -- Adam --------------------------------------------------------------------------------------------------


def numpy_adam(params: dict, grads_per_step: list[dict], lr: float, eps: float, placement: str):
    """float64 Adam, each placement written as its framework writes it."""
    b1, b2 = 0.9, 0.999
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, grads in enumerate(grads_per_step, start=1):
        for k, g in grads.items():
            g = g.astype(np.float64)
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            if placement == "corrected":  # PyTorch / optax
                p[k] = p[k] - lr * (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps)
            else:  # Keras
                p[k] = p[k] - lr * np.sqrt(1 - b2**t) / (1 - b1**t) * m[k] / (np.sqrt(v[k]) + eps)
    return p, m, v


@pytest.mark.parametrize("placement", ["corrected", "uncorrected"])
def test_adam_epsilon_placement_on_tiny_gradients(placement):
    """Gradients of ~1e-7 sit at eps, where the two placements differ by 16x at step 1."""
    knobs = ALIGNED.replace(adam_epsilon=1e-7, adam_epsilon_placement=placement)
    lr = 1e-3
    params = {"w": np.zeros(4, np.float32)}  # zero start: the update is the parameter, no cancellation
    steps = [{"w": np.array([1e-7, -2e-7, 1e-3, 3e-8], np.float32)}, {"w": np.array([2e-7, 1e-7, -1e-3, 1e-7], np.float32)}]
    tx = fa.adam(lr, knobs)
    state = tx.init({"w": jnp.asarray(params["w"])})
    p = {"w": jnp.asarray(params["w"])}
    for i, g in enumerate(steps, start=1):
        p, state = fa.adam_update(tx, state, {"w": jnp.asarray(g["w"])}, p, knobs)
        expected, m, v = numpy_adam(params, steps[:i], lr, knobs.adam_epsilon, placement)
        other, _, _ = numpy_adam(params, steps[:i], lr, knobs.adam_epsilon, "uncorrected" if placement == "corrected" else "corrected")
        # optax's own float32 bias correction 1 - 0.999**t is off by ~1.3e-5 relative
        np.testing.assert_allclose(np.asarray(p["w"]), expected["w"], rtol=1e-4)
        assert np.abs(np.asarray(p["w"]) / other["w"] - 1)[[0, 1, 3]].min() > 0.1
        moments = fa.adam_moments(state)
        assert int(moments.count) == i
        np.testing.assert_allclose(np.asarray(moments.mu["w"]), m["w"], rtol=1e-6)
        np.testing.assert_allclose(np.asarray(moments.nu["w"]), v["w"], rtol=1e-6)


@pytest.mark.parametrize("placement", ["corrected", "uncorrected"])
def test_two_train_steps_are_numpy_adam(adapter, models, weights, placement):
    # the knobs of the BN test above, so that the compiled train step is shared
    knobs = ALIGNED.replace(bn_momentum=0.9, adam_epsilon_placement=placement)
    model = models(knobs)
    adapter.make_optimizer(model, 1.0)  # a first optimiser compiles the step with lr 1.0 ...
    lr = 2e-3
    opt = adapter.make_optimizer(model, lr)  # ... which must not leak into this one
    x, y = images(8, 28), np.arange(8) % 7  # the BN test's batch: same compiled shapes
    trainable = {n: w for n, w in weights.items() if is_trainable(n)}
    grads = []
    for _ in range(2):
        loss, g = adapter.loss_and_grads(model, x, y)
        grads.append(g)
        assert adapter.train_step(model, opt, x, y) == pytest.approx(loss, rel=1e-6)  # the loss before the update
    expected, m, v = numpy_adam(trainable, grads, lr, knobs.adam_epsilon, placement)
    after = adapter.export_weights(model)
    # updates are ~lr; float32 parameters and Adam arithmetic: ~1e-7 absolute
    chex.assert_trees_all_close({n: after[n] for n in trainable}, {n: w.astype(np.float32) for n, w in expected.items()}, atol=5e-7, rtol=1e-6)
    state = adapter.optimizer_state(opt)
    assert state["step"] == 2
    assert set(state) == {"step"} | {f"{k}/{n}" for k in "mv" for n in trainable}
    chex.assert_trees_all_close({n: state[f"m/{n}"] for n in trainable}, {n: a.astype(np.float32) for n, a in m.items()}, atol=1e-9, rtol=1e-5)
    chex.assert_trees_all_close({n: state[f"v/{n}"] for n in trainable}, {n: a.astype(np.float32) for n, a in v.items()}, atol=1e-14, rtol=1e-5)
    assert not np.array_equal(after["stem.bn.var"], weights["stem.bn.var"])  # train_step moved the running statistics


# -- ReduceLROnPlateau -----------------------------------------------------------------------------------

LOSSES = [1.0, 0.9, 0.9, 0.9, 0.9, 0.9, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8]


@pytest.mark.parametrize(
    "changes,losses,expected_exponents",
    [
        # keras: reduce when 2 bad epochs are reached (epochs 3, 5, 8, 10)
        (dict(plateau_counting="keras"), LOSSES, [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4]),
        # torch: when the count exceeds 2, i.e. on the third bad epoch (epochs 4, 9)
        (dict(plateau_counting="torch"), LOSSES, [0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2]),
        (dict(plateau_counting="keras", plateau_threshold_mode="rel"), LOSSES, [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4]),
        # min_delta 0.05 from best 2.0: 1.92 improves in absolute terms (< 1.95), not in relative ones (< 1.90)
        (dict(plateau_min_delta=0.05, plateau_threshold_mode="abs"), [2.0, 1.92, 1.86, 1.80, 1.79], [0, 0, 0, 0, 0]),
        (dict(plateau_min_delta=0.05, plateau_threshold_mode="rel"), [2.0, 1.92, 1.86, 1.80, 1.79], [0, 0, 0, 0, 1]),
        # Keras cooldown 2, patience 1: after a reduction one epoch is ignored, the next counts again
        (dict(plateau_patience=1, plateau_cooldown=2), [1.0] * 8, [0, 1, 1, 2, 2, 3, 3, 4]),
        # min_delta 0: any decrease is an improvement
        (dict(plateau_patience=1, plateau_min_delta=0.0), [1.0, 0.999999, 0.999999, 0.5], [0, 0, 1, 1]),
    ],
)
def test_plateau_schedule_by_hand(adapter, changes, losses, expected_exponents):
    knobs = ALIGNED.replace(plateau_patience=2, plateau_factor=0.1, plateau_min_delta=1e-4, plateau_cooldown=0).replace(**changes)
    lrs = adapter.plateau_schedule(losses, 1e-3, knobs)
    # the scale is a float32 product of factors
    np.testing.assert_allclose(lrs, [1e-3 * 0.1**e for e in expected_exponents], rtol=1e-6)


def keras_plateau(losses, lr, knobs: Knobs) -> list[float]:
    """keras.callbacks.ReduceLROnPlateau.on_epoch_end (Keras 3), with the arbiter's
    counting and threshold knobs as the only generalisation."""
    patience = knobs.plateau_patience + (knobs.plateau_counting == "torch")
    best, wait, cooldown, out = None, 0, 0, []
    for current in losses:
        if cooldown > 0:
            cooldown -= 1
            wait = 0
        if knobs.plateau_threshold_mode == "abs":
            improved = best is None or current < best - knobs.plateau_min_delta
        else:
            improved = best is None or current < best * (1 - knobs.plateau_min_delta)
        if improved:
            best, wait = current, 0
        elif not cooldown > 0:
            wait += 1
            if wait >= patience:
                lr, cooldown, wait = lr * knobs.plateau_factor, knobs.plateau_cooldown, 0
        out.append(lr)
    return out


def test_plateau_schedule_follows_keras_semantics(adapter):
    rng = np.random.default_rng(0)
    for trial in range(24):
        knobs = ALIGNED.replace(
            plateau_patience=int(rng.integers(0, 4)),
            plateau_cooldown=int(rng.integers(0, 4)),
            plateau_counting=str(rng.choice(["keras", "torch"])),
            plateau_threshold_mode=str(rng.choice(["abs", "rel"])),
            # deltas off the 0.01 grid of the losses: no comparison lands exactly on a boundary
            plateau_min_delta=float(rng.choice([0.0, 1e-3, 0.015])),
            plateau_factor=0.5,
        )
        # quantised random walk: plenty of exact repeats and small improvements
        losses = list(np.round(1 + np.cumsum(rng.choice([-0.03, -0.01, 0.0, 0.0, 0.01], 20)), 4))
        np.testing.assert_allclose(adapter.plateau_schedule(losses, 1.0, knobs), keras_plateau(losses, 1.0, knobs), rtol=1e-6, err_msg=f"{knobs.to_dict()} {losses}")


def test_optax_native_cooldown_is_one_epoch_longer_than_keras():
    """Why the adapter passes cooldown - 1: optax ignores `cooldown` epochs after a
    reduction, Keras `cooldown - 1`."""
    tx = optax.contrib.reduce_on_plateau(factor=0.1, patience=1, rtol=0.0, atol=1e-4, cooldown=2)
    scales = fa.plateau_scales(tx, [1.0] * 8)
    np.testing.assert_allclose(scales, [0.1**e for e in [0, 1, 1, 1, 2, 2, 2, 3]], rtol=1e-6)


@pytest.mark.parametrize("changes", [dict(plateau_factor=1.0), dict(plateau_threshold_mode="rel", plateau_min_delta=1.5)])
def test_plateau_knobs_optax_cannot_honour(adapter, changes):
    with pytest.raises(KnobNotSupported):
        adapter.plateau_schedule([1.0, 1.0], 1e-3, ALIGNED.replace(**changes))


# -- initialisers -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kernel_init,std,bound",
    [
        # 3x3x96x96 conv: fan_in = fan_out = 864; uniform: bound = limit, std = limit/sqrt(3);
        # Flax's normals are truncated at 2 sigma of the underlying normal (std / 0.8796)
        ("glorot_uniform", np.sqrt(6 / 1728) / np.sqrt(3), np.sqrt(6 / 1728)),
        ("kaiming_uniform_a_sqrt5", 1 / np.sqrt(864) / np.sqrt(3), 1 / np.sqrt(864)),
        ("lecun_normal", 1 / np.sqrt(864), 2 / np.sqrt(864) / 0.87962566),
        ("he_normal", np.sqrt(2 / 864), 2 * np.sqrt(2 / 864) / 0.87962566),
    ],
)
def test_kernel_init(adapter, kernel_init, std, bound):
    w = adapter.export_weights(adapter.build(SPEC, ALIGNED.replace(kernel_init=kernel_init), seed=1))
    k = w["block2.conv2.kernel"]
    assert k.std() == pytest.approx(std, rel=0.02)  # 82,944 samples: std of the std estimate < 0.5%
    assert bound * 0.97 < np.abs(k).max() <= bound * (1 + 1e-6)


@pytest.mark.parametrize("bias_init", ["zeros", "fan_in_uniform"])
def test_bias_init(adapter, bias_init):
    w = adapter.export_weights(adapter.build(SPEC, ALIGNED.replace(bias_init=bias_init), seed=1))
    for name, fan_in in (("block2.se.reduce.bias", 96), ("block2.se.expand.bias", 24), ("head.bias", 96)):
        if bias_init == "zeros":
            assert not w[name].any()
        else:
            assert 0.5 / np.sqrt(fan_in) < np.abs(w[name]).max() <= 1 / np.sqrt(fan_in)
    assert np.all(w["stem.bn.scale"] == 1) and not w["stem.bn.bias"].any()
    assert np.all(w["stem.bn.var"] == 1) and not w["stem.bn.mean"].any()


# -- input pipeline -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rgb_data(tmp_path_factory):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 16), ("val", 4), ("test", 4)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 7, (n, 1), dtype=np.uint8)
    path = tmp_path_factory.mktemp("flax_data") / "tiny.npz"
    np.savez(path, **arrays)
    return Dataset(
        name="tiny",
        path=path,
        images={s: arrays[f"{s}_images"] for s in ("train", "val", "test")},
        labels={s: arrays[f"{s}_labels"].reshape(-1).astype(np.int64) for s in ("train", "val", "test")},
        num_classes=7,
        synthetic=True,
    )


TF_GRAY = (0.2989, 0.587, 0.114)


@pytest.mark.parametrize("scaling", ["unit", "symmetric"])
@pytest.mark.parametrize("coefficients", [(0.299, 0.587, 0.114), TF_GRAY])
@pytest.mark.parametrize("rounding", ["float", "uint8"])
def test_preprocess_matches_oracle(adapter, rgb_data, scaling, coefficients, rounding):
    knobs = ALIGNED.replace(input_scaling=scaling, grayscale_coefficients=coefficients, grayscale_rounding=rounding)
    idx = np.array([5, 0, 9, 3])
    x = adapter.preprocess(rgb_data, "train", idx, knobs, train=False, seed=0)
    ref = nm.preprocess(rgb_data.images["train"][idx], knobs)
    chex.assert_shape(x, (4, 28, 28, 1))
    assert x.dtype == np.float32
    if rounding == "float":
        np.testing.assert_allclose(x, ref, atol=5e-7)  # float32 gray and scaling: a few ulp of 1
        return
    levels = np.rint((x + (scaling == "symmetric")) * (255 / (1 + (scaling == "symmetric"))))
    ref_levels = np.rint(nm.preprocess(rgb_data.images["train"][idx], knobs.replace(input_scaling="unit")) * 255)
    if coefficients == (0.299, 0.587, 0.114):
        np.testing.assert_array_equal(levels, ref_levels)  # PIL's fixed-point rounding, bit for bit
    else:
        # exact .5 ties (about 1 pixel in 10^4) may round either way in float32 vs float64
        assert np.mean(levels != ref_levels) < 1e-3 and np.abs(levels - ref_levels).max() <= 1
    np.testing.assert_allclose(x, ref, atol=2e-7 if np.array_equal(levels, ref_levels) else 1 / 127)


def test_preprocess_gray_input(adapter, tmp_path):
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)  # MedMNIST's (N, H, W) grayscale layout
    path = tmp_path / "gray.npz"
    np.savez(path, test_images=gray, test_labels=np.zeros((3, 1), np.uint8))
    data = Dataset(name="gray", path=path, images={"test": gray[..., None]}, labels={"test": np.zeros(3, np.int64)}, num_classes=7)
    knobs = ALIGNED.replace(input_scaling="symmetric")
    x = adapter.preprocess(data, "test", np.arange(3), knobs, train=False, seed=0)
    np.testing.assert_allclose(x, nm.preprocess(gray[..., None], knobs), atol=2e-7)


def test_hflip_augmentation(adapter, rgb_data):
    idx = np.arange(16)
    knobs = ALIGNED.replace(train_augmentation="hflip")
    plain = adapter.preprocess(rgb_data, "train", idx, knobs, train=False, seed=0)
    flipped = adapter.preprocess(rgb_data, "train", idx, knobs, train=True, seed=0)
    is_flipped = np.array([np.array_equal(f, p[:, ::-1]) for f, p in zip(flipped, plain)])
    is_plain = np.array([np.array_equal(f, p) for f, p in zip(flipped, plain)])
    assert np.all(is_flipped ^ is_plain) and 0 < is_flipped.sum() < 16
    np.testing.assert_array_equal(flipped, adapter.preprocess(rgb_data, "train", idx, knobs, train=True, seed=0))
    assert not np.array_equal(flipped, adapter.preprocess(rgb_data, "train", idx, knobs, train=True, seed=1))
    at_eval = adapter.preprocess(rgb_data, "train", idx, knobs.replace(eval_augmentation=True), train=False, seed=0)
    np.testing.assert_array_equal(at_eval, flipped)  # the classic bug: the same flips at evaluation
    no_aug = adapter.preprocess(rgb_data, "train", idx, ALIGNED, train=True, seed=0)
    np.testing.assert_array_equal(no_aug, plain)


def test_batches_follow_the_shared_order(rgb_data):
    order = np.random.default_rng(3).permutation(16)
    got = list(pipeline.batches(rgb_data, "train", ALIGNED, train=True, seed=0, batch_size=6, order=order))
    assert [len(y) for _, y in got] == [6, 6, 4]
    np.testing.assert_array_equal(np.concatenate([y for _, y in got]), rgb_data.labels["train"][order])
    x = np.concatenate([x for x, _ in got])
    np.testing.assert_allclose(x, nm.preprocess(rgb_data.images["train"][order], ALIGNED), atol=2e-7)


# -- device -------------------------------------------------------------------------------------------------------


def test_device_and_environment(adapter):
    env = adapter.environment()
    assert env["device"].startswith("cpu") and "highest" in env["precision"]
    assert set(env["versions"]) >= {"jax", "flax", "optax"}
    import jax

    if not any(d.platform == "gpu" for d in jax.devices()):
        with pytest.raises(DeviceUnavailable):
            fa.Adapter(device="gpu")
