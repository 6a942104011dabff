"""Backend registry and dispatch for the two fused ops.

A backend implements the contracts of :func:`egma_fast.reference.late_interaction` and
:func:`egma_fast.reference.cross_map` (same arguments, values and gradients) for some devices.
Backends register themselves when their module is imported; the registry imports the known ones
lazily, so a missing Triton or compiled extension costs one log line, not an import error. A new
backend is a module that calls :func:`register_backend` on import, listed in ``_KNOWN_MODULES``.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Callable

import torch

logger = logging.getLogger("egma_fast")


@dataclass(frozen=True)
class Backend:
    """A fast (or reference) implementation of the fused ops.

    Attributes:
        name: the value users pass as ``backend=``.
        late_interaction: callable with the signature of reference.late_interaction, plus the
            keyword ``low_memory`` (see egma_fast.ops.late_interaction).
        cross_map: callable with the signature of reference.cross_map.
        Both receive the canonical arguments of egma_fast.ops.arguments (checked once, at the op
        boundary) and check nothing themselves.
        supports: (device) -> whether this backend can run on tensors of that device.
        auto_priority: device type -> rank under backend="auto" (higher wins; absent = never auto).
    """

    name: str
    late_interaction: Callable
    cross_map: Callable
    supports: Callable[[torch.device], bool]
    auto_priority: dict[str, int]


_BACKENDS: dict[str, Backend] = {}
# Modules that register a backend on import; imported lazily, in this order.
_KNOWN_MODULES: dict[str, str] = {
    "torch": "egma_fast.ops.torch_backend",
    "triton": "egma_fast.ops.triton_backend",
    "cpp": "egma_fast.ops.cpp_backend",
    "cuda": "egma_fast.ops.cpp_backend",
}
_IMPORT_ERRORS: dict[str, str] = {}


def register_backend(backend: Backend) -> None:
    """Register (or replace) a backend under ``backend.name``."""
    _BACKENDS[backend.name] = backend


def _load(name: str) -> None:
    if name in _BACKENDS or name in _IMPORT_ERRORS or name not in _KNOWN_MODULES:
        return
    module = _KNOWN_MODULES[name]
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken build: report once, fall back
        _IMPORT_ERRORS[name] = f"{type(exc).__name__}: {exc}"
        logger.info("egma_fast: backend %r unavailable (%s); falling back", name, _IMPORT_ERRORS[name])
        return
    if name not in _BACKENDS:
        # A module may explain why it registered only some of its backends (e.g. an extension
        # built without CUDA) in a module-level UNAVAILABLE dict.
        reasons = getattr(importlib.import_module(module), "UNAVAILABLE", {})
        _IMPORT_ERRORS[name] = reasons.get(name) or f"{module} did not register a backend named {name!r}"


def available_backends() -> list[str]:
    """Names of the backends that imported and registered successfully."""
    for name in _KNOWN_MODULES:
        _load(name)
    return sorted(_BACKENDS)


def backend_error(name: str) -> str | None:
    """Why a known backend is unavailable, or None."""
    _load(name)
    return _IMPORT_ERRORS.get(name)


def select_backend(name: str, device: torch.device) -> Backend:
    """Resolve ``backend=name`` for tensors on ``device``; raise ValueError with the reason."""
    if name == "auto":
        for candidate in _KNOWN_MODULES:
            _load(candidate)
        ranked = sorted(
            (b for b in _BACKENDS.values() if device.type in b.auto_priority and b.supports(device)),
            key=lambda b: -b.auto_priority[device.type],
        )
        if not ranked:
            raise ValueError(f"no backend supports device {device}")
        return ranked[0]
    if name not in _KNOWN_MODULES and name not in _BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {sorted(set(_KNOWN_MODULES) | set(_BACKENDS))}, got {name!r}")
    _load(name)
    if name not in _BACKENDS:
        raise ValueError(f"backend {name!r} is unavailable: {_IMPORT_ERRORS.get(name, 'not registered')}")
    backend = _BACKENDS[name]
    if not backend.supports(device):
        hint = " (set TRITON_INTERPRET=1 to run Triton kernels on CPU tensors)" if name == "triton" and device.type == "cpu" else ""
        raise ValueError(f"backend {name!r} does not support tensors on {device}{hint}")
    return backend
