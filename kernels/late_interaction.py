"""Fused late interaction over all Bi x Bt (image, text) pairs (SPEC 2.1), without ever forming the
Bi x Bt x n x M similarity tensor.

Contract: egma_fast.reference.late_interaction (unscaled; alpha is applied by the caller).

Tiles. A similarity tile X [BLOCK_N patches, BLOCK_L = BLOCK_T texts x M_PAD slots] of one image
against a block of texts is computed by :func:`_scores_tile`, always with the same loop over d in
BLOCK_D chunks, so a recomputed tile (low-memory mode) is bitwise the forward's. Column (l, j) of a
tile is sentence slot j of text l; slots j >= M (power-of-two padding) never exist, slots j < M
with sent_mask False are masked.

Forward   (grid Bi x text blocks, in GEMM-style groups of images for L2 reuse) loops over the
          image's patch chunks: image side, the max over each text's slots per patch (floored at 0
          for texts with a zero slot), summed into zI; text side, the running max and first argmax
          over patches per slot, into zT. Saves the winners: the winning patch per (k, l, slot)
          always, and the winning slot per (k, l, patch) unless in low-memory mode (M marks "the
          zero slot won"). Both are 1-byte for n, M < 256: Bi Bt (n + M) bytes in all.
Backward  two destination-owned GEMMs with a one-hot weight tile W built in registers from the
          saved winners: W[i, (l, j)] = dzI[k, l] / n_valid at each patch's winning slot, plus
          dzT[k, l] / m_l at each slot's winning patch. dP = W S (grid Bi x patch chunks x d-out
          blocks, looping over text blocks) and dS = W^T P (grid text blocks x d-out blocks x image
          splits, looping over images). 2U of matmul work for the forward's U; each gradient element
          is written by one program (no atomics): deterministic. In low-memory mode the image-side
          winners are recomputed from the tiles instead (another U per d-out block).

W on the tensor cores (GRAD_MODE; benchmarks/rounding_study.py measured each choice against the
flash-attention rule, fast error <= 2x PyTorch's own error from the same 16-bit inputs):
    fp32 features   W and the features in IEEE fp32.
    bf16 features   one fp16 product: W times a power of two (largest entry near 1) rounded to fp16,
                    and the features times a power of two converted to fp16 once per backward
                    (exact: a bf16 mantissa fits fp16's). W keeps 11 bits instead of bf16's 8:
                    errors up to 1.09x PyTorch's, where rounding W to bf16 measured up to 1.86x.
    fp16 features   W scaled the same way and split into hi + lo fp16 halves (two products): one
                    fp16 rounding of W measured up to 2.05x, over the rule, since the output has
                    fp16's precision too.
The power-of-two scales (exact) keep W and the features inside fp16's exponent range at any batch
size and feature norm; the accumulator is unscaled once at the end.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .tuning import PROXY_IMAGES, PROXY_TEXTS, Tuner, launch_options
from .utils import dot_precision, interpreting, next_pow2, pick_block

__all__ = ["LIBlocks", "late_interaction_backward", "late_interaction_forward", "li_blocks", "weight_mode"]


# One num_warps for every kernel: ptxas on sm_90 keeps the 64 x 128 fp32 tiles and the 3-D max /
# argmax epilogues in registers at 8 warps. Fixed (never tuned) so that a recomputed tile in the
# low-memory backward uses the forward's instruction shapes.
_NUM_WARPS = 8

# GRAD_MODE: how the fp32 weight tile W meets the feature tile on the tensor cores.
W_FP32, W_FP16, W_FP16_SPLIT = 0, 1, 2


def weight_mode(dtype: torch.dtype) -> int:
    """GRAD_MODE for features of this dtype (see the module docstring)."""
    return {torch.bfloat16: W_FP16, torch.float16: W_FP16_SPLIT}.get(dtype, W_FP32)


@dataclass(frozen=True)
class LIBlocks:
    """Tile sizes of the similarity tile, shared by every kernel (a recomputed tile must be
    bitwise the forward's)."""

    BLOCK_N: int  # patches per tile
    BLOCK_T: int  # texts per tile
    M_PAD: int  # sentence slots per text, padded to a power of two
    BLOCK_D: int  # d chunk of the similarity dot
    num_warps: int


def li_blocks(n: int, M: int, d: int, dtype: torch.dtype) -> LIBlocks:
    """Tile sizes for (n, M, d, dtype); independent of the batch sizes (no recompiles as B varies)."""
    m_pad = next_pow2(M)
    if interpreting():
        # Small tiles so the interpreter exercises multi-chunk loops and masks on tiny inputs,
        # without paying its per-op cost on thousands of iterations for larger n.
        return LIBlocks(BLOCK_N=8 if n <= 32 else 64, BLOCK_T=2, M_PAD=m_pad, BLOCK_D=16, num_warps=1)
    # 128 slot columns per tile (8 texts at M = 16): operand reuse like a GEMM's N tile, and every
    # tensor-core dot dimension >= 16.
    block_t = max(1, 128 // m_pad)
    if dtype in (torch.bfloat16, torch.float16):
        # Hopper's wgmma needs 64-row tiles (8 warps as 4 x 2); at 32 rows Triton emits the older
        # mma.sync (benchmarks/gpu/ptxas_report.py). n = 196 pads to 256 rows, cheaper than that.
        block_n, block_d = 64, 64
    else:
        block_n, block_d = pick_block(n, (64, 32, 16)), 32
    return LIBlocks(BLOCK_N=block_n, BLOCK_T=block_t, M_PAD=m_pad, BLOCK_D=block_d, num_warps=_NUM_WARPS)


# ----------------------------------------------------------------------------------------------
# Tile pieces
# ----------------------------------------------------------------------------------------------
@triton.jit
def _scores_tile(P, S, k, i, l, j, slot_ok, n, d, sPb, sPn, sSb, sSm,
                 BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """X[a, b] = <P[k, i[a]], S[l[b], j[b]]> in fp32 (0 for padded rows / slots), d in BLOCK_D chunks."""
    acc = tl.zeros((BLOCK_N, BLOCK_L), dtype=tl.float32)
    row_ok = i < n
    p_rows = P + k * sPb + i.to(tl.int64) * sPn
    s_cols = S + l.to(tl.int64) * sSb + j.to(tl.int64) * sSm
    for d0 in range(0, d, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < d
        p = tl.load(p_rows[:, None] + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.load(s_cols[None, :] + dd[:, None], mask=d_ok[:, None] & slot_ok[None, :], other=0.0)
        acc = tl.dot(p, s, acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _image_winners(X, sv, zs_t, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, M_PAD: tl.constexpr):
    """Image side of a tile, per (patch row, text): the max over the text's valid slots, floored at
    0 for texts with a zero slot (zs_t [BLOCK_T]), and the first slot attaining it; M_PAD where the
    zero slot wins (ties go to the real slot) or the text has no valid slot."""
    xi = tl.reshape(tl.where(sv[None, :], X, float("-inf")), (BLOCK_N, BLOCK_T, M_PAD))
    row_max = tl.max(xi, axis=2)
    # First slot attaining the max: a min over slot indices (lighter than a paired argmax reduction).
    slot = tl.arange(0, M_PAD)[None, None, :]
    row_arg = tl.min(tl.where(xi == row_max[:, :, None], slot, M_PAD), axis=2)
    zero_wins = zs_t[None, :] & (row_max < 0)
    row_arg = tl.where(zero_wins | (row_max == float("-inf")), M_PAD, row_arg)
    row_max = tl.where(zero_wins, 0.0, row_max)
    return row_max, row_arg


@triton.jit
def _slot_hits(row_arg, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, M_PAD: tl.constexpr):
    """[BLOCK_N, BLOCK_L] bool: column (l, j) is patch row i's winning slot of text l."""
    best = tl.reshape(tl.broadcast_to(row_arg[:, :, None], (BLOCK_N, BLOCK_T, M_PAD)), (BLOCK_N, BLOCK_T * M_PAD))
    return best == (tl.arange(0, BLOCK_T * M_PAD) % M_PAD)[None, :]


@triton.jit
def _weight_tile(img_hit, win_t, i, p_ok, sv, c_img, c_txt, img_has_patch):
    """The one-hot gradient tile W of (zI, zT) with respect to a similarity tile, in either
    orientation: every argument but img_has_patch comes broadcast to the tile's 2-D shape (patch
    rows x slot columns for dP, the transpose for dS, so that dS needs no transposed copy).
    c_img where the patch's winning slot is the slot (img_hit), plus c_txt where the slot's winning
    patch ``win_t`` is the patch; masked patches, masked slots and patch-less images give 0."""
    w = tl.where(img_hit & sv & p_ok, c_img, 0.0)
    w += tl.where((win_t.to(tl.int32) == i) & sv & img_has_patch, c_txt, 0.0)
    return w


@triton.jit
def _weight_dot(w, feats, acc, w_scale, GRAD_MODE: tl.constexpr):
    """acc + W @ feats on the tensor cores, W [R, K] fp32 and feats [K, C] (fp16 in the 16-bit
    modes: see the module docstring). In the 16-bit modes W is multiplied by ``w_scale`` first and
    acc holds scaled sums (the caller unscales once at the end)."""
    if GRAD_MODE == 1:
        acc = tl.dot((w * w_scale).to(tl.float16), feats, acc)
    elif GRAD_MODE == 2:
        ws = w * w_scale
        hi = ws.to(tl.float16)
        acc = tl.dot(hi, feats, acc)
        acc = tl.dot((ws - hi.to(tl.float32)).to(tl.float16), feats, acc)
    else:
        acc = tl.dot(w, feats.to(tl.float32), acc, input_precision="ieee")
    return acc


@triton.jit
def _image_hits(WIN_I, P, S, k, i, l, j, slot_ok, sv, zs_t, Bt, n, d, sPb, sPn, sSb, sSm,
                SAVED: tl.constexpr, TRANSPOSED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
                M_PAD: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """Bool tile: slot column (l, j) is patch row i's winning slot of text l, loaded from the
    forward's saved winners or (low-memory mode) recomputed from the similarity tile.
    [BLOCK_N, BLOCK_L], or [BLOCK_L, BLOCK_N] when TRANSPOSED."""
    if SAVED:
        base = (k * Bt + l.to(tl.int64)) * n
        if TRANSPOSED:
            wi = tl.load(WIN_I + base[:, None] + i[None, :], mask=slot_ok[:, None] & (i < n)[None, :], other=0)
            hit = wi.to(tl.int32) == j[:, None]
        else:
            wi = tl.load(WIN_I + base[None, :] + i[:, None], mask=(i < n)[:, None] & slot_ok[None, :], other=0)
            hit = wi.to(tl.int32) == j[None, :]
    else:
        X = _scores_tile(P, S, k, i, l, j, slot_ok, n, d, sPb, sPn, sSb, sSm, BLOCK_N, BLOCK_T * M_PAD, BLOCK_D, DOT_PREC)
        _, row_arg = _image_winners(X, sv, zs_t, BLOCK_N, BLOCK_T, M_PAD)
        hit = _slot_hits(row_arg, BLOCK_N, BLOCK_T, M_PAD)
        if TRANSPOSED:
            hit = tl.trans(hit)
    return hit


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["Bi", "Bt"])
def _li_fwd_kernel(P, S, SMASK, PMASK, NVALID, MVALID, ZSLOT, ZI, ZT, WIN_T, WIN_I,
                   Bi, Bt, n, M, d, sPb, sPn, sSb, sSm,
                   BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, M_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
                   DOT_PREC: tl.constexpr, SAVE_WIN_I: tl.constexpr, GROUP_K: tl.constexpr):
    """One program: image k against texts [l0, l0 + BLOCK_T). Writes zI, zT [Bi, Bt], WIN_T [Bi, Bt, M]
    and (SAVE_WIN_I) WIN_I [Bi, Bt, n].

    Programs are ordered in groups of GROUP_K images (GEMM-style swizzle): programs that run
    together share a few images' patches and a band of text blocks in L2, so each P_k is read from
    memory about once instead of once per text block."""
    BLOCK_L: tl.constexpr = BLOCK_T * M_PAD
    pid = tl.program_id(0)
    n_tb = tl.cdiv(Bt, BLOCK_T)
    per_group = GROUP_K * n_tb
    first_k = (pid // per_group) * GROUP_K
    group_size = tl.minimum(Bi - first_k, GROUP_K)
    k = (first_k + (pid % per_group) % group_size).to(tl.int64)
    l0 = ((pid % per_group) // group_size) * BLOCK_T
    col = tl.arange(0, BLOCK_L)
    l = l0 + col // M_PAD
    j = col % M_PAD
    slot_ok = (l < Bt) & (j < M)
    sv = tl.load(SMASK + l.to(tl.int64) * M + j, mask=slot_ok, other=0) != 0
    lt = l0 + tl.arange(0, BLOCK_T)
    m_t = tl.load(MVALID + lt, mask=lt < Bt, other=0)
    zs_t = tl.load(ZSLOT + lt, mask=lt < Bt, other=0) != 0
    nv = tl.load(NVALID + k)

    zi = tl.zeros((BLOCK_T,), dtype=tl.float32)
    run_max = tl.full((BLOCK_L,), float("-inf"), tl.float32)
    run_arg = tl.zeros((BLOCK_L,), dtype=tl.int32)
    for i0 in range(0, n, BLOCK_N):
        i = i0 + tl.arange(0, BLOCK_N)
        p_ok = tl.load(PMASK + k * n + i, mask=i < n, other=0) != 0
        X = _scores_tile(P, S, k, i, l, j, slot_ok, n, d, sPb, sPn, sSb, sSm, BLOCK_N, BLOCK_L, BLOCK_D, DOT_PREC)
        # Image side: each patch's best slot within each text; masked patches / empty texts add 0.
        row_max, row_arg = _image_winners(X, sv, zs_t, BLOCK_N, BLOCK_T, M_PAD)
        zi += tl.sum(tl.where(p_ok[:, None] & (m_t > 0)[None, :], row_max, 0.0), axis=0)
        if SAVE_WIN_I:
            # The zero slot's (or no slot's) win is stored as M: it matches no real slot.
            out = WIN_I + ((k * Bt + lt.to(tl.int64)) * n)[None, :] + i[:, None]
            tl.store(out, tl.minimum(row_arg, M).to(WIN_I.dtype.element_ty), mask=(i < n)[:, None] & (lt < Bt)[None, :])
        # Text side: running max / first argmax over valid patches (strict > keeps the earlier chunk).
        xt = tl.where(p_ok[:, None], X, float("-inf"))
        c_max = tl.max(xt, axis=0)
        c_arg = tl.argmax(xt, axis=0, tie_break_left=True) + i0
        upd = c_max > run_max
        run_max = tl.where(upd, c_max, run_max)
        run_arg = tl.where(upd, c_arg, run_arg)

    zi = zi / tl.maximum(nv, 1).to(tl.float32)
    col_val = tl.where(sv & (nv > 0), run_max, 0.0)
    zt = tl.sum(tl.reshape(col_val, (BLOCK_T, M_PAD)), axis=1) / tl.maximum(m_t, 1).to(tl.float32)
    tl.store(ZI + k * Bt + lt, zi, mask=lt < Bt)
    tl.store(ZT + k * Bt + lt, zt, mask=lt < Bt)
    tl.store(WIN_T + (k * Bt + l) * M + j, run_arg.to(WIN_T.dtype.element_ty), mask=slot_ok)


@triton.jit(do_not_specialize=["Bt"])
def _li_bwd_dp_kernel(P, S, SF, SMASK, PMASK, NVALID, MVALID, ZSLOT, WIN_T, WIN_I, DZI, DZT, SCALES, DP,
                      Bt, n, M, d, sPb, sPn, sSb, sSm,
                      BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, M_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
                      DOT_PREC: tl.constexpr, GRAD_MODE: tl.constexpr, SAVED: tl.constexpr, BLOCK_DO: tl.constexpr):
    """One program: dP[k, patch chunk, d-out block] = sum over every text block of W_tile @ S_tile.
    SF: the features the product reads (S, or its scaled fp16 copy); SCALES [3] fp32: W's scale and
    the accumulator's unscale factors for dP and dS."""
    BLOCK_L: tl.constexpr = BLOCK_T * M_PAD
    k = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    do = tl.program_id(2) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    do_ok = do < d
    p_ok = tl.load(PMASK + k * n + i, mask=i < n, other=0) != 0
    nv = tl.load(NVALID + k)
    inv_nv = 1.0 / tl.maximum(nv, 1).to(tl.float32)
    w_scale = tl.load(SCALES)
    col = tl.arange(0, BLOCK_L)
    acc = tl.zeros((BLOCK_N, BLOCK_DO), dtype=tl.float32)
    for l0 in range(0, Bt, BLOCK_T):
        l = l0 + col // M_PAD
        j = col % M_PAD
        slot_ok = (l < Bt) & (j < M)
        sv = tl.load(SMASK + l.to(tl.int64) * M + j, mask=slot_ok, other=0) != 0
        lt = l0 + tl.arange(0, BLOCK_T)
        zs_t = tl.load(ZSLOT + lt, mask=lt < Bt, other=0) != 0
        m_l = tl.load(MVALID + l, mask=l < Bt, other=1)
        # W's coefficients: the same reciprocals as in the dS kernel, so both GEMMs use the same W.
        c_img = tl.load(DZI + k * Bt + l, mask=l < Bt, other=0.0) * inv_nv
        c_txt = tl.load(DZT + k * Bt + l, mask=l < Bt, other=0.0) * (1.0 / tl.maximum(m_l, 1).to(tl.float32))
        win_t = tl.load(WIN_T + (k * Bt + l) * M + j, mask=slot_ok, other=0)
        hit = _image_hits(WIN_I, P, S, k, i, l, j, slot_ok, sv, zs_t, Bt, n, d, sPb, sPn, sSb, sSm,
                          SAVED, False, BLOCK_N, BLOCK_T, M_PAD, BLOCK_D, DOT_PREC)
        w = _weight_tile(hit, win_t[None, :], i[:, None], p_ok[:, None], sv[None, :], c_img[None, :], c_txt[None, :],
                         nv > 0)
        s_out = tl.load(SF + l.to(tl.int64)[:, None] * sSb + j[:, None] * sSm + do[None, :],
                        mask=slot_ok[:, None] & do_ok[None, :], other=0.0)
        acc = _weight_dot(w, s_out, acc, w_scale, GRAD_MODE)
    if GRAD_MODE != 0:
        acc = acc * tl.load(SCALES + 1)
    tl.store(DP + k * sPb + i.to(tl.int64)[:, None] * sPn + do[None, :], acc.to(DP.dtype.element_ty),
             mask=(i < n)[:, None] & do_ok[None, :])


@triton.jit(do_not_specialize=["Bi", "Bt", "k_per_split"])
def _li_bwd_ds_kernel(P, S, PF, SMASK, PMASK, NVALID, MVALID, ZSLOT, WIN_T, WIN_I, DZI, DZT, SCALES, OUT,
                      Bi, Bt, n, M, d, sPb, sPn, sSb, sSm, k_per_split,
                      BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, M_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
                      DOT_PREC: tl.constexpr, GRAD_MODE: tl.constexpr, SAVED: tl.constexpr, BLOCK_DO: tl.constexpr):
    """One program: OUT[split, text block, d-out block] = sum over the split's images and all their
    patch chunks of W_tile^T @ P_tile (W^T built directly, slots x patches). OUT is dS itself ([Bt, M, d]) when there is one split, else an
    fp32 [splits, Bt, M, d] buffer summed afterwards (in a fixed order: still deterministic)."""
    BLOCK_L: tl.constexpr = BLOCK_T * M_PAD
    l0 = tl.program_id(0) * BLOCK_T
    do = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    split = tl.program_id(2)
    do_ok = do < d
    col = tl.arange(0, BLOCK_L)
    l = l0 + col // M_PAD
    j = col % M_PAD
    slot_ok = (l < Bt) & (j < M)
    sv = tl.load(SMASK + l.to(tl.int64) * M + j, mask=slot_ok, other=0) != 0
    lt = l0 + tl.arange(0, BLOCK_T)
    zs_t = tl.load(ZSLOT + lt, mask=lt < Bt, other=0) != 0
    m_l = tl.load(MVALID + l, mask=l < Bt, other=1)
    inv_m = 1.0 / tl.maximum(m_l, 1).to(tl.float32)
    w_scale = tl.load(SCALES)
    acc = tl.zeros((BLOCK_L, BLOCK_DO), dtype=tl.float32)
    # One loop over (image, patch chunk) steps, so that num_stages pipelines the loads across
    # images too (at n <= BLOCK_N an image is a single step).
    chunks = tl.cdiv(n, BLOCK_N)
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, Bi)
    for step in range(k_lo * chunks, k_hi * chunks):
        k = tl.cast(step // chunks, tl.int64)
        i = (step % chunks) * BLOCK_N + tl.arange(0, BLOCK_N)
        nv = tl.load(NVALID + k)
        c_img = tl.load(DZI + k * Bt + l, mask=l < Bt, other=0.0) * (1.0 / tl.maximum(nv, 1).to(tl.float32))
        c_txt = tl.load(DZT + k * Bt + l, mask=l < Bt, other=0.0) * inv_m
        win_t = tl.load(WIN_T + (k * Bt + l) * M + j, mask=slot_ok, other=0)
        p_ok = tl.load(PMASK + k * n + i, mask=i < n, other=0) != 0
        hit = _image_hits(WIN_I, P, S, k, i, l, j, slot_ok, sv, zs_t, Bt, n, d, sPb, sPn, sSb, sSm,
                          SAVED, True, BLOCK_N, BLOCK_T, M_PAD, BLOCK_D, DOT_PREC)
        w_t = _weight_tile(hit, win_t[:, None], i[None, :], p_ok[None, :], sv[:, None], c_img[:, None], c_txt[:, None],
                           nv > 0)
        p_out = tl.load(PF + k * sPb + i.to(tl.int64)[:, None] * sPn + do[None, :],
                        mask=(i < n)[:, None] & do_ok[None, :], other=0.0)
        acc = _weight_dot(w_t, p_out, acc, w_scale, GRAD_MODE)
    if GRAD_MODE != 0:
        acc = acc * tl.load(SCALES + 2)
    out = OUT + split.to(tl.int64) * Bt * M * d + (l.to(tl.int64)[:, None] * M + j[:, None]) * d + do[None, :]
    tl.store(out, acc.to(OUT.dtype.element_ty), mask=slot_ok[:, None] & do_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Launch configuration: on a GPU each kernel's config is picked per (device, n, M, d, dtype, mode)
# by kernels.tuning.Tuner on a bounded proxy of the call (the first call at B = 16384 costs what
# one at B = 256 does); fixed under the interpreter. Only launch parameters that leave the
# similarity tile's arithmetic unchanged are tuned (stages, the image grouping, the d-out block),
# so a recomputed tile is bitwise the forward's.
# ----------------------------------------------------------------------------------------------
def _configs(name: str, pairs) -> list[triton.Config]:
    return [triton.Config({name: value}, num_warps=_NUM_WARPS, num_stages=stages) for value, stages in pairs]


# Every config here compiles without register spills for bf16 / fp16 at n in {49, 196}, M = 16,
# d = 512 on sm_90 with Triton 3.6 and 3.9 (tests/test_triton_compile.py; benchmarks/gpu/
# ptxas_report.py): d-out blocks of 256 spill in the dS kernel (its [128, BLOCK_DO] accumulator),
# in the dP kernel with 3 stages, and with fp16's two products (Triton 3.6).
FWD_CONFIGS = _configs("GROUP_K", [(4, 3), (8, 3), (4, 4), (8, 4)])
DP_CONFIGS = _configs("BLOCK_DO", [(128, 2), (128, 3), (256, 2)])
DP_SPLIT_CONFIGS = DP_CONFIGS[:2]
DS_CONFIGS = _configs("BLOCK_DO", [(64, 2), (64, 3), (128, 2), (128, 3)])
_FWD_TUNER = Tuner("late_interaction forward", FWD_CONFIGS)
_DP_TUNERS = {mode: Tuner("late_interaction dP", DP_SPLIT_CONFIGS if mode == W_FP16_SPLIT else DP_CONFIGS)
              for mode in (W_FP32, W_FP16, W_FP16_SPLIT)}
_DS_TUNER = Tuner("late_interaction dS", DS_CONFIGS)


def dp_configs(mode: int) -> list[triton.Config]:
    """The dP kernel's tuning space for a weight mode."""
    return _DP_TUNERS[mode].configs

_INTERPRET_FWD = triton.Config({"GROUP_K": 2}, num_warps=1, num_stages=1)
_INTERPRET_BWD = triton.Config({"BLOCK_DO": 32}, num_warps=1, num_stages=1)

#: Tests may force the number of image splits of the dS kernel (None: heuristic) and the weight
#: mode (None: weight_mode of the features' dtype; the interpreter can run W_FP16 / W_FP16_SPLIT on
#: fp32 inputs, since numpy has fp16).
FORCE_DS_SPLITS: int | None = None
FORCE_WEIGHT_MODE: int | None = None


def _ds_splits(Bi: int, Bt: int, blocks: LIBlocks, device: torch.device) -> int:
    """Images are split across programs only when there are too few text blocks to fill the GPU;
    the fp32 partial buffer is then at most ~2 waves x BLOCK_T texts per split, independent of B."""
    if FORCE_DS_SPLITS is not None:
        return max(1, min(FORCE_DS_SPLITS, Bi))
    if interpreting() or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    text_blocks = triton.cdiv(Bt, blocks.BLOCK_T)
    return max(1, min(triton.cdiv(2 * sms, text_blocks), Bi // 16 or 1))


def _tiles(P: torch.Tensor, blocks: LIBlocks) -> dict:
    return dict(BLOCK_N=blocks.BLOCK_N, BLOCK_T=blocks.BLOCK_T, M_PAD=blocks.M_PAD, BLOCK_D=blocks.BLOCK_D,
                DOT_PREC=dot_precision(P.dtype))


def _key(P: torch.Tensor, S: torch.Tensor, *modes) -> tuple:
    return (P.device.index, P.shape[1], S.shape[1], P.shape[2], P.dtype, *modes)


def _valid_counts(smask: torch.Tensor, pmask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return pmask.sum(1, dtype=torch.int32), smask.sum(1, dtype=torch.int32)


def late_interaction_forward(
    P: torch.Tensor, S: torch.Tensor, smask: torch.Tensor, pmask: torch.Tensor, zslot: torch.Tensor,
    patch_index: torch.dtype, slot_index: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward.

    P [Bi, n, d], S [Bt, M, d] contiguous (same float dtype); smask [Bt, M], pmask [Bi, n] and zslot
    [Bt] (texts with a zero slot) uint8. ``patch_index`` / ``slot_index``: integer dtypes holding
    0..n-1 and 0..M; slot_index None skips saving the image-side winners (low-memory mode).
    Returns zI, zT [Bi, Bt] fp32, WIN_T [Bi, Bt, M] (winning patch per slot) and WIN_I [Bi, Bt, n]
    (winning slot per patch, M where none or the zero slot won; an empty [0] tensor when not saved).
    """
    Bi, n, d = P.shape
    Bt, M, _ = S.shape
    blocks = li_blocks(n, M, d, P.dtype)
    save = slot_index is not None
    zI = torch.empty(Bi, Bt, device=P.device, dtype=torch.float32)
    zT = torch.empty(Bi, Bt, device=P.device, dtype=torch.float32)
    win_t = torch.empty(Bi, Bt, M, device=P.device, dtype=patch_index)
    win_i = torch.empty((Bi, Bt, n) if save else (0,), device=P.device, dtype=slot_index or torch.uint8)
    if Bi == 0 or Bt == 0:
        return zI, zT, win_t, win_i
    tiles = dict(_tiles(P, blocks), SAVE_WIN_I=save)

    def launch(bi: int, bt: int, outs, config: triton.Config) -> None:
        nvalid, mvalid = _valid_counts(smask[:bt], pmask[:bi])
        grid = (bi * triton.cdiv(bt, blocks.BLOCK_T),)
        _li_fwd_kernel[grid](P, S, smask, pmask, nvalid, mvalid, zslot, *outs,
                             bi, bt, n, M, d, P.stride(0), P.stride(1), S.stride(0), S.stride(1),
                             **tiles, **launch_options(config))

    if interpreting():
        config = _INTERPRET_FWD
    else:
        bi, bt = min(Bi, PROXY_IMAGES), min(Bt, PROXY_TEXTS)
        proxy = (zI[:bi, :bt].contiguous(), zT[:bi, :bt].contiguous(), win_t[:bi, :bt].contiguous(),
                 win_i[:bi, :bt].contiguous() if save else win_i)
        config = _FWD_TUNER.pick(_key(P, S, save), lambda cfg: launch(bi, bt, proxy, cfg))
    launch(Bi, Bt, (zI, zT, win_t, win_i), config)
    return zI, zT, win_t, win_i


def _pow2_scale(peak: torch.Tensor) -> torch.Tensor:
    """2^-ceil(log2(peak)): brings a positive peak into (0.5, 1] exactly (1 for a zero peak). The
    exponent is clamped to fp32's normal range, so a subnormal or infinite peak gives a finite scale
    (an infinite upstream gradient then stays an inf where it is, instead of NaN everywhere)."""
    exponent = torch.ceil(torch.log2(peak.float())).clamp(-120.0, 120.0)
    return torch.where(peak > 0, torch.exp2(-exponent), torch.ones_like(exponent))


def _max_abs(x: torch.Tensor) -> torch.Tensor:
    """max |x| as one reduction (no |x| temporary)."""
    return torch.linalg.vector_norm(x, float("inf"))


def _scaled_fp16(x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, rows, d] with its invalid rows (valid [B, rows] == 0) zeroed, times the power of two that
    brings its largest valid |entry| near 1, in fp16; and that scale. Masked rows never reach the
    products (their W entries are 0), so they must neither set the scale nor become fp16 infinities."""
    kept = torch.where(valid.bool()[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))
    scale = _pow2_scale(_max_abs(kept))
    return torch.mul(kept, scale.to(kept.dtype), out=kept).half(), scale


def _product_operands(mode: int, dzI: torch.Tensor, dzT: torch.Tensor, P: torch.Tensor, S: torch.Tensor,
                      pmask: torch.Tensor, smask: torch.Tensor):
    """The features the backward's products read and SCALES [3] fp32 = (W's scale, dP's unscale,
    dS's unscale), all computed on the device (no host sync).

    W's largest entry is at most |dzI| + |dzT| (c_img <= |dzI|, c_txt <= |dzT|). For bf16 features
    (W_FP16) P and S are also scaled into fp16's range and converted once here (exact for a bf16
    mantissa down to 2^-17 of the largest entry; Bi n d + Bt M d fp16 elements while the backward
    runs)."""
    if mode == W_FP32:
        return P, S, torch.ones(3, device=P.device)
    w_scale = _pow2_scale(_max_abs(dzI) + _max_abs(dzT))
    if mode == W_FP16:
        PF, p_scale = _scaled_fp16(P, pmask)
        SF, s_scale = _scaled_fp16(S, smask)
    else:
        p_scale = s_scale = torch.ones((), device=P.device)
        PF, SF = P, S
    return PF, SF, torch.stack([w_scale, 1 / (w_scale * s_scale), 1 / (w_scale * p_scale)]).float()


def late_interaction_backward(
    dzI: torch.Tensor, dzT: torch.Tensor, P: torch.Tensor, S: torch.Tensor, smask: torch.Tensor,
    pmask: torch.Tensor, zslot: torch.Tensor, win_t: torch.Tensor, win_i: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the two backward kernels. dzI, dzT [Bi, Bt] fp32 contiguous; win_t, win_i the forward's
    winners (win_i empty: recompute them, low-memory mode). Returns dP, dS in the features' dtype."""
    Bi, n, d = P.shape
    Bt, M, _ = S.shape
    blocks = li_blocks(n, M, d, P.dtype)
    if Bi == 0 or Bt == 0:
        return torch.zeros_like(P), torch.zeros_like(S)
    saved = win_i.dim() == 3
    mode = weight_mode(P.dtype) if FORCE_WEIGHT_MODE is None else FORCE_WEIGHT_MODE
    PF, SF, scales = _product_operands(mode, dzI, dzT, P, S, pmask, smask)  # before dP, dS: a lower peak
    dP = torch.empty_like(P)
    dS = torch.empty_like(S)
    meta = dict(_tiles(P, blocks), GRAD_MODE=mode, SAVED=saved)
    strides = (P.stride(0), P.stride(1), S.stride(0), S.stride(1))
    splits = _ds_splits(Bi, Bt, blocks, P.device)

    def launch_dp(bi: int, bt: int, out: torch.Tensor, config: triton.Config) -> None:
        nvalid, mvalid = _valid_counts(smask[:bt], pmask[:bi])
        grid = (bi, triton.cdiv(n, blocks.BLOCK_N), triton.cdiv(d, config.kwargs["BLOCK_DO"]))
        _li_bwd_dp_kernel[grid](P, S, SF, smask, pmask, nvalid, mvalid, zslot, win_t, win_i, dzI, dzT, scales, out,
                                bt, n, M, d, *strides, **meta, **launch_options(config))

    def launch_ds(bi: int, bt: int, splits_: int, out: torch.Tensor, config: triton.Config) -> None:
        nvalid, mvalid = _valid_counts(smask[:bt], pmask[:bi])
        grid = (triton.cdiv(bt, blocks.BLOCK_T), triton.cdiv(d, config.kwargs["BLOCK_DO"]), splits_)
        _li_bwd_ds_kernel[grid](P, S, PF, smask, pmask, nvalid, mvalid, zslot, win_t, win_i, dzI, dzT, scales, out,
                                bi, bt, n, M, d, *strides, triton.cdiv(bi, splits_), **meta, **launch_options(config))

    if interpreting():
        cfg_dp = cfg_ds = _INTERPRET_BWD
    else:
        # Proxies: the leading bi images and bt texts. The kernels then index the winners and the
        # upstream gradients as if the batch were bi x bt: other (in-bounds) entries than the real
        # call's, which changes nothing the timing depends on; the outputs are scratch.
        bi, bt = min(Bi, PROXY_IMAGES), min(Bt, PROXY_TEXTS)
        key = _key(P, S, mode, saved)
        cfg_dp = _DP_TUNERS[mode].pick(key, lambda c: launch_dp(bi, bt, torch.empty_like(P[:bi]), c))
        # The dS proxy writes what the real call writes: dS itself when it has one split (large B),
        # else an fp32 split buffer.
        proxy_splits = 1 if splits == 1 else _ds_splits(bi, bt, blocks, P.device)
        buf = (torch.empty(bt, M, d, device=P.device, dtype=S.dtype) if proxy_splits == 1
               else torch.empty(proxy_splits, bt, M, d, device=P.device, dtype=torch.float32))
        cfg_ds = _DS_TUNER.pick(key, lambda c: launch_ds(bi, bt, proxy_splits, buf, c))
    launch_dp(Bi, Bt, dP, cfg_dp)
    out = dS if splits == 1 else torch.empty(splits, Bt, M, d, device=S.device, dtype=torch.float32)
    launch_ds(Bi, Bt, splits, out, cfg_ds)
    if splits > 1:
        dS = out.sum(0).to(S.dtype)
    return dP, dS
