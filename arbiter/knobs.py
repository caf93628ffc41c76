"""Every convention on which the frameworks differ, as one serialisable settings object.

A `Knobs` value says how ONE framework's implementation must behave. Each implementation
honours every knob, including values that are not its framework's default (e.g. the
PyTorch model with TF-style asymmetric padding); a value it cannot honour raises
`KnobNotSupported`, never is silently ignored.

Presets:
  tf-native     what a Keras user gets by default
  torch-native  what a typical PyTorch port gets
  flax-native   the explicit reference settings of the Flax implementation
  aligned       one shared choice for all three

The numbers and their sources are in shared/notes/framework-defaults.md; tests pin them
against the installed frameworks.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from typing import Any


class KnobError(ValueError):
    """A knob name or value that does not exist."""


class KnobNotSupported(NotImplementedError):
    """A framework implementation cannot honour a knob value."""

    def __init__(self, framework: str, knob: str, value: Any, why: str):
        super().__init__(f"{framework} cannot honour {knob}={value!r}: {why}")
        self.framework, self.knob, self.value = framework, knob, value


def _knob(default, meaning: str, choices: tuple | None = None, kind: str = "choice", scope: str = "numeric"):
    """scope: 'numeric' knobs can show in the numerical stages, which run on transferred
    weights and fixed batches; 'training' knobs (initialisers, shuffling, training-time
    augmentation) only act in a training run, so triangulation lists them as not testable."""
    return field(default=default, metadata={"meaning": meaning, "choices": choices, "kind": kind, "scope": scope})


@dataclass(frozen=True)
class Knobs:
    # --- input pipeline -------------------------------------------------------------
    input_scaling: str = _knob(
        "unit", "gray level in [0,1] -> model input: 'unit' keeps it; 'symmetric' (x-0.5)/0.5 in [-1,1]", ("unit", "symmetric")
    )
    grayscale_coefficients: tuple[float, float, float] = _knob(
        (0.299, 0.587, 0.114),
        "RGB -> gray weights: ITU-R 601 (0.299, 0.587, 0.114) as in PIL; TF's rgb_to_grayscale uses (0.2989, 0.587, 0.114)",
        kind="triple",
    )
    grayscale_rounding: str = _knob(
        "float", "'float': gray computed in float; 'uint8': rounded to uint8 first, as PIL's convert('L')", ("float", "uint8")
    )
    train_augmentation: str = _knob(
        "none", "training augmentation: 'none' or 'hflip' (random horizontal flip)", ("none", "hflip"), scope="training"
    )
    eval_augmentation: bool = _knob(False, "apply the training augmentation at evaluation too (a classic port bug)", kind="bool")
    # --- Gabor front end --------------------------------------------------------------
    gabor_normalization: str = _knob("l2", "Gabor kernels divided by their L2 norm ('l2') or not ('none')", ("l2", "none"))
    # --- architecture conventions ---------------------------------------------------
    stride2_padding: str = _knob(
        "tf_same",
        "stride-2 conv padding: 'tf_same' TF/XLA 'SAME' (odd pixel bottom/right, (0,1) for 3x3 on even input); "
        "'symmetric' k//2 on both sides (the usual PyTorch port)",
        ("tf_same", "symmetric"),
    )
    bn_relu_order: str = _knob("bn_relu", "conv -> BN -> ReLU ('bn_relu') or conv -> ReLU -> BN ('relu_bn')", ("bn_relu", "relu_bn"))
    bn_momentum: float = _knob(
        0.99, "weight of the OLD running statistic (Keras/Flax convention; PyTorch's momentum=0.1 is 0.9 here)", kind="float"
    )
    bn_epsilon: float = _knob(1e-3, "BatchNorm epsilon", kind="float")
    bn_running_var: str = _knob(
        "biased",
        "running variance updated with the biased (/N) or unbiased (/(N-1)) batch variance; normalisation in train mode always uses the biased one",
        ("biased", "unbiased"),
    )
    # --- initialisation (from-scratch only) -----------------------------------------
    kernel_init: str = _knob(
        "glorot_uniform",
        "conv/dense kernel initialiser",
        ("glorot_uniform", "kaiming_uniform_a_sqrt5", "lecun_normal", "he_normal"),
        scope="training",
    )
    bias_init: str = _knob(
        "zeros", "dense bias initialiser: 'zeros' or 'fan_in_uniform' U(+-1/sqrt(fan_in)) (PyTorch)", ("zeros", "fan_in_uniform"), scope="training"
    )
    # --- loss and optimiser ---------------------------------------------------------
    loss: str = _knob(
        "logits",
        "'logits': cross-entropy from logits (log-softmax); 'clipped_probs': softmax, clip to [1e-7, 1-1e-7], log (Keras from_logits=False)",
        ("logits", "clipped_probs"),
    )
    adam_epsilon: float = _knob(1e-8, "Adam epsilon value", kind="float")
    adam_epsilon_placement: str = _knob(
        "corrected",
        "'corrected': m_hat / (sqrt(v_hat) + eps) (PyTorch, optax); 'uncorrected': eps added to sqrt(v) before bias correction (Keras)",
        ("corrected", "uncorrected"),
    )
    # --- ReduceLROnPlateau ----------------------------------------------------------
    plateau_patience: int = _knob(10, "epochs without improvement tolerated", kind="int")
    plateau_counting: str = _knob(
        "keras",
        "'keras': reduce once the bad-epoch count reaches patience (Keras, optax); 'torch': once it exceeds patience (one epoch later)",
        ("keras", "torch"),
    )
    plateau_threshold_mode: str = _knob(
        "abs", "improvement test: 'abs' current < best - delta (Keras); 'rel' current < best * (1 - delta) (PyTorch, optax)", ("abs", "rel")
    )
    plateau_min_delta: float = _knob(1e-4, "improvement threshold (absolute or relative, see plateau_threshold_mode)", kind="float")
    plateau_factor: float = _knob(0.1, "learning-rate multiplier on a plateau", kind="float")
    plateau_cooldown: int = _knob(0, "epochs to wait after a reduction before counting again", kind="int")
    # --- data order (from-scratch only) ---------------------------------------------
    shuffle: str = _knob(
        "shared",
        "batch order: 'shared' (one numpy permutation per epoch handed to every framework) or 'framework' (its own shuffling)",
        ("shared", "framework"),
        scope="training",
    )

    def __post_init__(self):
        for f in fields(self):
            _validate(f, getattr(self, f.name))

    # -- (de)serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Knobs":
        unknown = set(d) - set(KNOB_NAMES)
        if unknown:
            raise KnobError(f"unknown knob(s): {', '.join(sorted(unknown))}")
        return cls(**{k: parse_value(k, v) for k, v in d.items()})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def replace(self, **changes) -> "Knobs":
        unknown = set(changes) - set(KNOB_NAMES)
        if unknown:
            raise KnobError(f"unknown knob(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **{k: parse_value(k, v) for k, v in changes.items()})

    def differences(self, other: "Knobs") -> list[str]:
        """Names of the knobs whose values differ, in declaration order."""
        return [n for n in KNOB_NAMES if getattr(self, n) != getattr(other, n)]


KNOB_FIELDS = {f.name: f for f in fields(Knobs)}
KNOB_NAMES = tuple(KNOB_FIELDS)


def knob_scope(name: str) -> str:
    return KNOB_FIELDS[name].metadata["scope"]


def _validate(f, value):
    meta = f.metadata
    kind = meta["kind"]
    if kind == "choice" and value not in meta["choices"]:
        raise KnobError(f"knob {f.name} must be one of {', '.join(meta['choices'])}; got {value!r}")
    if kind == "triple" and (len(value) != 3 or any(c < 0 for c in value)):
        raise KnobError(f"knob {f.name} must be three non-negative numbers; got {value!r}")
    if kind in ("float", "int") and value < 0:
        raise KnobError(f"knob {f.name} must be non-negative; got {value!r}")
    if f.name == "bn_momentum" and not 0 <= value < 1:
        raise KnobError(f"knob bn_momentum must be in [0, 1); got {value!r}")


def show_value(value: Any) -> str:
    """A knob value as people write it: 1e-05, (0.299, 0.587, 0.114), tf_same."""
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(f"{v:g}" for v in value) + ")"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def parse_value(name: str, raw: Any) -> Any:
    """Turn a string from the command line (or a JSON value) into the knob's type."""
    if name not in KNOB_FIELDS:
        raise KnobError(f"unknown knob {name!r}; `python -m arbiter knobs` lists them")
    kind = KNOB_FIELDS[name].metadata["kind"]
    try:
        if kind == "float":
            return float(raw)
        if kind == "int":
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError
            return int(raw)
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            s = str(raw).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind == "triple":
            parts = raw if isinstance(raw, (list, tuple)) else str(raw).strip("()[] ").split(",")
            return tuple(float(p) for p in parts)
        return str(raw)
    except (TypeError, ValueError):
        raise KnobError(f"bad value {raw!r} for knob {name} ({kind})") from None


