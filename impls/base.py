"""The one door between the harness and a framework.

Every framework subpackage (`impls.keras`, `impls.torch`, `impls.flax`) provides an
`Adapter` subclass in its `adapter.py`. The harness in `arbiter/` talks to frameworks only
through these methods, and everything that crosses the door is plain numpy in the
canonical names and layouts of `arbiter.spec`:

* weights: `{name: array}` with the names of `arbiter.spec.weight_shapes`; conv kernels
  HWIO, dense kernels (in, out), BatchNorm `scale`, `bias`, `mean`, `var`;
* activations: `{name: array}` with the names of `arbiter.spec.ACTIVATIONS`, NHWC
  (N, C for `block2.se_gate`, `pool`, `logits`);
* gradients: `{name: array}` for the trainable canonical names (no `.mean`/`.var`);
* optimiser state: `{"m/<name>": array, "v/<name>": array}` for the trainable names plus
  `"step"`: the number of Adam updates applied so far (int).

This module imports no framework, so the harness can import it anywhere.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np

from arbiter.data import Dataset
from arbiter.knobs import Knobs
from arbiter.spec import ModelSpec


DEVICES = ("auto", "cpu", "gpu")


class FrameworkUnavailable(RuntimeError):
    """The framework is not installed or cannot start (the message says why)."""


class DeviceUnavailable(RuntimeError):
    """`--device gpu` was asked for and the framework sees no GPU."""


@dataclass
class Model:
    """An implementation's model, opaque to the harness.

    `net` is the framework object (a keras.Model, a torch.nn.Module, a flax Module) and
    `state` whatever else the framework needs between calls (Flax's variables, say). The
    adapter may mutate `net` and `state` in place; the harness never looks inside.
    """

    spec: ModelSpec
    knobs: Knobs
    net: Any
    state: Any = None
    extras: dict = field(default_factory=dict)


class Adapter(abc.ABC):
    """One framework's implementation of the arbiter's model and pipeline."""

    #: short key used on the command line: "tf", "torch" or "flax"
    name: ClassVar[str]
    #: human-readable, e.g. "TensorFlow/Keras"
    display_name: ClassVar[str]

    def __init__(self, device: str = "auto"):
        """device: 'auto' (the accelerator when present, else CPU), 'cpu' or 'gpu'.
        Raises DeviceUnavailable for 'gpu' when there is none. Switches off TF32 and
        other reduced-precision float32 paths on devices that have them."""
        if device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
        self.requested_device = device

    # -- environment ------------------------------------------------------------------
    @abc.abstractmethod
    def environment(self) -> dict[str, Any]:
        """{'versions': {package: version}, 'device': str, 'precision': str (which
        reduced-precision paths are off), 'determinism': str (which switches are on)}."""

    # -- model --------------------------------------------------------------------------
    @abc.abstractmethod
    def build(self, spec: ModelSpec, knobs: Knobs, seed: int) -> Model:
        """A fresh model initialised with the framework's RNG seeded by `seed`, honouring
        the initialiser knobs. Raises arbiter.knobs.KnobNotSupported for a knob value
        the implementation cannot honour."""

    @abc.abstractmethod
    def parameter_count(self, model: Model) -> int:
        """Trainable parameters as the framework itself counts them (Gabor bank excluded:
        it is not trainable)."""

    @abc.abstractmethod
    def export_weights(self, model: Model) -> dict[str, np.ndarray]:
        """All canonical tensors (trainable and BN running statistics), float32."""

    @abc.abstractmethod
    def import_weights(self, model: Model, weights: dict[str, np.ndarray]) -> None:
        """Load canonical tensors into the model, in place, bit-exactly. Must check that
        every name is present with the canonical shape and raise ValueError otherwise.
        Resets no optimiser (optimisers are separate objects)."""

    @abc.abstractmethod
    def gabor_kernel(self, model: Model) -> np.ndarray:
        """The fixed bank as the framework holds it, HWIO (k, k, 1, channels)."""

    # -- input pipeline ---------------------------------------------------------------------
    @abc.abstractmethod
    def preprocess(self, data: Dataset, split: str, indices: np.ndarray, knobs: Knobs, train: bool, seed: int) -> np.ndarray:
        """The model input for examples `indices` of `split`, float32 (N, H, W, 1), in the
        order of `indices`, produced by the framework's OWN input pipeline reading
        `data.path`: a tensorflow-datasets builder over the npz feeding tf.data and
        tf.image ops for TF; a torch Dataset/DataLoader with its transforms for PyTorch;
        numpy/jnp for JAX. It is the same per-example transform the training pipeline
        applies: uint8 -> gray in [0, 1] (knobs grayscale_*; skipped for 1-channel data;
        'uint8' rounding rounds the gray level before dividing by 255) -> input_scaling ->
        augmentation when `train` (knob train_augmentation; also
        at eval when eval_augmentation is on), seeded by `seed` in the framework's own
        RNG."""

    # -- numerics ---------------------------------------------------------------------------
    @abc.abstractmethod
    def forward(self, model: Model, x: np.ndarray, train: bool) -> dict[str, np.ndarray]:
        """Every activation of arbiter.spec.ACTIVATIONS for model input x. train=True uses
        batch statistics in BatchNorm. Must not change the model (no running-statistic
        update, even in train mode)."""

    @abc.abstractmethod
    def loss_and_grads(self, model: Model, x: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """Mean cross-entropy (knob `loss`) of a train-mode forward pass on integer labels
        y (N,), and its gradient for every trainable canonical tensor. Must not change
        the model."""

    @abc.abstractmethod
    def make_optimizer(self, model: Model, learning_rate: float) -> Any:
        """The framework's own Adam (keras.optimizers.Adam, torch.optim.Adam, optax.adam)
        with beta1=0.9, beta2=0.999 and the knobs' epsilon value and placement, no weight
        decay, over the trainable parameters."""

    @abc.abstractmethod
    def train_step(self, model: Model, optimizer: Any, x: np.ndarray, y: np.ndarray) -> float:
        """One training step in place: train-mode forward, loss, gradients, one Adam
        update, and the BN running-statistic update (knobs bn_momentum, bn_running_var).
        Returns the loss before the update."""

    @abc.abstractmethod
    def optimizer_state(self, optimizer: Any) -> dict[str, np.ndarray]:
        """{'m/<name>', 'v/<name>'} Adam moments (the framework's raw, uncorrected first and
        second moments) for every trainable canonical tensor, and 'step'."""

    @abc.abstractmethod
    def plateau_schedule(self, val_losses: Sequence[float], learning_rate: float, knobs: Knobs) -> list[float]:
        """Feed the framework's own ReduceLROnPlateau (Keras callback, torch
        lr_scheduler.ReduceLROnPlateau, optax.contrib.reduce_on_plateau) one validation
        loss per epoch, honouring the plateau_* knobs; return the learning rate in
        effect for the NEXT epoch after each one (same length as val_losses)."""
