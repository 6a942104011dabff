"""Attention backends for the HF encoders: "sdpa" (default), "eager", and optional "xformers".

"sdpa" and "eager" are transformers' own implementations. "xformers" is registered here into
transformers' ``AttentionInterface`` (and ``AttentionMaskInterface``) under that name, so the
stock Swin / ViT / BERT modules call ``xformers.ops.memory_efficient_attention`` without any
hand-written encoder code. It is registered only when asked for, and only if xformers imports.
"""
from __future__ import annotations

import torch

from egma_fast.models.config import ATTN_IMPLEMENTATIONS

XFORMERS = "xformers"


class BackendUnavailableError(ValueError, ImportError):
    """An attention backend was requested whose package is not installed (a ValueError and an ImportError)."""


def _import_xformers_ops():
    try:
        import xformers.ops as xops  # noqa: PLC0415 (optional dependency)
    except ImportError as exc:
        raise BackendUnavailableError(
            "attn_implementation='xformers' needs the xformers package, which is not installed "
            "(pip install 'egma-fast[xformers]'); use attn_implementation='sdpa' or 'eager'"
        ) from exc
    return xops


def xformers_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function backed by xformers' memory-efficient attention.

    Args:
        query, key, value: [B, H, L, D] (transformers' layout).
        attention_mask: None, an additive float bias broadcastable to [B, H, Lq, Lk] (Swin's
            relative-position bias + shift mask, BERT's padding mask), or a boolean keep-mask.
    Returns:
        ([B, Lq, H, D] attention output, None), the layout transformers' sdpa path returns.
    """
    xops = _import_xformers_ops()
    # xformers takes [B, L, H, D]; a transpose view keeps the last dim contiguous.
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    bias = None
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            # finfo.min rather than -inf so a fully masked row cannot turn into NaN.
            bias = torch.zeros(attention_mask.shape, dtype=q.dtype, device=q.device)
            bias = bias.masked_fill(~attention_mask, torch.finfo(q.dtype).min)
        else:
            bias = attention_mask.to(q.dtype)
        b, h, lq, lk = q.shape[0], q.shape[2], q.shape[1], k.shape[1]
        # xformers needs a materialised [B, H, Lq, Lk] bias whose rows start 8-element aligned.
        padded = torch.empty(b, h, lq, lk + (-lk) % 8, dtype=q.dtype, device=q.device)
        padded[..., :lk] = bias.expand(b, h, lq, lk)
        bias = padded[..., :lk]
    out = xops.memory_efficient_attention(q, k, v, attn_bias=bias, p=float(dropout), scale=scaling)
    return out, None


def resolve_attn_implementation(name: str) -> str:
    """Validate ``name`` and make it usable by transformers; returns the name to pass on.

    Raises:
        ValueError: unknown name.
        BackendUnavailableError: "xformers" without the xformers package.
    """
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {name!r}")
    if name == XFORMERS:
        _import_xformers_ops()
        from transformers import AttentionInterface, AttentionMaskInterface  # noqa: PLC0415 (transformers is imported only when a tower is built)
        from transformers.masking_utils import eager_mask  # noqa: PLC0415 (transformers is imported only when a tower is built)

        AttentionInterface.register(XFORMERS, xformers_attention_forward)
        # Additive float masks: what memory_efficient_attention takes as attn_bias.
        AttentionMaskInterface.register(XFORMERS, eager_mask)
    return name
