"""The TensorFlow/Keras implementation against the contract and the float64 numpy oracle."""

import hashlib
import os
from pathlib import Path

import chex
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("keras")

import numpy_model as nm  # noqa: E402

from arbiter.data import Dataset  # noqa: E402
from arbiter.gabor import gabor_bank  # noqa: E402
from arbiter.knobs import preset  # noqa: E402
from arbiter.padding import conv_padding  # noqa: E402
from arbiter.spec import ACTIVATIONS, ModelSpec, is_trainable, weight_shapes  # noqa: E402
from impls import base  # noqa: E402
from impls.keras import pipeline  # noqa: E402
from impls.keras.adapter import Adapter  # noqa: E402
from impls.keras.model import make_adam  # noqa: E402

import keras  # noqa: E402  (after impls.keras pinned the backend)

SPEC = ModelSpec()
ALIGNED = preset("aligned")
# float32 against the float64 oracle: each conv is an up-to-864-term float32 dot product
# (~1e-6 relative), compounded over 8 layers and, in train mode, divided by batch standard
# deviations of small batches; activations reach ~10, logits ~1.
ACT_TOL = dict(atol=3e-5, rtol=1e-5)
LOGIT_TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def adapter():
    return Adapter("cpu")


@pytest.fixture(scope="module")
def weights():
    return nm.random_weights(SPEC, 0)


def images(n, size=28, seed=1):
    return np.random.default_rng(seed).uniform(0, 1, (n, size, size, 1)).astype(np.float32)


def labels(n, seed=2):
    return np.random.default_rng(seed).integers(0, SPEC.num_classes, n)


def model_with(adapter, weights, knobs=ALIGNED):
    model = adapter.build(SPEC, knobs, seed=0)
    adapter.import_weights(model, weights)
    return model


def oracle(knobs, weights, x, train):
    return nm.forward(SPEC, knobs, weights, gabor_bank(SPEC.gabor, knobs.gabor_normalization), x, train)


@pytest.fixture(scope="module")
def aligned_model(adapter, weights):
    return model_with(adapter, weights)


# -- structure and weights -------------------------------------------------------------


def test_parameter_count(adapter, aligned_model):
    assert adapter.parameter_count(aligned_model) == 328_991


def test_export_names_shapes_dtype(adapter, aligned_model):
    exported = adapter.export_weights(aligned_model)
    assert list(exported) == list(weight_shapes(SPEC))
    chex.assert_trees_all_equal_shapes_and_dtypes(exported, {k: np.zeros(s, np.float32) for k, s in weight_shapes(SPEC).items()})


def test_round_trip_is_bit_exact(adapter, aligned_model, weights):
    exported = adapter.export_weights(aligned_model)
    for name, w in weights.items():
        np.testing.assert_array_equal(exported[name], w, err_msg=name)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda w: w.pop("down1.bn.var"), "down1.bn.var"),
        (lambda w: w.update({"head.kernel": np.zeros((7, 96), np.float32)}), "head.kernel"),
        (lambda w: w.update({"head.extra": np.zeros(3, np.float32)}), "head.extra"),
    ],
    ids=["missing", "transposed", "unknown"],
)
def test_import_rejects_bad_weights(adapter, aligned_model, weights, damage, message):
    bad = dict(weights)
    damage(bad)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        adapter.import_weights(aligned_model, bad)


def test_build_is_seeded_and_initialised_per_contract(adapter):
    a, b, c = (adapter.export_weights(adapter.build(SPEC, ALIGNED, seed)) for seed in (3, 3, 4))
    chex.assert_trees_all_equal(a, b)
    assert not np.array_equal(a["stem.conv.kernel"], c["stem.conv.kernel"])
    for name, w in a.items():
        leaf = name.rsplit(".", 1)[1]
        if ".bn" in name:
            np.testing.assert_array_equal(w, {"scale": 1, "bias": 0, "mean": 0, "var": 1}[leaf] * np.ones_like(w), err_msg=name)
        elif leaf == "bias":
            np.testing.assert_array_equal(w, 0 * w, err_msg=name)  # bias_init 'zeros'


@pytest.mark.parametrize("normalization", ["l2", "none"])
def test_gabor_bank_is_the_numpy_bank_and_frozen(adapter, normalization):
    model = adapter.build(SPEC, ALIGNED.replace(gabor_normalization=normalization), seed=0)
    np.testing.assert_array_equal(adapter.gabor_kernel(model), gabor_bank(SPEC.gabor, normalization))
    assert not model.net.get_layer("gabor").trainable


