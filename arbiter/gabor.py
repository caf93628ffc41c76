"""The fixed Gabor filter bank, generated once in numpy and handed to every framework.

For orientation theta_j = j * pi / orientations and frequency f (cycles per pixel),
on the grid x, y in {-(k-1)/2, ..., (k-1)/2}:

    x' =  x cos(theta) + y sin(theta)
    y' = -x sin(theta) + y cos(theta)
    sigma = clip(bandwidth / f, sigma_min, (k - 1) / 2)
    g(x, y) = exp(-(x'^2 + gamma^2 y'^2) / (2 sigma^2)) * cos(2 pi f x' + psi)

Each kernel then has its mean removed (a band-pass filter does not respond to a flat
image) and, when normalisation is on, is divided by its L2 norm. Channels are ordered
low-frequency group first, then high-frequency; inside a group, frequency-major,
orientation-minor. Computed in float64 and cast once, so every framework receives the
same float32 bits.
"""

from __future__ import annotations

import numpy as np

from arbiter.spec import GaborSpec

NORMALIZATIONS = ("l2", "none")


def gabor_kernel(size: int, theta: float, frequency: float, sigma: float, gamma: float, psi: float) -> np.ndarray:
    half = (size - 1) / 2
    y, x = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float64)
    xr = x * np.cos(theta) + y * np.sin(theta)
    yr = -x * np.sin(theta) + y * np.cos(theta)
    envelope = np.exp(-(xr**2 + gamma**2 * yr**2) / (2 * sigma**2))
    return envelope * np.cos(2 * np.pi * frequency * xr + psi)


def channel_table(spec: GaborSpec) -> list[dict]:
    """One row per output channel: group, frequency, orientation (radians), sigma."""
    rows = []
    for group, freqs in (("low", spec.low_frequencies), ("high", spec.high_frequencies)):
        for f in freqs:
            sigma = float(np.clip(spec.bandwidth / f, spec.sigma_min, (spec.kernel_size - 1) / 2))
            for j in range(spec.orientations):
                rows.append({"group": group, "frequency": f, "theta": j * np.pi / spec.orientations, "sigma": sigma})
    return rows


def gabor_bank(spec: GaborSpec, normalization: str = "l2", dtype=np.float32) -> np.ndarray:
    """The bank as an HWIO kernel of shape (k, k, 1, channels)."""
    if spec.kernel_size % 2 != 1:
        raise ValueError(f"Gabor kernel_size must be odd, got {spec.kernel_size}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"Gabor normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    kernels = []
    for row in channel_table(spec):
        g = gabor_kernel(spec.kernel_size, row["theta"], row["frequency"], row["sigma"], spec.aspect_ratio, spec.phase)
        g = g - g.mean()
        if normalization == "l2":
            g = g / np.linalg.norm(g)
        kernels.append(g)
    bank = np.stack(kernels, axis=-1)[:, :, None, :]
    return bank.astype(dtype)
