"""The ``torch`` backend: the oracle (egma_fast.reference) run as a backend, autograd through
PyTorch. Runs anywhere; auto picks it only when no fused backend fits the device.

It materialises B x B x n x M. The reference is imported when the backend first runs, not when
the registry loads this module: production code never loads the oracle unless it is asked to run.
"""
from __future__ import annotations

import torch

from egma_fast.ops.arguments import CrossMapParams, CrossMapTerms
from egma_fast.ops.registry import Backend, register_backend


def late_interaction(P: torch.Tensor, S: torch.Tensor, sent_mask: torch.Tensor, patch_mask: torch.Tensor | None = None,
                     pad_as_zero: bool = False, low_memory: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.late_interaction (``low_memory`` has no meaning here: autograd keeps what it keeps)."""
    from egma_fast import reference

    return reference.late_interaction(P, S, sent_mask, patch_mask, pad_as_zero)


def cross_map(P: torch.Tensor, S: torch.Tensor, sent_mask: torch.Tensor, GS: torch.Tensor, use_gaze: torch.Tensor,
              theta: torch.Tensor, alpha: torch.Tensor, params: CrossMapParams) -> CrossMapTerms:
    """reference.cross_map."""
    from egma_fast import reference

    return reference.cross_map(P, S, sent_mask, GS, use_gaze, theta, alpha, params)


register_backend(
    Backend(
        name="torch",
        late_interaction=late_interaction,
        cross_map=cross_map,
        supports=lambda device: True,
        auto_priority={"cpu": 0, "cuda": 0, "mps": 0, "xpu": 0, "meta": 0},
    )
)
