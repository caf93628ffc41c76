"""TensorFlow's own input pipeline: a tensorflow-datasets builder over the npz, then
tf.data with tf.image ops.

The builder lives in this module because TFDS looks for a builder's code folder and
fails for one defined in `__main__`. It is prepared once per npz content (md5) under
$ARBITER_CACHE/tfds (default ~/.cache/arbiter/tfds); a second call reads what is there.
TFDS stores examples shuffled by a hash of their key, so every example carries its npz
index, and ordered reads go through that index.

The per-example transform follows `tests/numpy_model.preprocess` (the contract's
oracle): scale to [0, 1], grayscale, then the knob's input_scaling. (Scaling to [-1, 1]
before grayscale, as the spec diagram's order reads, differs by 1 - sum of the
coefficients, 1e-4 for TF's, and would not allow 'uint8' rounding.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from arbiter.data import SPLITS, Dataset
from arbiter.knobs import Knobs

TF_GRAYSCALE = (0.2989, 0.587, 0.114)  # what tf.image.rgb_to_grayscale hard-codes
PIL_GRAYSCALE = (0.299, 0.587, 0.114)
# PIL's convert('L'): (R*19595 + G*38470 + B*7471 + 0x8000) >> 16, its ITU-R 601 weights
# in 16-bit fixed point with round-half-up.
PIL_FIXED_POINT = (19595, 38470, 7471)


# -- the TFDS builder --------------------------------------------------------------------


@dataclasses.dataclass
class NpzConfig(tfds.core.BuilderConfig):
    npz_path: str = ""
    image_shape: tuple = ()
    num_classes: int = 0


class ArbiterNpz(tfds.core.GeneratorBasedBuilder):
    """A MedMNIST-format npz as a TFDS dataset: image (H, W, C) uint8, label, npz index."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=tuple(cfg.image_shape), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=cfg.num_classes),
                    "index": tfds.features.Scalar(dtype=np.int64),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split):
        with np.load(self.builder_config.npz_path) as npz:
            images, labels = npz[f"{split}_images"], npz[f"{split}_labels"].reshape(-1)
        if images.ndim == 3:  # MedMNIST's grayscale files are (N, H, W)
            images = images[..., None]
        for i in range(len(images)):
            yield i, {"image": images[i], "label": int(labels[i]), "index": i}


def cache_root() -> Path:
    return Path(os.environ.get("ARBITER_CACHE", "~/.cache/arbiter")).expanduser() / "tfds"


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def prepared_builder(data: Dataset) -> ArbiterNpz:
    path = Path(data.path).resolve()
    stat = path.stat()
    return _prepared_builder(str(path), stat.st_mtime_ns, stat.st_size, str(cache_root()), tuple(data.images["train"].shape[1:]), data.num_classes)


@lru_cache(maxsize=8)
def _prepared_builder(path: str, _mtime_ns: int, _size: int, root: str, image_shape: tuple, num_classes: int) -> ArbiterNpz:
    md5 = file_md5(Path(path))
    config = NpzConfig(name=f"md5_{md5}", npz_path=path, image_shape=image_shape, num_classes=num_classes)
    builder = ArbiterNpz(config=config, data_dir=str(Path(root) / md5))
    tfds.disable_progress_bar()  # a few seconds of work, not worth a progress bar per split
    # offline: never ask GCS for a prepared copy of a local file
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder


