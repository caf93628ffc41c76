"""The JAX input pipeline: numpy batches from the npz, transformed with jnp ops.

What a JAX user writes (Flax's examples/mnist style): the whole split in memory as numpy,
a numpy permutation for the batch order, each batch converted on the fly. The transform
follows `tests/numpy_model.preprocess`:

    uint8 RGB -> gray (knobs grayscale_*) -> /255 -> scaling (knob input_scaling)
    -> horizontal flip (knob train_augmentation) drawn from jax.random

Gray rounding 'uint8' means "as PIL's convert('L')": for PIL's own ITU-R 601
coefficients that is PIL's fixed-point formula (R*19595 + G*38470 + B*7471 + 2^15) >> 16,
written here in int32 jnp so the result is bit-identical to PIL; a float
floor(gray + 0.5) would round a few near-half pixels per image the other way, because
PIL's 16-bit coefficients are not exactly 0.299/0.587/0.114. Other coefficients
have no PIL counterpart and use floor(gray + 0.5) in float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from arbiter.data import Dataset
from arbiter.knobs import Knobs

PIL_ITU = (0.299, 0.587, 0.114)
PIL_FIXED_POINT = (19595, 38470, 7471)  # PIL's Convert.c: L = (R*299 + G*587 + B*114)/1000 in 16-bit fixed point

# jax.random.fold_in tags, so that the flips and the framework's own shuffle never share a stream
_FLIP, _SHUFFLE = 0, 1

_cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def load_split(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, H, W, C) and int64 labels (N,) of one split of a MedMNIST npz."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, split)
    if key not in _cache:
        if len(_cache) >= 3:  # a 224x224 split is a gigabyte: keep one file's splits at most
            _cache.clear()
        with np.load(path) as npz:
            images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
        if images.ndim == 3:  # MedMNIST's grayscale files are (N, H, W)
            images = images[..., None]
        _cache[key] = (images, labels.reshape(-1).astype(np.int64))
    return _cache[key]


def to_gray(images: jax.Array, knobs: Knobs) -> jax.Array:
    """uint8 (N, H, W, C) -> float32 (N, H, W, 1) in [0, 1]."""
    if images.shape[-1] == 1:
        return images.astype(jnp.float32) / 255.0
    if knobs.grayscale_rounding == "uint8" and tuple(knobs.grayscale_coefficients) == PIL_ITU:
        rgb = images.astype(jnp.int32)
        r, g, b = (rgb[..., i] * c for i, c in enumerate(PIL_FIXED_POINT))
        gray = ((r + g + b + 0x8000) >> 16).astype(jnp.float32)
        return gray[..., None] / 255.0
    coefficients = jnp.asarray(knobs.grayscale_coefficients, jnp.float32)
    if knobs.grayscale_rounding == "uint8":
        gray = jnp.floor(images.astype(jnp.float32) @ coefficients + 0.5)
        return gray[..., None] / 255.0
    return ((images.astype(jnp.float32) / 255.0) @ coefficients)[..., None]


def scale(x: jax.Array, knobs: Knobs) -> jax.Array:
    if knobs.input_scaling == "symmetric":
        return (x - 0.5) / 0.5
    return x


def random_hflip(x: jax.Array, key: jax.Array) -> jax.Array:
    """Each image mirrored left-right with probability 1/2."""
    flip = jax.random.bernoulli(key, 0.5, (x.shape[0],))
    return jnp.where(flip[:, None, None, None], x[:, :, ::-1, :], x)


def augments(knobs: Knobs, train: bool) -> bool:
    return knobs.train_augmentation == "hflip" and (train or knobs.eval_augmentation)


def transform(images: np.ndarray, knobs: Knobs, train: bool, key: jax.Array) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 model input (N, H, W, 1)."""
    x = scale(to_gray(jnp.asarray(images), knobs), knobs)
    if augments(knobs, train):
        x = random_hflip(x, jax.random.fold_in(key, _FLIP))
    return np.asarray(x, np.float32)


def preprocess(data: Dataset, split: str, indices: np.ndarray, knobs: Knobs, train: bool, seed: int) -> np.ndarray:
    images, _ = load_split(data.path, split)
    return transform(images[np.asarray(indices)], knobs, train, jax.random.key(seed))


def epoch_order(n: int, knobs: Knobs, train: bool, seed: int) -> np.ndarray:
    """Without a shared order: a jax.random permutation for knob shuffle='framework' in
    training (as Flax's examples draw it), else the file order."""
    if train and knobs.shuffle == "framework":
        return np.asarray(jax.random.permutation(jax.random.fold_in(jax.random.key(seed), _SHUFFLE), n))
    return np.arange(n)


def batches(
    data: Dataset,
    split: str,
    knobs: Knobs,
    train: bool,
    seed: int,
    batch_size: int,
    order: np.ndarray | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(x float32 (B, H, W, 1), y int64 (B,)) in `order` (the harness's shared numpy
    permutation), the last batch possibly smaller. Batch i flips with key fold_in(seed, i)."""
    images, labels = load_split(data.path, split)
    if order is None:
        order = epoch_order(len(labels), knobs, train, seed)
    key = jax.random.key(seed)
    for i, start in enumerate(range(0, len(order), batch_size)):
        idx = np.asarray(order[start : start + batch_size])
        yield transform(images[idx], knobs, train, jax.random.fold_in(key, i)), labels[idx]
