"""Cross-framework parity: the three implementations compute the same thing.

Every framework must be installed here (CI installs all three): a missing one fails these
tests rather than skipping them.
"""

import itertools

import chex
import numpy as np
import pytest

from arbiter.frameworks import FRAMEWORK_KEYS, load_adapter
from arbiter.knobs import PRESETS
from arbiter.spec import ACTIVATIONS, ModelSpec, trainable_parameter_count, weight_shapes
from arbiter.stages import SCRIPTED_VAL_LOSSES
from arbiter.weights import load_weights, probe_weights, save_weights

SPEC = ModelSpec()
ALIGNED = PRESETS["aligned"]


@pytest.fixture(scope="module")
def adapters():
    return {fw: load_adapter(fw, "cpu") for fw in FRAMEWORK_KEYS}


@pytest.fixture(scope="module")
def models(adapters):
    return {fw: a.build(SPEC, ALIGNED, seed=fw_index) for fw_index, (fw, a) in enumerate(adapters.items())}


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(1)
    return rng.random((8, 28, 28, 1), dtype=np.float32), rng.integers(0, 7, 8)


def test_parameter_count_identical(adapters, models):
    counts = {fw: adapters[fw].parameter_count(models[fw]) for fw in adapters}
    assert set(counts.values()) == {trainable_parameter_count(SPEC)}, counts


@pytest.mark.parametrize("src, dst", list(itertools.permutations(FRAMEWORK_KEYS, 2)))
def test_weight_transfer_is_bit_exact(adapters, models, src, dst, tmp_path):
    # through the canonical .npz file, as a user would move weights
    exported = adapters[src].export_weights(models[src])
    path = save_weights(tmp_path / f"{src}.npz", exported, SPEC)
    loaded, spec = load_weights(path)
    assert spec == SPEC
    adapters[dst].import_weights(models[dst], loaded)
    back = adapters[dst].export_weights(models[dst])
    assert list(back) == list(weight_shapes(SPEC))
    for name in exported:
        np.testing.assert_array_equal(back[name], exported[name], err_msg=f"{src}->{dst} {name}")


def test_exports_do_not_alias_the_model(adapters, models, batch):
    x, y = batch
    for fw, adapter in adapters.items():
        adapter.import_weights(models[fw], probe_weights(SPEC))
        before = adapter.export_weights(models[fw])
        snapshot = {k: v.copy() for k, v in before.items()}
        adapter.train_step(models[fw], adapter.make_optimizer(models[fw], 1e-3), x, y)
        for name in before:
            np.testing.assert_array_equal(before[name], snapshot[name], err_msg=f"{fw}: export of {name} changed when the model trained")


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_aligned_forward_agrees_per_activation(adapters, models, batch, train):
    x, _ = batch
    weights = probe_weights(SPEC, seed=3)
    acts = {}
    for fw, adapter in adapters.items():
        adapter.import_weights(models[fw], weights)
        acts[fw] = adapter.forward(models[fw], x, train=train)
    for a, b in itertools.combinations(FRAMEWORK_KEYS, 2):
        # the bar: logits within 1e-5 max abs in float32 on CPU
        chex.assert_trees_all_close(acts[a]["logits"], acts[b]["logits"], atol=1e-5, rtol=0)
        for name in ACTIVATIONS:
            # activations reach ~8 in train mode: 1e-5 absolute plus 1e-5 relative covers
            # float32 round-off through 7 convolutions (measured <= 1.1e-5 at block2, train)
            chex.assert_trees_all_close(acts[a][name], acts[b][name], atol=1e-5, rtol=1e-5, custom_message=f"{a}-{b} {name}")


def test_native_padding_shifts_the_grid_by_one_pixel(adapters, models, batch):
    """TF-style 'SAME' vs symmetric k//2 on the stride-2 conv: same shape, shifted samples."""
    x, _ = batch
    weights = probe_weights(SPEC, seed=3)
    outs = {}
    for mode in ("tf_same", "symmetric"):
        model = adapters["torch"].build(SPEC, ALIGNED.replace(stride2_padding=mode), seed=0)
        adapters["torch"].import_weights(model, weights)
        outs[mode] = adapters["torch"].forward(model, x, train=False)
    assert outs["tf_same"]["down1"].shape == outs["symmetric"]["down1"].shape
    np.testing.assert_array_equal(outs["tf_same"]["stem"], outs["symmetric"]["stem"])
    assert np.abs(outs["tf_same"]["down1"] - outs["symmetric"]["down1"]).max() > 0.1


@pytest.mark.parametrize(
    "changes",
    [{}, {"plateau_counting": "torch"}, {"plateau_threshold_mode": "rel"}, {"plateau_cooldown": 2}, {"plateau_patience": 4, "plateau_factor": 0.5}],
    ids=["aligned", "torch-counting", "rel", "cooldown", "patience-factor"],
)
def test_plateau_schedules_agree_given_the_same_knobs(adapters, changes):
    knobs = ALIGNED.replace(**changes)
    lrs = {fw: np.asarray(a.plateau_schedule(SCRIPTED_VAL_LOSSES, 1e-3, knobs)) for fw, a in adapters.items()}
    for a, b in itertools.combinations(FRAMEWORK_KEYS, 2):
        # Keras keeps the rate in float32 and optax its scale: 1e-6 relative
        chex.assert_trees_all_close(lrs[a], lrs[b], rtol=1e-6, atol=0, custom_message=f"{a}-{b} {changes}")
    assert lrs["flax"][-1] < 1e-3, "the script must trigger at least one reduction"
