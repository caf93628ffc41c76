"""Datasets in MedMNIST's npz format: the real files, users' own files, and a synthetic
stand-in written in exactly the same format.

A MedMNIST npz holds `{split}_images` uint8 (N, H, W) or (N, H, W, 3) and
`{split}_labels` uint8 (N, 1) for split in train, val, test.

    load_dataset("dermamnist")      the real file, downloaded once into ~/.medmnist, MD5-checked
    load_dataset("synthetic")       the stand-in, generated once (see `synthetic_dataset`)
    load_dataset("mine.npz")        a user's file in the same layout: validated, no MD5 to check

Every error a user can fix is a `DataError` whose message is one line that says what to do.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import importlib.util
import os
import re
import tempfile
import urllib.error
import zipfile
import zlib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from urllib.request import urlopen

import numpy as np

SPLITS = ("train", "val", "test")
SIZES = (28, 64, 128, 224)
SYNTHETIC = "synthetic"
SYNTHETIC_NAME = "synthetic-dermamnist"

# DermaMNIST's per-class counts (medmnist 3.0 INFO["dermamnist"]["n_samples"] gives only the
# totals 7007 / 1003 / 2005); the stand-in reproduces them exactly, class imbalance included.
DERMAMNIST_CLASS_COUNTS = {
    "train": (228, 359, 769, 80, 779, 4693, 99),
    "val": (33, 52, 110, 12, 111, 671, 14),
    "test": (66, 103, 220, 23, 223, 1341, 29),
}


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


def _one_line(text: object) -> str:
    return re.sub(r"\s+", " ", str(text)).strip()


# --------------------------------------------------------------------------------------
# MedMNIST's catalogue
# --------------------------------------------------------------------------------------


@cache
def medmnist_info() -> dict:
    """medmnist's `INFO` (URLs, MD5s, split sizes, label names per flag).

    Read from `medmnist/info.py` alone: `import medmnist` runs its `__init__`, which imports
    `medmnist.dataset` and with it torch, and `arbiter/` imports no framework.
    """
    spec = importlib.util.find_spec("medmnist")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the medmnist package is not installed; install the project's dependencies (pip install -e .)")
    info_path = Path(next(iter(spec.submodule_search_locations))) / "info.py"
    module_spec = importlib.util.spec_from_file_location("_arbiter_medmnist_info", info_path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.INFO


def medmnist_flags() -> tuple[str, ...]:
    """The 2D MedMNIST flags (the 3D ones hold volumes the model cannot take)."""
    return tuple(flag for flag, info in medmnist_info().items() if not info["python_class"].endswith("3D"))


def default_root() -> Path:
    return Path.home() / ".medmnist"


def npz_filename(flag: str, size: int = 28) -> str:
    """medmnist's convention: no suffix for 28x28, `_{size}` otherwise."""
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def _size_key(key: str, size: int) -> str:
    return key if size == 28 else f"{key}_{size}"


def _label_names(info: dict) -> list[str]:
    return [info["label"][k] for k in sorted(info["label"], key=int)]


# --------------------------------------------------------------------------------------
# Checksums
# --------------------------------------------------------------------------------------

_md5_cache: dict[tuple, str] = {}