# kernel: name -> (distribution, bound or std as a function of fan_in, fan_out)
INITIALISERS = {
    "glorot_uniform": ("uniform", lambda i, o: np.sqrt(6 / (i + o))),
    "kaiming_uniform_a_sqrt5": ("uniform", lambda i, o: 1 / np.sqrt(i)),
    "lecun_normal": ("normal", lambda i, o: np.sqrt(1 / i)),
    "he_normal": ("normal", lambda i, o: np.sqrt(2 / i)),
}


@pytest.mark.parametrize("kernel_init", list(INITIALISERS))
def test_initialisers(adapter, kernel_init):
    model = adapter.build(SPEC, ALIGNED.replace(kernel_init=kernel_init, bias_init="fan_in_uniform"), seed=0)
    w = adapter.export_weights(model)
    kernel = w["block2.conv1.kernel"].astype(np.float64)  # 82,944 draws
    fan_in, fan_out = 3 * 3 * 96, 3 * 3 * 96
    kind, scale = INITIALISERS[kernel_init]
    target = scale(fan_in, fan_out)
    if kind == "uniform":
        assert np.abs(kernel).max() <= target
        assert np.abs(kernel).max() > 0.99 * target
    else:  # Keras draws a truncated normal rescaled to the target std
        assert abs(kernel.std() / target - 1) < 0.02  # 82,944 draws: std error ~0.3%
    bias = w["head.bias"]  # fan_in 96
    assert np.abs(bias).max() <= 1 / np.sqrt(96) and np.abs(bias).min() > 0


# -- forward pass ------------------------------------------------------------------------


@pytest.mark.parametrize("preset_name", ["aligned", "tf-native"])
@pytest.mark.parametrize("size", [28, 64])
def test_forward_matches_oracle(adapter, weights, preset_name, size):
    knobs = preset(preset_name)
    model = model_with(adapter, weights, knobs)
    x = images(3, size)
    for train in (False, True):
        out, ref = adapter.forward(model, x, train), oracle(knobs, weights, x, train)
        assert list(out) == list(ACTIVATIONS)
        for name in ACTIVATIONS:
            assert out[name].dtype == np.float32
            chex.assert_trees_all_close(out[name], ref[name], **(LOGIT_TOL if name == "logits" else ACT_TOL), custom_message=f"{name} train={train}")


@pytest.mark.parametrize(
    "knob, value, first_changed",
    [
        ("stride2_padding", "symmetric", "down1"),
        ("bn_relu_order", "relu_bn", "stem"),
        ("bn_epsilon", 1e-5, "stem"),
        ("gabor_normalization", "none", "gabor"),
    ],
)
def test_model_knobs_move_the_right_activation(adapter, weights, aligned_model, knob, value, first_changed):
    knobs = ALIGNED.replace(**{knob: value})
    model = model_with(adapter, weights, knobs)
    x = images(2)
    out, default = adapter.forward(model, x, False), adapter.forward(aligned_model, x, False)
    ref = oracle(knobs, weights, x, False)
    for name in ACTIVATIONS:
        chex.assert_trees_all_close(out[name], ref[name], **(LOGIT_TOL if name == "logits" else ACT_TOL), custom_message=name)
    earlier = ACTIVATIONS[: ACTIVATIONS.index(first_changed)]
    for name in earlier:
        np.testing.assert_array_equal(out[name], default[name], err_msg=name)
    assert np.abs(out[first_changed] - default[first_changed]).max() > 1e-3


@pytest.mark.parametrize("size", [28, 14])
def test_keras_same_is_conv_padding_tf_same(size):
    """Keras's padding='same' at stride 2 is the tf_same split (0, 1), not the symmetric one."""
    x = images(2, size)[..., :1].repeat(4, axis=-1)
    kernel = np.random.default_rng(0).normal(size=(3, 3, 4, 5)).astype(np.float32)

    def conv(padding, pads=None):
        layer = keras.layers.Conv2D(5, 3, strides=2, padding=padding, use_bias=False)
        layer.build(x.shape)
        layer.kernel.assign(kernel)
        h = keras.layers.ZeroPadding2D((pads, pads))(x) if pads else x
        return keras.ops.convert_to_numpy(layer(h))

    assert conv_padding(size, 3, 2, "tf_same") == (0, 1)
    same = conv("same")
    # explicit padding changes only the summation order of the same products
    chex.assert_trees_all_close(same, conv("valid", conv_padding(size, 3, 2, "tf_same")), atol=1e-5)
    assert np.abs(same - conv("valid", conv_padding(size, 3, 2, "symmetric"))).max() > 1e-2


