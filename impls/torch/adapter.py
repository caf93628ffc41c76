"""The PyTorch side of the `impls.base.Adapter` door.

Native behaviours the knobs move away from, and how:
* BatchNorm momentum weighs the new statistic (momentum = 1 - knob) and running_var is
  the unbiased batch variance: 'biased' uses `model.BiasedVarBatchNorm2d`.
* Adam adds eps to the bias-corrected sqrt(v_hat): 'uncorrected' (Keras) rescales eps
  per step, see `EpsilonPlacementAdam`.
* ReduceLROnPlateau reduces when num_bad_epochs > patience and ignores exactly
  `cooldown` epochs after a reduction; the knobs are mapped onto Keras's callback
  semantics, the cross-framework reference, see `plateau_schedule`.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Iterator, Sequence

import numpy as np
import PIL
import torch
import torch.nn.functional as F
from torch import nn

from arbiter.data import Dataset
from arbiter.knobs import Knobs, KnobNotSupported
from arbiter.spec import ACTIVATIONS, ModelSpec, is_trainable, weight_shapes
from arbiter.weights import check_weights
from impls import base

from . import layout, pipeline
from .model import ACTIVATION_MODULES, GaborNet, initialise

BETAS = (0.9, 0.999)
CLIP = 1e-7  # Keras's backend epsilon, the clip of cross-entropy on probabilities


class Adapter(base.Adapter):
    name = "torch"
    display_name = "PyTorch"

    def __init__(self, device: str = "auto"):
        super().__init__(device)
        has_cuda = torch.cuda.is_available()
        if device == "gpu" and not has_cuda:
            raise base.DeviceUnavailable("PyTorch sees no CUDA device (torch.cuda.is_available() is False)")
        self.device = torch.device("cuda" if device != "cpu" and has_cuda else "cpu")
        # cuBLAS is only deterministic with a fixed workspace; it must be set before CUDA starts
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)

    # -- environment ------------------------------------------------------------------
    def environment(self) -> dict[str, Any]:
        device = str(self.device)
        if self.device.type == "cuda":
            device += f" ({torch.cuda.get_device_name(self.device)})"
        return {
            "versions": {"torch": torch.__version__, "numpy": np.__version__, "pillow": PIL.__version__},
            "device": device,
            "precision": (
                "float32; TF32 off (torch.backends.cuda.matmul.allow_tf32=False, cudnn.allow_tf32=False), "
                f"float32_matmul_precision={torch.get_float32_matmul_precision()}"
            ),
            "determinism": (
                f"use_deterministic_algorithms={torch.are_deterministic_algorithms_enabled()} (warn_only), "
                f"cudnn.benchmark={torch.backends.cudnn.benchmark}, cudnn.deterministic={torch.backends.cudnn.deterministic}"
            ),
        }

    # -- model --------------------------------------------------------------------------
    def build(self, spec: ModelSpec, knobs: Knobs, seed: int) -> base.Model:
        torch.manual_seed(seed)
        net = GaborNet(spec, knobs)
        initialise(net, knobs)
        return base.Model(spec=spec, knobs=knobs, net=net.to(self.device))

    def parameter_count(self, model: base.Model) -> int:
        return sum(p.numel() for p in model.net.parameters() if p.requires_grad)

    def export_weights(self, model: base.Model) -> dict[str, np.ndarray]:
        state = model.net.state_dict()
        return {name: layout.to_canonical(name, state[layout.state_key(name)]) for name in weight_shapes(model.spec)}

    def import_weights(self, model: base.Model, weights: dict[str, np.ndarray]) -> None:
        check_weights(weights, model.spec)
        shapes = weight_shapes(model.spec)
        state = model.net.state_dict()  # shares storage with the parameters and buffers
        with torch.no_grad():
            for name in shapes:
                state[layout.state_key(name)].copy_(layout.from_canonical(name, weights[name]))

    def gabor_kernel(self, model: base.Model) -> np.ndarray:
        return layout.oihw_to_hwio(model.net.gabor.kernel)

    # -- input pipeline ---------------------------------------------------------------------
    def preprocess(self, data: Dataset, split: str, indices: np.ndarray, knobs: Knobs, train: bool, seed: int) -> np.ndarray:
        return pipeline.preprocess(data, split, indices, knobs, train, seed)

    # -- numerics ---------------------------------------------------------------------------
    def forward(self, model: base.Model, x: np.ndarray, train: bool) -> dict[str, np.ndarray]:
        net = model.net
        x_t = self._input(x)
        with _frozen_buffers(net), _mode(net, train), _recording(net) as taps, torch.no_grad():
            net(x_t)
        out = {"input": layout.activation_to_canonical(x_t)}
        out.update({name: layout.activation_to_canonical(taps[name]) for name in ACTIVATIONS if name != "input"})
        return out

    def loss_and_grads(self, model: base.Model, x: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        net = model.net
        named = _trainable(net)
        with _frozen_buffers(net), _mode(net, True):
            loss = cross_entropy(net(self._input(x)), self._labels(y), model.knobs.loss)
            # autograd.grad returns the gradients without accumulating into .grad
            grads = torch.autograd.grad(loss, [p for _, p in named])
        return float(loss.detach()), {name: layout.to_canonical(name, g) for (name, _), g in zip(named, grads)}

    def make_optimizer(self, model: base.Model, learning_rate: float) -> torch.optim.Adam:
        knobs = model.knobs
        return EpsilonPlacementAdam(
            [p for _, p in _trainable(model.net)],
            lr=learning_rate,
            betas=BETAS,
            eps=knobs.adam_epsilon,
            weight_decay=0.0,
            placement=knobs.adam_epsilon_placement,
            names=[name for name, _ in _trainable(model.net)],
        )

    def train_step(self, model: base.Model, optimizer: torch.optim.Adam, x: np.ndarray, y: np.ndarray) -> float:
        net = model.net
        with _mode(net, True):
            optimizer.zero_grad(set_to_none=True)
            loss = cross_entropy(net(self._input(x)), self._labels(y), model.knobs.loss)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def optimizer_state(self, optimizer: torch.optim.Adam) -> dict[str, np.ndarray]:
        state: dict[str, Any] = {}
        steps = set()
        for name, p in zip(optimizer.canonical_names, optimizer.param_groups[0]["params"]):
            s = optimizer.state.get(p, {})
            if s:
                state[f"m/{name}"] = layout.to_canonical(name, s["exp_avg"])
                state[f"v/{name}"] = layout.to_canonical(name, s["exp_avg_sq"])
                steps.add(int(s["step"]))
            else:  # before the first step torch has no state: Adam's moments start at zero
                zeros = np.zeros(tuple(layout.to_canonical(name, p).shape), np.float32)
                state[f"m/{name}"], state[f"v/{name}"] = zeros, zeros.copy()
                steps.add(0)
        state["step"] = max(steps)
        return state

    def plateau_schedule(self, val_losses: Sequence[float], learning_rate: float, knobs: Knobs) -> list[float]:
        dummy = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=learning_rate)
        scheduler = make_plateau_scheduler(dummy, knobs)
        lrs = []
        for loss in val_losses:
            scheduler.step(float(loss))
            lrs.append(float(dummy.param_groups[0]["lr"]))
        return lrs

    # -- helpers (not part of the interface) ----------------------------------------------
    @staticmethod
    def set_learning_rate(optimizer: torch.optim.Optimizer, learning_rate: float) -> None:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate

    def _input(self, x: np.ndarray) -> torch.Tensor:
        return layout.nhwc_to_nchw(x).to(self.device)

    def _labels(self, y: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(y, dtype=np.int64)).to(self.device)


# -- loss -----------------------------------------------------------------------------------
def cross_entropy(logits: torch.Tensor, y: torch.Tensor, how: str) -> torch.Tensor:
    if how == "logits":
        return F.cross_entropy(logits, y)
    if how == "clipped_probs":
        # Keras's sparse_categorical_crossentropy(from_logits=False) behind a softmax layer
        p = torch.softmax(logits, dim=-1)
        p = p / p.sum(dim=-1, keepdim=True)
        p = p.clamp(CLIP, 1 - CLIP)
        return -torch.log(p.gather(1, y[:, None])).mean()
    raise ValueError(f"unknown loss {how!r}")


# -- optimiser ------------------------------------------------------------------------------
class EpsilonPlacementAdam(torch.optim.Adam):
    """torch.optim.Adam, optionally with Keras's epsilon placement.

    torch's step t is  p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps_t).
    With eps_t = eps / sqrt(1-b2^t) the denominator is (sqrt(v) + eps)/sqrt(1-b2^t), so
    the step is  lr * sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps): Keras's update,
    algebraically exactly (only float32 round-off differs). The moments are untouched.
    `canonical_names` maps the parameters (in order) to canonical tensor names."""

    def __init__(self, params, *, placement: str, names: Sequence[str], **kwargs):
        if placement not in ("corrected", "uncorrected"):
            raise ValueError(f"unknown adam_epsilon_placement {placement!r}")
        super().__init__(params, **kwargs)
        self.placement = placement
        self.canonical_names = list(names)
        self.base_eps = kwargs["eps"]

    @torch.no_grad()
    def step(self, closure=None):
        if self.placement == "uncorrected":
            beta2 = self.param_groups[0]["betas"][1]
            t = self.steps_taken() + 1
            for group in self.param_groups:
                group["eps"] = self.base_eps / math.sqrt(1 - beta2**t)
        return super().step(closure)

    def steps_taken(self) -> int:
        return max((int(s["step"]) for s in self.state.values() if "step" in s), default=0)


# -- purity and observation -------------------------------------------------------------------
def _trainable(net: GaborNet) -> list[tuple[str, nn.Parameter]]:
    """(canonical name, parameter) in canonical order."""
    params = dict(net.named_parameters())
    return [(n, params[layout.state_key(n)]) for n in weight_shapes(net.spec) if is_trainable(n)]


@contextlib.contextmanager
def _frozen_buffers(net: nn.Module) -> Iterator[None]:
    """Running statistics (and num_batches_tracked) restored on exit: forward and
    loss_and_grads must not change the model, even in train mode."""
    saved = {name: b.clone() for name, b in net.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, b in net.named_buffers():
                b.copy_(saved[name])


@contextlib.contextmanager
def _mode(net: nn.Module, train: bool) -> Iterator[None]:
    was_training = net.training
    net.train(train)
    try:
        yield
    finally:
        net.train(was_training)


@contextlib.contextmanager
def _recording(net: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Forward hooks storing each canonical activation's module output."""
    taps: dict[str, torch.Tensor] = {}
    modules = dict(net.named_modules())
    handles = []
    for activation, module_name in ACTIVATION_MODULES.items():

        def hook(_module, _inputs, output, activation=activation):
            taps[activation] = output

        handles.append(modules[module_name].register_forward_hook(hook))
    try:
        yield taps
    finally:
        for h in handles:
            h.remove()


