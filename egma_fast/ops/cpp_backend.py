"""The ``cpp`` and ``cuda`` backends: the compiled extension ``egma_fast._C``.

``egma_fast._C`` registers four ops in the ``torch.ops.egma_fast_C`` namespace, with C++ kernels
for CPU tensors (OpenMP over the batch, vectorised for AVX-512 / AVX2 / SSE2, picked at run time)
and, when built with a CUDA toolkit and a CUDA build of torch, CUDA kernels:

    late_interaction_fwd(P [Bi, n, d], S [Bt, M, d], sent_mask [Bt, M] bool, patch_mask [Bi, n] bool | None,
                         zero_slot [Bt] bool, save_sentence_argmax)
        -> zI [Bi, Bt], zT [Bi, Bt], win_patch [Bi, Bt, M], win_sentence [Bi, Bt, n] (or [0])
    late_interaction_bwd(grad_zI, grad_zT, P, S, sent_mask, patch_mask, zero_slot, win_patch, win_sentence)
        -> grad_P, grad_S
    cross_map_fwd(P [B, n, d], S [B, M, d], sent_mask [B, M], GS [B, M, n], use_gaze [B], theta [B], alpha (1 element),
                  <CrossMapParams.OP_SCHEMA: the options, as CrossMapParams.op_args() gives them>)
        -> mlce_s2p, mlce_p2s, egm_image, egm_text (each [B])
    cross_map_bwd(grad_mlce_s2p, grad_mlce_p2s, grad_egm_image, grad_egm_text, <cross_map_fwd's inputs>)
        -> grad_P, grad_S, grad_alpha

Scores and terms are float32 (float64 for float64 inputs); gradients have their input's dtype.
This module registers their fake (meta) implementations and autograd formulas, so torch.compile
and torch.library.opcheck accept them, and the backends whose functions have the signatures of
:func:`egma_fast.reference.late_interaction` and :func:`egma_fast.reference.cross_map`.

The extension is built by ``pip install --no-build-isolation -e .`` (setup.py), never at import.
Without it this module raises ImportError and the registry falls back to the PyTorch backend.

CUDA kernels of late_interaction: ``EGMA_FAST_CUDA_KERNELS=simt`` (the default) runs the SIMT
kernels above; ``EGMA_FAST_CUDA_KERNELS=tensor_core`` runs ``late_interaction_tc_fwd`` /
``late_interaction_tc_bwd`` instead (same schemas and contract; csrc/cuda/late_interaction_tc.cu:
mma.sync tensor-core kernels for bf16 / fp16 on sm_80+, the SIMT kernels with a one-time warning
for other inputs). Read at every call; set it before the forward. The tensor-core kernels stay
opt-in until GPU runs have validated them (tests/test_cpp_gpu.py, benchmarks/gpu/device_check.sh).
"""
from __future__ import annotations

import logging
import os

import torch

from egma_fast.ops.arguments import (
    CrossMapParams,
    CrossMapTerms,
    check_cross_map_meta,
    check_late_interaction_meta,
    text_zero_slots,
)
from egma_fast.ops.arguments import index_dtype as _index_dtype
from egma_fast.ops.registry import Backend, register_backend

logger = logging.getLogger("egma_fast")

_REBUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` in the egma_fast source tree "
    "(needs a C++ compiler and the installed torch; EGMA_FAST_BUILD_CUDA=on adds the CUDA kernels)"
)

try:
    from egma_fast import _C
except ImportError as exc:
    if getattr(exc, "name", None) == "egma_fast._C":
        raise ImportError(f"the compiled extension egma_fast._C is not built; {_REBUILD_HINT}") from exc
    raise ImportError(
        f"the compiled extension egma_fast._C failed to load ({exc}); it was probably built against another "
        f"torch: rebuild it, {_REBUILD_HINT}"
    ) from exc
except OSError as exc:  # a broken shared library
    raise ImportError(f"the compiled extension egma_fast._C failed to load ({exc}); {_REBUILD_HINT}") from exc

__all__ = [
    "CUDA_KERNELS_ENV",
    "SAVE_SENTENCE_ARGMAX_MAX_BYTES",
    "TENSOR_CORE_SAVE_SENTENCE_ARGMAX_MAX_BYTES",
    "UNAVAILABLE",
    "WITH_CUDA",
    "cross_map",
    "cuda_kernels",
    "late_interaction",
]

#: Whether egma_fast._C has CUDA kernels (the ``cuda`` backend).
WITH_CUDA: bool = bool(_C.WITH_CUDA)

#: Why a backend name this module serves did not register, for the registry's messages.
UNAVAILABLE: dict[str, str] = (
    {}
    if WITH_CUDA
    else {
        "cuda": "egma_fast._C was built without CUDA kernels; rebuild it with a CUDA build of torch and a CUDA "
        "toolkit (EGMA_FAST_BUILD_CUDA=on pip install --no-build-isolation -e .)"
    }
)

#: Per device type: the forward saves each (image, text, patch)'s winning sentence for the
#: backward (Bi * Bt * n bytes) when that is at most this many bytes; otherwise the backward
#: recomputes the similarity tiles (bitwise the forward's) to find them. Saving halves the CPU
#: kernels' work; the CUDA kernels recompute (DESIGN.md) to keep memory at Bi * Bt * M bytes.
SAVE_SENTENCE_ARGMAX_MAX_BYTES: dict[str, int] = {"cpu": 256 << 20, "cuda": 0}

_ops = torch.ops.egma_fast_C

# ----------------------------------------------------------------------------------------------
# Which CUDA kernels late_interaction runs (issue 11): SIMT (default) or tensor cores (opt-in).
# ----------------------------------------------------------------------------------------------
#: Environment variable selecting the CUDA kernels of late_interaction: "simt" or "tensor_core".
CUDA_KERNELS_ENV = "EGMA_FAST_CUDA_KERNELS"
_CUDA_KERNEL_CHOICES = ("simt", "tensor_core")

#: With the tensor-core kernels the forward saves each (image, text, patch)'s winning sentence
#: (Bi * Bt * n bytes) up to this size, so the backward is two GEMMs without recomputation; above
#: it the backward reruns the forward kernel into a transient buffer of that size.
TENSOR_CORE_SAVE_SENTENCE_ARGMAX_MAX_BYTES: int = 4 << 30

#: Whether this build has the tensor-core ops (every build with CUDA kernels does).
_HAS_TENSOR_CORE_OPS: bool = WITH_CUDA and hasattr(_ops, "late_interaction_tc_fwd")


def cuda_kernels() -> str:
    """The CUDA kernels late_interaction uses on CUDA tensors: EGMA_FAST_CUDA_KERNELS, "simt" by default."""
    value = os.environ.get(CUDA_KERNELS_ENV, "").strip().lower() or "simt"
    if value not in _CUDA_KERNEL_CHOICES:
        raise ValueError(f"{CUDA_KERNELS_ENV} must be one of {', '.join(_CUDA_KERNEL_CHOICES)}; got {value!r}")
    return value



def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# Fake (meta) implementations: shapes and dtypes only, for torch.compile and opcheck.
# ----------------------------------------------------------------------------------------------
@torch.library.register_fake("egma_fast_C::late_interaction_fwd")
def _late_interaction_fwd_fake(P, S, sent_mask, patch_mask, zero_slot, save_sentence_argmax):
    Bi, Bt, n, M = check_late_interaction_meta(P, S, sent_mask, patch_mask, zero_slot)
    acc = _accumulate_dtype(P.dtype)
    win_sentence_shape = (Bi, Bt, n) if save_sentence_argmax else (0,)
    return (
        P.new_empty((Bi, Bt), dtype=acc),
        P.new_empty((Bi, Bt), dtype=acc),
        P.new_empty((Bi, Bt, M), dtype=_index_dtype(n)),
        P.new_empty(win_sentence_shape, dtype=_index_dtype(M)),
    )


@torch.library.register_fake("egma_fast_C::late_interaction_bwd")
def _late_interaction_bwd_fake(grad_zI, grad_zT, P, S, sent_mask, patch_mask, zero_slot, win_patch, win_sentence):
    Bi, Bt, _, M = check_late_interaction_meta(P, S, sent_mask, patch_mask, zero_slot)
    torch._check(tuple(grad_zI.shape) == (Bi, Bt) and tuple(grad_zT.shape) == (Bi, Bt),
                 lambda: f"grad_zI and grad_zT must be [Bi, Bt] = [{Bi}, {Bt}], got {list(grad_zI.shape)} and {list(grad_zT.shape)}")
    torch._check(tuple(win_patch.shape) == (Bi, Bt, M),
                 lambda: f"win_patch must be [Bi, Bt, M] = [{Bi}, {Bt}, {M}], got {list(win_patch.shape)}")
    return P.new_empty(P.shape), S.new_empty(S.shape)


@torch.library.register_fake("egma_fast_C::cross_map_fwd")
def _cross_map_fwd_fake(P, S, sent_mask, GS, use_gaze, theta, alpha, *params):
    B, _, _ = check_cross_map_meta(P, S, sent_mask, GS, use_gaze, theta, alpha)
    acc = _accumulate_dtype(P.dtype)
    return tuple(P.new_empty((B,), dtype=acc) for _ in range(4))


@torch.library.register_fake("egma_fast_C::cross_map_bwd")
def _cross_map_bwd_fake(g0, g1, g2, g3, P, S, sent_mask, GS, use_gaze, theta, alpha, *params):
    B, _, _ = check_cross_map_meta(P, S, sent_mask, GS, use_gaze, theta, alpha)
    for g in (g0, g1, g2, g3):
        torch._check(tuple(g.shape) == (B,), lambda: f"every output gradient must be [B] = [{B}], got {list(g.shape)}")
    return P.new_empty(P.shape), S.new_empty(S.shape), alpha.new_empty(alpha.shape)


# ----------------------------------------------------------------------------------------------
# Autograd: the forward ops save their inputs (and the winners), the backward ops are the formulas.
# ----------------------------------------------------------------------------------------------
def _late_interaction_setup(ctx, inputs, output):
    P, S, sent_mask, patch_mask, zero_slot, _save = inputs
    _zI, _zT, win_patch, win_sentence = output
    ctx.save_for_backward(P, S, sent_mask, patch_mask, zero_slot, win_patch, win_sentence)


def _late_interaction_backward_with(bwd_op):
    def backward(ctx, grad_zI, grad_zT, _grad_win_patch, _grad_win_sentence):
        P, S, sent_mask, patch_mask, zero_slot, win_patch, win_sentence = ctx.saved_tensors
        grad_P, grad_S = bwd_op(grad_zI, grad_zT, P, S, sent_mask, patch_mask, zero_slot, win_patch, win_sentence)
        needs = ctx.needs_input_grad
        return (grad_P if needs[0] else None, grad_S if needs[1] else None, None, None, None, None)

    return backward


_late_interaction_backward = _late_interaction_backward_with(_ops.late_interaction_bwd)

torch.library.register_autograd(
    "egma_fast_C::late_interaction_fwd", _late_interaction_backward, setup_context=_late_interaction_setup
)

if _HAS_TENSOR_CORE_OPS:  # same shapes and autograd formula, the tensor-core backward
    torch.library.register_fake("egma_fast_C::late_interaction_tc_fwd")(_late_interaction_fwd_fake)
    torch.library.register_fake("egma_fast_C::late_interaction_tc_bwd")(_late_interaction_bwd_fake)
    torch.library.register_autograd(
        "egma_fast_C::late_interaction_tc_fwd",
        _late_interaction_backward_with(_ops.late_interaction_tc_bwd),
        setup_context=_late_interaction_setup,
    )


def _cross_map_setup(ctx, inputs, output):
    P, S, sent_mask, GS, use_gaze, theta, alpha, *params = inputs
    ctx.save_for_backward(P, S, sent_mask, GS, use_gaze, theta, alpha)
    ctx.params = params


def _cross_map_backward(ctx, g_s2p, g_p2s, g_image, g_text):
    P, S, sent_mask, GS, use_gaze, theta, alpha = ctx.saved_tensors
    grad_P, grad_S, grad_alpha = _ops.cross_map_bwd(
        g_s2p, g_p2s, g_image, g_text, P, S, sent_mask, GS, use_gaze, theta, alpha, *ctx.params
    )
    needs = ctx.needs_input_grad
    # GS (3) and theta (5) are data: no gradient (SPEC 3.1).
    return (
        grad_P if needs[0] else None,
        grad_S if needs[1] else None,
        None,
        None,
        None,
        None,
        grad_alpha if needs[6] else None,
    ) + (None,) * len(ctx.params)


torch.library.register_autograd("egma_fast_C::cross_map_fwd", _cross_map_backward, setup_context=_cross_map_setup)


# ----------------------------------------------------------------------------------------------
# The backend functions (signatures of reference.late_interaction and reference.cross_map).
# ----------------------------------------------------------------------------------------------
def late_interaction(
    P: torch.Tensor,
    S: torch.Tensor,
    sent_mask: torch.Tensor,
    patch_mask: torch.Tensor | None = None,
    pad_as_zero: bool = False,
    low_memory: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled pooled late-interaction scores (zI, zT), each [Bi, Bt]; see reference.late_interaction.

    P [Bi, n, d] and S [Bt, M, d] (one dtype: fp32, bf16, fp16 or fp64), sent_mask [Bt, M] bool,
    patch_mask [Bi, n] bool or None, as egma_fast.ops.arguments.late_interaction_inputs returns them.
    Never materialises the Bi x Bt x n x M similarities; saves the winning patch of every (image,
    text, sentence) and, up to SAVE_SENTENCE_ARGMAX_MAX_BYTES and unless ``low_memory``, the
    winning sentence of every (image, text, patch) for the backward.
    """
    Bi, n, _ = P.shape
    Bt = S.shape[0]
    tensor_cores = P.device.type == "cuda" and _HAS_TENSOR_CORE_OPS and cuda_kernels() == "tensor_core"
    if tensor_cores:
        limit, forward = TENSOR_CORE_SAVE_SENTENCE_ARGMAX_MAX_BYTES, _ops.late_interaction_tc_fwd
    else:
        limit, forward = SAVE_SENTENCE_ARGMAX_MAX_BYTES.get(P.device.type, 0), _ops.late_interaction_fwd
    save = not low_memory and Bi * Bt * n * _index_dtype(S.shape[1]).itemsize <= limit
    zero_slot = text_zero_slots(sent_mask, pad_as_zero)
    zI, zT, _, _ = forward(P, S, sent_mask, patch_mask, zero_slot, save)
    return zI, zT


def cross_map(
    P: torch.Tensor,
    S: torch.Tensor,
    sent_mask: torch.Tensor,
    GS: torch.Tensor,
    use_gaze: torch.Tensor,
    theta: torch.Tensor,
    alpha: torch.Tensor,
    params: CrossMapParams,
) -> CrossMapTerms:
    """Per-instance MLCE and EGM terms on the B matched pairs, each [B]; see reference.cross_map.

    P [B, n, d], S [B, M, d], sent_mask [B, M] bool, GS [B, M, n], use_gaze [B] bool, theta [B],
    alpha one element (differentiable), as egma_fast.ops.arguments.cross_map_inputs returns them.
    Gradients flow to P, S and alpha (none to GS or theta).
    """
    terms = _ops.cross_map_fwd(P, S, sent_mask, GS, use_gaze, theta, alpha, *params.op_args())
    return CrossMapTerms(*terms)


register_backend(
    Backend(
        name="cpp",
        late_interaction=late_interaction,
        cross_map=cross_map,
        supports=lambda device: device.type == "cpu",
        auto_priority={"cpu": 10},
    )
)

if WITH_CUDA:
    register_backend(
        Backend(
            name="cuda",
            late_interaction=late_interaction,
            cross_map=cross_map,
            supports=lambda device: device.type == "cuda",
            auto_priority={"cuda": 10},
        )
    )
else:
    logger.info("egma_fast: backend 'cuda' unavailable (%s); the 'cpp' backend serves CPU tensors", UNAVAILABLE["cuda"])