@lru_cache(maxsize=8)
def _split_by_index(builder: ArbiterNpz, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of a split in npz order, for reads in a caller-given order."""
    n = builder.info.splits[split].num_examples
    batch = next(iter(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False).batch(n))))
    order = np.argsort(batch["index"])
    if not np.array_equal(batch["index"][order], np.arange(n)):
        raise RuntimeError(f"the prepared TFDS split {split!r} does not hold npz indices 0..{n - 1}; delete {builder.data_dir}")
    return batch["image"][order], batch["label"][order].astype(np.int64)


# -- the per-example transform ---------------------------------------------------------


def unit_gray(image: tf.Tensor, knobs: Knobs) -> tf.Tensor:
    """uint8 (H, W, C) -> float32 (H, W, 1) in [0, 1] under the grayscale_* knobs."""
    if image.shape[-1] == 1:
        return tf.image.convert_image_dtype(image, tf.float32)
    coefficients = tuple(knobs.grayscale_coefficients)
    if knobs.grayscale_rounding == "float":
        x = tf.image.convert_image_dtype(image, tf.float32)
        if coefficients == TF_GRAYSCALE:
            return tf.image.rgb_to_grayscale(x)  # what a TF user writes
        return tf.tensordot(x, tf.constant(coefficients, tf.float32), [[-1], [0]])[..., None]
    if coefficients == PIL_GRAYSCALE:
        rgb = tf.cast(image, tf.int32)
        gray = tf.bitwise.right_shift(tf.tensordot(rgb, tf.constant(PIL_FIXED_POINT, tf.int32), [[-1], [0]]) + 0x8000, 16)
    else:
        # round half up (PIL's rule), not tf.round's half-to-even; float64 so the .5
        # boundaries fall where numpy's do
        gray = tf.floor(tf.tensordot(tf.cast(image, tf.float64), tf.constant(coefficients, tf.float64), [[-1], [0]]) + 0.5)
    return (tf.cast(gray, tf.float32) / 255.0)[..., None]


def scale(x: tf.Tensor, input_scaling: str) -> tf.Tensor:
    if input_scaling == "unit":
        return x
    if input_scaling == "symmetric":
        return (x - 0.5) / 0.5
    raise ValueError(f"unknown input_scaling {input_scaling!r}")


def augments(knobs: Knobs, train: bool) -> bool:
    return knobs.train_augmentation == "hflip" and (train or knobs.eval_augmentation)


def example_transform(knobs: Knobs, train: bool, seed: int):
    """(uint8 image (H, W, C), npz index) -> float32 model input (H, W, 1).

    The flip draws from TF's stateless RNG keyed by (seed, npz index): an example's flip
    depends on the seed and on which example it is, not on the order it is read in."""
    flip = augments(knobs, train)

    def transform(image, index):
        x = scale(unit_gray(image, knobs), knobs.input_scaling)
        if flip:
            x = tf.image.stateless_random_flip_left_right(x, seed=tf.stack([tf.constant(seed, tf.int64), tf.cast(index, tf.int64)]))
        return x

    return transform


# -- datasets ------------------------------------------------------------------------


def make_tf_dataset(
    data: Dataset, split: str, knobs: Knobs, train: bool, seed: int, batch_size: int, order: np.ndarray | None = None
) -> tf.data.Dataset:
    """Batches of (x float32 (B, H, W, 1), y int64 (B,)).

    order: npz indices in the order to read them (a shared permutation, or the examples
    `preprocess` asks for). None: all of the split, shuffled by tf.data seeded by `seed`
    when `train` (knob shuffle='framework'), else in TFDS's stored order."""
    builder = prepared_builder(data)
    transform = example_transform(knobs, train, seed)
    if order is None:
        ds = builder.as_dataset(split=split, shuffle_files=False)
        if train:
            ds = ds.shuffle(builder.info.splits[split].num_examples, seed=seed, reshuffle_each_iteration=True)
        ds = ds.map(lambda ex: (transform(ex["image"], ex["index"]), ex["label"]))
    else:
        images, labels = _split_by_index(builder, split)
        order = np.asarray(order, np.int64)
        ds = tf.data.Dataset.from_tensor_slices((images[order], labels[order], order))
        ds = ds.map(lambda image, label, index: (transform(image, index), label))
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def preprocess(data: Dataset, split: str, indices: np.ndarray, knobs: Knobs, train: bool, seed: int) -> np.ndarray:
    indices = np.asarray(indices, np.int64)
    ds = make_tf_dataset(data, split, knobs, train, seed, batch_size=max(len(indices), 1), order=indices)
    xs = [x.numpy() for x, _ in ds]
    return np.concatenate(xs) if xs else np.zeros((0, data.image_size, data.image_size, 1), np.float32)
