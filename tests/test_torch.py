"""The PyTorch implementation on its own: against the float64 numpy oracle, hand-written
Adam and ReduceLROnPlateau references, and the knobs it must honour."""

from __future__ import annotations

import math
from pathlib import Path

import chex
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import numpy_model as nm  # noqa: E402
from arbiter.data import Dataset  # noqa: E402
from arbiter.gabor import gabor_bank  # noqa: E402
from arbiter.knobs import Knobs, KnobNotSupported, preset  # noqa: E402
from arbiter.spec import ACTIVATIONS, ModelSpec, is_trainable, trainable_parameter_count, weight_shapes  # noqa: E402
from impls import base  # noqa: E402
from impls.torch import layout  # noqa: E402
from impls.torch.adapter import Adapter  # noqa: E402

SPEC = ModelSpec()
ALIGNED = preset("aligned")
NATIVE = preset("torch-native")
# float32 against the float64 oracle: 3x3xC dot products (C up to 96) and train-mode BN
# (dividing by batch std) leave ~1e-6 relative round-off per layer, compounding over 7
# convs; measured max |diff| / max |activation| <= 2e-6, so 1e-5 of the activation's scale
# has 5x headroom and still catches any wrong pad, order or epsilon (those move values
# by >1e-3).
RTOL = 1e-5


@pytest.fixture(scope="module")
def adapter() -> Adapter:
    return Adapter("cpu")


def make(adapter, knobs=ALIGNED, seed=0, weights_seed=1):
    model = adapter.build(SPEC, knobs, seed)
    weights = nm.random_weights(SPEC, weights_seed)
    adapter.import_weights(model, weights)
    return model, weights


def images(n, size=28, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (n, size, size, 1)).astype(np.float32)


def labels(n, seed=0):
    return np.random.default_rng(seed + 100).integers(0, SPEC.num_classes, n)


def oracle(knobs, weights, x, train):
    return nm.forward(SPEC, knobs, weights, gabor_bank(SPEC.gabor, knobs.gabor_normalization), x, train)


def assert_matches_oracle(got, want, names=ACTIVATIONS):
    for name in names:
        chex.assert_shape(got[name], want[name].shape)
        scale = max(1.0, float(np.abs(want[name]).max()))
        np.testing.assert_allclose(got[name], want[name], rtol=RTOL, atol=RTOL * scale, err_msg=name)


# -- weights ----------------------------------------------------------------------------------
def test_parameter_count(adapter):
    model = adapter.build(SPEC, ALIGNED, 0)
    assert adapter.parameter_count(model) == trainable_parameter_count(SPEC) == 328_991
    # the Gabor bank is a buffer: no optimiser can move it
    assert "gabor.kernel" in dict(model.net.named_buffers())


def test_export_names_shapes_and_bn_init(adapter):
    exported = adapter.export_weights(adapter.build(SPEC, ALIGNED, 0))
    assert list(exported) == list(weight_shapes(SPEC))
    for name, shape in weight_shapes(SPEC).items():
        chex.assert_shape(exported[name], shape)
        assert exported[name].dtype == np.float32, name
    expected_bn = {"scale": 1.0, "bias": 0.0, "mean": 0.0, "var": 1.0}
    for name, a in exported.items():
        if ".bn" in name:
            np.testing.assert_array_equal(a, expected_bn[name.rsplit(".", 1)[1]], err_msg=name)


def test_round_trip_is_bit_exact(adapter):
    model, weights = make(adapter)
    exported = adapter.export_weights(model)
    for name in weights:
        np.testing.assert_array_equal(exported[name], weights[name], err_msg=name)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda w: w.pop("block1.bn2.var"), "block1.bn2.var"),
        (lambda w: w.__setitem__("down1.conv.kernel", np.zeros((3, 3, 64, 32), np.float32)), "down1.conv.kernel"),
        (lambda w: w.__setitem__("head.extra", np.zeros(7, np.float32)), "head.extra"),
    ],
)
def test_import_rejects_bad_weights(adapter, change, message):
    model = adapter.build(SPEC, ALIGNED, 0)
    weights = nm.random_weights(SPEC, 0)
    change(weights)
    with pytest.raises(ValueError, match=message):
        adapter.import_weights(model, weights)


