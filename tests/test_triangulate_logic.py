"""The verdict and attribution logic, on stand-in stages whose outputs are known
functions of the knobs (no framework involved, so every case is exact and fast)."""

import numpy as np
import pytest

from arbiter.compare import AGREE, DEVIATES, DIFFER, NO_MAJORITY, Tolerance, pair_error, verdict
from arbiter.knobs import PRESETS
from arbiter.spec import ModelSpec
from arbiter.stages import Stage
from arbiter.triangulate import Triangulator, summarize

TOL = Tolerance(1e-6, 0.0, "test")
FW = ("tf", "torch", "flax")


def test_pair_error_is_symmetric_and_relative():
    a, b = np.array([1.0, 100.0]), np.array([1.0, 100.001])
    tol = Tolerance(0.0, 1e-4, "")
    assert pair_error(a, b, tol).agree and pair_error(b, a, tol).agree
    assert pair_error(a, b, Tolerance(1e-4, 0.0, "")).excess == pytest.approx(10.0, rel=1e-3)
    assert not pair_error(np.zeros(2), np.zeros(3), tol).agree  # shape mismatch never agrees


@pytest.mark.parametrize(
    "agreeing, expected",
    [
        ({("tf", "torch"): True, ("tf", "flax"): True, ("torch", "flax"): True}, (AGREE, None)),
        ({("tf", "torch"): False, ("tf", "flax"): True, ("torch", "flax"): False}, (DEVIATES, "torch")),
        ({("tf", "torch"): False, ("tf", "flax"): False, ("torch", "flax"): False}, (NO_MAJORITY, None)),
        ({("tf", "torch"): True, ("tf", "flax"): False, ("torch", "flax"): True}, (NO_MAJORITY, None)),
    ],
)
def test_verdict(agreeing, expected):
    assert verdict(agreeing, FW) == expected


def test_two_frameworks_cannot_have_a_majority():
    assert verdict({("tf", "torch"): False}, ("tf", "torch")) == (DIFFER, None)


def _stage(fn, reads):
    return Stage("toy", "toy", reads, TOL, lambda adapter, new_model, knobs, probe: fn(knobs))


def _tri(stage, knobs):
    return Triangulator({fw: object() for fw in knobs}, knobs, probe=None, spec=ModelSpec(), reference="flax", stages=(stage,))


def toy(knobs):
    # an activation that depends on two knobs, the way the forward pass does
    pad_shift = 1.0 if knobs.stride2_padding == "symmetric" else 0.0
    return {"a": np.array([pad_shift]), "b": np.array([pad_shift + knobs.bn_epsilon])}


def test_single_deviator_is_named_and_explained():
    base = PRESETS["aligned"]
    knobs = {"tf": base, "torch": base.replace(stride2_padding="symmetric"), "flax": base}
    o = _tri(_stage(toy, ("stride2_padding", "bn_epsilon")), knobs).run_stage(_stage(toy, ("stride2_padding", "bn_epsilon")))
    assert (o.judgement.verdict, o.judgement.deviator) == (DEVIATES, "torch")
    assert o.judgement.first_tensor("torch") == "a"
    assert [(m.framework, m.knob) for m in o.explained_by] == [("torch", "stride2_padding")]
    assert o.resolved


def test_no_majority_is_separated_into_each_frameworks_own_knob():
    base = PRESETS["aligned"]
    knobs = {"tf": base.replace(bn_epsilon=1e-5), "torch": base.replace(stride2_padding="symmetric"), "flax": base}
    stage = _stage(toy, ("stride2_padding", "bn_epsilon"))
    o = _tri(stage, knobs).run_stage(stage)
    assert o.judgement.verdict == NO_MAJORITY
    assert sorted((m.framework, m.knob) for m in o.explained_by) == [("tf", "bn_epsilon"), ("torch", "stride2_padding")]
    findings = summarize([o])
    assert {f["framework"]: f["knob"] for f in findings} == {"tf": "bn_epsilon", "torch": "stride2_padding"}


def test_knob_without_effect_is_not_blamed_and_unexplained_is_reported():
    base = PRESETS["aligned"]
    # torch differs in a knob the stage reads but that has no effect, and in an unread one
    knobs = {"tf": base, "torch": base.replace(bn_relu_order="relu_bn", loss="clipped_probs"), "flax": base}

    def broken(k):
        return {"a": np.array([1.0 if k.loss == "clipped_probs" else 0.0])}  # depends on a knob it does not declare

    stage = _stage(broken, ("bn_relu_order",))
    o = _tri(stage, knobs).run_stage(stage)
    assert o.judgement.deviator == "torch"
    assert o.explained_by == [] and not o.resolved
    assert summarize([o]) == [{"unexplained": {"stage": "toy", "verdict": DEVIATES, "deviator": "torch"}}]


def test_only_needed_knobs_are_kept():
    base = PRESETS["aligned"]
    # two knobs differ and both change the output, but only the sum matters to the tolerance
    knobs = {"tf": base, "torch": base.replace(bn_epsilon=1e-5, bn_relu_order="relu_bn"), "flax": base}

    def fn(k):
        return {"a": np.array([k.bn_epsilon * 10 + (1e-7 if k.bn_relu_order == "relu_bn" else 0.0)])}

    stage = _stage(fn, ("bn_relu_order", "bn_epsilon"))
    o = _tri(stage, knobs).run_stage(stage)
    assert [(m.framework, m.knob) for m in o.explained_by] == [("torch", "bn_epsilon")]


def test_training_only_knobs_are_listed_as_not_testable():
    base = PRESETS["aligned"]
    knobs = {"tf": base, "torch": base.replace(kernel_init="kaiming_uniform_a_sqrt5", shuffle="framework"), "flax": base}
    stage = _stage(toy, ("stride2_padding",))
    o = _tri(stage, knobs).run_stage(stage)
    assert o.judgement.verdict == AGREE
    assert o.not_testable == ["kernel_init", "shuffle"]
