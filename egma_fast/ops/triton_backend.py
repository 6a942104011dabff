"""The ``triton`` backend: fused Triton kernels (egma_fast.kernels) behind torch.library custom ops.

Ops (namespace ``egma_fast``), each with a fake implementation so torch.compile traces through them
without a graph break, and autograd registered on the forward ops:

    triton_late_interaction_fwd(P, S, sent_mask, patch_mask, zero_slot, save_slot_winners)
        -> (zI, zT, win_patch, win_slot)
    triton_late_interaction_bwd(dzI, dzT, P, S, sent_mask, patch_mask, zero_slot, win_patch, win_slot) -> (dP, dS)
    triton_cross_map_fwd(P, S, sent_mask, GS, use_gaze, theta, alpha, <options>) -> (terms, A0, lse_col)
    triton_cross_map_bwd(gterms, P, S, sent_mask, GS, use_gaze, theta, alpha, A0, lse_col, <options>)
        -> (dP, dS, dalpha_per_instance)

<options> are CrossMapParams.OP_SCHEMA's scalars (CrossMapParams.op_args()); the op bodies turn
them back into the CrossMapParams the kernel launchers take.

Saved for backward: the inputs (by reference); for late interaction the winning patch per
(image, text, slot) and the winning slot per (image, text, patch), 1 byte each for n, M < 256
(B^2 (n + M) bytes; B^2 M with low_memory); for cross_map A0 [B, n, M] and an [B, n] log-sum-exp.
Never O(B^2 n M).

Runs on CUDA tensors, and on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1: how
CI checks the kernels; 16-bit CPU inputs are computed in fp32 there). float64 inputs are not a
Triton path: they go to the ``torch`` backend (the reference: exact, and what gradcheck uses).
Importing this module without Triton raises ImportError, which the registry reports once and
falls back from.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
from pathlib import Path

import torch
import triton  # noqa: F401  (ImportError here: the registry logs one line and falls back)

from egma_fast.ops import torch_backend as _oracle
from egma_fast.ops.arguments import (
    CrossMapParams,
    CrossMapTerms,
    check_cross_map_meta,
    check_late_interaction_meta,
    index_dtype,
    text_zero_slots,
)
from egma_fast.ops.registry import Backend, register_backend

Tensor = torch.Tensor


def _load_kernels():
    """egma_fast.kernels; from the repository's kernels/ folder when the package is not installed
    (setup.py maps that folder to egma_fast.kernels; a source checkout on PYTHONPATH lacks it)."""
    try:
        return importlib.import_module("egma_fast.kernels")
    except ModuleNotFoundError:
        root = Path(__file__).resolve().parents[2] / "kernels"
        if not (root / "__init__.py").is_file():
            raise
        spec = importlib.util.spec_from_file_location("egma_fast.kernels", root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["egma_fast.kernels"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules["egma_fast.kernels"]
            raise
        return module


def _check_interpreter_numpy() -> None:
    """Triton <= 3.6's interpreter converts 1-element arrays with int(), which numpy >= 2.4 rejects
    ("only 0-dimensional arrays can be converted to Python scalars" inside every kernel loop);
    fixed in Triton 3.7. Say so up front instead of failing in the first kernel."""
    if not _kernels.utils.interpreting():
        return
    import numpy

    def version(text: str) -> tuple[int, int]:
        major, minor = (text.split("+")[0].split(".") + ["0"])[:2]
        return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)

    if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4):
        raise ImportError(
            f"the Triton interpreter (TRITON_INTERPRET=1) of triton {triton.__version__} cannot run with numpy "
            f"{numpy.__version__}: install numpy<2.4 or triton>=3.7")


_kernels = _load_kernels()
_check_interpreter_numpy()
_li = _kernels.late_interaction
_cm = _kernels.cross_map


# ----------------------------------------------------------------------------------------------
# late_interaction
# ----------------------------------------------------------------------------------------------
def _on_device(x: Tensor):
    """Triton launches on the current CUDA device: make it the tensors' own (a no-op on CPU)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _dense(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Contiguous tensors (a no-op for the contiguous ones): the kernels index features with their
    row strides only and everything else densely, so an op called directly with a strided view
    gets a dense copy instead of a wrong result."""
    return tuple(t.contiguous() for t in tensors)


def _u8(*masks: Tensor) -> tuple[Tensor, ...]:
    return tuple(m.contiguous().view(torch.uint8) for m in masks)


def _winner_dtypes(n: int, M: int, save_slots: bool) -> tuple[torch.dtype, torch.dtype | None]:
    """Index dtypes of the winning patch (0..n-1) and, when saved, the winning slot (0..M, M: none)."""
    return index_dtype(n), index_dtype(M + 1) if save_slots else None


@torch.library.custom_op("egma_fast::triton_late_interaction_fwd", mutates_args=())
def _li_fwd(P: Tensor, S: Tensor, sent_mask: Tensor, patch_mask: Tensor, zero_slot: Tensor,
            save_slot_winners: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """zI, zT [Bi, Bt] fp32, the winning patch per (image, text, slot) [Bi, Bt, M] and the winning
    slot per (image, text, patch) [Bi, Bt, n] (an empty [0] tensor unless save_slot_winners)."""
    with _on_device(P):
        return _li.late_interaction_forward(*_dense(P, S), *_u8(sent_mask, patch_mask, zero_slot),
                                            *_winner_dtypes(P.shape[1], S.shape[1], save_slot_winners))


@_li_fwd.register_fake
def _li_fwd_fake(P, S, sent_mask, patch_mask, zero_slot, save_slot_winners):
    Bi, Bt, n, M = check_late_interaction_meta(P, S, sent_mask, patch_mask, zero_slot)
    patch_index, slot_index = _winner_dtypes(n, M, save_slot_winners)
    win_i = P.new_empty((Bi, Bt, n) if save_slot_winners else (0,), dtype=slot_index or torch.uint8)
    return (P.new_empty(Bi, Bt, dtype=torch.float32), P.new_empty(Bi, Bt, dtype=torch.float32),
            P.new_empty(Bi, Bt, M, dtype=patch_index), win_i)


@torch.library.custom_op("egma_fast::triton_late_interaction_bwd", mutates_args=())
def _li_bwd(dzI: Tensor, dzT: Tensor, P: Tensor, S: Tensor, sent_mask: Tensor, patch_mask: Tensor, zero_slot: Tensor,
            win_patch: Tensor, win_slot: Tensor) -> tuple[Tensor, Tensor]:
    """dP [Bi, n, d], dS [Bt, M, d] in the features' dtype (win_slot empty: recomputed)."""
    with _on_device(P):
        return _li.late_interaction_backward(*_dense(dzI, dzT, P, S), *_u8(sent_mask, patch_mask, zero_slot),
                                             *_dense(win_patch, win_slot))