def _stat_key(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


def file_md5(path: str | Path) -> str:
    """MD5 of a file, hashed once per process per (path, size, mtime): a 224x224 file is
    gigabytes, and every command asks for the checksum the ledger keys its runs by."""
    path = Path(path)
    key = _stat_key(path)
    if key not in _md5_cache:
        digest = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _md5_cache[key] = digest.hexdigest()
    return _md5_cache[key]


# --------------------------------------------------------------------------------------
# Writing: MedMNIST's layout, byte-for-byte reproducible
# --------------------------------------------------------------------------------------


def _npy_header(array: np.ndarray) -> bytes:
    """An .npy v1.0 header written here rather than by numpy: numpy's padding has changed
    between versions, and the synthetic file's MD5 must not depend on the numpy installed."""
    descr = np.lib.format.dtype_to_descr(array.dtype)
    text = "{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (descr, tuple(array.shape))
    prefix = len(np.lib.format.MAGIC_PREFIX) + 2 + 2  # magic, version, header length
    pad = -(prefix + len(text) + 1) % 64
    text = text + " " * pad + "\n"
    return np.lib.format.MAGIC_PREFIX + bytes([1, 0]) + len(text).to_bytes(2, "little") + text.encode("latin1")


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    # Stored, not deflated: zlib's output is not guaranteed identical across builds. Fixed
    # timestamp and host system: np.savez would stamp the current time into the archive.
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for key, array in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.create_system = 3
            info.external_attr = 0o644 << 16
            array = np.ascontiguousarray(array)
            with zf.open(info, "w", force_zip64=True) as f:
                f.write(_npy_header(array))
                f.write(memoryview(array).cast("B"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) on a temp file beside `path`, then rename it into place: an
    interrupted write never leaves a half file under the final name."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    except OSError as err:
        raise DataError(f"cannot write into {path.parent}: {_one_line(err.strerror or err)}") from err
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; the final file gets the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_medmnist_npz(path: str | Path, images: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> Path:
    """Write `{split}_images` / `{split}_labels` for every split in MedMNIST's layout, as
    given (no conversion), atomically and byte-for-byte reproducibly."""
    path = Path(path)
    arrays = {}
    for split in SPLITS:
        arrays[f"{split}_images"] = np.asarray(images[split])
        arrays[f"{split}_labels"] = np.asarray(labels[split])
    _atomic_write(path, lambda tmp: _write_npz(tmp, arrays))
    return path


# --------------------------------------------------------------------------------------
# Downloading
# --------------------------------------------------------------------------------------


def _progress(total: int | None, description: str, enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    # stderr: stdout belongs to the command's own output
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )
    return progress, progress.add_task(description, total=total)


def download(url: str, path: str | Path, md5: str | None, *, progress: bool = True, timeout: float = 60.0) -> Path:
    """Fetch `url` into `path` with a progress bar, via a temp file in the same folder that
    is MD5-checked and then renamed into place. Network failures propagate (OSError,
    http.client.HTTPException, ValueError); an MD5 mismatch raises DataError."""
    path = Path(path)
    got: dict[str, str] = {}

    def fetch(tmp: Path) -> None:
        digest = hashlib.md5(usedforsecurity=False)
        with urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            length = response.headers.get("Content-Length")
            bar, task = _progress(int(length) if length else None, path.name, progress)
            with bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(task, advance=len(chunk))
        got["md5"] = digest.hexdigest()
        if md5 is not None and got["md5"] != md5:
            raise DataError(
                f"download of {url} has md5 {got['md5']}, expected {md5}; nothing was saved, try again "
                f"or put the file at {path} yourself"
            )

    _atomic_write(path, fetch)
    _md5_cache[_stat_key(path)] = got["md5"]
    return path


def _fetch_flag(flag: str, path: Path, size: int) -> None:
    info = medmnist_info()[flag]
    url, md5 = info[_size_key("url", size)], info[_size_key("MD5", size)]
    try:
        download(url, path, md5)
    except (OSError, http.client.HTTPException, ValueError) as err:
        # URLError's own text wraps its reason in "<urlopen error ...>"; HTTPError's has the status
        reason = err.reason if type(err) is urllib.error.URLError else err
        raise DataError(
            f"cannot download {path.name} ({_one_line(reason)}); download {url} (md5 {md5}) yourself and put it "
            f"at {path}, or run on the synthetic stand-in instead with --dataset synthetic"
        ) from err


# --------------------------------------------------------------------------------------
# Reading and validating
# --------------------------------------------------------------------------------------

# What np.load and the archive reads raise on a truncated or corrupt file. medmnist's own
# classes do the same np.load, but importing them imports torch, so we call np.load directly.
_CORRUPT = (zipfile.BadZipFile, ValueError, EOFError, OSError, zlib.error, KeyError, RuntimeError)


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """The six arrays of a MedMNIST npz, read into memory. DataError if they cannot be."""
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    wanted = [f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels")]
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic[:2] != b"PK":  # np.load would try it as .npy, then complain about pickles
            what = "a single .npy array" if magic == np.lib.format.MAGIC_PREFIX[:4] else "not a zip archive"
            raise DataError(f"{path} is not an .npz file ({what}); MedMNIST files are .npz archives of six arrays")
        archive = np.load(path, allow_pickle=False)
        with archive:
            missing = [key for key in wanted if key not in archive.files]
            if missing:
                raise DataError(f"{path} lacks {', '.join(missing)}; a MedMNIST npz holds {', '.join(wanted)}")
            return {key: archive[key] for key in wanted}
    except DataError:
        raise
    except _CORRUPT as err:
        raise DataError(f"{path} is truncated or corrupt ({type(err).__name__}: {_one_line(err)}); replace it with a complete copy") from err


def validate(
    arrays: dict[str, np.ndarray], path: Path, num_classes: int | None, size: int | None = None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
    """Check MedMNIST's layout and return (images NHWC uint8, labels int64 (N,), num_classes).

    num_classes None (a user's file): labels must lie in [0, max label] and the number of
    classes is max label + 1, so a class absent from every split but below the maximum
    still counts (its count shows as 0 in `arbiter data`).
    """
    images, labels = {}, {}
    for split in SPLITS:
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        where = f"{path}: {split}_images"
        if x.dtype != np.uint8:
            raise DataError(f"{where} has dtype {x.dtype}, expected uint8")
        if not (x.ndim == 3 or (x.ndim == 4 and x.shape[-1] == 3)) or x.shape[1] != x.shape[2]:
            raise DataError(f"{where} has shape {x.shape}, expected (N, H, W) or (N, H, W, 3) with H == W")
        if size is not None and x.shape[1] != size:
            raise DataError(f"{where} is {x.shape[1]}x{x.shape[2]}, expected {size}x{size}")
        if split != "train" and x.shape[1:] != arrays["train_images"].shape[1:]:
            raise DataError(f"{where} has shape {x.shape}, but train_images has {arrays['train_images'].shape}")
        where = f"{path}: {split}_labels"
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{where} has dtype {y.dtype}, expected an integer type (MedMNIST uses uint8)")
        if not (y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1)):
            raise DataError(f"{where} has shape {y.shape}, expected (N, 1) or (N,) (multi-label data is not supported)")
        if len(y) != len(x):
            raise DataError(f"{path}: {split} has {len(x)} images but {len(y)} labels")
        if len(x) == 0:
            raise DataError(f"{path}: {split} split is empty")
        images[split] = x if x.ndim == 4 else x[..., None]
        labels[split] = y.reshape(-1).astype(np.int64)
    low = min(int(labels[s].min()) for s in SPLITS)
    high = max(int(labels[s].max()) for s in SPLITS)
    if num_classes is None:
        if low < 0:
            raise DataError(f"{path}: labels must be class indices in [0, max label]; found {low}")
        num_classes = high + 1
    elif low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise DataError(f"{path}: label {bad} is outside [0, {num_classes}) for this dataset's {num_classes} classes")
    return images, labels, num_classes


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _is_path(name: str) -> bool:
    return name.lower().endswith(".npz") or os.sep in name or (os.altsep is not None and os.altsep in name)


def load_dataset(
    name: str = "dermamnist", root: str | Path | None = None, size: int = 28, download: bool = True
) -> Dataset:
    """A validated dataset: a 2D MedMNIST flag (downloaded into `root` when missing and
    `download`), 'synthetic' (the stand-in, see `synthetic_dataset`), or a path to a
    user's npz in MedMNIST's layout (validated, no MD5 to check; `root` and `size` unused)."""
    if name == SYNTHETIC:
        return synthetic_dataset(root=root, size=size)
    if _is_path(name):
        return _load_user_file(Path(name).expanduser())
    flag = name.lower()
    if flag in medmnist_info() and flag not in medmnist_flags():
        raise DataError(f"{flag} is a 3D MedMNIST dataset; the model takes 2D images ({', '.join(medmnist_flags())})")
    if flag not in medmnist_flags():
        raise DataError(
            f"unknown dataset {name!r}; use a 2D MedMNIST flag ({', '.join(medmnist_flags())}), "
            f"'{SYNTHETIC}', or a path to an .npz file"
        )
    return _load_flag(flag, Path(root).expanduser() if root is not None else default_root(), size, download)


def _check_size(size: int) -> None:
    if size not in SIZES:
        raise DataError(f"image size {size} is not one of MedMNIST's {', '.join(map(str, SIZES))}")


def _load_flag(flag: str, root: Path, size: int, download: bool) -> Dataset:
    _check_size(size)
    info = medmnist_info()[flag]
    if "multi-label" in info["task"]:
        raise DataError(f"{flag} is a multi-label dataset ({info['task']}); the model classifies one label per image")
    path = root / npz_filename(flag, size)
    url, md5 = info[_size_key("url", size)], info[_size_key("MD5", size)]
    if not path.is_file():
        if not download:
            raise DataError(
                f"{path} not found and downloading is off; download {url} (md5 {md5}) and put it there, "
                f"or run on the synthetic stand-in instead with --dataset synthetic"
            )
        _fetch_flag(flag, path, size)
    got = file_md5(path)
    if got != md5:
        raise DataError(f"{path} has md5 {got}, expected {md5} (medmnist {flag}, size {size}); delete it and run again to re-download")
    images, labels, num_classes = validate(read_npz(path), path, len(info["label"]), size)
    return Dataset(flag, path, images, labels, num_classes, synthetic=False, md5=got, label_names=_label_names(info))


def _load_user_file(path: Path) -> Dataset:
    if not path.is_file():
        raise DataError(f"{path} does not exist; --dataset takes a MedMNIST flag, '{SYNTHETIC}', or a path to an .npz file")
    images, labels, num_classes = validate(read_npz(path), path, None)
    return Dataset(
        path.name, path, images, labels, num_classes, md5=file_md5(path), label_names=[str(i) for i in range(num_classes)]
    )


# --------------------------------------------------------------------------------------
# The synthetic stand-in
# --------------------------------------------------------------------------------------

# Per class (DermaMNIST's order: akiec, bcc, bkl, df, mel, nv, vasc): the lesion's mean
# RGB, and its texture's frequency (cycles per pixel, inside the Gabor bank's 0.08..0.36)
# and orientation (radians). Classes close in colour differ in texture and the reverse,
# so neither cue alone separates them; grayscale keeps the colour only as a gray shift.
_LESION_RGB = np.array(
    [
        (176, 112, 106),  # akiec: pink-red
        (172, 122, 128),  # bcc: pale pink
        (160, 116, 88),  # bkl: light brown
        (150, 104, 84),  # df: brown
        (104, 74, 78),  # mel: dark, bluish
        (142, 100, 76),  # nv: medium brown
        (158, 78, 98),  # vasc: red-purple
    ],
    dtype=np.float64,
)
_TEXTURE_FREQ = np.array([0.25, 0.12, 0.18, 0.32, 0.18, 0.25, 0.12])
_TEXTURE_ANGLE = np.array([0.0, 0.25, 0.5, 0.75, 0.0, 0.5, 0.75]) * np.pi
_SKIN_RGB = np.array((196.0, 158.0, 140.0))


def synthetic_filename(size: int = 28, seed: int = 0, scale: float = 1.0) -> str:
    stem = npz_filename("synthetic_dermamnist", size)[: -len(".npz")]
    if seed != 0:
        stem += f"_seed{seed}"
    if scale != 1.0:
        stem += f"_x{scale:g}"
    return stem + ".npz"


def synthetic_class_counts(scale: float = 1.0) -> dict[str, tuple[int, ...]]:
    """DermaMNIST's per-class counts, scaled (every class keeps at least one image)."""
    return {split: tuple(max(1, round(n * scale)) for n in counts) for split, counts in DERMAMNIST_CLASS_COUNTS.items()}


def _render(rng: np.random.Generator, labels: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, size, size, 3): a noisy skin patch with one blob-shaped lesion whose colour
    and oriented sinusoidal texture depend on the class."""
    n = len(labels)
    # per-image draws, in a fixed order: the file's bytes depend on it
    centre = rng.uniform(-0.1, 0.1, (n, 2)) * size
    radius = rng.uniform(0.24, 0.38, n) * size
    elongation = rng.uniform(0.7, 1.0, n)
    tilt = rng.uniform(0.0, np.pi, n)
    wobble = rng.uniform(0.0, 0.15, (n, 2))
    wobble_phase = rng.uniform(0.0, 2 * np.pi, (n, 2))
    skin = _SKIN_RGB + rng.normal(0.0, 14.0, (n, 3))
    lesion = _LESION_RGB[labels] + rng.normal(0.0, 16.0, (n, 3))
    freq = _TEXTURE_FREQ[labels] * np.exp(rng.normal(0.0, 0.1, n))
    angle = _TEXTURE_ANGLE[labels] + rng.normal(0.0, 0.2, n)
    phase = rng.uniform(0.0, 2 * np.pi, n)
    amplitude = rng.uniform(10.0, 28.0, n)

    grid = np.arange(size, dtype=np.float64) - (size - 1) / 2
    v, u = np.meshgrid(grid, grid, indexing="ij")  # rows, columns
    u = u[None] - centre[:, 0, None, None]
    v = v[None] - centre[:, 1, None, None]
    c, s = np.cos(tilt)[:, None, None], np.sin(tilt)[:, None, None]
    a, b = c * u + s * v, (-s * u + c * v) / elongation[:, None, None]
    theta = np.arctan2(b, a)
    outline = radius[:, None, None] * (
        1
        + wobble[:, 0, None, None] * np.cos(2 * theta + wobble_phase[:, 0, None, None])
        + wobble[:, 1, None, None] * np.cos(3 * theta + wobble_phase[:, 1, None, None])
    )
    # soft edge about 1.5 px wide at 28x28, scaled with the image
    mask = np.clip((outline - np.hypot(a, b)) / (0.055 * size) + 0.5, 0.0, 1.0)[..., None]

    wave = np.cos(angle)[:, None, None] * u + np.sin(angle)[:, None, None] * v
    texture = amplitude[:, None, None] * np.sin(2 * np.pi * freq[:, None, None] * wave + phase[:, None, None])
    image = skin[:, None, None, :] * (1 - mask) + (lesion[:, None, None, :] + texture[..., None]) * mask
    image += rng.normal(0.0, 22.0, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def generate_synthetic(size: int = 28, seed: int = 0, scale: float = 1.0) -> tuple[dict, dict]:
    """(images, labels) in DermaMNIST's layout: uint8 (N, size, size, 3) and (N, 1).
    Deterministic: numpy's PCG64 stream, one per split, in a fixed drawing order."""
    _check_size(size)
    images, labels = {}, {}
    # chunks bound the float64 working set (about 50 MB) without changing the draws' order
    chunk = max(1, (1 << 21) // (size * size))
    for index, (split, counts) in enumerate(synthetic_class_counts(scale).items()):
        rng = np.random.default_rng([seed, index])
        y = rng.permutation(np.repeat(np.arange(len(counts)), counts))
        images[split] = np.concatenate([_render(rng, y[i : i + chunk], size) for i in range(0, len(y), chunk)])
        labels[split] = y.astype(np.uint8)[:, None]
    return images, labels


def synthetic_dataset(root: str | Path | None = None, size: int = 28, seed: int = 0, scale: float = 1.0) -> Dataset:
    """The synthetic DermaMNIST stand-in, written once into `root` (default ~/.medmnist) as
    `synthetic_dermamnist.npz` (`_{size}`, `_seed{seed}`, `_x{scale}` when not default) in
    exactly DermaMNIST's format and per-class counts, and re-used while it stays valid.

    Each class has a lesion colour and an oriented texture (frequency, angle); strong pixel
    noise, random lesion shape, phase and colour jitter keep it from being trivial. A
    nearest-class-mean classifier on colour and spectral-energy features scores about 80%
    on the test split, against 66.9% for always answering the majority class.
    `scale` shrinks every class count (at least one image each), for quick tests.
    """
    _check_size(size)
    if not scale > 0:
        raise DataError(f"synthetic scale must be positive, got {scale}")
    root = Path(root).expanduser() if root is not None else default_root()
    path = root / synthetic_filename(size, seed, scale)
    expected = synthetic_class_counts(scale)
    if path.is_file():
        try:
            return _synthetic_from_file(path, size, expected)
        except DataError:
            pass  # ours to regenerate: a stale or damaged stand-in is simply written again
    images, labels = generate_synthetic(size, seed, scale)
    write_medmnist_npz(path, images, labels)
    return _synthetic_from_file(path, size, expected)


def _synthetic_from_file(path: Path, size: int, expected: dict[str, tuple[int, ...]]) -> Dataset:
    images, labels, num_classes = validate(read_npz(path), path, 7, size)
    for split, counts in expected.items():
        got = tuple(np.bincount(labels[split], minlength=7).tolist())
        if got != counts or images[split].shape[-1] != 3:
            raise DataError(f"{path}: {split} class counts {got} are not the stand-in's {counts}")
    names = [f"synthetic {name}" for name in _label_names(medmnist_info()["dermamnist"])]
    return Dataset(SYNTHETIC_NAME, path, images, labels, num_classes, synthetic=True, md5=file_md5(path), label_names=names)


# --------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------


def class_counts(dataset: Dataset) -> dict[str, np.ndarray]:
    return {split: np.bincount(dataset.labels[split], minlength=dataset.num_classes) for split in SPLITS}


def majority_accuracy(dataset: Dataset, split: str = "test") -> float:
    """Accuracy on `split` of always answering the training set's most frequent class."""
    majority = int(np.argmax(np.bincount(dataset.labels["train"], minlength=dataset.num_classes)))
    return float(np.mean(dataset.labels[split] == majority))


# --------------------------------------------------------------------------------------
# Command-line glue shared by every command
# --------------------------------------------------------------------------------------


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset",
        default="dermamnist",
        help="a 2D MedMNIST flag (dermamnist, pathmnist, bloodmnist, ...), 'synthetic' for the generated "
        "DermaMNIST stand-in, or a path to an .npz in MedMNIST's layout (default: dermamnist)",
    )
    group.add_argument(
        "--data-root",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder holding the MedMNIST files and the synthetic stand-in (default: ~/.medmnist)",
    )
    group.add_argument("--size", type=int, choices=SIZES, default=28, help="image size (default: 28)")
    group.add_argument("--no-download", action="store_true", help="fail instead of downloading a missing MedMNIST file")


def dataset_from_args(args: argparse.Namespace) -> Dataset:
    return load_dataset(args.dataset, root=args.data_root, size=args.size, download=not args.no_download)
