"""The fused ops of the EGMA hot path, dispatched to a backend.

``late_interaction`` (SPEC 2.1) and ``cross_map`` (SPEC 2.4 and 3) have the exact contracts of
the functions of the same names in :mod:`egma_fast.reference` (the oracle; nothing here imports
it). ``backend="auto"`` picks, per device, the fastest registered backend: Triton or the CUDA
extension on GPUs, the C++ extension on CPUs, and the ``torch`` backend (the oracle run as a
backend) otherwise. Their argument types live in :mod:`egma_fast.ops.arguments`.

The arguments are checked and brought to one canonical form here, once, for every backend
(:func:`~egma_fast.ops.arguments.late_interaction_inputs`, :func:`~egma_fast.ops.arguments.cross_map_inputs`):
a backend's functions receive only what those return and check nothing themselves.
"""
from __future__ import annotations

import torch

from egma_fast.ops.arguments import CrossMapParams, CrossMapTerms, cross_map_inputs, late_interaction_inputs
from egma_fast.ops.registry import Backend, available_backends, backend_error, register_backend, select_backend

__all__ = [
    "Backend",
    "CrossMapParams",
    "CrossMapTerms",
    "available_backends",
    "backend_error",
    "cross_map",
    "late_interaction",
    "register_backend",
    "select_backend",
]


def late_interaction(
    P: torch.Tensor,
    S: torch.Tensor,
    sent_mask: torch.Tensor,
    patch_mask: torch.Tensor | None = None,
    pad_as_zero: bool = False,
    backend: str = "auto",
    low_memory: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled pooled scores (zI, zT), each [Bi, Bt]; see reference.late_interaction.

    ``low_memory``: the fused backends save Bi Bt (n + M) winner indices (1 byte each for n, M < 256)
    so that the backward is two GEMMs; True saves only the Bi Bt M winning patches and recomputes the
    image-side winners in the backward (slower)."""
    P, S, sent_mask, patch_mask = late_interaction_inputs(P, S, sent_mask, patch_mask)
    return select_backend(backend, P.device).late_interaction(P, S, sent_mask, patch_mask, bool(pad_as_zero),
                                                              low_memory=bool(low_memory))


def cross_map(
    P: torch.Tensor,
    S: torch.Tensor,
    sent_mask: torch.Tensor,
    GS: torch.Tensor,
    use_gaze: torch.Tensor,
    theta: torch.Tensor,
    alpha: torch.Tensor,
    params: CrossMapParams,
    backend: str = "auto",
) -> CrossMapTerms:
    """Per-instance MLCE and EGM terms, each [B]; see reference.cross_map."""
    args = cross_map_inputs(P, S, sent_mask, GS, use_gaze, theta, alpha, params)
    return select_backend(backend, P.device).cross_map(*args)