@_li_bwd.register_fake
def _li_bwd_fake(dzI, dzT, P, S, sent_mask, patch_mask, zero_slot, win_patch, win_slot):
    Bi, Bt, _, _ = check_late_interaction_meta(P, S, sent_mask, patch_mask, zero_slot)
    torch._check(tuple(dzI.shape) == (Bi, Bt) and tuple(dzT.shape) == (Bi, Bt),
                 lambda: f"dzI and dzT must be [{Bi}, {Bt}]")
    return torch.empty_like(P), torch.empty_like(S)


def _li_setup(ctx, inputs, output) -> None:
    P, S, sent_mask, patch_mask, zero_slot, _save = inputs
    ctx.save_for_backward(P, S, sent_mask, patch_mask, zero_slot, output[2], output[3])


def _li_backward(ctx, dzI, dzT, _dwin_patch, _dwin_slot):
    P, S, sent_mask, patch_mask, zero_slot, win_patch, win_slot = ctx.saved_tensors
    Bi, Bt = P.shape[0], S.shape[0]
    dzI = P.new_zeros(Bi, Bt, dtype=torch.float32) if dzI is None else dzI.to(torch.float32).contiguous()
    dzT = P.new_zeros(Bi, Bt, dtype=torch.float32) if dzT is None else dzT.to(torch.float32).contiguous()
    dP, dS = _li_bwd(dzI, dzT, P, S, sent_mask, patch_mask, zero_slot, win_patch, win_slot)
    return dP, dS, None, None, None, None


