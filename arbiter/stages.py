"""The numerical stages of triangulation, in pipeline order.

Every stage runs each framework on identical inputs: the same uint8 batch
(preprocessing), the same model input and the same canonical weights (gabor-bank to
trajectory), the same scripted validation losses (lr-schedule). A stage returns named tensors in pipeline order; the
harness compares them pairwise. `reads` names the knobs a stage's computation depends
on: attribution moves only those, and outputs are cached by them.

Tolerances are set above float32 round-off measured under the `aligned` preset and well
below the smallest planted fault the self-test checks; each carries its reason, which every
report.md lists under "Tolerances and why" (README: "How the stages stay honest").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from arbiter.compare import Tolerance
from arbiter.spec import ACTIVATIONS, is_trainable, weight_shapes

PIPELINE_KNOBS = ("input_scaling", "grayscale_coefficients", "grayscale_rounding", "eval_augmentation", "train_augmentation")
MODEL_KNOBS = ("gabor_normalization", "stride2_padding", "bn_relu_order", "bn_epsilon")
BN_UPDATE_KNOBS = ("bn_momentum", "bn_running_var")
OPTIMIZER_KNOBS = ("adam_epsilon", "adam_epsilon_placement")
PLATEAU_KNOBS = ("plateau_patience", "plateau_counting", "plateau_threshold_mode", "plateau_min_delta", "plateau_factor", "plateau_cooldown")

# In the stages that differentiate (loss, gradients, adam-step, trajectory) the BN biases
# of the probe weights sit this many standard deviations above zero, so few ReLU inputs
# fall within float32 round-off of the kink (see arbiter.weights.probe_weights). The
# forward stages keep unshifted weights, whose activations stay O(1) in eval mode.
RELU_MARGIN = 2.0

# A scripted validation-loss sequence on which every plateau knob changes the outcome
# (Keras semantics, patience 10: reductions after epochs 13, 23, 33). The drop 0.1 -> 0.095
# is an improvement for min_delta 1e-4 but not 1e-2; the drop 0.095 -> 0.09495 (5e-5) is
# one for a relative threshold (1e-4 * 0.095 = 9.5e-6) but not an absolute one (1e-4); the
# long plateau after it gives three reductions, so patience, counting (one epoch later per
# reduction), cooldown and factor all change the sequence of rates.
SCRIPTED_VAL_LOSSES = (0.2, 0.1, 0.1, 0.095, 0.095, 0.095) + (0.09495,) * 34


@dataclass
class Probe:
    """Everything the stages share, fixed before any framework runs."""

    data: object  # arbiter.data.Dataset
    indices: np.ndarray  # the batch, as indices into the train split
    x: np.ndarray  # model input (N, H, W, 1), from the reference framework's pipeline
    y: np.ndarray  # labels (N,)
    weights: dict  # canonical weights every framework imports (forward stages)
    step_weights: dict  # the same with BN biases RELU_MARGIN up, for the differentiating stages
    trajectory: list  # [(x, y)] fixed batch sequence for the trajectory stage
    learning_rate: float
    seed: int
    # canonical weights before each trajectory step: the reference framework's free run,
    # filled in by the Triangulator (which owns the models)
    reference_path: list | None = None
    # builds a replicate probe on independent batches (same weights): a deviation that
    # does not reproduce there is a round-off event, not a convention
    make_replicate: Callable[[], "Probe"] | None = None


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    reads: tuple[str, ...]
    tolerance: Tolerance
    compute: Callable  # (adapter, model_factory, knobs, probe) -> dict[str, np.ndarray]


def _preprocessing(adapter, new_model, knobs, probe):
    return {"input": adapter.preprocess(probe.data, "train", probe.indices, knobs, train=False, seed=probe.seed)}


def _gabor_bank(adapter, new_model, knobs, probe):
    return {"gabor.kernel": adapter.gabor_kernel(new_model())}


def _forward(train: bool, names: tuple[str, ...]):
    def compute(adapter, new_model, knobs, probe):
        acts = adapter.forward(new_model(), probe.x, train=train)
        return {name: acts[name] for name in names}

    return compute


def _saturated(weights: dict) -> dict:
    """The probe weights with the classifier scaled 200x: logits of a confident, trained
    model, where the clip of a probability-space loss engages (it never does at ~1/7)."""
    w = dict(weights)
    w["head.kernel"] = (weights["head.kernel"] * 200).astype(np.float32)
    return w


def _loss(adapter, new_model, knobs, probe):
    loss, _ = adapter.loss_and_grads(new_model(probe.step_weights), probe.x, probe.y)
    saturated, _ = adapter.loss_and_grads(new_model(_saturated(probe.step_weights)), probe.x, probe.y)
    return {"loss": np.float64(loss), "loss.saturated-head": np.float64(saturated)}


def _gradients(adapter, new_model, knobs, probe):
    model = new_model(probe.step_weights)
    _, grads = adapter.loss_and_grads(model, probe.x, probe.y)
    return {f"grad/{n}": grads[n] for n in weight_shapes(model.spec) if is_trainable(n)}


def _state_after_step(adapter, model, optimizer, x, y, prefix: str = "") -> dict:
    """Loss, parameters and BN statistics after one step, plus Adam's first moment (the
    round-off reference: see ROUNDOFF_REFERENCE)."""
    loss = adapter.train_step(model, optimizer, x, y)
    out = {f"{prefix}loss": np.float64(loss)}
    out.update({f"{prefix}{n}": w for n, w in adapter.export_weights(model).items()})
    state = adapter.optimizer_state(optimizer)
    out.update({f"{ROUNDOFF_REFERENCE}{prefix}{n[2:]}": m for n, m in state.items() if n.startswith("m/")})
    return out


# Tensors under this prefix are not judged. They hold each framework's Adam first moment
# after the step: where two frameworks' moments differ by more than 0.01%
# (arbiter.compare.roundoff_mask), the gradient history of that element is round-off
# (a gradient near zero, or a ReLU kink within round-off of zero), Adam's normalisation
# (m_hat / sqrt(v_hat) ~ sign(g)) turns it into updates of up to +-lr, and the element is
# excluded from the comparison of the parameter of the same name, and counted. Faults that
# change gradients for real (loss, BN epsilon, padding) are caught by the earlier stages.
ROUNDOFF_REFERENCE = "roundoff-reference/"


def _adam_step(adapter, new_model, knobs, probe):
    model = new_model(probe.step_weights)
    optimizer = adapter.make_optimizer(model, probe.learning_rate)
    out = _state_after_step(adapter, model, optimizer, probe.x, probe.y)
    out.update({k: v for k, v in adapter.optimizer_state(optimizer).items() if k != "step"})
    return out


def _trajectory(adapter, new_model, knobs, probe):
    """K steps along the shared reference path: before step t every framework loads the
    same parameters and BN statistics (the reference framework's after t-1 steps) and keeps
    its own Adam state. The path starts from the probe's step weights. Free-running copies would diverge chaotically — round-off gradients
    flip Adam updates by +-lr and the flips compound (measured here: 1.5e-3 after 2 steps,
    4e-2 after 20, under the aligned preset) — which would hide every real difference.
    A pre-activation within round-off of a ReLU kink flips one element's gradient and, through
    BatchNorm, a whole channel's (seen here at one step in six); the round-off mask excludes
    those elements while their Adam moments still differ."""
    model = new_model(probe.step_weights)
    optimizer = adapter.make_optimizer(model, probe.learning_rate)
    out = {}
    for t, ((x, y), start) in enumerate(zip(probe.trajectory, probe.reference_path), start=1):
        adapter.import_weights(model, start)
        out.update(_state_after_step(adapter, model, optimizer, x, y, prefix=f"step{t:02d}/"))
    return out


def reference_path(adapter, model, learning_rate: float, batches: list) -> list[dict]:
    """Canonical weights before each step of a free-running trajectory of `model`."""
    optimizer = adapter.make_optimizer(model, learning_rate)
    path = []
    for x, y in batches:
        path.append(adapter.export_weights(model))
        adapter.train_step(model, optimizer, x, y)
    return path


def _schedule(adapter, new_model, knobs, probe):
    lrs = adapter.plateau_schedule(SCRIPTED_VAL_LOSSES, probe.learning_rate, knobs)
    return {"lr": np.asarray(lrs, np.float64)}


_FWD = tuple(a for a in ACTIVATIONS if a != "input")

STAGES: tuple[Stage, ...] = (
    Stage(
        "preprocessing",
        "uint8 batch -> model input, each framework's own pipeline",
        PIPELINE_KNOBS,
        Tolerance(1e-6, 0.0, "float32 x/255 and a 3-term weighted sum: a few ulp of 1.0 (ulp 1.2e-7)"),
        _preprocessing,
    ),
    Stage(
        "gabor-bank",
        "the fixed Gabor kernels as each framework holds them",
        ("gabor_normalization",),
        Tolerance(0.0, 0.0, "generated once in numpy and copied: bit-identical expected"),
        _gabor_bank,
    ),
    Stage(
        "gabor-conv",
        "Gabor convolution output on the shared input",
        MODEL_KNOBS[:1],
        Tolerance(1e-6, 1e-5, "49-tap float32 dot products in different summation orders"),
        _forward(False, ("gabor",)),
    ),
    Stage(
        "forward-eval",
        "every named activation, eval mode (running statistics)",
        MODEL_KNOBS,
        Tolerance(1e-5, 1e-4, "float32 round-off through 7 conv layers (measured <= 2e-6 under aligned)"),
        _forward(False, _FWD),
    ),
    Stage(
        "forward-train",
        "every named activation, train mode (batch statistics)",
        MODEL_KNOBS,
        Tolerance(5e-5, 1e-4, "float32 round-off, amplified by normalising with small batch variances (measured ~1e-5 under aligned)"),
        _forward(True, _FWD),
    ),
    Stage(
        "loss",
        "mean cross-entropy; also with a saturated head, where a probability clip engages",
        MODEL_KNOBS + ("loss",),
        Tolerance(1e-6, 1e-5, "float32 log-softmax of round-off-level logit differences"),
        _loss,
    ),
    Stage(
        "gradients",
        "gradient of every trainable tensor",
        MODEL_KNOBS + ("loss",),
        Tolerance(1e-7, 3e-3, "relative to each tensor's largest gradient: backward sums in float32 cancel, and a ReLU input within round-off of zero moves a few gradients (measured <= 8e-4 with the probe's ReLU margin)", "tensor"),
        _gradients,
    ),
    Stage(
        "adam-step",
        "one Adam step: parameters, BN running statistics, Adam moments",
        MODEL_KNOBS + ("loss",) + BN_UPDATE_KNOBS + OPTIMIZER_KNOBS,
        Tolerance(1e-6, 1e-6, "updates of ~lr=1e-3 and BN statistics in float32 agree to ~1e-7; elements whose Adam moment is round-off (differs by >0.01% between frameworks) are excluded and counted"),
        _adam_step,
    ),
    Stage(
        "trajectory",
        "K training steps from shared starting points: loss, parameters, BN statistics per step",
        MODEL_KNOBS + ("loss",) + BN_UPDATE_KNOBS + OPTIMIZER_KNOBS,
        Tolerance(1e-5, 1e-6, "1% of lr: a round-off gradient flip lingers in Adam's second moment for ~1/(1-beta2) steps after its first moment agrees again (measured <= 5e-6 under aligned)"),
        _trajectory,
    ),
    Stage(
        "lr-schedule",
        "each framework's own ReduceLROnPlateau on a scripted validation-loss sequence",
        PLATEAU_KNOBS,
        Tolerance(0.0, 1e-6, "learning rates are products of the factor; optax keeps its scale in float32"),
        _schedule,
    ),
)

STAGE_NAMES = tuple(s.name for s in STAGES)


def stage(name: str) -> Stage:
    return {s.name: s for s in STAGES}[name]