def test_gabor_bank_and_normalization(adapter):
    x = images(2)
    gabor = {}
    for norm in ("l2", "none"):
        knobs = ALIGNED.replace(gabor_normalization=norm)
        model, weights = make(adapter, knobs)
        np.testing.assert_array_equal(adapter.gabor_kernel(model), gabor_bank(SPEC.gabor, norm))
        gabor[norm] = adapter.forward(model, x, train=False)["gabor"]
        assert_matches_oracle({"gabor": gabor[norm]}, oracle(knobs, weights, x, False), names=["gabor"])
    assert np.abs(gabor["l2"] - gabor["none"]).max() > 1e-2


def test_build_is_seeded(adapter):
    a, b, c = (adapter.export_weights(adapter.build(SPEC, ALIGNED, s)) for s in (0, 0, 1))
    chex.assert_trees_all_equal(a, b)
    assert not np.array_equal(a["stem.conv.kernel"], c["stem.conv.kernel"])


# -- initialisers -----------------------------------------------------------------------------
FAN_IN = FAN_OUT = 3 * 3 * 96  # block2.conv2


@pytest.mark.parametrize(
    "init, std, bound",
    [
        ("glorot_uniform", math.sqrt(2 / (FAN_IN + FAN_OUT)), math.sqrt(6 / (FAN_IN + FAN_OUT))),
        ("kaiming_uniform_a_sqrt5", math.sqrt(1 / (3 * FAN_IN)), math.sqrt(1 / FAN_IN)),
        ("lecun_normal", math.sqrt(1 / FAN_IN), 2 * math.sqrt(1 / FAN_IN) / 0.87962566103423978),
        ("he_normal", math.sqrt(2 / FAN_IN), None),  # torch's kaiming_normal_ is not truncated
    ],
)
def test_kernel_init(adapter, init, std, bound):
    w = adapter.export_weights(adapter.build(SPEC, ALIGNED.replace(kernel_init=init), 0))["block2.conv2.kernel"]
    # 82,944 draws: the sample std's relative standard error is ~0.25%, so 2% is 8 sigma
    np.testing.assert_allclose(w.std(), std, rtol=0.02)
    if bound is not None:
        assert np.abs(w).max() <= bound
        assert np.abs(w).max() > 0.95 * bound  # uniform draws reach the bound; truncated ones near it
    else:
        assert np.abs(w).max() > 2 * std / 0.87962566103423978  # tails past Keras's truncation


@pytest.mark.parametrize("bias_init", ["zeros", "fan_in_uniform"])
def test_bias_init(adapter, bias_init):
    w = adapter.export_weights(adapter.build(SPEC, ALIGNED.replace(bias_init=bias_init), 0))
    fan_in = {"block2.se.reduce": 96, "block2.se.expand": 24, "head": 96}
    for layer, n in fan_in.items():
        b = w[f"{layer}.bias"]
        if bias_init == "zeros":
            np.testing.assert_array_equal(b, 0.0)
        else:
            assert np.abs(b).max() <= 1 / math.sqrt(n)
            assert np.abs(b).max() > 0.3 / math.sqrt(n)


# -- forward ----------------------------------------------------------------------------------
@pytest.mark.parametrize("knobs", [ALIGNED, NATIVE], ids=["aligned", "torch-native"])
@pytest.mark.parametrize("size", [28, 64])
def test_forward_matches_oracle(adapter, knobs, size):
    model, weights = make(adapter, knobs)
    x = images(4, size)
    for train in (False, True):
        assert_matches_oracle(adapter.forward(model, x, train), oracle(knobs, weights, x, train))


@pytest.mark.parametrize("size, first_shifted", [(28, "down1"), (27, "down2")])
def test_stride2_padding(adapter, size, first_shifted):
    """'SAME' pads (0, 1) on an even input and (1, 1) on an odd one: on 27x27 the modes
    agree at down1 (27 -> 14) and part at down2 (14 -> 7)."""
    x = images(2, size)
    out = {}
    for mode in ("tf_same", "symmetric"):
        knobs = ALIGNED.replace(stride2_padding=mode)
        model, weights = make(adapter, knobs)
        out[mode] = adapter.forward(model, x, train=False)
        assert_matches_oracle(out[mode], oracle(knobs, weights, x, False))
    # a one-pixel shift of the sampling grid, not round-off
    assert np.abs(out["tf_same"][first_shifted] - out["symmetric"][first_shifted]).max() > 0.1
    if first_shifted == "down2":
        np.testing.assert_allclose(out["tf_same"]["down1"], out["symmetric"]["down1"], atol=1e-6)