_li_fwd.register_autograd(_li_backward, setup_context=_li_setup)


def _features(P: Tensor, S: Tensor) -> tuple[Tensor, Tensor]:
    """Contiguous P, S (one dtype already: the op boundary), fp32 for CPU tensors (the interpreter
    has no bf16 dots). The casts are differentiable."""
    if P.device.type == "cpu":
        P, S = P.float(), S.float()
    return P.contiguous(), S.contiguous()


def late_interaction(
    P: Tensor, S: Tensor, sent_mask: Tensor, patch_mask: Tensor | None = None, pad_as_zero: bool = False,
    low_memory: bool = False,
) -> tuple[Tensor, Tensor]:
    """reference.late_interaction on the fused kernels: zI, zT [Bi, Bt] fp32 (unscaled).

    The forward saves the winning slot of every (image, text, patch), Bi Bt n bytes for n < 256, so
    that the backward is two GEMMs; ``low_memory`` saves only the Bi Bt M winning patches and
    recomputes the rest in the backward (slower). Arguments as egma_fast.ops.arguments.late_interaction_inputs
    returns them."""
    Bi, n, _ = P.shape
    if P.dtype == torch.float64:
        return _oracle.late_interaction(P, S, sent_mask, patch_mask, pad_as_zero)
    if patch_mask is None:
        patch_mask = torch.ones(Bi, n, dtype=torch.bool, device=P.device)
    P, S = _features(P, S)
    zero_slot = text_zero_slots(sent_mask, pad_as_zero)
    zI, zT, _, _ = _li_fwd(P, S, sent_mask.contiguous(), patch_mask.contiguous(), zero_slot, not low_memory)
    return zI, zT


# ----------------------------------------------------------------------------------------------
# cross_map
# ----------------------------------------------------------------------------------------------
_CM_INPUTS = "Tensor P, Tensor S, Tensor sent_mask, Tensor GS, Tensor use_gaze, Tensor theta, Tensor alpha"


@torch.library.custom_op("egma_fast::triton_cross_map_fwd", mutates_args=(),
                         schema=f"({_CM_INPUTS}, {CrossMapParams.OP_SCHEMA}) -> (Tensor, Tensor, Tensor)")
def _cm_fwd(P: Tensor, S: Tensor, sent_mask: Tensor, GS: Tensor, use_gaze: Tensor, theta: Tensor, alpha: Tensor,
            *options) -> tuple[Tensor, Tensor, Tensor]:
    """terms [B, 4] fp32 (mlce_s2p, mlce_p2s, egm_image, egm_text), A0 [B, n, M] fp32, lse_col [B, n] fp32."""
    sent_mask, use_gaze = _u8(sent_mask, use_gaze)
    with _on_device(P):
        return _cm.cross_map_forward(*_dense(P, S), sent_mask, *_dense(GS), use_gaze, *_dense(theta, alpha),
                                     CrossMapParams.from_op_args(*options))


@_cm_fwd.register_fake
def _cm_fwd_fake(P, S, sent_mask, GS, use_gaze, theta, alpha, *options):
    B, n, M = check_cross_map_meta(P, S, sent_mask, GS, use_gaze, theta, alpha)
    return (P.new_empty(B, 4, dtype=torch.float32), P.new_empty(B, n, M, dtype=torch.float32),
            P.new_empty(B, n, dtype=torch.float32))


@torch.library.custom_op(
    "egma_fast::triton_cross_map_bwd", mutates_args=(),
    schema=f"(Tensor gterms, {_CM_INPUTS}, Tensor a0, Tensor lse_col, {CrossMapParams.OP_SCHEMA}) -> (Tensor, Tensor, Tensor)")
