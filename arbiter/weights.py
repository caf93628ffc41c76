"""Canonical weights: named float32 numpy arrays in one documented layout, saved as .npz.

Layout (see arbiter.spec.weight_shapes): conv kernels HWIO, dense kernels (in, out),
BatchNorm `scale`, `bias` (trainable) and `mean`, `var` (running statistics). The Gabor
bank is not a weight: it is generated from the spec by arbiter.gabor. Each framework's
adapter converts to and from its own layout (PyTorch's OIHW and (out, in) live in
impls/torch), so files written by one framework load bit-exactly into any other.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from arbiter.spec import ModelSpec, weight_shapes

_SPEC_KEY = "__spec__"


def check_weights(weights: dict[str, np.ndarray], spec: ModelSpec) -> None:
    """ValueError naming the first missing, unexpected or mis-shaped tensor."""
    expected = weight_shapes(spec)
    missing = [n for n in expected if n not in weights]
    if missing:
        raise ValueError(f"canonical weights lack {missing[0]!r} ({len(missing)} missing)")
    extra = [n for n in weights if n not in expected]
    if extra:
        raise ValueError(f"canonical weights have unexpected tensor {extra[0]!r}")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise ValueError(f"canonical tensor {name!r} has shape {tuple(weights[name].shape)}, expected {shape}")


def save_weights(path: str | Path, weights: dict[str, np.ndarray], spec: ModelSpec) -> Path:
    """Write atomically (a temp file renamed into place), with the spec stored beside."""
    check_weights(weights, spec)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {name: np.asarray(weights[name], np.float32) for name in weight_shapes(spec)}
    arrays[_SPEC_KEY] = np.frombuffer(json.dumps(spec.to_dict()).encode(), dtype=np.uint8)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    os.close(fd)
    try:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_weights(path: str | Path) -> tuple[dict[str, np.ndarray], ModelSpec]:
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"cannot read canonical weights {path}: {err}") from None
    if _SPEC_KEY not in arrays:
        raise ValueError(f"{path} is not an arbiter weights file (no stored spec)")
    spec = ModelSpec.from_dict(json.loads(arrays.pop(_SPEC_KEY).tobytes().decode()))
    check_weights(arrays, spec)
    return arrays, spec


def probe_weights(spec: ModelSpec, seed: int = 0, relu_margin: float = 0.0) -> dict[str, np.ndarray]:
    """Deterministic canonical weights for the numerical stages.

    He-scaled kernels, and BatchNorm statistics away from their (0, 1) initial values so
    that eval mode exercises the running statistics and a BN-epsilon difference is not
    hidden behind var = 1. `relu_margin` shifts every BN bias up by that many standard
    deviations, so that the ReLU after it sees few inputs near zero: with ~1.5 M
    pre-activations a batch and float32 round-off of ~1e-6, some input lands within
    round-off of the kink in most batches of 16 (measured here: 4 batches in 8), and its
    gradient is then 0 in one framework and not in another."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in weight_shapes(spec).items():
        if name.endswith(".var"):
            a = rng.uniform(0.5, 1.5, shape)
        elif name.endswith(".scale"):
            a = rng.uniform(0.8, 1.2, shape)
        elif name.endswith(".bias") and ".bn" in name:
            a = rng.normal(relu_margin, 0.1, shape)
        elif name.endswith(".mean") or name.endswith(".bias"):
            a = rng.normal(0.0, 0.1, shape)
        else:
            fan_in = int(np.prod(shape[:-1]))
            a = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        weights[name] = a.astype(np.float32)
    return weights