def make_plateau_scheduler(optimizer: torch.optim.Optimizer, knobs: Knobs) -> torch.optim.lr_scheduler.ReduceLROnPlateau:
    """torch's own ReduceLROnPlateau honouring the plateau knobs, with Keras's callback as
    the shared reference semantics (used by plateau_schedule and by training).

    torch's scheduler reduces when num_bad_epochs > patience; Keras's callback (the 'keras'
    counting) when its count reaches patience, i.e. one epoch earlier: torch's patience - 1.
    Cooldown: torch ignores exactly `cooldown` epochs after a reduction; Keras decrements its
    cooldown counter BEFORE testing it, so it ignores only cooldown - 1 (cooldown 1 ignores
    none): torch is given max(cooldown - 1, 0). min_lr 0 and eps 0: every reduction is
    applied, as in Keras."""
    patience = knobs.plateau_patience - (1 if knobs.plateau_counting == "keras" else 0)
    if patience < 0:
        raise KnobNotSupported(
            "torch",
            "plateau_patience",
            knobs.plateau_patience,
            "Keras counting with patience 0 reduces on every non-improving epoch; torch's "
            "ReduceLROnPlateau would need patience -1, which also reduces on improving ones",
        )
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer,
        mode="min",
        factor=knobs.plateau_factor,
        patience=patience,
        threshold=knobs.plateau_min_delta,
        threshold_mode=knobs.plateau_threshold_mode,
        cooldown=max(knobs.plateau_cooldown - 1, 0),
        min_lr=0.0,
        eps=0.0,
    )