PRESETS: dict[str, Knobs] = {
    "tf-native": Knobs(
        grayscale_coefficients=(0.2989, 0.587, 0.114),  # tf.image.rgb_to_grayscale
        grayscale_rounding="float",
        stride2_padding="tf_same",
        bn_momentum=0.99,
        bn_epsilon=1e-3,
        bn_running_var="biased",
        kernel_init="glorot_uniform",
        bias_init="zeros",
        # A softmax output layer + sparse_categorical_crossentropy(from_logits=False) does NOT
        # clip in Keras 3 on TF: a Keras softmax tensor carries its logits (`_keras_logits`)
        # and the loss uses them (pinned in tests/test_keras.py). The clip only engages on a
        # probability tensor Keras cannot trace back, e.g. a raw tf.nn.softmax in eager mode.
        loss="logits",
        adam_epsilon=1e-7,
        adam_epsilon_placement="uncorrected",
        plateau_counting="keras",
        plateau_threshold_mode="abs",
        shuffle="framework",
    ),
    "torch-native": Knobs(
        grayscale_coefficients=(0.299, 0.587, 0.114),  # PIL convert('L') (transforms.Grayscale on PIL)
        grayscale_rounding="uint8",
        stride2_padding="symmetric",  # nn.Conv2d(..., stride=2, padding=k//2)
        bn_momentum=0.9,  # torch momentum=0.1
        bn_epsilon=1e-5,
        bn_running_var="unbiased",
        kernel_init="kaiming_uniform_a_sqrt5",
        bias_init="fan_in_uniform",
        loss="logits",
        adam_epsilon=1e-8,
        adam_epsilon_placement="corrected",
        plateau_counting="torch",
        plateau_threshold_mode="rel",
        shuffle="framework",
    ),
    "flax-native": Knobs(
        grayscale_coefficients=(0.299, 0.587, 0.114),
        grayscale_rounding="float",
        stride2_padding="tf_same",  # written as explicit ((0, 1), (0, 1)) tuples
        bn_momentum=0.99,
        bn_epsilon=1e-5,
        bn_running_var="biased",
        kernel_init="lecun_normal",
        bias_init="zeros",
        loss="logits",
        adam_epsilon=1e-8,
        adam_epsilon_placement="corrected",
        plateau_counting="keras",  # optax.contrib.reduce_on_plateau: count == patience
        plateau_threshold_mode="rel",
        shuffle="shared",
    ),
    "aligned": Knobs(
        grayscale_coefficients=(0.299, 0.587, 0.114),
        grayscale_rounding="float",
        stride2_padding="tf_same",
        bn_momentum=0.99,
        bn_epsilon=1e-3,
        bn_running_var="biased",
        kernel_init="glorot_uniform",
        bias_init="zeros",
        loss="logits",
        adam_epsilon=1e-7,
        adam_epsilon_placement="corrected",
        plateau_counting="keras",
        plateau_threshold_mode="abs",
        shuffle="shared",
    ),
}

# What `--preset native` gives each framework.
NATIVE_PRESET = {"tf": "tf-native", "torch": "torch-native", "flax": "flax-native"}


def preset(name: str) -> Knobs:
    try:
        return PRESETS[name]
    except KeyError:
        raise KnobError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def parse_override(text: str, frameworks: tuple[str, ...]) -> tuple[str, str, Any]:
    """'torch.adam_epsilon=1e-7' -> ('torch', 'adam_epsilon', 1e-7)."""
    lhs, sep, raw = text.partition("=")
    fw, dot, name = lhs.partition(".")
    if not sep or not dot or not name:
        raise KnobError(f"--set takes FRAMEWORK.KNOB=VALUE, got {text!r}")
    if fw not in frameworks:
        raise KnobError(f"--set {text!r}: unknown framework {fw!r}; choose one of {', '.join(frameworks)}")
    value = parse_value(name, raw)
    _validate(KNOB_FIELDS[name], value)
    return fw, name, value
