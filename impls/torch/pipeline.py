"""The native PyTorch input pipeline: a torch Dataset over the uint8 images with a
transform callable, batched by a DataLoader.

The transform is what a torch user writes in place of torchvision's transforms (which
cannot be imported beside the installed torch): PIL's convert('L') where that is what
`transforms.Grayscale` would do, torch ops otherwise. Examples come out CHW, as
`transforms.ToTensor` gives them; batches are handed over in the canonical NHWC numpy
layout, the one every Adapter method takes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, RandomSampler

from arbiter.data import Dataset
from arbiter.knobs import Knobs

from .layout import activation_to_canonical

PIL_GRAYSCALE = (0.299, 0.587, 0.114)  # the ITU-R 601 weights of PIL's convert('L')


class ImageDataset(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), int(self.labels[i])


class Transform:
    """uint8 (H, W, C) -> float32 (1, H, W): scale, gray, then the augmentation."""

    def __init__(self, knobs: Knobs, augment: bool, seed: int):
        self.knobs = knobs
        self.hflip = augment and knobs.train_augmentation == "hflip"
        # one generator per pipeline: the flips of successive examples form one stream
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        x = scale(to_gray(image, self.knobs), self.knobs.input_scaling)
        if self.hflip and torch.rand(1, generator=self.generator).item() < 0.5:
            x = torch.flip(x, dims=[-1])
        return x


def to_gray(image: np.ndarray, knobs: Knobs) -> torch.Tensor:
    """uint8 (H, W, C) -> (1, H, W) float32 in [0, 1]."""
    if image.shape[-1] == 1:
        return torch.from_numpy(np.ascontiguousarray(image[..., 0])).float().div(255.0)[None]
    coefficients = tuple(knobs.grayscale_coefficients)
    if knobs.grayscale_rounding == "uint8" and coefficients == PIL_GRAYSCALE:
        gray = Image.fromarray(np.ascontiguousarray(image)).convert("L")
        return torch.from_numpy(np.array(gray)).float().div(255.0)[None]
    rgb = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if knobs.grayscale_rounding == "uint8":
        # rounding to an integer is a discontinuity: float32 round-off next to x.5 could
        # move a pixel by one grey level, so the weighted sum is taken in float64
        c = torch.tensor(coefficients, dtype=torch.float64)
        gray = torch.floor(torch.tensordot(c, rgb.double(), dims=1) + 0.5)
        return gray.div(255.0).float()[None]
    c = torch.tensor(coefficients, dtype=torch.float32)
    return torch.tensordot(c, rgb.float().div(255.0), dims=1)[None]


def scale(x: torch.Tensor, input_scaling: str) -> torch.Tensor:
    if input_scaling == "unit":
        return x
    if input_scaling == "symmetric":
        return (x - 0.5) / 0.5  # transforms.Normalize(mean=0.5, std=0.5)
    raise ValueError(f"unknown input_scaling {input_scaling!r}")


def to_canonical_batch(batch: list[tuple[torch.Tensor, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Collate: NCHW tensors -> (x NHWC float32, y int64) numpy, what the Adapter takes."""
    x = torch.stack([example for example, _ in batch])
    y = np.array([label for _, label in batch], dtype=np.int64)
    return activation_to_canonical(x), y


def make_loader(
    data: Dataset,
    split: str,
    knobs: Knobs,
    train: bool,
    seed: int,
    batch_size: int,
    order: Sequence[int] | None = None,
) -> DataLoader:
    """Batches (x NHWC float32, y int64) of `split`.

    order: the example indices in the order to visit them (knob shuffle='shared': the
    harness's permutation); None visits them shuffled by torch's RandomSampler seeded by
    `seed` when `train`, in file order otherwise. Augmentation follows the knobs
    (training, and evaluation too when eval_augmentation is on)."""
    augment = train or knobs.eval_augmentation
    dataset = ImageDataset(data.images[split], data.labels[split], Transform(knobs, augment, seed))
    if order is not None:
        sampler = [int(i) for i in order]
    elif train:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    else:
        sampler = None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=0, collate_fn=to_canonical_batch)


def preprocess(data: Dataset, split: str, indices: np.ndarray, knobs: Knobs, train: bool, seed: int) -> np.ndarray:
    """The model input for `indices` of `split`, float32 (N, H, W, 1), in that order."""
    loader = make_loader(data, split, knobs, train, seed, batch_size=max(len(indices), 1), order=indices)
    batches = [x for x, _ in loader]
    if not batches:
        return np.zeros((0, data.image_size, data.image_size, 1), np.float32)
    return batches[0]
