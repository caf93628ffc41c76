"""Setting up a triangulation: frameworks, per-framework knobs, the shared probe."""

from __future__ import annotations

import os

import numpy as np

from arbiter.frameworks import FRAMEWORK_KEYS, load_adapter
from arbiter.knobs import NATIVE_PRESET, KnobError, Knobs, parse_override, preset
from arbiter.spec import ModelSpec
from arbiter.stages import RELU_MARGIN, Probe
from arbiter.weights import probe_weights
from impls.base import FrameworkUnavailable

PRESET_CHOICES = ("native", "aligned", "tf-native", "torch-native", "flax-native")


def parse_frameworks(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in FRAMEWORK_KEYS]
    if unknown or not names:
        raise KnobError(f"unknown framework {unknown[0] if unknown else text!r}; choose from {', '.join(FRAMEWORK_KEYS)}")
    if len(set(names)) != len(names):
        raise KnobError(f"framework listed twice in {text!r}")
    return names


def knobs_for(frameworks: tuple[str, ...], preset_name: str, overrides: list[str]) -> dict[str, Knobs]:
    """'native' gives each framework its users' defaults; any other preset is shared."""
    knobs = {fw: preset(NATIVE_PRESET[fw] if preset_name == "native" else preset_name) for fw in frameworks}
    for text in overrides:
        fw, name, value = parse_override(text, frameworks)
        knobs[fw] = knobs[fw].replace(**{name: value})
    return knobs


def load_adapters(frameworks: tuple[str, ...], device: str) -> tuple[dict, dict[str, str]]:
    """(available adapters, {missing framework: reason}); a missing framework is reported, not fatal.

    Several frameworks in one process each bring a thread pool; PyTorch's OpenMP workers
    then wait on cores the others' pools hold (measured here: PyTorch's 20-step trajectory
    took 33 s instead of 1.6 s, fill_ alone 2.7 ms a call). One OpenMP thread per op is set
    before the frameworks load, unless the user chose OMP_NUM_THREADS; the numerical stages
    run batches of 16, where more threads buy nothing."""
    if len(frameworks) > 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    adapters, missing = {}, {}
    for fw in frameworks:
        try:
            adapters[fw] = load_adapter(fw, device)
        except FrameworkUnavailable as err:
            missing[fw] = str(err)
    return adapters, missing


def spec_for(data) -> ModelSpec:
    return ModelSpec(num_classes=data.num_classes, image_channels=data.channels, image_size=data.image_size)


def reference_framework(frameworks) -> str:
    """Flax is the neutral reference: its pipeline makes the shared model input."""
    return "flax" if "flax" in frameworks else frameworks[0]


def make_probe(data, adapters: dict, knobs: dict[str, Knobs], reference: str, seed: int, batch_size: int,
               steps: int, learning_rate: float, replicate: int = 0) -> Probe:
    """The shared inputs. `replicate` > 0 draws independent batches (same weights)."""
    spec = spec_for(data)
    n_train = len(data.labels["train"])
    if batch_size > n_train:
        raise KnobError(f"--batch-size {batch_size} exceeds the {n_train} training images")
    rng = np.random.default_rng([seed, replicate])
    order = rng.permutation(n_train)
    # batch 0 is the probe batch; batches 1..steps form the trajectory
    batches = [order[(i * batch_size) % n_train:][:batch_size] for i in range(steps + 1)]
    ref = adapters[reference]

    def model_input(idx):
        return ref.preprocess(data, "train", idx, knobs[reference], train=False, seed=seed)

    return Probe(
        data=data,
        indices=batches[0],
        x=model_input(batches[0]),
        y=data.labels["train"][batches[0]],
        weights=probe_weights(spec, seed),
        step_weights=probe_weights(spec, seed, RELU_MARGIN),
        trajectory=[(model_input(b), data.labels["train"][b]) for b in batches[1:]],
        learning_rate=learning_rate,
        seed=seed,
        make_replicate=lambda: make_probe(data, adapters, knobs, reference, seed, batch_size, steps, learning_rate, replicate + 1),
    )
