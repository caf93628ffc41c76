"""The numerical stages of triangulation, in pipeline order.

Every stage runs each framework on identical inputs: the same uint8 batch (stage 1), the
same model input and the same canonical weights (stages 2-8), the same scripted
validation losses (stage 9). A stage returns named tensors in pipeline order; the
harness compares them pairwise. `reads` names the knobs a stage's computation depends
on: attribution moves only those, and outputs are cached by them.

Tolerances are set above float32 round-off measured under the `aligned` preset (see
README, "Tolerances") and well below the smallest planted fault the self-test checks.
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

# A validation-loss script on which every plateau knob changes the outcome: a long
# plateau (patience, counting, cooldown), then improvements of 3e-4 on a loss of ~2 —
# above an absolute 1e-4 threshold but below a relative 1e-4 * 2 = 2e-4? no: 3e-4 > 2e-4;
# so the steps are 1.5e-4: an improvement in 'abs' mode (> 1e-4), not in 'rel' (< 2e-4).
SCRIPTED_VAL_LOSSES = (
    2.0, 1.9, 1.9, 1.9, 1.9, 1.9, 1.9, 1.9,
    1.89985, 1.8997, 1.89955, 1.8994, 1.89925, 1.8991, 1.89895, 1.8988,
    1.9, 1.9, 1.9, 1.9, 1.9, 1.9, 1.9, 1.9, 1.9, 1.9, 1.9, 1.9, 1.9, 1.9,
)  # fmt: skip
SCHEDULE_PATIENCE = 3  # plateau_patience is overridden to this unless the knob is planted


@dataclass
class Probe:
    """Everything the stages share, fixed before any framework runs."""

    data: object  # arbiter.data.Dataset
    indices: np.ndarray  # the batch, as indices into the train split
    x: np.ndarray  # model input (N, H, W, 1), from the reference framework's pipeline
    y: np.ndarray  # labels (N,)
    weights: dict  # canonical weights every framework imports
    trajectory: list  # [(x, y)] fixed batch sequence for the trajectory stage
    learning_rate: float
    seed: int


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    reads: tuple[str, ...]
    tolerance: Tolerance
    compute: Callable  # (adapter, model_factory, knobs, probe) -> dict[str, np.ndarray]
    uses_model: bool = True


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
    loss, _ = adapter.loss_and_grads(new_model(), probe.x, probe.y)
    saturated, _ = adapter.loss_and_grads(new_model(_saturated(probe.weights)), probe.x, probe.y)
    return {"loss": np.float64(loss), "loss.saturated-head": np.float64(saturated)}


def _gradients(adapter, new_model, knobs, probe):
    _, grads = adapter.loss_and_grads(new_model(), probe.x, probe.y)
    return {f"grad/{n}": grads[n] for n in weight_shapes(new_model().spec) if is_trainable(n)}


def _state_after_steps(adapter, model, optimizer, batches) -> dict:
    out = {}
    for t, (x, y) in enumerate(batches, start=1):
        loss = adapter.train_step(model, optimizer, x, y)
        prefix = f"step{t:02d}/" if len(batches) > 1 else ""
        out[f"{prefix}loss"] = np.float64(loss)
        out.update({f"{prefix}{n}": w for n, w in adapter.export_weights(model).items()})
    return out


def _adam_step(adapter, new_model, knobs, probe):
    model = new_model()
    optimizer = adapter.make_optimizer(model, probe.learning_rate)
    out = _state_after_steps(adapter, model, optimizer, [(probe.x, probe.y)])
    state = adapter.optimizer_state(optimizer)
    out.update({k: v for k, v in state.items() if k != "step"})
    return out


def _trajectory(adapter, new_model, knobs, probe):
    model = new_model()
    optimizer = adapter.make_optimizer(model, probe.learning_rate)
    return _state_after_steps(adapter, model, optimizer, probe.trajectory)


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
        uses_model=False,
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
        Tolerance(1e-5, 1e-4, "float32 round-off; batch statistics add a reduction per BN"),
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
        Tolerance(1e-6, 1e-3, "backward float32 round-off; atol 1e-6 covers near-cancelling sums"),
        _gradients,
    ),
    Stage(
        "adam-step",
        "one Adam step: parameters, BN running statistics, Adam moments",
        MODEL_KNOBS + ("loss",) + BN_UPDATE_KNOBS + OPTIMIZER_KNOBS,
        Tolerance(1e-6, 1e-5, "one update of size ~lr=1e-3 applied to O(1) parameters in float32"),
        _adam_step,
    ),
    Stage(
        "trajectory",
        "K training steps on a fixed batch sequence: loss, parameters, BN statistics per step",
        MODEL_KNOBS + ("loss",) + BN_UPDATE_KNOBS + OPTIMIZER_KNOBS,
        Tolerance(1e-5, 1e-4, "round-off compounds over steps; Adam normalises tiny gradient noise"),
        _trajectory,
    ),
    Stage(
        "lr-schedule",
        "each framework's own ReduceLROnPlateau on a scripted validation-loss sequence",
        PLATEAU_KNOBS,
        Tolerance(0.0, 1e-9, "learning rates are products of the factor: exact up to float64 round-off"),
        _schedule,
        uses_model=False,
    ),
)

STAGE_NAMES = tuple(s.name for s in STAGES)


def stage(name: str) -> Stage:
    return {s.name: s for s in STAGES}[name]
