"""How cheap is the fixed Gabor front end in each framework, and how close to the hardware?

    python benchmarks/gabor_conv.py [--batch-sizes 1 64 256 1024] [--bank-sizes 8 32 128]
        [--image-sizes 28 64 128 224] [--device auto|cpu|gpu] [--repeats 7] [--rounds 1]
        [--cpus 0 ...] [--out DIR] [--quick]

For each point (batch, bank channels, image size) and each framework/formulation, the
convolution of a grayscale (N, H, W, 1) float32 batch with `arbiter.gabor.gabor_bank` (k x k,
stride 1, padding k//2) is:
  1. run once: that first call (tracing, compilation, autotuning) is `compile_s`;
  2. checked against a float64 numpy reference: max abs diff above `--tolerance` marks
     the point `mismatch` and it is not timed (a fast wrong kernel is not a result);
  3. warmed up, then timed `--repeats` times, round-robin with the other formulations of
     the same framework and a float32 matmul (the ceiling), each sample ending with that
     framework's synchronisation.
FLOPs counted are those of the direct convolution, 2*N*H_out*W_out*C_out*k*k*C_in, whatever
the formulation actually computes. The ceiling is the best float32 matmul throughput any
framework reached in the run; `ceiling_fraction` divides by it.

Each framework (and each set of XLA flags, which XLA reads once per process) runs in its own
worker process, so that one framework's idle thread pool does not spin against another's
work, and a missing framework costs one clearly reported line. Outputs under --out:
gabor_conv.json (every point and the environment), gabor_conv.md, and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
from arbiter.gabor import gabor_bank  # noqa: E402
from arbiter.padding import conv_padding  # noqa: E402
from arbiter.spec import GaborSpec  # noqa: E402
from impls.base import DEVICES  # noqa: E402

# float32 accumulation of 49 taps of inputs in [0, 1] against unit-L2 kernels: outputs are
# O(1) and the measured error is ~1e-6; 1e-4 leaves room for FFT and reordered sums while
# still failing any kernel that drops a tap, shifts the grid or reads the wrong channel.
DEFAULT_TOLERANCE = 1e-4
MODEL_CHANNELS = GaborSpec().channels
CENTRE_BATCH = 256  # where the targets are stated
IMAGE_SWEEP_BATCH = 32  # 224x224x32 outputs of 32 images: 205 MB


# --------------------------------------------------------------------------- the problem


def bank_spec(channels: int) -> GaborSpec:
    """A Gabor spec with `channels` filters, varying orientations and frequencies around
    the model's bank (8 orientations x 2+2 frequencies = 32)."""
    base = GaborSpec()
    if channels == base.channels:
        return base
    if channels % 2:
        raise ValueError(f"bank size must be even (low and high groups), got {channels}")
    per_group = 1 if channels < 16 else 2 if channels <= 64 else 4
    if channels % (2 * per_group):
        raise ValueError(f"bank size {channels} is not a multiple of {2 * per_group}")
    lo_range, hi_range = (base.low_frequencies[0], base.low_frequencies[-1]), (base.high_frequencies[0], base.high_frequencies[-1])
    low = tuple(float(f) for f in np.geomspace(*lo_range, per_group)) if per_group > 1 else (lo_range[0],)
    high = tuple(float(f) for f in np.geomspace(*hi_range, per_group)) if per_group > 1 else (hi_range[0],)
    return replace(base, orientations=channels // (2 * per_group), low_frequencies=low, high_frequencies=high)


@dataclass(frozen=True)
class Point:
    batch: int
    channels: int
    image: int

    @property
    def key(self) -> str:
        return f"b{self.batch}_c{self.channels}_i{self.image}"

    def spec(self) -> GaborSpec:
        return bank_spec(self.channels)

    def flops(self) -> int:
        k = self.spec().kernel_size
        return 2 * self.batch * self.image * self.image * self.channels * k * k * 1

    def output_bytes(self) -> int:
        return 4 * self.batch * self.image * self.image * self.channels


def make_input(p: Point) -> np.ndarray:
    """Grayscale images in [0, 1] as the pipeline produces them; the same bits in every
    worker (seeded by the shape), so every framework sees identical input."""
    rng = np.random.default_rng([p.batch, p.image, 20240])
    return (rng.integers(0, 256, (p.batch, p.image, p.image, 1)) / 255.0).astype(np.float32)


def make_bank(p: Point) -> np.ndarray:
    return gabor_bank(p.spec(), "l2")


def paddings(image: int, k: int) -> tuple[tuple[int, int], tuple[int, int]]:
    return conv_padding(image, k, 1, "tf_same"), conv_padding(image, k, 1, "tf_same")


def reference(x: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """float64 direct convolution, NHWC: patches (rows of k*k taps) times the bank, in
    batch chunks so a large point does not need GBs of patches at once."""
    k = bank.shape[0]
    (t, b), (l, r) = paddings(x.shape[1], k)
    w = bank.astype(np.float64).reshape(k * k, -1)
    out = np.empty(x.shape[:3] + (w.shape[1],), np.float64)
    chunk = max(1, int(2e7 // (x.shape[1] * x.shape[2] * k * k)))
    for i in range(0, x.shape[0], chunk):
        xp = np.pad(x[i : i + chunk, :, :, 0].astype(np.float64), ((0, 0), (t, b), (l, r)))
        win = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(1, 2))  # n, H, W, k, k
        out[i : i + chunk] = win.reshape(*win.shape[:3], k * k) @ w
    return out


def max_abs_diff(y: np.ndarray, ref: np.ndarray) -> float:
    if y.shape != ref.shape:
        return float("inf")
    return float(max(np.max(np.abs(y[i : i + 64] - ref[i : i + 64])) for i in range(0, len(y), 64)))


# --------------------------------------------------------------------------- formulations
#
# Each framework section returns {name: build}, where build(x, bank) -> (run, fetch):
# `run()` computes the conv and waits for it (the timed call); `fetch(out)` turns its
# output into an NHWC numpy array for the equality check (untimed). Inputs are placed on
# the device once, outside the timed call.


class NotApplicable(Exception):
    """A formulation that does not apply at this point (e.g. a batch that does not split
    over the devices): reported as `n/a: why`, neither an error nor a result."""


@dataclass
class Section:
    framework: str
    variant: str
    info: dict
    formulations: dict[str, Callable]
    matmul: Callable[[int], Callable[[], object]]
    reset: Callable[[], None] = lambda: None  # between points (compile caches)
    # build(x, bank) -> run: writes an output-sized array and nothing else, the memory
    # floor under any formulation (where a framework offers one)
    floor: Callable | None = None


# XLA reads XLA_FLAGS once per process: each entry is one JAX worker, running only the
# formulations named (None: all). Flag names were taken from this jaxlib's binary
# (`strings libjax_common.so | grep xla_cpu_`); what each variant is for:
# - default: this jaxlib (0.10) hands convolutions to YNNPACK (`__ynn_fusion` in the
#   compiled HLO), which ran the whole conv on ONE thread here (per-thread CPU time
#   from /proc/self/task: ~14 ticks on one thread, ~5 on the other; torch's oneDNN
#   splits 16/14);
# - ynn-off: XLA's previous path, Eigen's spatial convolution;
# - xnn-greedy: the XNNPACK graph-fusion pass instead of YNNPACK;
# - devices: one XLA CPU device per core and the batch sharded over them, so that each
#   core runs its own single-threaded YNNPACK conv (a data-parallel jit, no concat);
# - concurrent: the batch split in two inside one jit, the halves independent so that
#   the concurrency-optimised scheduler can run them side by side (costs a concat).
JAX_CPU_VARIANTS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "default": ("", None),
    "ynn-off": ("--xla_cpu_experimental_ynn_fusion_type=", ("lax.conv NHWC", "space-to-depth(w) conv", "row-Toeplitz matmul")),
    "xnn-greedy": (
        "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_use_xnnpack=true "
        "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
        ("lax.conv NHWC", "space-to-depth(w) conv"),
    ),
    "devices": ("--xla_force_host_platform_device_count={cores}", ("lax.conv NHWC", "lax.conv NHWC, batch sharded over cores")),
    "concurrent": ("--xla_cpu_enable_concurrency_optimized_scheduler=true", ("lax.conv NHWC split+concat",)),
}
JAX_GPU_VARIANTS = {"default": ("", None)}


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def jax_flags(variant: str, cores: int | None = None) -> str:
    return JAX_CPU_VARIANTS[variant][0].format(cores=cores or usable_cores())


def jax_section(device: str, variant: str) -> Section:
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")  # no TF32 on GPUs
    import jax.numpy as jnp
    from jax import lax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = jax.devices("gpu" if device == "gpu" else "cpu")
    dev = devices[0]
    hi = lax.Precision.HIGHEST

    def lax_conv_nhwc(x, w):
        pads = paddings(x.shape[1], w.shape[0])
        return lax.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=hi)

    def lax_conv_nchw(x, w):
        # the PyTorch layout inside XLA, transposed back to the canonical NHWC
        pads = paddings(x.shape[1], w.shape[0])
        y = lax.conv_general_dilated(
            jnp.transpose(x, (0, 3, 1, 2)), jnp.transpose(w, (3, 2, 0, 1)), (1, 1), pads,
            dimension_numbers=("NCHW", "OIHW", "NCHW"), precision=hi,
        )
        return jnp.transpose(y, (0, 2, 3, 1))

    def split_concat(x, w):
        half = x.shape[0] // 2
        if half == 0:
            return lax_conv_nhwc(x, w)
        return jnp.concatenate([lax_conv_nhwc(x[:half], w), lax_conv_nhwc(x[half:], w)], axis=0)

    def shifted(x, k):
        """The k*k shifted views of the padded single-channel image, each (N, H, W)."""
        (t, b), (l, r) = paddings(x.shape[1], k)
        xp = jnp.pad(x[..., 0], ((0, 0), (t, b), (l, r)))
        h, wd = x.shape[1], x.shape[2]
        return [xp[:, i : i + h, j : j + wd] for i in range(k) for j in range(k)]

    def taps_matmul(x, w):
        # a 1-input-channel conv IS a matmul of the k*k taps: (N*H*W, k*k) @ (k*k, C)
        k = w.shape[0]
        patches = jnp.stack(shifted(x, k), axis=-1)
        return jnp.matmul(patches, w.reshape(k * k, -1), precision=hi)

    def patches_matmul(x, w):
        k = w.shape[0]
        pads = paddings(x.shape[1], k)
        patches = lax.conv_general_dilated_patches(x, (k, k), (1, 1), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.matmul(patches, w.reshape(k * k, -1), precision=hi)

    def shift_add(x, w):
        # one elementwise fusion, nothing materialised; summed as a balanced tree, because a
        # 49-long chain of dependent adds is latency-bound (measured 1.5x slower here)
        k = w.shape[0]
        terms = [s[..., None] * w[t // k, t % k, 0] for t, s in enumerate(shifted(x, k))]
        while len(terms) > 1:
            terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
        return terms[0]

    def column_kernel(w, span: int, r: int):
        """K[i, u, v, c] = w[i, u - v, c] (0 where u - v is off the kernel): input column u
        of a span-wide window feeding output column v of an r-wide block."""
        k = w.shape[0]
        u, v = np.meshgrid(np.arange(span), np.arange(r), indexing="ij")
        j = u - v
        valid = (j >= 0) & (j < k)
        return jnp.where(valid[None, :, :, None], w[:, np.clip(j, 0, k - 1), 0, :], 0.0)  # k, span, r, C

    def s2d_width(x, w, r: int = 2):
        """Space-to-depth along the width: r adjacent columns become r input channels and
        r output columns become r*C output channels, so the conv reads as a denser GEMM
        and its (N, H, W/r, r*C) output IS the NHWC result, reshaped for free. Costs
        (ceil((r+k-1)/r)*r)/k more FLOPs (8/7 at r=2)."""
        k, c = w.shape[0], w.shape[-1]
        nb = -(-(r + k - 1) // r)  # input blocks one output block reads
        kern = column_kernel(w, nb * r, r).reshape(k, nb, r, r * c)
        (t, b), (l, _) = paddings(x.shape[1], k)
        width = x.shape[2]
        out_blocks = -(-width // r)
        padded = (out_blocks + nb - 1) * r
        xp = jnp.pad(x[..., 0], ((0, 0), (t, b), (l, padded - width - l)))
        xs = xp.reshape(x.shape[0], xp.shape[1], padded // r, r)
        y = lax.conv_general_dilated(xs, kern, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=hi)
        return y.reshape(x.shape[0], x.shape[1], out_blocks * r, c)[:, :, :width, :]

    def row_toeplitz(x, w, r: int = 4):
        """Blocks of r output columns as one matmul: each row of the lhs is the k x (r+k-1)
        input window of a block, the rhs the banded (Toeplitz) arrangement of the bank,
        (k*(r+k-1), r*C). The lhs is ~2.8x smaller than the 49-tap patches (k*(r+k-1)/r
        values per output pixel instead of k*k), for (r+k-1)/k more FLOPs (10/7 at r=4),
        and the (N*H*W/r, r*C) result is already NHWC."""
        k, c = w.shape[0], w.shape[-1]
        n, h, width = x.shape[:3]
        (t, b), (l, _) = paddings(h, k)
        nb, span = -(-width // r), r + k - 1
        padded = (nb - 1) * r + span
        xp = jnp.pad(x[..., 0], ((0, 0), (t, b), (l, padded - width - l)))
        rows = jnp.stack([xp[:, i : i + h, :] for i in range(k)], axis=2)  # n, h, k, padded
        lhs = jnp.stack([rows[..., blk * r : blk * r + span] for blk in range(nb)], axis=2)  # n, h, nb, k, span
        y = jnp.matmul(lhs.reshape(n * h * nb, k * span), column_kernel(w, span, r).reshape(k * span, r * c), precision=hi)
        return y.reshape(n, h, nb * r, c)[:, :, :width, :]

    def fft(x, w):
        # linear (not circular) convolution: transform size >= H + k - 1
        k = w.shape[0]
        h, wd = x.shape[1], x.shape[2]
        s = (h + k - 1, wd + k - 1)
        # correlation (what conv layers compute) = convolution with the flipped kernel
        kf = jnp.fft.rfft2(w[::-1, ::-1, 0, :], s=s, axes=(0, 1))
        xf = jnp.fft.rfft2(x[..., 0], s=s)
        y = jnp.fft.irfft2(xf[..., None] * kf[None], s=s, axes=(1, 2))
        o = k - 1 - k // 2
        return y[:, o : o + h, o : o + wd, :]

    def builder(fn):
        jitted = jax.jit(fn)

        def build(x, bank):
            xd, wd = jax.device_put(x, dev), jax.device_put(bank, dev)
            return (lambda: jitted(xd, wd).block_until_ready()), np.asarray

        return build

    def sharded_builder(fn):
        mesh = Mesh(np.array(devices), ("batch",))
        split, whole = NamedSharding(mesh, PartitionSpec("batch")), NamedSharding(mesh, PartitionSpec())
        jitted = jax.jit(fn, in_shardings=(split, whole), out_shardings=split)

        def build(x, bank):
            if len(devices) < 2:
                raise NotApplicable("one device only: nothing to shard over")
            if x.shape[0] % len(devices):
                raise NotApplicable(f"batch {x.shape[0]} does not split over {len(devices)} devices")
            xd, wd = jax.device_put(x, split), jax.device_put(bank, whole)
            return (lambda: jitted(xd, wd).block_until_ready()), np.asarray

        return build

    all_forms = {
        "lax.conv NHWC": builder(lax_conv_nhwc),
        "lax.conv NHWC, batch sharded over cores": sharded_builder(lax_conv_nhwc),
        "lax.conv NHWC split+concat": builder(split_concat),
        "lax.conv NCHW": builder(lax_conv_nchw),
        "space-to-depth(w) conv": builder(s2d_width),
        "row-Toeplitz matmul": builder(row_toeplitz),
        "taps matmul": builder(taps_matmul),
        "patches+matmul": builder(patches_matmul),
        "shift-add": builder(shift_add),
        "FFT": builder(fft),
    }
    if device == "cpu":
        flags, names = jax_flags(variant), JAX_CPU_VARIANTS[variant][1]
    else:
        flags, names = JAX_GPU_VARIANTS[variant]
    default_names = [n for n in all_forms if "sharded" not in n and "split" not in n]
    chosen = {f"jit {n}": all_forms[n] for n in (names or default_names)}

    def matmul(n: int):
        a = jax.device_put(np.random.default_rng(1).standard_normal((n, n), np.float32), dev)
        f = jax.jit(lambda a: jnp.matmul(a, a, precision=hi))
        return lambda: f(a).block_until_ready()

    info = {
        "jax": jax.__version__,
        "device": str(dev),
        "devices": len(devices),
        "device_kind": getattr(dev, "device_kind", None),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "variant_flags": flags,
        "intra_op_threads": f"{usable_cores()} (XLA:CPU: one per usable core)" if device == "cpu" else None,
        "default_matmul_precision": "highest",
    }
    def floor(x, bank):
        # one multiply per output element: what writing (N, H, W, C) float32 costs here
        f = jax.jit(lambda x, w: x * w[0, 0, 0])
        xd, wd = jax.device_put(x, dev), jax.device_put(bank, dev)
        return lambda: f(xd, wd).block_until_ready()

    return Section("jax", variant, info, chosen, matmul, floor=floor if variant == "default" else None)


def torch_section(device: str, variant: str) -> Section:
    import torch
    import torch.nn.functional as F

    if device == "gpu":
        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device")
        dev = torch.device("cuda")
        torch.backends.cudnn.allow_tf32 = False  # parity: TF32 would miss the 1e-4 check
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = True  # what a performance-minded user sets; its autotuning lands in compile_s
    else:
        dev = torch.device("cpu")
    torch.set_grad_enabled(False)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def to_torch(x, bank, channels_last=False):
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(dev)  # NCHW
        wt = torch.from_numpy(np.ascontiguousarray(bank.transpose(3, 2, 0, 1))).to(dev)  # OIHW
        if channels_last:
            xt, wt = xt.contiguous(memory_format=torch.channels_last), wt.contiguous(memory_format=torch.channels_last)
        return xt, wt

    def padding_arg(image, k):
        (t, b), (l, r) = paddings(image, k)
        if t != b or l != r:
            raise ValueError("asymmetric padding needs an explicit F.pad; not a stride-1 odd-k bank")
        return (t, l)

    def fetch(y):
        return y.permute(0, 2, 3, 1).cpu().numpy()

    def eager(channels_last):
        def build(x, bank):
            xt, wt = to_torch(x, bank, channels_last)
            pad = padding_arg(x.shape[1], bank.shape[0])

            def run():
                y = F.conv2d(xt, wt, padding=pad)
                sync()
                return y

            return run, fetch

        return build

    def conv(x, w, pad: tuple[int, int]):
        return F.conv2d(x, w, padding=pad)

    compiled = torch.compile(conv, dynamic=False, fullgraph=True)

    def build_compiled(x, bank):
        xt, wt = to_torch(x, bank)
        pad = padding_arg(x.shape[1], bank.shape[0])

        def run():
            y = compiled(xt, wt, pad)
            sync()
            return y

        return run, fetch

    def matmul(n: int):
        a = torch.from_numpy(np.random.default_rng(1).standard_normal((n, n), np.float32)).to(dev)

        def run():
            y = a @ a
            sync()
            return y

        return run

    def reset():
        # a fresh compile per point: its first call is then the compile time of that shape,
        # and dynamo's recompile limit (8 shapes) can never silently fall back to eager
        torch._dynamo.reset()

    info = {
        "torch": torch.__version__,
        "device": str(dev),
        "num_threads": torch.get_num_threads(),
        "num_interop_threads": torch.get_num_interop_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark) if dev.type == "cuda" else None,
        "tf32": False if dev.type == "cuda" else None,
    }
    if dev.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name()
    forms = {
        "eager F.conv2d NCHW": eager(False),
        "eager F.conv2d channels_last": eager(True),
        "torch.compile": build_compiled,
    }
    return Section("torch", variant, info, forms, matmul, reset)


def tf_section(device: str, variant: str) -> Section:
    import tensorflow as tf

    if device == "gpu":
        gpus = tf.config.list_physical_devices("GPU")
        if not gpus:
            raise RuntimeError("tensorflow sees no GPU")
        for g in gpus:
            tf.config.experimental.set_memory_growth(g, True)
        tf.config.experimental.enable_tensor_float_32_execution(False)
        dev = "/GPU:0"
    else:
        dev = "/CPU:0"

    def sync():
        # waits for the device without copying the output out (.numpy() copies: ~2 ms at batch 256)
        tf.test.experimental.sync_devices()

    def conv(x, w):
        (t, b), (l, r) = paddings(x.shape[1], w.shape[0])
        return tf.nn.conv2d(x, w, strides=1, padding=[[0, 0], [t, b], [l, r], [0, 0]])

    def builder(jit: bool):
        def build(x, bank):
            fn = tf.function(conv, jit_compile=jit, autograph=False)  # a fresh trace per point
            with tf.device(dev):
                xt, wt = tf.constant(x), tf.constant(bank)

            def run():
                with tf.device(dev):
                    y = fn(xt, wt)
                sync()
                return y

            return run, lambda y: y.numpy()

        return build

    def matmul(n: int):
        with tf.device(dev):
            a = tf.constant(np.random.default_rng(1).standard_normal((n, n), np.float32))
        fn = tf.function(tf.linalg.matmul, autograph=False)

        def run():
            with tf.device(dev):
                y = fn(a, a)
            sync()
            return y

        return run

    info = {
        "tensorflow": tf.__version__,
        "device": dev,
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads() or "0 (all cores)",
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads() or "0 (all cores)",
        "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on for x86 CPU)"),
        "tf32": False if device == "gpu" else None,
    }
    forms = {"tf.function": builder(False), "tf.function(jit_compile=True)": builder(True)}
    return Section("tensorflow", variant, info, forms, matmul)


SECTIONS = {"jax": jax_section, "torch": torch_section, "tensorflow": tf_section}


# --------------------------------------------------------------------------- worker


def worker(args) -> None:
    """One framework (one variant) over every point; JSON lines to stdout."""
    plan = json.loads(Path(args.plan).read_text())
    if plan.get("cpus"):
        # before any framework sizes its thread pools from the usable CPUs
        os.sched_setaffinity(0, set(plan["cpus"]))
    try:
        section = SECTIONS[args.worker](plan["device"], args.variant)
    except Exception as err:  # ImportError, no GPU, unknown flag...
        common.emit({"type": "unavailable", "framework": args.worker, "variant": args.variant, "reason": f"{type(err).__name__}: {err}"})
        return
    common.emit({"type": "info", "framework": section.framework, "variant": section.variant, "info": section.info})
    timing = plan["timing"]
    mm_timer = common.Timer(section.matmul(plan["matmul_size"]), warmup_s=timing["warmup_s"], min_sample_s=timing["min_sample_s"])
    mm_timer.first_call()
    mm_timer.warm_up()
    for p_dict in plan["points"]:
        p = Point(**p_dict)
        records = run_point(section, p, plan, mm_timer)
        for r in records:
            common.emit({"type": "point", **r})
        common.emit({"type": "progress", "framework": section.framework, "variant": section.variant, "point": p.key})


def run_point(section: Section, p: Point, plan: dict, mm_timer: common.Timer) -> list[dict]:
    base = {"framework": section.framework, "variant": section.variant, "batch": p.batch, "bank_channels": p.channels,
            "kernel_size": p.spec().kernel_size, "image_size": p.image, "flops": p.flops(), "tolerance": plan["tolerance"],
            "device": section.info.get("device")}
    if p.output_bytes() > plan["max_output_mb"] * 2**20:
        reason = f"skipped: output {p.output_bytes() / 2**20:.0f} MB > --max-output-mb {plan['max_output_mb']}"
        return [{**base, "formulation": n, "status": reason} for n in section.formulations]
    x, bank = make_input(p), make_bank(p)
    ref = reference(x, bank)
    timing = plan["timing"]
    section.reset()
    records, timers = {}, {}
    for name, build in section.formulations.items():
        rec = {**base, "formulation": name, "compile_s": None, "max_abs_diff": None}
        try:
            run, fetch = build(x, bank)
            timer = common.Timer(run, warmup_s=timing["warmup_s"], min_sample_s=timing["min_sample_s"])
            out = timer.first_call()
            rec["compile_s"] = timer.first_call_s
            rec["max_abs_diff"] = max_abs_diff(fetch(out), ref)
            del out
            if rec["max_abs_diff"] <= plan["tolerance"]:
                timer.warm_up()
                timers[name] = timer
                rec["status"] = "ok"
            else:
                rec["status"] = "mismatch"
        except NotApplicable as why:
            rec["status"] = f"n/a: {why}"
        except Exception as err:
            rec["status"] = f"error: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        records[name] = rec
    del ref
    if timers and section.floor is not None:
        floor = common.Timer(section.floor(x, bank), warmup_s=timing["warmup_s"], min_sample_s=timing["min_sample_s"])
        floor.first_call()
        floor.warm_up()
        timers["__floor__"] = floor
    if timers:
        raw = common.interleaved_raw({**timers, "__matmul__": mm_timer}, plan["repeats"])
        mm_samples = [s["s"] for s in raw.pop("__matmul__")]
        floor_samples = [s["s"] for s in raw.pop("__floor__", [])]
        for name, samples in raw.items():
            records[name].update({"samples": samples, "calls_per_sample": timers[name].inner,
                                  "matmul_samples_s": mm_samples, "floor_samples_s": floor_samples or None})
            records[name].update(timing_fields(records[name], plan["matmul_size"]))
    return list(records.values())


def timing_fields(rec: dict, matmul_size: int) -> dict:
    """Everything derived from a record's raw samples (one round's, or several pooled)."""
    st = common.sample_stats(rec["samples"])
    flops = rec["flops"]
    mm_gflops = 2 * matmul_size**3 / float(np.median(rec["matmul_samples_s"])) / 1e9
    floor = rec.get("floor_samples_s")
    return {
        "steady_median_s": st["median"], "steady_iqr_s": st["iqr"], "steady_min_s": st["min"], "steady_max_s": st["max"],
        "repeats": st["n"],
        "images_per_s": rec["batch"] / st["median"], "gflops": flops / st["median"] / 1e9,
        "gflops_iqr": (flops / st["q1"] - flops / st["q3"]) / 1e9,
        "faults_per_call": st["faults_per_call"], "cpu_utilisation": st["cpu_utilisation"],
        # work per CPU-second: what the conv costs the cores, whatever else shares the machine
        "gflops_per_cpu_s": flops / st["cpu_s_per_call"] / 1e9 if st["cpu_s_per_call"] > 0 else None,
        "matmul_gflops_same_window": mm_gflops,
        "ceiling_fraction_same_window": flops / st["median"] / 1e9 / mm_gflops,
        "output_write_floor_s": float(np.median(floor)) if floor else None,
    }


STATUS_RANK = ("mismatch", "error", "n/a", "skipped", "ok")  # worst first


def merge_rounds(records: list[dict], matmul_size: int) -> list[dict]:
    """One record per (worker, formulation, point) from several rounds (fresh processes at
    different times): samples pooled, the worst status kept, compile time the median."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        key = (r["framework"], r["variant"], r["formulation"], r["batch"], r["bank_channels"], r["image_size"])
        groups.setdefault(key, []).append(r)
    merged = []
    for rounds in groups.values():
        if len(rounds) == 1:
            merged.append(rounds[0])
            continue
        worst = min(rounds, key=lambda r: next(i for i, s in enumerate(STATUS_RANK) if r["status"].startswith(s)))
        out = {**rounds[0], "status": worst["status"], "rounds": len(rounds)}
        diffs = [r["max_abs_diff"] for r in rounds if r.get("max_abs_diff") is not None]
        out["max_abs_diff"] = max(diffs) if diffs else None
        compiles = [r["compile_s"] for r in rounds if r.get("compile_s") is not None]
        out["compile_s"] = float(np.median(compiles)) if compiles else None
        out["compile_s_rounds"] = compiles
        timed = [r for r in rounds if r.get("samples")]
        if out["status"] == "ok" and timed:
            out["samples"] = [s for r in timed for s in r["samples"]]
            out["matmul_samples_s"] = [s for r in timed for s in r["matmul_samples_s"]]
            floors = [s for r in timed for s in (r.get("floor_samples_s") or [])]
            out["floor_samples_s"] = floors or None
            out["round_median_s"] = [float(np.median([s["s"] for s in r["samples"]])) for r in timed]
            out.update(timing_fields(out, matmul_size))
        merged.append(out)
    return merged


# --------------------------------------------------------------------------- orchestration


def detect_device(requested: str) -> str:
    if requested != "auto":
        return requested
    # no framework import here: the driver's device nodes say whether there is a GPU
    return "gpu" if Path("/dev/nvidia0").exists() or Path("/dev/nvidiactl").exists() else "cpu"


def plan_points(args) -> list[Point]:
    """Three sweeps through the centre point (batch 256, the model's bank, 28x28), or the
    full product with --grid. A cross product of everything would mostly re-measure the
    same story at a cost the shared machine cannot pay."""
    if args.grid:
        pts = [Point(b, c, i) for i in args.image_sizes for c in args.bank_sizes for b in args.batch_sizes]
    else:
        i0 = args.image_sizes[0]
        c0 = MODEL_CHANNELS if MODEL_CHANNELS in args.bank_sizes else args.bank_sizes[0]
        b0 = CENTRE_BATCH if CENTRE_BATCH in args.batch_sizes else max(args.batch_sizes)
        pts = [Point(b, c0, i0) for b in args.batch_sizes]
        pts += [Point(b0, c, i0) for c in args.bank_sizes]
        if len(args.image_sizes) > 1:
            pts += [Point(args.image_batch, c0, i) for i in args.image_sizes]
    seen, out = set(), []
    for p in pts:
        bank_spec(p.channels)  # fail early on an impossible bank size
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def worker_list(frameworks: list[str], device: str, quick: bool, cores: int) -> list[tuple[str, str]]:
    workers = []
    for fw in frameworks:
        if fw == "jax" and device == "cpu" and not quick:
            workers += [("jax", v) for v in JAX_CPU_VARIANTS if v not in ("devices", "concurrent") or cores > 1]
        else:
            workers.append((fw, "default"))
    return workers


def orchestrate(args) -> dict:
    device = args.device_resolved = detect_device(args.device)
    points = plan_points(args)
    plan = {
        "device": device,
        "points": [vars(p) for p in points],
        "repeats": args.repeats,
        "tolerance": args.tolerance,
        "matmul_size": args.matmul_size or (8192 if device == "gpu" else 2048),
        "max_output_mb": args.max_output_mb,
        "image_batch": args.image_batch,
        "cpus": args.cpus,
        "timing": {"warmup_s": 0.05 if args.quick else 0.3, "min_sample_s": 0.01 if args.quick else 0.03},
    }
    workers = worker_list(args.frameworks, device, args.quick, len(args.cpus) if args.cpus else usable_cores())
    result = {"environment": common.environment(), "config": {**plan, "argv": sys.argv[1:], "allocator": args.allocator, "rounds": args.rounds,
              "workers": [f"{f}:{v}" for f, v in workers]}, "workers": {}, "skipped": [], "points": []}
    if args.allocator == "tuned":
        result["environment"]["allocator_env"] = common.TUNED_ALLOCATOR_ENV
    with tempfile.TemporaryDirectory() as tmp:
        plan_path = Path(tmp) / "plan.json"
        plan_path.write_text(json.dumps(plan))
        with common.progress_bar(args.rounds * len(workers) * len(points), "gabor conv") as bar:
            bar.log(f"device: {device}; {len(points)} points x {len(workers)} workers x {args.rounds} rounds; allocator: {args.allocator}")
            for rnd in range(args.rounds):
                # alternate the order, so that no worker always runs at the same time of a load trend
                for fw, variant in workers if rnd % 2 == 0 else workers[::-1]:
                    run_one_worker(fw, variant, plan_path, args, bar, result, len(points))
    result["skipped"] = list(dict.fromkeys(result["skipped"]))
    result["points"] = merge_rounds(result["points"], plan["matmul_size"])
    finish(result)
    return result


def run_one_worker(fw, variant, plan_path, args, bar, result, n_points) -> None:
    env = dict(os.environ)
    if args.allocator == "tuned":
        env.update(common.TUNED_ALLOCATOR_ENV)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cores = len(args.cpus) if args.cpus else usable_cores()
    flags = jax_flags(variant, cores) if fw == "jax" and args.device_resolved == "cpu" else ""
    if flags:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", fw, "--variant", variant, "--plan", str(plan_path)]
    seen = {"points": 0, "unavailable": False}
    label = f"{fw}:{variant}"

    def on_line(msg):
        kind = msg.pop("type")
        if kind == "info":
            result["workers"][label] = msg["info"]
        elif kind == "point":
            result["points"].append(msg)
        elif kind == "progress":
            seen["points"] += 1
            bar.advance(1, f"{label} {msg['point']}")
        elif kind == "unavailable":
            seen["unavailable"] = True
            line = f"SKIPPED {label}: framework unavailable ({msg['reason']})"
            result["skipped"].append(line)
            bar.log(line)

    rc, stderr = common.run_worker(cmd, env, on_line)
    if rc != 0 and not seen["unavailable"]:
        line = f"FAILED {label}: worker exited with {rc} after {seen['points']}/{n_points} points: {stderr.strip().splitlines()[-1] if stderr.strip() else ''}"
        result["skipped"].append(line)
        bar.log(line)
    bar.advance(n_points - seen["points"], f"{label} done")


def finish(result: dict) -> None:
    """The ceiling (best matmul of the run) and each point's fraction of it."""
    mms = [r["matmul_gflops_same_window"] for r in result["points"] if r.get("matmul_gflops_same_window")]
    per_worker: dict[str, list[float]] = {}
    for r in result["points"]:
        if r.get("matmul_gflops_same_window"):
            per_worker.setdefault(f"{r['framework']}:{r['variant']}", []).append(r["matmul_gflops_same_window"])
    ceiling = max((float(np.median(v)) for v in per_worker.values()), default=None)
    result["ceiling"] = {
        "matmul_size": result["config"]["matmul_size"],
        "gflops": ceiling,
        "definition": "best, over workers, of the median float32 matmul GFLOP/s measured interleaved with that worker's convs",
        "per_worker_median_gflops": {k: float(np.median(v)) for k, v in per_worker.items()},
        "per_point_range_gflops": [min(mms), max(mms)] if mms else None,
    }
    for r in result["points"]:
        # raw samples: keep the seconds, drop the per-formulation copies of the shared matmul
        if "samples" in r:
            r["samples_s"] = [s["s"] for s in r.pop("samples")]
        r.pop("matmul_samples_s", None)
        r.pop("floor_samples_s", None)
        r["label"] = f"{r['framework']} {r['formulation']}" + ("" if r["variant"] == "default" else f" [{r['variant']}]")
        r.setdefault("steady_median_s", None)
        for key in ("steady_iqr_s", "images_per_s", "gflops", "compile_s", "max_abs_diff"):
            r.setdefault(key, None)
        r["ceiling_fraction"] = r["gflops"] / ceiling if (r.get("gflops") and ceiling) else None
    result["targets"] = targets(result)


def targets(result: dict) -> dict:
    """The issue's targets at the centre point, REPORTED (never asserted)."""
    centre = [r for r in result["points"] if r["batch"] == CENTRE_BATCH and r["bank_channels"] == MODEL_CHANNELS
              and r["image_size"] == 28 and r["status"] == "ok" and r.get("gflops")]
    if not centre:
        return {"note": "centre point (batch 256, 32 channels, 28x28) not measured"}

    def best(rows):
        return max(rows, key=lambda r: r["gflops"]) if rows else None

    jax_best = best([r for r in centre if r["framework"] == "jax"])
    other_best = best([r for r in centre if r["framework"] != "jax"])
    out = {"point": "batch 256, 32 channels of 7x7, 28x28x1"}
    if jax_best:
        out["best_jax"] = {"label": jax_best["label"], "gflops": jax_best["gflops"], "ceiling_fraction": jax_best["ceiling_fraction"]}
        out["jax_at_least_half_ceiling"] = jax_best["ceiling_fraction"] is not None and jax_best["ceiling_fraction"] >= 0.5
    if other_best:
        out["best_other"] = {"label": other_best["label"], "gflops": other_best["gflops"], "ceiling_fraction": other_best["ceiling_fraction"]}
    floors = [r["output_write_floor_s"] for r in centre if r.get("output_write_floor_s")]
    if floors:
        # no conv can beat writing its output: the floor as a time and as a direct-conv rate
        out["output_write_floor_ms"] = 1e3 * float(np.median(floors))
        out["output_write_floor_gflops_equivalent"] = centre[0]["flops"] / float(np.median(floors)) / 1e9
    if jax_best and other_best:
        out["jax_vs_best_other"] = jax_best["gflops"] / other_best["gflops"]
        out["jax_at_least_as_fast"] = jax_best["gflops"] >= other_best["gflops"]
    return out


# --------------------------------------------------------------------------- reports

TABLE = [
    ("framework / formulation", "label"), ("batch", "batch"), ("bank", "bank_channels"), ("image", "image_size"),
    ("first call s", "compile_s"), ("median ms", "median_ms"), ("IQR ms", "iqr_ms"), ("images/s", "images_per_s_fmt"),
    ("GFLOP/s", "gflops"), ("% ceiling", "ceiling_pct"), ("% same-window mm", "local_pct"), ("faults/call", "faults_per_call"),
    ("CPU util", "cpu_utilisation"), ("GFLOP per CPU-s", "gflops_per_cpu_s"), ("max abs diff", "diff_fmt"), ("status", "status"),
]


def markdown(result: dict) -> str:
    env, cfg, ceil = result["environment"], result["config"], result["ceiling"]
    lines = [
        "# Gabor bank convolution benchmark", "",
        f"- command: `python benchmarks/gabor_conv.py {' '.join(cfg['argv'])}`",
        f"- device: {cfg['device']}; CPU: {env['cpu_model']} x {env['cpu_count']} (usable {env['cpus_usable']})"
        + (f", workers pinned to CPUs {cfg['cpus']}" if cfg.get("cpus") else "")
        + f"; load average at start: {', '.join(f'{x:.1f}' for x in env['load_average'] or ())}",
        "- packages: " + ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v),
        f"- allocator: {cfg['allocator']}; repeats: {cfg['repeats']} per round (round-robin per framework), rounds: {cfg.get('rounds', 1)}; tolerance: {cfg['tolerance']:g} max abs diff vs float64 numpy",
        f"- ceiling: float32 {ceil['matmul_size']}x{ceil['matmul_size']} matmul, best worker median = "
        + (f"{ceil['gflops']:.1f} GFLOP/s" if ceil["gflops"] else "n/a")
        + " (per worker: " + ", ".join(f"{k} {v:.0f}" for k, v in ceil["per_worker_median_gflops"].items()) + ")",
        "- GFLOP/s count the direct convolution (2*N*H*W*C_out*k*k*C_in) whatever a formulation computes; "
        "'% same-window mm' divides by the matmul timed round-robin with it (same load), '% ceiling' by the run's best.",
        "",
    ]
    for s in result["skipped"]:
        lines.append(f"- **{s}**")
    for label, info in result["workers"].items():
        lines.append(f"- worker {label}: " + ", ".join(f"{k}={v}" for k, v in info.items() if v not in (None, "")))
    lines.append("")
    t = result.get("targets", {})
    if "best_jax" in t:
        lines += ["## Targets (reported, not asserted)", "",
                  f"- At {t['point']}: best JAX = {t['best_jax']['label']} at {t['best_jax']['gflops']:.1f} GFLOP/s "
                  f"({100 * (t['best_jax']['ceiling_fraction'] or 0):.0f}% of ceiling; target >= 50%: "
                  f"{'met' if t.get('jax_at_least_half_ceiling') else 'missed'})."]
        if "best_other" in t:
            lines.append(f"- Best PyTorch/TensorFlow = {t['best_other']['label']} at {t['best_other']['gflops']:.1f} GFLOP/s; "
                         f"JAX/other = {t['jax_vs_best_other']:.2f} (target >= 1: {'met' if t['jax_at_least_as_fast'] else 'missed'}).")
        if "output_write_floor_ms" in t:
            lines.append(f"- Memory floor: writing the (256, 28, 28, 32) float32 output alone takes {t['output_write_floor_ms']:.2f} ms "
                         f"in JAX, the time of a conv at {t['output_write_floor_gflops_equivalent']:.0f} GFLOP/s.")
        lines.append("")
    rows = []
    for r in sorted(result["points"], key=lambda r: (r["image_size"], r["bank_channels"], r["batch"], -(r.get("gflops") or 0))):
        rows.append({
            **r,
            "median_ms": r["steady_median_s"] * 1e3 if r.get("steady_median_s") else None,
            "iqr_ms": r["steady_iqr_s"] * 1e3 if r.get("steady_iqr_s") is not None else None,
            "images_per_s_fmt": f"{r['images_per_s']:.0f}" if r.get("images_per_s") else None,
            "ceiling_pct": f"{100 * r['ceiling_fraction']:.0f}%" if r.get("ceiling_fraction") else None,
            "local_pct": f"{100 * r['ceiling_fraction_same_window']:.0f}%" if r.get("ceiling_fraction_same_window") else None,
            "diff_fmt": f"{r['max_abs_diff']:.1e}" if r.get("max_abs_diff") is not None else None,
        })
    lines += sweep_tables(result)
    lines += ["## All points", "", common.markdown_table(rows, TABLE), ""]
    return "\n".join(lines)


def sweep_tables(result: dict) -> list[str]:
    """One row per framework/formulation, one column per swept value: 'GFLOP/s (% of
    ceiling)', the shape of the story at a glance."""
    ok = [r for r in result["points"] if r["status"] == "ok" and r.get("gflops")]
    if not ok:
        return []
    i0 = min(r["image_size"] for r in ok)
    sweeps = (
        ("batch", f"Batch sweep: {MODEL_CHANNELS} channels, {i0}x{i0}", lambda r: r["bank_channels"] == MODEL_CHANNELS and r["image_size"] == i0),
        ("bank_channels", f"Bank sweep: batch {CENTRE_BATCH}, {i0}x{i0}", lambda r: r["batch"] == CENTRE_BATCH and r["image_size"] == i0),
        ("image_size", f"Image sweep: batch {result['config']['image_batch']}, {MODEL_CHANNELS} channels",
         lambda r: r["batch"] == result["config"]["image_batch"] and r["bank_channels"] == MODEL_CHANNELS),
    )
    lines = []
    for key, title, keep in sweeps:
        rows = [r for r in ok if keep(r)]
        values = sorted({r[key] for r in rows})
        if len(values) < 2:
            continue
        cells: dict[str, dict] = {}
        for r in rows:
            pct = f" ({100 * r['ceiling_fraction']:.0f}%)" if r.get("ceiling_fraction") else ""
            cells.setdefault(r["label"], {"label": r["label"]})[str(r[key])] = f"{r['gflops']:.3g}{pct}"
        last = str(values[-1])
        order = sorted(cells.values(), key=lambda c: -float(c.get(last, "0").split()[0]))
        columns = [("framework / formulation", "label")] + [(f"{key.replace('_', ' ')} {v}", str(v)) for v in values]
        lines += [f"## {title}: GFLOP/s (% of ceiling)", "", common.markdown_table(order, columns), ""]
    return lines


FRAMEWORK_STYLE = {"jax": ("-", "tab20"), "torch": ("--", "autumn"), "tensorflow": (":", "cool")}


def line_styles(labels: list[str]) -> dict[str, dict]:
    """One colour family and dash per framework, so 15 lines stay tellable apart."""
    import matplotlib

    styles = {}
    for fw, (dash, cmap) in FRAMEWORK_STYLE.items():
        mine = [lab for lab in labels if lab.startswith(fw + " ")]
        for i, lab in enumerate(mine):
            cm = matplotlib.colormaps[cmap]
            colour = cm(i % cm.N) if cm.N <= 20 else cm(0.9 * i / max(len(mine) - 1, 1))
            styles[lab] = {"linestyle": dash, "color": colour}
    return styles


def plots(result: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in result["points"] if r["status"] == "ok" and r.get("gflops")]
    written = []
    i0 = min((r["image_size"] for r in ok), default=28)
    sweep = [r for r in ok if r["bank_channels"] == MODEL_CHANNELS and r["image_size"] == i0]
    styles = line_styles(sorted({r["label"] for r in ok}))
    device = result["config"]["device"]
    for name, key, ylabel, log in (
        ("throughput_vs_batch.png", "images_per_s", "images / s (median)", True),
        ("ceiling_fraction_vs_batch.png", "ceiling_fraction", "fraction of the best float32 matmul (GFLOP/s)", False),
    ):
        fig, ax = plt.subplots(figsize=(11, 5.5))
        for lab in sorted({r["label"] for r in sweep}):
            rows = sorted((r for r in sweep if r["label"] == lab), key=lambda r: r["batch"])
            ax.plot([r["batch"] for r in rows], [r[key] for r in rows], marker="o", ms=3, label=lab, **styles[lab])
        if key == "ceiling_fraction":
            ax.axhline(0.5, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.set_title(f"Gabor conv: {MODEL_CHANNELS} channels 7x7 on {i0}x{i0}x1, float32, {device}")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        else:
            ax.text(0.5, 0.5, "nothing measured", ha="center", transform=ax.transAxes)
        fig.tight_layout()
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        written.append(out / name)
    # the other two sweeps: GFLOP/s against bank size (batch 256) and image size
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    for ax, key, fixed, fixed_value, batch in (
        (axes[0], "bank_channels", "image_size", i0, CENTRE_BATCH),
        (axes[1], "image_size", "bank_channels", MODEL_CHANNELS, result["config"]["image_batch"]),
    ):
        rows = [r for r in ok if r[fixed] == fixed_value and r["batch"] == batch]
        for lab in sorted({r["label"] for r in rows}):
            rr = sorted((r for r in rows if r["label"] == lab), key=lambda r: r[key])
            if len(rr) > 1:
                ax.plot([r[key] for r in rr], [r["gflops"] for r in rr], marker="o", ms=3, label=lab, **styles[lab])
        ax.set_xlabel(key.replace("_", " "))
        ax.set_ylabel("GFLOP/s (direct-conv count)")
        ax.set_title(f"batch {batch}, {device}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[1].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, fontsize=7, loc="center right")
        fig.tight_layout(rect=(0, 0, 0.74, 1))
    else:
        for ax in axes:
            ax.text(0.5, 0.5, "sweep not run", ha="center", transform=ax.transAxes)
        fig.tight_layout()
    fig.savefig(out / "sweeps.png", dpi=90)
    plt.close(fig)
    written.append(out / "sweeps.png")
    return written


# --------------------------------------------------------------------------- CLI


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64, 256, 1024])
    ap.add_argument("--bank-sizes", type=int, nargs="+", default=[8, 32, 128], help="Gabor channels (32 = the model's bank)")
    ap.add_argument("--image-sizes", type=int, nargs="+", default=[28, 64, 128, 224])
    ap.add_argument("--image-batch", type=int, default=IMAGE_SWEEP_BATCH, help="batch size of the image-size sweep")
    ap.add_argument("--grid", action="store_true", help="every combination instead of three sweeps through batch 256/32/28")
    ap.add_argument("--frameworks", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    ap.add_argument("--device", choices=DEVICES, default="auto")
    ap.add_argument("--repeats", type=int, default=7, help="samples per formulation per point per round")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every worker this many times (fresh processes, alternating order) and pool the samples")
    ap.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE)
    ap.add_argument("--matmul-size", type=int, default=None, help="ceiling matmul size (default 2048 on CPU, 8192 on GPU)")
    ap.add_argument("--max-output-mb", type=float, default=512, help="skip points whose output is larger")
    ap.add_argument("--cpus", type=int, nargs="+", default=None,
                    help="pin every worker to these CPUs (e.g. --cpus 0: one core, steadier on a loaded machine)")
    ap.add_argument("--allocator", choices=("tuned", "default"), default="tuned", help="glibc malloc settings of the workers")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gabor_conv"))
    ap.add_argument("--quick", action="store_true", help="batch 1 and 8, the model's bank, 28x28, 2 repeats (smoke test)")
    ap.add_argument("--worker", choices=list(SECTIONS), help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="default", help=argparse.SUPPRESS)
    ap.add_argument("--plan", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.bank_sizes, args.image_sizes, args.repeats, args.rounds = [1, 8], [MODEL_CHANNELS], [28], 2, 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    result = orchestrate(args)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    common.write_json(out / "gabor_conv.json", result)
    (out / "gabor_conv.md").write_text(markdown(result))
    pngs = plots(result, out)
    failed = [r for r in result["points"] if r["status"] == "mismatch"]
    print(f"wrote {out / 'gabor_conv.json'}, {out / 'gabor_conv.md'}, " + ", ".join(p.name for p in pngs))
    for s in result["skipped"]:
        print(s)
    for r in failed:
        print(f"MISMATCH (excluded): {r['label']} batch {r['batch']}: max abs diff {r['max_abs_diff']:.2e} > {r['tolerance']:g}")
    t = result.get("targets", {})
    if "best_jax" in t:
        print(f"centre point: best JAX {t['best_jax']['label']} {t['best_jax']['gflops']:.1f} GFLOP/s "
              f"({100 * (t['best_jax']['ceiling_fraction'] or 0):.0f}% of ceiling)"
              + (f"; best other {t['best_other']['label']} {t['best_other']['gflops']:.1f}" if "best_other" in t else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
