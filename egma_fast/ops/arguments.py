"""Arguments every backend of the fused ops derives the same way (one definition each).

* :func:`text_zero_slots`: which texts have the authors' zero-scoring slot under ``pad_as_zero``
  (SPEC 2.1), decided on the device (no host sync).
* :func:`index_dtype`: the integer dtype of the saved winner indices.
"""
from __future__ import annotations

import torch

__all__ = ["index_dtype", "text_zero_slots"]


def text_zero_slots(sent_mask: torch.Tensor, pad_as_zero: bool) -> torch.Tensor:
    """[Bt] bool: True for the texts whose image-side max is floored at 0.

    The authors pack each batch's sentences into zero vectors up to the longest report, m_max =
    max_l m_l: a text with m_l < m_max has a zero slot after its real sentences, a text with
    m_l = m_max has none, and the tensors' width M never matters. All False without
    ``pad_as_zero``. sent_mask [Bt, M] bool.
    """
    m = sent_mask.sum(dim=1)
    if not pad_as_zero or m.numel() == 0:
        return torch.zeros(m.shape, dtype=torch.bool, device=sent_mask.device)
    return m < m.max()


def index_dtype(count: int) -> torch.dtype:
    """The smallest integer dtype holding the indices 0..count-1 (csrc/ops.h index_dtype)."""
    if count <= 256:
        return torch.uint8
    if count <= 32768:
        return torch.int16
    return torch.int32