@pytest.mark.parametrize("running_var", ["biased", "unbiased"])
def test_bn_running_statistics_after_one_train_step(adapter, weights, running_var):
    knobs = ALIGNED.replace(bn_momentum=0.9, bn_running_var=running_var)
    model = model_with(adapter, weights, knobs)
    x, y = images(8), labels(8)
    adapter.train_step(model, adapter.make_optimizer(model, 1e-3), x, y)
    after = adapter.export_weights(model)
    # down2's conv output, pre-BN, from the oracle's train-mode block1 output
    pre_bn = nm.conv2d(oracle(knobs, weights, x, True)["block1"], weights["down2.conv.kernel"].astype(np.float64), 2, "tf_same")
    n = pre_bn.size // pre_bn.shape[-1]  # 8 * 7 * 7 = 392
    mean, biased = pre_bn.mean((0, 1, 2)), pre_bn.var((0, 1, 2))
    batch_var = biased * n / (n - 1) if running_var == "unbiased" else biased
    expected_var = 0.9 * weights["down2.bn.var"] + 0.1 * batch_var  # momentum weighs the OLD value
    other_var = 0.9 * weights["down2.bn.var"] + 0.1 * (biased * n / (n - 1) if running_var == "biased" else biased)
    # float32 statistics of 392 x 96 values: ~1e-6 relative
    chex.assert_trees_all_close(after["down2.bn.mean"], 0.9 * weights["down2.bn.mean"] + 0.1 * mean, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(after["down2.bn.var"], expected_var, atol=1e-5, rtol=1e-5)
    assert np.abs(after["down2.bn.var"] - other_var).max() > 1e-4  # the two conventions are told apart


def test_forward_and_loss_and_grads_leave_the_model_unchanged(adapter, aligned_model):
    before = adapter.export_weights(aligned_model)
    x, y = images(4), labels(4)
    adapter.forward(aligned_model, x, True)
    adapter.forward(aligned_model, x, False)
    adapter.loss_and_grads(aligned_model, x, y)
    chex.assert_trees_all_equal(adapter.export_weights(aligned_model), before)


# -- loss and gradients ----------------------------------------------------------------------


def numpy_cross_entropy(logits, y, kind):
    logits = logits.astype(np.float64)
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    if kind == "clipped_probs":
        p = np.exp(logp)
        logp = np.log(np.clip(p / p.sum(-1, keepdims=True), 1e-7, 1 - 1e-7))
    return -logp[np.arange(len(y)), y].mean()


@pytest.mark.parametrize("kind", ["logits", "clipped_probs"])
def test_loss_matches_numpy(adapter, weights, kind):
    model = model_with(adapter, weights, ALIGNED.replace(loss=kind))
    x, y = images(4), labels(4)
    loss, _ = adapter.loss_and_grads(model, x, y)
    logits = adapter.forward(model, x, True)["logits"]
    # float32 log-softmax of logits ~1: a few ulp
    np.testing.assert_allclose(loss, numpy_cross_entropy(logits, y, kind), rtol=1e-6)


def test_clipped_probs_clips_where_keras_would_not(adapter, weights):
    """Logits so extreme that p[y] underflows: the knob's loss is -log(1e-7), and the clip
    also stops the gradient; from logits the loss is the full 200."""
    extreme = dict(weights, **{"head.kernel": np.zeros((96, 7), np.float32), "head.bias": np.array([0, 200, 0, 0, 0, 0, 0], np.float32)})
    x, y = images(2), np.array([0, 1])
    clipped = model_with(adapter, extreme, ALIGNED.replace(loss="clipped_probs"))
    loss, grads = adapter.loss_and_grads(clipped, x, y)
    np.testing.assert_allclose(loss, (-np.log(1e-7) - np.log1p(-1e-7)) / 2, rtol=1e-6)  # float32 log
    np.testing.assert_array_equal(grads["head.bias"], 0)
    from_logits = model_with(adapter, extreme, ALIGNED)
    np.testing.assert_allclose(adapter.loss_and_grads(from_logits, x, y)[0], 100, rtol=1e-6)


def test_keras_native_sparse_crossentropy_skips_the_clip_behind_a_softmax():
    """Pins what Keras 3 on TensorFlow does natively (documented in impls.keras.model):
    from_logits=False on a Keras softmax output uses the cached logits, eager and graph
    alike; a plain probability tensor is clipped."""
    logits = tf.constant([[0.0, 200.0, 0.0]])
    y = tf.constant([0])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=False)
    np.testing.assert_allclose(loss(y, keras.activations.softmax(logits)), 200, rtol=1e-6)
    np.testing.assert_allclose(tf.function(lambda: loss(y, keras.activations.softmax(logits)))(), 200, rtol=1e-6)
    np.testing.assert_allclose(loss(y, tf.constant(tf.nn.softmax(logits).numpy())), -np.log(1e-7), rtol=1e-6)


