"""Every conversion between PyTorch's layouts and the canonical ones of `arbiter.spec`.

PyTorch keeps activations NCHW, conv kernels OIHW and dense kernels (out, in); the
canonical layouts are NHWC, HWIO and (in, out). No permutation other than these is
needed: the only dense layers after a convolution read globally pooled (N, C) features,
so there is no Flatten whose NCHW feature order would need its rows permuted.

The module names of `impls.torch.model` spell the canonical layer names, so a canonical
tensor name differs from its state_dict key only in its last component.
"""

from __future__ import annotations

import numpy as np
import torch

from arbiter.spec import DENSE_LAYERS

# canonical leaf -> state_dict leaf
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def state_key(name: str) -> str:
    """'stem.conv.kernel' -> 'stem.conv.weight', 'stem.bn.var' -> 'stem.bn.running_var'."""
    layer, _, leaf = name.rpartition(".")
    return f"{layer}.{_LEAF[leaf]}"


def _kind(name: str) -> str:
    layer, _, leaf = name.rpartition(".")
    if leaf != "kernel":
        return "vector"
    return "dense" if layer in DENSE_LAYERS else "conv"


def to_canonical(name: str, tensor: torch.Tensor) -> np.ndarray:
    """A parameter, buffer, gradient or optimiser moment of tensor `name`, canonical layout."""
    t = tensor.detach()
    kind = _kind(name)
    if kind == "conv":
        t = t.permute(2, 3, 1, 0)  # OIHW -> HWIO
    elif kind == "dense":
        t = t.t()  # (out, in) -> (in, out)
    # always a copy: .numpy() shares memory with the live tensor, and a caller holding an
    # export must not see it change when the model trains on
    return np.array(t.cpu().numpy(), dtype=np.float32, order="C", copy=True)


def from_canonical(name: str, array: np.ndarray) -> torch.Tensor:
    """The inverse of `to_canonical`, as a contiguous CPU float32 tensor."""
    t = torch.from_numpy(np.array(array, dtype=np.float32))  # a copy: the caller's array may be read-only
    kind = _kind(name)
    if kind == "conv":
        t = t.permute(3, 2, 0, 1)  # HWIO -> OIHW
    elif kind == "dense":
        t = t.t()
    return t.contiguous()


def hwio_to_oihw(kernel: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.transpose(kernel, (3, 2, 0, 1))))


def oihw_to_hwio(kernel: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(kernel.detach().permute(2, 3, 1, 0).cpu().numpy())


def nhwc_to_nchw(x: np.ndarray) -> torch.Tensor:
    return torch.tensor(np.asarray(x), dtype=torch.float32).permute(0, 3, 1, 2).contiguous()


def activation_to_canonical(t: torch.Tensor) -> np.ndarray:
    """NCHW feature maps -> NHWC; (N, C) vectors stay as they are."""
    t = t.detach()
    if t.ndim == 4:
        t = t.permute(0, 2, 3, 1)
    return np.ascontiguousarray(t.cpu().numpy())