def _cm_bwd(gterms: Tensor, P: Tensor, S: Tensor, sent_mask: Tensor, GS: Tensor, use_gaze: Tensor, theta: Tensor,
            alpha: Tensor, a0: Tensor, lse_col: Tensor, *options) -> tuple[Tensor, Tensor, Tensor]:
    """dP, dS in the features' dtype and dalpha per instance [B] fp32."""
    sent_mask, use_gaze = _u8(sent_mask, use_gaze)
    with _on_device(P):
        return _cm.cross_map_backward(*_dense(gterms, P, S), sent_mask, *_dense(GS), use_gaze,
                                      *_dense(theta, alpha, a0, lse_col), CrossMapParams.from_op_args(*options))


@_cm_bwd.register_fake
def _cm_bwd_fake(gterms, P, S, sent_mask, GS, use_gaze, theta, alpha, a0, lse_col, *options):
    B, n, M = check_cross_map_meta(P, S, sent_mask, GS, use_gaze, theta, alpha)
    torch._check(tuple(gterms.shape) == (B, 4), lambda: f"gterms must be [B, 4] = [{B}, 4], got {list(gterms.shape)}")
    torch._check(tuple(a0.shape) == (B, n, M), lambda: f"a0 must be [B, n, M] = [{B}, {n}, {M}], got {list(a0.shape)}")
    torch._check(tuple(lse_col.shape) == (B, n), lambda: f"lse_col must be [B, n] = [{B}, {n}], got {list(lse_col.shape)}")
    return torch.empty_like(P), torch.empty_like(S), P.new_empty(B, dtype=torch.float32)


def _cm_setup(ctx, inputs, output) -> None:
    P, S, sent_mask, GS, use_gaze, theta, alpha = inputs[:7]
    _, a0, lse_col = output
    ctx.save_for_backward(P, S, sent_mask, GS, use_gaze, theta, alpha, a0, lse_col)
    ctx.options = inputs[7:]
    ctx.mark_non_differentiable(a0, lse_col)


def _cm_backward(ctx, gterms, _ga0, _glse):
    P, S, sent_mask, GS, use_gaze, theta, alpha, a0, lse_col = ctx.saved_tensors
    if gterms is None:
        gterms = P.new_zeros(P.shape[0], 4, dtype=torch.float32)
    dP, dS, dalpha = _cm_bwd(gterms.to(torch.float32).contiguous(), P, S, sent_mask, GS, use_gaze, theta, alpha, a0,
                             lse_col, *ctx.options)
    # GS and theta are data: no gradient (SPEC 3.1).
    return (dP, dS, None, None, None, None, dalpha.sum().reshape(1)) + (None,) * len(ctx.options)


_cm_fwd.register_autograd(_cm_backward, setup_context=_cm_setup)


def cross_map(
    P: Tensor, S: Tensor, sent_mask: Tensor, GS: Tensor, use_gaze: Tensor, theta: Tensor, alpha: Tensor,
    params: CrossMapParams,
) -> CrossMapTerms:
    """reference.cross_map on the fused kernels: CrossMapTerms of [B] fp32 tensors, gradients to P,
    S and alpha (none to GS or theta). Arguments as egma_fast.ops.arguments.cross_map_inputs returns them."""
    n, M = P.shape[1], S.shape[1]
    if P.dtype == torch.float64:
        return _oracle.cross_map(P, S, sent_mask, GS, use_gaze, theta, alpha, params)
    _cm.check_sizes(n, M)  # one instance's tiles must fit Triton's tensor limit: say so up front
    P, S = _features(P, S)
    GS = GS.to(torch.float32 if GS.dtype == torch.float64 else GS.dtype).contiguous()
    alpha1 = alpha.reshape(1).float()
    theta = theta.float().contiguous()
    terms, _, _ = _cm_fwd(P, S, sent_mask.contiguous(), GS, use_gaze.contiguous(), theta, alpha1, *params.op_args())
    return CrossMapTerms(*terms.unbind(1))


def _supports(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and _kernels.utils.interpreting())


register_backend(
    Backend(
        name="triton",
        late_interaction=late_interaction,
        cross_map=cross_map,
        supports=_supports,
        auto_priority={"cuda": 20},
    )
)