def test_head_gradients_are_softmax_minus_onehot(adapter, aligned_model):
    x, y = images(4), labels(4)
    _, grads = adapter.loss_and_grads(aligned_model, x, y)
    out = adapter.forward(aligned_model, x, True)
    logits, pool = out["logits"].astype(np.float64), out["pool"].astype(np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    delta = (p - np.eye(SPEC.num_classes)[y]) / len(y)
    # float32 gradients of O(0.1): round-off ~1e-7
    chex.assert_trees_all_close(grads["head.bias"], delta.sum(0), atol=1e-6)
    chex.assert_trees_all_close(grads["head.kernel"], pool.T @ delta, atol=1e-6)


def test_gradients_match_float64_finite_differences_of_the_oracle(adapter, aligned_model, weights):
    """Directional derivatives of the float64 oracle's train-mode loss: the step is tiny
    (1e-7) so it crosses no ReLU kink; at 1e-5 kinks already move conv directions by %."""
    x, y = images(2), labels(2)
    _, grads = adapter.loss_and_grads(aligned_model, x, y)
    w64 = {k: v.astype(np.float64) for k, v in weights.items()}

    def oracle_loss(w):
        return numpy_cross_entropy(oracle(ALIGNED, w, x, True)["logits"], y, "logits")

    rng = np.random.default_rng(5)
    groups = {
        "all": list(grads),
        "batchnorm": [k for k in grads if ".bn" in k],
        "dense": [k for k in grads if k.startswith(("head", "block2.se"))],
    }
    h = 1e-7
    for group, names in groups.items():
        direction = {k: rng.normal(size=grads[k].shape) for k in names}
        shifted = [{**w64, **{k: w64[k] + t * d for k, d in direction.items()}} for t in (h, -h)]
        numeric = (oracle_loss(shifted[0]) - oracle_loss(shifted[1])) / (2 * h)
        analytic = sum(float((grads[k].astype(np.float64) * d).sum()) for k, d in direction.items())
        # float32 gradients through train-mode BN (sums over 1,568 values per channel) vs
        # float64: ~1e-6 relative measured; the FD itself is good to ~1e-8
        np.testing.assert_allclose(analytic, numeric, rtol=2e-5, err_msg=group)


# -- Adam --------------------------------------------------------------------------------


def numpy_adam(params, grads_per_step, lr, eps, placement):
    p, m, v = params.astype(np.float64), 0.0, 0.0
    for t, g in enumerate(grads_per_step, start=1):
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g**2
        m_hat, v_hat = m / (1 - 0.9**t), v / (1 - 0.999**t)
        eps_t = eps if placement == "corrected" else eps / np.sqrt(1 - 0.999**t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps_t)
    return p


@pytest.mark.parametrize("placement", ["corrected", "uncorrected"])
def test_adam_epsilon_placement_against_numpy(placement):
    """Gradients ~1e-7 sit where eps decides the step: corrected eps 1e-7 halves it,
    uncorrected eps/sqrt(1 - b2) ~3e-6 shrinks it 30-fold."""
    lr, eps = 1e-3, 1e-7
    p0 = np.array([0.5, -0.5, 0.25, 1.0], np.float32)
    grads = [np.array([1e-7, -3e-7, 1e-3, 1.0], np.float32), np.array([2e-7, 1e-7, -2e-3, 0.5], np.float32)]
    optimizer = make_adam(lr, ALIGNED.replace(adam_epsilon=eps, adam_epsilon_placement=placement))
    var = keras.Variable(p0)
    for steps, g in enumerate(grads, start=1):
        optimizer.apply([tf.constant(g)], [var])
        expected = numpy_adam(p0, [gr.astype(np.float64) for gr in grads[:steps]], lr, eps, placement)
        # float32 parameters near 1 are spaced 6e-8 apart
        chex.assert_trees_all_close(var.numpy(), expected, atol=2e-7, rtol=0)
        other = numpy_adam(p0, [gr.astype(np.float64) for gr in grads[:steps]], lr, eps, {"corrected": "uncorrected"}.get(placement, "corrected"))
        assert np.abs(expected[0] - other[0]) > 1e-5  # the placements are told apart here


@pytest.mark.parametrize("placement", ["corrected", "uncorrected"])
def test_train_step_applies_adam_to_the_reported_gradients(adapter, weights, placement):
    knobs = ALIGNED.replace(adam_epsilon_placement=placement)
    model = model_with(adapter, weights, knobs)
    lr, x, y = 1e-3, images(8), labels(8)
    optimizer = adapter.make_optimizer(model, lr)
    history = []
    for step in (1, 2):
        loss, grads = adapter.loss_and_grads(model, x, y)
        history.append(grads)
        assert adapter.train_step(model, optimizer, x, y) == pytest.approx(loss, rel=1e-6)
        after = adapter.export_weights(model)
        for name in grads:
            expected = numpy_adam(weights[name], [g[name].astype(np.float64) for g in history], lr, knobs.adam_epsilon, placement)
            # weights up to ~2 are spaced 1e-7 apart in float32, 1e-4 of lr
            chex.assert_trees_all_close(after[name], expected, atol=1e-3 * lr, rtol=0, custom_message=f"{name} step {step}")
    state = adapter.optimizer_state(optimizer)
    assert set(state) == {f"{k}/{n}" for n in weight_shapes(SPEC) if is_trainable(n) for k in "mv"} | {"step"}
    assert state["step"] == 2
    g1, g2 = (h["head.kernel"].astype(np.float64) for h in history)
    # float32 moments of O(0.1) gradients
    chex.assert_trees_all_close(state["m/head.kernel"], 0.9 * 0.1 * g1 + 0.1 * g2, rtol=1e-5, atol=1e-9)
    chex.assert_trees_all_close(state["v/head.kernel"], 0.999 * 0.001 * g1**2 + 0.001 * g2**2, rtol=1e-5, atol=1e-12)


# -- ReduceLROnPlateau ----------------------------------------------------------------------

PLATEAU = [1.0, 0.9, 0.9, 0.9, 0.9, 0.9, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8]
STEADY = [10.0, 9.7, 9.4, 9.1, 8.8, 8.5]  # drops of 0.3: improvements by 'abs' 0.05, not by 'rel' 5%


@pytest.mark.parametrize(
    "counting, mode, cooldown, patience, min_delta, losses, lr, expected",
    [
        # keras: reduce when the 2nd bad epoch is counted
        ("keras", "abs", 0, 2, 1e-4, PLATEAU, 1e-2, [1e-2, 1e-2, 1e-2, 1e-3, 1e-3, 1e-4, 1e-4, 1e-4, 1e-5, 1e-5, 1e-6, 1e-6]),
        # torch: one epoch later, at the 3rd bad epoch
        ("torch", "abs", 0, 2, 1e-4, PLATEAU, 1e-2, [1e-2] * 4 + [1e-3] * 5 + [1e-4] * 3),
        # Keras cooldown: the epoch that ends the cooldown already counts
        ("keras", "abs", 2, 2, 1e-4, PLATEAU, 1e-2, [1e-2] * 3 + [1e-3] * 5 + [1e-4] * 3 + [1e-5]),
        ("keras", "abs", 0, 1, 0.05, STEADY, 1.0, [1.0] * 6),
        ("keras", "rel", 0, 1, 0.05, STEADY, 1.0, [1.0, 0.1, 0.1, 0.01, 0.01, 0.001]),
        ("torch", "rel", 0, 1, 0.05, STEADY, 1.0, [1.0] * 6),
    ],
)
# Keras's callback itself reads the rate with np.array(variable), which numpy 2 warns about
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_plateau_schedule(adapter, counting, mode, cooldown, patience, min_delta, losses, lr, expected):
    knobs = ALIGNED.replace(
        plateau_counting=counting, plateau_threshold_mode=mode, plateau_cooldown=cooldown, plateau_patience=patience, plateau_min_delta=min_delta
    )
    # Keras keeps the rate in a float32 variable
    np.testing.assert_allclose(adapter.plateau_schedule(losses, lr, knobs), expected, rtol=1e-6)


# -- input pipeline ------------------------------------------------------------------------------


def write_npz(path, channels, n_train=16, size=28, seed=0):
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if channels == 3 else (size, size)
    arrays = {}
    for split, n in (("train", n_train), ("val", 4), ("test", 4)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 7, (n, 1), dtype=np.uint8)
    np.savez(path, **arrays)
    imgs = {s: arrays[f"{s}_images"] if channels == 3 else arrays[f"{s}_images"][..., None] for s in ("train", "val", "test")}
    labs = {s: arrays[f"{s}_labels"].reshape(-1).astype(np.int64) for s in ("train", "val", "test")}
    return Dataset(name=path.name, path=path, images=imgs, labels=labs, num_classes=7)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("arbiter-cache")
    old = os.environ.get("ARBITER_CACHE")
    os.environ["ARBITER_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("ARBITER_CACHE")
    else:
        os.environ["ARBITER_CACHE"] = old


@pytest.fixture(scope="module")
def rgb_data(cache, tmp_path_factory):
    return write_npz(tmp_path_factory.mktemp("npz") / "rgb.npz", channels=3)


ORDER = np.array([5, 0, 9, 2, 15])


@pytest.mark.parametrize(
    "coefficients, rounding, scaling, atol",
    [
        # PIL's fixed-point convert('L') in int32 tf ops, then an exactly rounded /255
        ((0.299, 0.587, 0.114), "uint8", "unit", 0.0),
        ((0.2989, 0.587, 0.114), "uint8", "unit", 0.0),  # round half up in float64: exact off ties
        # tf.image.convert_image_dtype scales by float32(1/255) and the gray sum is a
        # 3-term float32 dot: ~2 ulp at 1; [-1, 1] doubles it
        ((0.2989, 0.587, 0.114), "float", "unit", 2e-7),
        ((0.299, 0.587, 0.114), "float", "symmetric", 4e-7),
        ((0.2989, 0.587, 0.114), "uint8", "symmetric", 2e-7),
    ],
)
def test_preprocess_matches_oracle_in_the_order_asked(adapter, rgb_data, coefficients, rounding, scaling, atol):
    knobs = ALIGNED.replace(grayscale_coefficients=coefficients, grayscale_rounding=rounding, input_scaling=scaling)
    x = adapter.preprocess(rgb_data, "train", ORDER, knobs, train=False, seed=0)
    expected = nm.preprocess(rgb_data.images["train"][ORDER], knobs)
    assert x.dtype == np.float32 and x.shape == (len(ORDER), 28, 28, 1)
    if atol == 0 and coefficients == (0.2989, 0.587, 0.114):
        # floor(x . c + 0.5) is ill-defined where x . c is exactly k + 1/2 in real numbers:
        # float summation order decides there (~0.01% of pixels for these coefficients; (0.3, 0.6, 0.1) ties on
        # ~10%). Exact elsewhere, one gray level apart at most on ties.
        rgb = rgb_data.images["train"][ORDER].astype(np.int64)
        tie = ((rgb @ np.array([2989, 5870, 1140])) % 10000 == 5000)[..., None]
        np.testing.assert_array_equal(np.where(tie, 0, x), np.where(tie, 0, expected).astype(np.float32))
        assert np.abs(x - expected).max() <= 1 / 255 + 1e-7
    elif atol == 0:
        np.testing.assert_array_equal(x, expected.astype(np.float32))
    else:
        chex.assert_trees_all_close(x, expected, atol=atol, rtol=0)


def flips(x, reference):
    """Per image: True if mirrored, False if untouched (asserting it is one of the two)."""
    out = []
    for a, r in zip(x, reference):
        same, mirrored = np.allclose(a, r, atol=1e-6), np.allclose(a, r[:, ::-1], atol=1e-6)
        assert same != mirrored
        out.append(mirrored)
    return out


def test_hflip_is_seeded_and_train_only_unless_eval_augmentation(adapter, rgb_data):
    knobs = ALIGNED.replace(train_augmentation="hflip")
    everything = np.arange(16)
    reference = nm.preprocess(rgb_data.images["train"], knobs)
    seed0 = flips(adapter.preprocess(rgb_data, "train", everything, knobs, train=True, seed=0), reference)
    assert 0 < sum(seed0) < 16
    assert flips(adapter.preprocess(rgb_data, "train", everything, knobs, train=True, seed=0), reference) == seed0
    assert flips(adapter.preprocess(rgb_data, "train", everything, knobs, train=True, seed=1), reference) != seed0
    # a flip belongs to (seed, example), not to the position it is read at
    assert flips(adapter.preprocess(rgb_data, "train", everything[::-1], knobs, train=True, seed=0), reference[::-1]) == seed0[::-1]
    assert not any(flips(adapter.preprocess(rgb_data, "train", everything, knobs, train=False, seed=0), reference))
    eval_aug = knobs.replace(eval_augmentation=True)
    assert flips(adapter.preprocess(rgb_data, "train", everything, eval_aug, train=False, seed=0), reference) == seed0


def test_tfds_preparation_is_keyed_by_md5_and_reused(rgb_data, cache):
    builder = pipeline.prepared_builder(rgb_data)
    md5 = hashlib.md5(Path(rgb_data.path).read_bytes()).hexdigest()
    assert Path(builder.data_dir).is_relative_to(cache / "tfds" / md5)
    info = Path(builder.data_dir) / "dataset_info.json"
    stamp = info.stat().st_mtime_ns
    pipeline._prepared_builder.cache_clear()
    assert Path(pipeline.prepared_builder(rgb_data).data_dir) == Path(builder.data_dir)
    assert info.stat().st_mtime_ns == stamp  # read back, not prepared again


def test_make_tf_dataset_batches_in_order_and_shuffles_whole_split(rgb_data):
    order = np.array([3, 1, 4, 1, 5])
    batches = list(pipeline.make_tf_dataset(rgb_data, "train", ALIGNED, train=True, seed=0, batch_size=2, order=order))
    assert [tuple(x.shape) for x, _ in batches] == [(2, 28, 28, 1), (2, 28, 28, 1), (1, 28, 28, 1)]
    np.testing.assert_array_equal(np.concatenate([y.numpy() for _, y in batches]), rgb_data.labels["train"][order])
    shuffled = list(pipeline.make_tf_dataset(rgb_data, "train", ALIGNED, train=True, seed=0, batch_size=16))
    x = np.concatenate([b[0].numpy() for b in shuffled])
    reference = nm.preprocess(rgb_data.images["train"], ALIGNED).astype(np.float32)
    # every example once: match each output to its source image (float paths: 2 ulp)
    matches = [int(np.argmin(np.abs(reference - xi).max(axis=(1, 2, 3)))) for xi in x]
    assert sorted(matches) == list(range(16)) and matches != list(range(16))


def test_one_channel_npz_skips_grayscale(adapter, cache, tmp_path):
    data = write_npz(tmp_path / "gray.npz", channels=1, n_train=4)
    x = adapter.preprocess(data, "val", np.arange(4), ALIGNED, train=False, seed=0)
    chex.assert_shape(x, (4, 28, 28, 1))
    chex.assert_trees_all_close(x, data.images["val"] / 255.0, atol=1e-7, rtol=0)  # float32(1/255) scaling


# -- device and environment ----------------------------------------------------------------


def test_gpu_request_without_gpu_raises():
    if tf.config.list_physical_devices("GPU"):
        pytest.skip("a GPU is present")
    with pytest.raises(base.DeviceUnavailable):
        Adapter("gpu")


def test_environment_reports_device_and_precision(adapter):
    env = adapter.environment()
    assert {"tensorflow", "keras", "tensorflow-datasets"} <= set(env["versions"])
    assert env["device"] == "CPU"
    assert "TensorFloat-32 off" in env["precision"]
    assert "enable_op_determinism" in env["determinism"] and "oneDNN" in env["determinism"]
    assert not tf.config.experimental.tensor_float_32_execution_enabled()