def test_bn_relu_order(adapter):
    x = images(2)
    stem = {}
    for order in ("bn_relu", "relu_bn"):
        knobs = ALIGNED.replace(bn_relu_order=order)
        model, weights = make(adapter, knobs)
        for train in (False, True):
            got = adapter.forward(model, x, train)
            assert_matches_oracle(got, oracle(knobs, weights, x, train))
        stem[order] = got["stem"]
    assert np.abs(stem["bn_relu"] - stem["relu_bn"]).max() > 0.1


@pytest.mark.parametrize("size", [128, 224])
def test_any_input_size(adapter, size):
    model, _ = make(adapter)
    out = adapter.forward(model, images(1, size), train=False)
    half, quarter = -(-size // 2), -(-size // 4)
    chex.assert_shape([out["gabor"], out["stem"]], (1, size, size, None))
    chex.assert_shape([out["down1"], out["block1"]], (1, half, half, 64))
    chex.assert_shape([out["down2"], out["block2"]], (1, quarter, quarter, 96))
    chex.assert_shape(out["logits"], (1, SPEC.num_classes))
    chex.assert_tree_all_finite(out)


def test_forward_and_grads_leave_the_model_unchanged(adapter):
    model, weights = make(adapter)
    x, y = images(8), labels(8)
    adapter.forward(model, x, train=True)
    adapter.forward(model, x, train=False)
    adapter.loss_and_grads(model, x, y)
    chex.assert_trees_all_equal(adapter.export_weights(model), weights)
    assert all(p.grad is None for p in model.net.parameters())
    assert all(int(b) == 0 for n, b in model.net.named_buffers() if n.endswith("num_batches_tracked"))


# -- BatchNorm running statistics ----------------------------------------------------------------
def test_torch_native_batchnorm_stores_the_unbiased_variance():
    """Pins the torch behaviour the 'biased' knob value works around."""
    x = torch.randn(8, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    bn = torch.nn.BatchNorm2d(3, momentum=1.0)  # running = the batch statistic
    bn.train()(x)
    np.testing.assert_allclose(bn.running_var, x.var(dim=(0, 2, 3), correction=1), rtol=1e-6)


@pytest.mark.parametrize("running_var", ["biased", "unbiased"])
@pytest.mark.parametrize("momentum", [0.99, 0.9])
def test_bn_running_statistics(adapter, running_var, momentum):
    knobs = ALIGNED.replace(bn_running_var=running_var, bn_momentum=momentum)
    model, weights = make(adapter, knobs)
    x, y = images(8), labels(8)
    adapter.train_step(model, adapter.make_optimizer(model, 1e-3), x, y)
    after = adapter.export_weights(model)
    # the stem BN's input: the oracle's stem conv on the oracle's Gabor output
    pre = nm.conv2d(oracle(knobs, weights, x, True)["gabor"], weights["stem.conv.kernel"].astype(np.float64), 1, "tf_same")
    batch_var = pre.var(axis=(0, 1, 2), ddof=1 if running_var == "unbiased" else 0)
    batch_mean = pre.mean(axis=(0, 1, 2))
    want_var = momentum * weights["stem.bn.var"] + (1 - momentum) * batch_var
    want_mean = momentum * weights["stem.bn.mean"] + (1 - momentum) * batch_mean
    # float32 statistics over 8*28*28 values; the biased/unbiased gap is (1-m)*var/6271,
    # ~1e-5 relative at m=0.9, so the tolerance must be well under it
    np.testing.assert_allclose(after["stem.bn.var"], want_var, rtol=1e-6)
    np.testing.assert_allclose(after["stem.bn.mean"], want_mean, rtol=1e-5, atol=1e-7)


# -- loss and gradients -----------------------------------------------------------------------
def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def numpy_loss(logits, y, how):
    p = softmax(logits)
    if how == "clipped_probs":
        p = np.clip(p / p.sum(axis=1, keepdims=True), 1e-7, 1 - 1e-7)
    return -np.log(p[np.arange(len(y)), y]).mean()


def sharp_model(adapter, loss):
    """Head weights scaled up so some probabilities fall below the 1e-7 clip."""
    model, weights = make(adapter, ALIGNED.replace(loss=loss))
    weights = dict(weights, **{"head.kernel": weights["head.kernel"] * 60})
    adapter.import_weights(model, weights)
    return model, weights


def test_loss_knob(adapter):
    x, y = images(8), labels(8)
    losses = {}
    for how in ("logits", "clipped_probs"):
        model, weights = sharp_model(adapter, how)
        logits = oracle(model.knobs, weights, x, True)["logits"]
        assert softmax(logits)[np.arange(8), y].min() < 1e-7  # the clip is exercised
        losses[how], _ = adapter.loss_and_grads(model, x, y)
        # float32 logits of magnitude ~1e2 carry ~1e-5 absolute round-off
        np.testing.assert_allclose(losses[how], numpy_loss(logits, y, how), rtol=1e-5)
    assert losses["logits"] > losses["clipped_probs"] + 1.0


@pytest.mark.parametrize("how", ["logits", "clipped_probs"])
def test_head_gradients(adapter, how):
    """d loss / d logits = (softmax - onehot) / N, zero for an example whose clipped p_y is clipped."""
    model, _ = sharp_model(adapter, how)
    x, y = images(8), labels(8)
    acts = adapter.forward(model, x, train=True)
    p = softmax(acts["logits"].astype(np.float64))
    dz = (p - np.eye(SPEC.num_classes)[y]) / len(y)
    if how == "clipped_probs":
        p_y = p[np.arange(len(y)), y]
        dz *= ((p_y > 1e-7) & (p_y < 1 - 1e-7))[:, None]
        assert not dz.any(axis=1).all()  # some example is clipped away
    _, grads = adapter.loss_and_grads(model, x, y)
    # float32 softmax of logits ~1e2 and sums over 8 examples
    np.testing.assert_allclose(grads["head.bias"], dz.sum(0), atol=1e-6)
    np.testing.assert_allclose(grads["head.kernel"], acts["pool"].astype(np.float64).T @ dz, atol=1e-5)


def test_gradients_match_finite_differences(adapter):
    model, weights = make(adapter)
    x, y = images(4), labels(4)
    _, grads = adapter.loss_and_grads(model, x, y)
    assert set(grads) == {n for n in weight_shapes(SPEC) if is_trainable(n)}

    def loss(w):
        return numpy_loss(oracle(ALIGNED, w, x, True)["logits"], y, "logits")

    rng = np.random.default_rng(0)
    # small: a larger step moves some of the thousands of pre-ReLU values across zero,
    # and those kinks put 10% errors into the difference at h=1e-4 (measured)
    h = 1e-6
    for name in ("stem.conv.kernel", "down1.bn.scale", "block1.conv2.kernel", "block2.se.reduce.kernel", "head.bias"):
        for _ in range(2):
            idx = tuple(int(rng.integers(0, d)) for d in weights[name].shape)
            plus = {k: v.astype(np.float64) for k, v in weights.items()}
            minus = {k: v.copy() for k, v in plus.items()}
            plus[name][idx] += h
            minus[name][idx] -= h
            fd = (loss(plus) - loss(minus)) / (2 * h)
            # the float64 difference quotient is good to ~1e-9 absolute; the float32
            # gradient carries ~1e-5 relative round-off on gradients of ~1e-3..1e-1
            np.testing.assert_allclose(grads[name][idx], fd, rtol=1e-3, atol=1e-6, err_msg=f"{name}{idx}")


# -- Adam ---------------------------------------------------------------------------------------
def numpy_adam(w, grads_per_step, lr, eps, placement, b1=0.9, b2=0.999):
    w, m, v = w.astype(np.float64), 0.0, 0.0
    for t, g in enumerate(grads_per_step, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        if placement == "corrected":
            w = w - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        else:
            w = w - lr * math.sqrt(1 - b2**t) / (1 - b1**t) * m / (np.sqrt(v) + eps)
    return w, m, v


@pytest.mark.parametrize("placement", ["corrected", "uncorrected"])
def test_adam_epsilon_placement(adapter, placement):
    """Hand-set gradients of ~1e-7, where eps (1e-7; 3e-6 effective at t=1 when
    uncorrected) decides the size of the update, for two steps."""
    lr = 1e-3
    knobs = ALIGNED.replace(adam_epsilon=1e-7, adam_epsilon_placement=placement)
    model, weights = make(adapter, knobs)
    opt = adapter.make_optimizer(model, lr)
    assert isinstance(opt, torch.optim.Adam)
    assert adapter.optimizer_state(opt)["step"] == 0
    rng = np.random.default_rng(0)
    trainable = [n for n in weight_shapes(SPEC) if is_trainable(n)]
    steps = [{n: (1e-7 * rng.standard_normal(weights[n].shape)).astype(np.float32) for n in trainable} for _ in range(2)]
    params = dict(model.net.named_parameters())
    for t, g in enumerate(steps, start=1):
        for n in trainable:
            params[layout.state_key(n)].grad = layout.from_canonical(n, g[n])
        opt.step()
        got, state = adapter.export_weights(model), adapter.optimizer_state(opt)
        assert state["step"] == t
        for n in trainable:
            want, m, v = numpy_adam(weights[n], [s[n].astype(np.float64) for s in steps[:t]], lr, 1e-7, placement)
            # float32 weights of magnitude <~1: 1e-3 of lr is far above their round-off
            # and far below the placement's effect (~0.4 lr per step here)
            np.testing.assert_allclose(got[n], want, rtol=0, atol=1e-6, err_msg=n)
            # float32 moments: where b1*m and (1-b1)*g nearly cancel, the error is
            # relative to the terms, not to the result
            np.testing.assert_allclose(state[f"m/{n}"], m, rtol=1e-5, atol=1e-6 * np.abs(m).max(), err_msg=n)
            np.testing.assert_allclose(state[f"v/{n}"], v, rtol=1e-5, err_msg=n)
    other = "uncorrected" if placement == "corrected" else "corrected"
    w_other, _, _ = numpy_adam(weights["head.bias"], [s["head.bias"] for s in steps], lr, 1e-7, other)
    assert np.abs(got["head.bias"] - w_other).max() > 1e-4


def test_train_step_is_loss_grads_and_one_adam_step(adapter):
    lr = 1e-3
    model, weights = make(adapter)
    x, y = images(8), labels(8)
    loss, grads = adapter.loss_and_grads(model, x, y)
    opt = adapter.make_optimizer(model, lr)
    # same ops in the same order: the losses agree to float32 round-off
    np.testing.assert_allclose(adapter.train_step(model, opt, x, y), loss, rtol=1e-6)
    after = adapter.export_weights(model)
    for n, g in grads.items():
        want, _, _ = numpy_adam(weights[n], [g.astype(np.float64)], lr, ALIGNED.adam_epsilon, "corrected")
        np.testing.assert_allclose(after[n], want, rtol=0, atol=1e-6, err_msg=n)  # as in the placement test
    assert all(p.grad is None for p in model.net.parameters())
    assert not np.array_equal(after["stem.bn.mean"], weights["stem.bn.mean"])


# -- ReduceLROnPlateau ------------------------------------------------------------------------
STEPS = [1.0, 0.9, 0.9, 0.9, 0.9, 0.9, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8]
SLOW = [10.0, 9.7, 9.4, 9.1, 8.8, 8.5]  # 0.3 a step: an improvement by 0.1 absolute, not by 10%


@pytest.mark.parametrize(
    "losses, knobs, want",
    [
        # keras: reduce when the count of bad epochs reaches 2
        (STEPS, dict(plateau_counting="keras", plateau_threshold_mode="abs"), [1, 1, 1, 0.1, 0.1, 0.01, 0.01, 0.01, 1e-3, 1e-3, 1e-4, 1e-4]),
        (STEPS, dict(plateau_counting="keras", plateau_threshold_mode="rel"), [1, 1, 1, 0.1, 0.1, 0.01, 0.01, 0.01, 1e-3, 1e-3, 1e-4, 1e-4]),
        # torch: when it exceeds 2, one epoch later
        (STEPS, dict(plateau_counting="torch", plateau_threshold_mode="abs"), [1, 1, 1, 1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01]),
        (STEPS, dict(plateau_counting="torch", plateau_threshold_mode="rel"), [1, 1, 1, 1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01]),
        (SLOW, dict(plateau_threshold_mode="abs", plateau_min_delta=0.1), [1, 1, 1, 1, 1, 1]),
        (SLOW, dict(plateau_threshold_mode="rel", plateau_min_delta=0.1), [1, 1, 0.1, 0.1, 0.1, 0.1]),
        # Keras's cooldown 2 skips ONE epoch (its counter is decremented before it is tested)
        (STEPS, dict(plateau_cooldown=2), [1, 1, 1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 1e-3]),
        (STEPS, dict(plateau_cooldown=2, plateau_counting="torch"), [1, 1, 1, 1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01]),
    ],
)
def test_plateau_schedule(adapter, losses, knobs, want):
    knobs = Knobs(plateau_patience=2, plateau_factor=0.1, **knobs)
    np.testing.assert_allclose(adapter.plateau_schedule(losses, 1.0, knobs), want, rtol=1e-12)


def keras_plateau(losses, lr, knobs):
    """A transcription of keras.callbacks.ReduceLROnPlateau.on_epoch_end (min mode,
    min_lr 0) extended by the two knob values Keras lacks: 'torch' counting is patience
    + 1, 'rel' the relative threshold."""
    patience = knobs.plateau_patience + (1 if knobs.plateau_counting == "torch" else 0)
    best, wait, cooldown, lrs = None, 0, 0, []
    for current in losses:
        if cooldown > 0:
            cooldown -= 1
            wait = 0
        if knobs.plateau_threshold_mode == "abs":
            improved = best is None or current + knobs.plateau_min_delta < best
        else:
            improved = best is None or current < best * (1 - knobs.plateau_min_delta)
        if improved:
            best, wait = current, 0
        elif cooldown <= 0:
            wait += 1
            if wait >= patience:
                lr, cooldown, wait = lr * knobs.plateau_factor, knobs.plateau_cooldown, 0
        lrs.append(lr)
    return lrs


def test_plateau_schedule_follows_keras_semantics(adapter):
    rng = np.random.default_rng(0)
    for trial in range(60):
        knobs = Knobs(
            plateau_patience=int(rng.integers(1, 4)),
            plateau_counting=str(rng.choice(["keras", "torch"])),
            plateau_threshold_mode=str(rng.choice(["abs", "rel"])),
            plateau_min_delta=float(rng.choice([1e-4, 0.03])),
            plateau_cooldown=int(rng.integers(0, 4)),
            plateau_factor=0.5,
        )
        # a noisy decay with plateaus; the noise keeps values off exact threshold ties,
        # where Keras's current + delta < best and torch's current < best - delta can round apart
        losses = np.round(np.cumsum(rng.choice([0.0, 0.0, -0.05, 0.02], 25)) + 2.0 + rng.uniform(0, 1e-3, 25), 6)
        want = keras_plateau(losses, 0.1, knobs)
        np.testing.assert_allclose(adapter.plateau_schedule(losses, 0.1, knobs), want, rtol=1e-12, err_msg=str(knobs))


def test_plateau_keras_counting_with_no_patience_is_not_supported(adapter):
    with pytest.raises(KnobNotSupported, match="plateau_patience"):
        adapter.plateau_schedule([1.0, 1.0], 1.0, Knobs(plateau_patience=0, plateau_counting="keras"))
    assert adapter.plateau_schedule([1.0, 1.0], 1.0, Knobs(plateau_patience=0, plateau_counting="torch")) == [1.0, 0.1]


# -- input pipeline ---------------------------------------------------------------------------
def dataset(channels=3, n=16, size=28):
    rng = np.random.default_rng(7)
    imgs = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
    return Dataset(
        name="unit-test",
        path=Path("/nonexistent/unit-test.npz"),
        images={"train": imgs, "val": imgs[:4], "test": imgs[:4]},
        labels={"train": rng.integers(0, 7, n), "val": np.zeros(4, np.int64), "test": np.zeros(4, np.int64)},
        num_classes=7,
    )


@pytest.mark.parametrize(
    "knobs, exact",
    [
        (Knobs(grayscale_rounding="uint8"), True),  # PIL's convert('L')
        (Knobs(grayscale_rounding="uint8", grayscale_coefficients=(0.2989, 0.587, 0.114)), True),
        (Knobs(grayscale_rounding="uint8", input_scaling="symmetric"), False),
        (Knobs(grayscale_rounding="float"), False),
        (Knobs(grayscale_rounding="float", grayscale_coefficients=(0.2989, 0.587, 0.114), input_scaling="symmetric"), False),
    ],
)
def test_preprocess_matches_oracle(adapter, knobs, exact):
    data = dataset()
    idx = np.array([5, 0, 11, 3])
    got = adapter.preprocess(data, "train", idx, knobs, train=False, seed=0)
    want = nm.preprocess(data.images["train"][idx], knobs)
    chex.assert_shape(got, (4, 28, 28, 1))
    assert got.dtype == np.float32
    if exact:
        np.testing.assert_array_equal(got, want.astype(np.float32))
    else:
        # float32 weighted sums and scaling of values in [-1, 1]: a few ulp
        np.testing.assert_allclose(got, want, rtol=0, atol=3e-7)


def test_preprocess_one_channel(adapter):
    data = dataset(channels=1)
    got = adapter.preprocess(data, "train", np.arange(3), Knobs(), train=False, seed=0)
    np.testing.assert_array_equal(got, nm.preprocess(data.images["train"][:3], Knobs()).astype(np.float32))


def test_hflip_augmentation(adapter):
    data = dataset()
    idx = np.arange(16)
    knobs = Knobs(train_augmentation="hflip")
    plain = adapter.preprocess(data, "train", idx, knobs.replace(train_augmentation="none"), train=True, seed=3)
    got = adapter.preprocess(data, "train", idx, knobs, train=True, seed=3)
    flipped = np.array([np.array_equal(g, p[:, ::-1]) for g, p in zip(got, plain)])
    unchanged = np.array([np.array_equal(g, p) for g, p in zip(got, plain)])
    assert (flipped | unchanged).all() and 0 < flipped.sum() < 16
    np.testing.assert_array_equal(adapter.preprocess(data, "train", idx, knobs, train=True, seed=3), got)
    assert not np.array_equal(adapter.preprocess(data, "train", idx, knobs, train=True, seed=4), got)
    # evaluation is not augmented, unless eval_augmentation says so
    np.testing.assert_array_equal(adapter.preprocess(data, "train", idx, knobs, train=False, seed=3), plain)
    np.testing.assert_array_equal(adapter.preprocess(data, "train", idx, knobs.replace(eval_augmentation=True), train=False, seed=3), got)


def test_make_loader(adapter):
    from impls.torch.pipeline import make_loader

    data = dataset()
    order = [3, 1, 4, 15, 9]
    batches = list(make_loader(data, "train", Knobs(), train=True, seed=0, batch_size=2, order=order))
    assert [len(y) for _, y in batches] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), data.labels["train"][order])
    np.testing.assert_array_equal(np.concatenate([x for x, _ in batches]), adapter.preprocess(data, "train", np.array(order), Knobs(), False, 0))
    shuffled = [y for _, y in make_loader(data, "train", Knobs(), train=True, seed=0, batch_size=16)]
    assert sorted(shuffled[0].tolist()) == sorted(data.labels["train"].tolist())


# -- device -----------------------------------------------------------------------------------
def test_device_and_environment():
    env = Adapter("auto").environment()
    assert set(env) >= {"versions", "device", "precision", "determinism"}
    assert env["versions"]["torch"] == torch.__version__
    assert "TF32 off" in env["precision"]
    assert torch.backends.cudnn.allow_tf32 is False and torch.backends.cuda.matmul.allow_tf32 is False
    if torch.cuda.is_available():
        assert env["device"].startswith("cuda")
    else:
        assert env["device"] == "cpu"
        with pytest.raises(base.DeviceUnavailable):
            Adapter("gpu")
