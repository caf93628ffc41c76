"""Which frameworks exist, and loading their adapters without importing them eagerly.

The harness never imports a framework: it imports `impls.<package>.adapter` on demand,
and a framework that is missing or broken is reported, not fatal.
"""

from __future__ import annotations

import importlib
from functools import lru_cache

from impls.base import Adapter, FrameworkUnavailable

# key on the command line -> (impls subpackage, what it needs installed)
FRAMEWORKS: dict[str, tuple[str, str]] = {
    "tf": ("impls.keras", "tensorflow + keras"),
    "torch": ("impls.torch", "torch"),
    "flax": ("impls.flax", "jax + flax + optax"),
}
FRAMEWORK_KEYS = tuple(FRAMEWORKS)


def adapter_class(key: str) -> type[Adapter]:
    if key not in FRAMEWORKS:
        raise FrameworkUnavailable(f"unknown framework {key!r}; choose from {', '.join(FRAMEWORKS)}")
    package, needs = FRAMEWORKS[key]
    try:
        module = importlib.import_module(f"{package}.adapter")
    except ImportError as err:
        raise FrameworkUnavailable(f"{key}: cannot import {needs} ({err})") from None
    return module.Adapter


@lru_cache(maxsize=None)
def load_adapter(key: str, device: str = "auto") -> Adapter:
    """One adapter per (framework, device) per process: frameworks keep global state."""
    return adapter_class(key)(device=device)


def availability() -> dict[str, str | None]:
    """{key: None if importable, else the reason it is not}."""
    status = {}
    for key in FRAMEWORKS:
        try:
            adapter_class(key)
            status[key] = None
        except FrameworkUnavailable as err:
            status[key] = str(err)
    return status
