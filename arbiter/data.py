"""Datasets in MedMNIST's npz format: the real files, users' own files, and a synthetic
stand-in written in exactly the same format.

A MedMNIST npz holds `{split}_images` uint8 (N, H, W) or (N, H, W, 3) and
`{split}_labels` uint8 (N, 1) for split in train, val, test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")


class DataError(RuntimeError):
    """A dataset that cannot be used; the message is one line that says what to do."""


@dataclass
class Dataset:
    """A loaded, validated dataset. `images[split]` is uint8 (N, H, W, C) with C in {1, 3}
    (MedMNIST's grayscale (N, H, W) files get C=1); `labels[split]` is int64 (N,)."""

    name: str  # 'dermamnist', 'synthetic-dermamnist', or the user's file name
    path: Path  # the npz on disk: every framework's native pipeline reads this file
    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    num_classes: int
    synthetic: bool = False
    md5: str | None = None
    label_names: list[str] = field(default_factory=list)

    @property
    def image_size(self) -> int:
        return int(self.images["train"].shape[1])

    @property
    def channels(self) -> int:
        return int(self.images["train"].shape[-1])

    @property
    def display_name(self) -> str:
        return f"{self.name} (SYNTHETIC stand-in)" if self.synthetic else self.name
