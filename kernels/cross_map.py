"""Fused per-instance EGMA terms on the B matched pairs (SPEC 2.4 MLCE and SPEC 3 EGM).

Contract: egma_fast.reference.cross_map.

Everything after the scores is a function of the in-instance score matrix A0 = P_k S_k^T [n, M]:
Cross_P P^T = W_i2t S P^T = W_i2t A0^T and Cross_S S^T = W_t2i P S^T = W_t2i A0, so the n x n and
M x M CLIP logits are rank-M products that never touch d. The only d-sized work is A0 itself, its
transpose products in the backward, and the ||Cross_S - S||^2 rule of one-sentence texts.

Kernels (one program per instance, except the d-parallel A0 and feature-gradient kernels):
    _cm_scores_kernel     A0 [B, n, M] fp32 = P S^T (grid B x row blocks); saved for the backward.
    _cm_fwd_kernel        MLCE rows, omega (top-k or threshold) weights, the M x M text CLIP term in
                          registers, the n x n image CLIP term in row blocks of R rows with online
                          column log-sum-exp (never stored); writes the 4 terms and the column LSE.
    _cm_bwd_scores_kernel dA0 (gradient w.r.t. A0, alpha folded in) and the per-instance dalpha:
                          MLCE, both CLIP terms and, for the threshold omega, back through the
                          row-L1, threshold and min/max. Row-block contributions (image side) go to
                          a second [B, n, M] buffer, so each buffer element is written once.
    _cm_bwd_feat_kernel   dP = dA0 S (+ W_t2i^T dD), dS = dA0^T P (- dD) (grid B x d blocks).

The launchers take the op's options as one egma_fast.ops.CrossMapParams (read by attribute: this
package imports nothing from egma_fast). EGM_GAZE (params.egm_use_gaze) off: the EGM weights see
no gaze (flag and GS zero) while the MLCE rows still use it.

Limits: one program holds an instance's whole [n, M] and [M, M] tiles, so n and M are bounded by
Triton's largest tensor (:func:`check_sizes`, called by the backend before any launch).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.core import TRITON_MAX_TENSOR_NUMEL

from .utils import (
    dot_precision,
    grad_mode,
    interpreting,
    lse_with_zero,
    masked_lse,
    mixed_dot,
    next_pow2,
    row_l1,
    threshold_weights,
    threshold_weights_bwd,
    topk_rows,
)

__all__ = ["CMBlocks", "check_sizes", "cm_blocks", "cross_map_backward", "cross_map_forward", "max_slots"]


@dataclass(frozen=True)
class CMBlocks:
    N_PAD: int  # patches, padded to a power of two (one instance's n fits one tile)
    M_PAD: int  # sentence slots, padded
    R: int  # rows of the n x n image-side logits per block
    R1: int  # rows per program of the A0 kernel
    BLOCK_D: int  # d chunk


def cm_blocks_gpu(n: int, M: int, d: int, dtype: torch.dtype = torch.float32) -> CMBlocks:
    """Tile sizes of the GPU launchers for (n, M, d, dtype), independent of B."""
    n_pad = max(16, next_pow2(n))
    return CMBlocks(
        N_PAD=n_pad,
        M_PAD=max(16, next_pow2(M)),  # tensor-core dots need dimensions >= 16
        R=n_pad if n_pad <= 64 else 16,
        R1=min(n_pad, 64),
        BLOCK_D=64 if dtype in (torch.bfloat16, torch.float16) else 32,
    )


def cm_blocks(n: int, M: int, d: int, dtype: torch.dtype) -> CMBlocks:
    """Tile sizes for (n, M, d, dtype), independent of B (small ones under the interpreter)."""
    if interpreting():
        return CMBlocks(N_PAD=next_pow2(n), M_PAD=next_pow2(M), R=4, R1=4, BLOCK_D=16)
    return cm_blocks_gpu(n, M, d, dtype)


def _largest_tile(n: int, M: int) -> int:
    """Elements of the largest tile a program of the GPU launchers holds (the interpreter's tiles
    are no larger): [M_PAD, M_PAD] text-side logits, [N_PAD, M_PAD] scores, [R, N_PAD] image-side
    logits, d chunks."""
    b = cm_blocks_gpu(n, M, 1)
    return max(b.M_PAD * b.M_PAD, b.N_PAD * b.M_PAD, b.R * b.N_PAD, max(b.N_PAD, b.M_PAD) * 64)


def max_slots(n: int) -> int:
    """The largest sentence-slot count M the kernels take for n patches (0 if none)."""
    M = 1
    while _largest_tile(n, 2 * M) <= TRITON_MAX_TENSOR_NUMEL:
        M *= 2
    return M if _largest_tile(n, M) <= TRITON_MAX_TENSOR_NUMEL else 0


def check_sizes(n: int, M: int) -> None:
    """Raise ValueError, naming the limit, when one instance's tiles exceed Triton's largest tensor
    (TRITON_MAX_TENSOR_NUMEL elements): the kernels keep an instance's n x M scores and M x M
    logits in one tile each instead of tiling them."""
    if _largest_tile(n, M) <= TRITON_MAX_TENSOR_NUMEL:
        return
    limit = max_slots(n)
    raise ValueError(
        f"backend='triton' cross_map supports at most M = {limit} sentence slots for n = {n} patches "
        f"(one program holds an instance's padded n x M and M x M tiles, at most {TRITON_MAX_TENSOR_NUMEL} elements "
        f"each), got M = {M}; pad sentences to fewer slots or use backend='cuda' or 'cpp'")


# ----------------------------------------------------------------------------------------------
# Per-instance pieces
# ----------------------------------------------------------------------------------------------
@triton.jit
def _instance(SMASK, USE_GAZE, THETA, ALPHA, b, M, M_PAD: tl.constexpr):
    """Valid slots vj [M_PAD], their count m, the gaze flag g, theta and alpha of instance b."""
    j = tl.arange(0, M_PAD)
    vj = tl.load(SMASK + b * M + j, mask=j < M, other=0) != 0
    m = tl.sum(vj.to(tl.int32), axis=0)
    g = tl.load(USE_GAZE + b) != 0
    theta = tl.load(THETA + b).to(tl.float32)
    alpha = tl.load(ALPHA).to(tl.float32)
    return j, vj, m, g, theta, alpha


@triton.jit
def _load_a0(A0, b, rows, n, M, M_PAD: tl.constexpr):
    """A0[b, rows, :] as [len(rows), M_PAD] fp32 (0 outside n x M)."""
    j = tl.arange(0, M_PAD)
    ok = (rows < n)[:, None] & (j < M)[None, :]
    return tl.load(A0 + (b * n + rows.to(tl.int64))[:, None] * M + j[None, :], mask=ok, other=0.0)


@triton.jit
def _load_gaze(GS, b, rows, vj, g, n, M, M_PAD: tl.constexpr):
    """Gaze of patches ``rows`` for every slot, [len(rows), M_PAD] fp32: GS[b, j, row], zero for
    masked slots and for samples without gaze (the reference's ``gaze``, transposed)."""
    j = tl.arange(0, M_PAD)
    ok = (rows < n)[:, None] & vj[None, :]
    gz = tl.load(GS + (b * M + j)[None, :] * n + rows.to(tl.int64)[:, None], mask=ok, other=0.0).to(tl.float32)
    return tl.where(g, gz, 0.0)


@triton.jit
def _instance_tiles(SMASK, USE_GAZE, THETA, ALPHA, A0, GS, n, M, N_PAD: tl.constexpr, M_PAD: tl.constexpr):
    """This program's instance b (grid axis 0) with its whole tiles: _instance's values, the patch
    indices i [N_PAD] and their validity rv, A0[b] [N_PAD, M_PAD], A = alpha A0, and the gaze gz
    as MLCE sees it (_load_gaze)."""
    b = tl.program_id(0).to(tl.int64)
    j, vj, m, g, theta, alpha = _instance(SMASK, USE_GAZE, THETA, ALPHA, b, M, M_PAD)
    i = tl.arange(0, N_PAD)
    rv = i < n
    a0 = _load_a0(A0, b, i, n, M, M_PAD)
    return b, j, vj, m, g, theta, alpha, i, rv, a0, alpha * a0, _load_gaze(GS, b, i, vj, g, n, M, M_PAD)


@triton.jit
def _i2t_weights(a, gz, vj, m, g, theta, k_s, floor, THRESHOLD: tl.constexpr, M_PAD: tl.constexpr):
    """W_i2t for a block of patch rows: a [R, M_PAD] alpha-scaled scores, gz [R, M_PAD] gaze; rows
    over the valid sentences."""
    ok = tl.broadcast_to(vj[None, :], a.shape)
    if THRESHOLD:
        # a_pre = a_tilde + GS^T / 2 for gaze samples (the authors' missing parentheses).
        w = threshold_weights(a, ok, m, gz, 1.0, tl.where(g, 0.5, 0.0), theta, floor, M_PAD)
    else:
        sel = topk_rows(a, ok, tl.minimum(m, k_s), M_PAD)
        w = row_l1(tl.where(sel, 1.0, 0.0) + gz)
    return w


@triton.jit
def _t2i_weights(t, gz, vj, n, g, theta, k_p, floor, THRESHOLD: tl.constexpr, N_PAD: tl.constexpr):
    """W_t2i [M_PAD, N_PAD] from t = A^T (alpha-scaled) and gz = GS; rows over all n patches, rows
    of masked slots zeroed."""
    ok = tl.broadcast_to((tl.arange(0, N_PAD) < n)[None, :], t.shape)
    if THRESHOLD:
        # t_pre = (t_tilde + GS) / 2 for gaze samples.
        half = tl.where(g, 0.5, 1.0)
        w = threshold_weights(t, ok, n, gz, half, tl.where(g, 0.5, 0.0), theta, floor, N_PAD)
    else:
        sel = topk_rows(t, ok, k_p, N_PAD)
        w = row_l1(tl.where(sel, 1.0, 0.0) + gz)
    return tl.where(vj[:, None], w, 0.0)


@triton.jit
def _mlce_parts(a, gl, rv, vj):
    """The four log-sum-exps of the MLCE rows of one instance: per sentence over patches (s2p) and
    per patch over valid sentences (p2s), negatives and positives. a, gl [N_PAD, M_PAD]."""
    neg_s = lse_with_zero(tl.where(rv[:, None] & (~gl), a, float("-inf")), 0)
    pos_s = lse_with_zero(tl.where(rv[:, None] & gl, -a, float("-inf")), 0)
    neg_p = lse_with_zero(tl.where(vj[None, :] & (~gl), a, float("-inf")), 1)
    pos_p = lse_with_zero(tl.where(vj[None, :] & gl, -a, float("-inf")), 1)
    return neg_s, pos_s, neg_p, pos_p


@triton.jit
def _feature_chunk(P, S, b, i, j, rv, dd, d, M, sPb, sPn, sSb, sSm):
    """P[b, i, dd] [len(i), len(dd)] and S[b, j, dd] [len(j), len(dd)], zero outside n, M and d."""
    d_ok = dd < d
    p = tl.load(P + b * sPb + i.to(tl.int64)[:, None] * sPn + dd[None, :], mask=rv[:, None] & d_ok[None, :], other=0.0)
    s = tl.load(S + b * sSb + j[:, None] * sSm + dd[None, :], mask=(j < M)[:, None] & d_ok[None, :], other=0.0)
    return p, s


@triton.jit
def _mse_residual(w_t, p, s, vj, dd, d, GRAD_MODE: tl.constexpr):
    """Cross_S - S = W_t2i P - S on one d chunk (p, s from _feature_chunk), fp32, zero outside the
    real slots and d: the m_k = 1 "mse" rule (SPEC 3.2)."""
    cross = mixed_dot(w_t, p, tl.zeros((w_t.shape[0], p.shape[1]), dtype=tl.float32), GRAD_MODE)
    return tl.where(vj[:, None] & (dd < d)[None, :], cross - s.to(tl.float32), 0.0)


@triton.jit
def _single_sentence_mse(P, S, b, i, j, rv, vj, w_t, acc, coef, M, d, sPb, sPn, sSb, sSm,
                         BLOCK_D: tl.constexpr, GRAD_MODE: tl.constexpr, WITH_GRAD: tl.constexpr):
    """The "mse" rule over all of d in chunks: returns (||W_t2i P - S||^2, acc), where with
    WITH_GRAD acc gains d(coef ||.||^2) / dW_t2i = 2 coef (W_t2i P - S) P^T (else it is returned
    unchanged and the square is summed)."""
    sq = coef * 0.0
    for d0 in range(0, d, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        p, s = _feature_chunk(P, S, b, i, j, rv, dd, d, M, sPb, sPn, sSb, sSm)
        r = _mse_residual(w_t, p, s, vj, dd, d, GRAD_MODE)
        if WITH_GRAD:
            acc = mixed_dot(2.0 * coef * r, tl.trans(p), acc, GRAD_MODE)
        else:
            sq += tl.sum(tl.sum(r * r, axis=1), axis=0)
    return sq, acc


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _cm_scores_kernel(P, S, A0, n, M, d, sPb, sPn, sSb, sSm,
                      R1: tl.constexpr, M_PAD: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """A0[b, rows] = P[b, rows] S[b]^T in fp32."""
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * R1 + tl.arange(0, R1)
    j = tl.arange(0, M_PAD)
    acc = tl.zeros((R1, M_PAD), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < d
        p = tl.load(P + b * sPb + rows.to(tl.int64)[:, None] * sPn + dd[None, :],
                    mask=(rows < n)[:, None] & d_ok[None, :], other=0.0)
        s = tl.load(S + b * sSb + j[None, :] * sSm + dd[:, None], mask=d_ok[:, None] & (j < M)[None, :], other=0.0)
        acc = tl.dot(p, s, acc, input_precision=DOT_PREC)
    tl.store(A0 + (b * n + rows.to(tl.int64))[:, None] * M + j[None, :], acc,
             mask=(rows < n)[:, None] & (j < M)[None, :])


@triton.jit
def _cm_fwd_kernel(P, S, SMASK, GS, USE_GAZE, THETA, ALPHA, A0, TERMS, LSE_COL,
                   n, M, d, sPb, sPn, sSb, sSm, k_s, k_p, floor, tau,
                   N_PAD: tl.constexpr, M_PAD: tl.constexpr, R: tl.constexpr, BLOCK_D: tl.constexpr,
                   THRESHOLD: tl.constexpr, WITH_MLCE: tl.constexpr, WITH_EGM: tl.constexpr,
                   MSE: tl.constexpr, EGM_GAZE: tl.constexpr, GRAD_MODE: tl.constexpr):
    """One program per instance b: TERMS[b] = (mlce_s2p, mlce_p2s, egm_image, egm_text), and the
    column log-sum-exp of the image-side logits (LSE_COL[b], reused by the backward)."""
    b, j, vj, m, g, theta, alpha, i, rv, a0, a, gz = _instance_tiles(SMASK, USE_GAZE, THETA, ALPHA, A0, GS, n, M,
                                                                      N_PAD, M_PAD)
    zero = alpha * 0.0
    s2p = zero
    p2s = zero
    e_img = zero
    e_txt = zero
    if WITH_MLCE:
        neg_s, pos_s, neg_p, pos_p = _mlce_parts(a, gz > tau, rv, vj)
        s2p = tl.sum(tl.where(vj, neg_s + pos_s, 0.0), axis=0) / tl.maximum(m, 1).to(tl.float32)
        p2s = tl.sum(tl.where(rv, neg_p + pos_p, 0.0), axis=0) / n
        s2p = tl.where(g, s2p, 0.0)
        p2s = tl.where(g, p2s, 0.0)
    if WITH_EGM:
        ge = g & EGM_GAZE  # the gaze flag as EGM sees it
        # Text side: M x M logits alpha * W_t2i A0, in registers.
        w_t = _t2i_weights(tl.trans(a), tl.trans(tl.where(ge, gz, 0.0)), vj, n, ge, theta, k_p, floor, THRESHOLD,
                           N_PAD)
        lt = alpha * tl.dot(w_t, a0, input_precision="ieee")
        okt = vj[:, None] & vj[None, :]
        diag_t = tl.sum(tl.where(j[:, None] == j[None, :], lt, 0.0), axis=1)
        clip_t = tl.where(vj, masked_lse(lt, okt, 1) + masked_lse(lt, okt, 0) - 2 * diag_t, 0.0)
        clip_t = 0.5 * tl.sum(clip_t, axis=0) / tl.maximum(m, 1).to(tl.float32)

        # Image side: n x n logits alpha * W_i2t A0^T in blocks of R rows; column LSE online.
        cols = tl.arange(0, N_PAD)
        cv = cols < n
        acc_rows = zero
        col_m = tl.full((N_PAD,), float("-inf"), tl.float32)
        col_s = tl.zeros((N_PAD,), dtype=tl.float32)
        for r0 in range(0, n, R):
            rows = r0 + tl.arange(0, R)
            rvb = rows < n
            a0b = _load_a0(A0, b, rows, n, M, M_PAD)
            wb = _i2t_weights(alpha * a0b, _load_gaze(GS, b, rows, vj, ge, n, M, M_PAD), vj, m, ge, theta, k_s, floor,
                              THRESHOLD, M_PAD)
            li = alpha * tl.dot(wb, tl.trans(a0), input_precision="ieee")
            ok = rvb[:, None] & cv[None, :]
            diag = tl.sum(tl.where(rows[:, None] == cols[None, :], li, 0.0), axis=1)
            acc_rows += tl.sum(tl.where(rvb, masked_lse(li, ok, 1) - 2 * diag, 0.0), axis=0)
            lm = tl.where(ok, li, float("-inf"))
            new_m = tl.maximum(col_m, tl.max(lm, axis=0))
            safe = tl.where(new_m == float("-inf"), 0.0, new_m)
            col_s = col_s * tl.exp(col_m - safe) + tl.sum(tl.exp(lm - safe[None, :]), axis=0)
            col_m = new_m
        lse_col = tl.where(cv, tl.where(col_m == float("-inf"), 0.0, col_m) + tl.log(tl.where(cv, col_s, 1.0)), 0.0)
        tl.store(LSE_COL + b * n + cols, lse_col, mask=cv)
        clip_i = 0.5 * (acc_rows + tl.sum(lse_col, axis=0)) / n

        # m_k = 1: "drop" both terms; "mse": ||Cross_S - S||^2 for the text term, 0 for the image term.
        e_img = tl.where(m != 1, clip_i, 0.0)
        e_txt = tl.where(m != 1, clip_t, 0.0)
        if MSE:
            if m == 1:
                e_txt, _ = _single_sentence_mse(P, S, b, i, j, rv, vj, w_t, w_t, zero + 1.0, M, d, sPb, sPn, sSb, sSm,
                                                BLOCK_D, GRAD_MODE, False)
    tl.store(TERMS + b * 4 + 0, s2p)
    tl.store(TERMS + b * 4 + 1, p2s)
    tl.store(TERMS + b * 4 + 2, e_img)
    tl.store(TERMS + b * 4 + 3, e_txt)


@triton.jit
def _cm_bwd_scores_kernel(P, S, SMASK, GS, USE_GAZE, THETA, ALPHA, A0, LSE_COL, GTERMS,
                          DA_FULL, DA_ROWS, DALPHA,
                          n, M, d, sPb, sPn, sSb, sSm, k_s, k_p, floor, tau,
                          N_PAD: tl.constexpr, M_PAD: tl.constexpr, R: tl.constexpr, BLOCK_D: tl.constexpr,
                          THRESHOLD: tl.constexpr, WITH_MLCE: tl.constexpr, WITH_EGM: tl.constexpr,
                          MSE: tl.constexpr, EGM_GAZE: tl.constexpr, GRAD_MODE: tl.constexpr):
    """One program per instance b: DA_FULL[b] (+ DA_ROWS[b] for the threshold omega) = dLoss/dA0
    (alpha folded in) and DALPHA[b] = this instance's share of dLoss/dalpha. GTERMS[b] holds the
    upstream gradients of the 4 terms."""
    b, j, vj, m, g, theta, alpha, i, rv, a0, a, gz = _instance_tiles(SMASK, USE_GAZE, THETA, ALPHA, A0, GS, n, M,
                                                                      N_PAD, M_PAD)
    # da: gradient w.r.t. the scaled scores A = alpha A0 (MLCE, omega); da0: w.r.t. A0 through the
    # CLIP logits' A0 factor (alpha included); dal: w.r.t. alpha through the logits.
    da = tl.zeros((N_PAD, M_PAD), dtype=tl.float32)
    da0 = tl.zeros((N_PAD, M_PAD), dtype=tl.float32)
    dal = alpha * 0.0
    if WITH_MLCE:
        gl = gz > tau
        neg_s, pos_s, neg_p, pos_p = _mlce_parts(a, gl, rv, vj)
        c_s = tl.where(g, tl.load(GTERMS + b * 4 + 0), 0.0) / tl.maximum(m, 1).to(tl.float32)
        c_p = tl.where(g, tl.load(GTERMS + b * 4 + 1), 0.0) / n
        # d/ds log(1 + sum e^s) = softmax with the zero logit; positives enter as -s.
        d_s = tl.where(rv[:, None] & (~gl), tl.exp(a - neg_s[None, :]), 0.0) \
            - tl.where(rv[:, None] & gl, tl.exp(-a - pos_s[None, :]), 0.0)
        d_p = tl.where(vj[None, :] & (~gl), tl.exp(a - neg_p[:, None]), 0.0) \
            - tl.where(vj[None, :] & gl, tl.exp(-a - pos_p[:, None]), 0.0)
        da += tl.where(vj[None, :], c_s * d_s, 0.0) + tl.where(rv[:, None], c_p * d_p, 0.0)
    if WITH_EGM:
        keep = m != 1  # both CLIP terms vanish for one-sentence texts (drop and mse alike)
        ge = g & EGM_GAZE  # the gaze flag as EGM sees it
        # ---- text side: L_t = alpha W_t2i A0 [M_PAD, M_PAD] ----
        t = tl.trans(a)
        gzt = tl.trans(tl.where(ge, gz, 0.0))
        w_t = _t2i_weights(t, gzt, vj, n, ge, theta, k_p, floor, THRESHOLD, N_PAD)
        lt_raw = tl.dot(w_t, a0, input_precision="ieee")
        lt = alpha * lt_raw
        okt = vj[:, None] & vj[None, :]
        eye_t = j[:, None] == j[None, :]
        c_t = tl.where(keep, 0.5 * tl.load(GTERMS + b * 4 + 3), 0.0) / tl.maximum(m, 1).to(tl.float32)
        lse_r = masked_lse(lt, okt, 1)
        lse_c = masked_lse(lt, okt, 0)
        # Softmax over rows + over columns - 2 I (each CE's gradient); exp of -inf outside okt.
        soft = tl.exp(tl.where(okt, lt - lse_r[:, None], float("-inf"))) \
            + tl.exp(tl.where(okt, lt - lse_c[None, :], float("-inf"))) - 2.0 * tl.where(eye_t & okt, 1.0, 0.0)
        dlt = c_t * soft
        dal += tl.sum(tl.sum(dlt * lt_raw, axis=1), axis=0)
        da0 += alpha * tl.dot(tl.trans(w_t), dlt, input_precision="ieee")
        if THRESHOLD:
            dw_t = alpha * tl.dot(dlt, tl.trans(a0), input_precision="ieee")
            if MSE:
                if m == 1:
                    # ||W_t2i P - S||^2: dW_t2i += 2 g (W_t2i P - S) P^T over valid slots.
                    _, dw_t = _single_sentence_mse(P, S, b, i, j, rv, vj, w_t, dw_t, tl.load(GTERMS + b * 4 + 3), M, d,
                                                   sPb, sPn, sSb, sSm, BLOCK_D, GRAD_MODE, True)
            dt = threshold_weights_bwd(tl.where(vj[:, None], dw_t, 0.0), t,
                                       tl.broadcast_to(rv[None, :], t.shape), n, gzt,
                                       tl.where(ge, 0.5, 1.0), tl.where(ge, 0.5, 0.0), theta, floor, N_PAD)
            da += tl.trans(dt)

        # ---- image side: L_i = alpha W_i2t A0^T, rows in blocks of R ----
        cols = tl.arange(0, N_PAD)
        cv = cols < n
        lse_col = tl.load(LSE_COL + b * n + cols, mask=cv, other=0.0)
        c_i = tl.where(keep, 0.5 * tl.load(GTERMS + b * 4 + 2), 0.0) / n
        for r0 in range(0, n, R):
            rows = r0 + tl.arange(0, R)
            rvb = rows < n
            a0b = _load_a0(A0, b, rows, n, M, M_PAD)
            ab = alpha * a0b
            gzb = _load_gaze(GS, b, rows, vj, ge, n, M, M_PAD)
            wb = _i2t_weights(ab, gzb, vj, m, ge, theta, k_s, floor, THRESHOLD, M_PAD)
            li_raw = tl.dot(wb, tl.trans(a0), input_precision="ieee")
            li = alpha * li_raw
            ok = rvb[:, None] & cv[None, :]
            lse_row = masked_lse(li, ok, 1)
            soft_i = tl.exp(tl.where(ok, li - lse_row[:, None], float("-inf"))) \
                + tl.exp(tl.where(ok, li - lse_col[None, :], float("-inf"))) \
                - 2.0 * tl.where(ok & (rows[:, None] == cols[None, :]), 1.0, 0.0)
            dli = c_i * soft_i
            dal += tl.sum(tl.sum(dli * li_raw, axis=1), axis=0)
            da0 += alpha * tl.dot(tl.trans(dli), wb, input_precision="ieee")
            if THRESHOLD:
                dwb = alpha * tl.dot(dli, a0, input_precision="ieee")
                dab = threshold_weights_bwd(dwb, ab, tl.broadcast_to(vj[None, :], ab.shape), m, gzb,
                                            1.0, tl.where(ge, 0.5, 0.0), theta, floor, M_PAD)
                dal += tl.sum(tl.sum(dab * a0b, axis=1), axis=0)
                tl.store(DA_ROWS + (b * n + rows.to(tl.int64))[:, None] * M + j[None, :], alpha * dab,
                         mask=rvb[:, None] & (j < M)[None, :])
    dal += tl.sum(tl.sum(da * a0, axis=1), axis=0)
    da0 += alpha * da
    tl.store(DA_FULL + (b * n + i.to(tl.int64))[:, None] * M + j[None, :], da0, mask=rv[:, None] & (j < M)[None, :])
    tl.store(DALPHA + b, dal)


@triton.jit
def _cm_bwd_feat_kernel(P, S, SMASK, GS, USE_GAZE, THETA, ALPHA, A0, GTERMS, DA_FULL, DA_ROWS, DP, DS,
                        n, M, d, sPb, sPn, sSb, sSm, k_p, floor,
                        N_PAD: tl.constexpr, M_PAD: tl.constexpr, BLOCK_DO: tl.constexpr,
                        THRESHOLD: tl.constexpr, WITH_EGM: tl.constexpr, MSE: tl.constexpr,
                        EGM_GAZE: tl.constexpr, GRAD_MODE: tl.constexpr):
    """dP[b, :, dblock] = dA0 S[b, :, dblock] and dS[b, :, dblock] = dA0^T P[b, :, dblock], plus the
    direct terms of ||W_t2i P - S||^2 for one-sentence texts under the mse rule."""
    b = tl.program_id(0).to(tl.int64)
    dd = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    d_ok = dd < d
    j, vj, m, g, theta, alpha = _instance(SMASK, USE_GAZE, THETA, ALPHA, b, M, M_PAD)
    ge = g & EGM_GAZE
    i = tl.arange(0, N_PAD)
    rv = i < n
    da0 = _load_a0(DA_FULL, b, i, n, M, M_PAD)
    if THRESHOLD:
        da0 += _load_a0(DA_ROWS, b, i, n, M, M_PAD)
    p, s = _feature_chunk(P, S, b, i, j, rv, dd, d, M, sPb, sPn, sSb, sSm)
    dp = mixed_dot(da0, s, tl.zeros((N_PAD, BLOCK_DO), dtype=tl.float32), GRAD_MODE)
    ds = mixed_dot(tl.trans(da0), p, tl.zeros((M_PAD, BLOCK_DO), dtype=tl.float32), GRAD_MODE)
    if WITH_EGM:
        if MSE:
            if m == 1:
                a0 = _load_a0(A0, b, i, n, M, M_PAD)
                gz = _load_gaze(GS, b, i, vj, ge, n, M, M_PAD)
                w_t = _t2i_weights(tl.trans(alpha * a0), tl.trans(gz), vj, n, ge, theta, k_p, floor, THRESHOLD, N_PAD)
                dcross = 2.0 * tl.load(GTERMS + b * 4 + 3) * _mse_residual(w_t, p, s, vj, dd, d, GRAD_MODE)
                dp += tl.dot(tl.trans(w_t), dcross, input_precision="ieee")
                ds -= dcross
    tl.store(DP + b * sPb + i.to(tl.int64)[:, None] * sPn + dd[None, :], dp.to(DP.dtype.element_ty),
             mask=rv[:, None] & d_ok[None, :])
    tl.store(DS + b * sSb + j[:, None] * sSm + dd[None, :], ds.to(DS.dtype.element_ty),
             mask=(j < M)[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Launch configuration (autotuned on GPUs keyed on n, M, d and dtypes; fixed under the interpreter)
# ----------------------------------------------------------------------------------------------
_KEY = ["n", "M", "d"]


def _tuned(kernel, configs):
    return kernel if interpreting() else triton.autotune(configs=configs, key=_KEY)(kernel)


_scores = _tuned(_cm_scores_kernel, [triton.Config({}, num_warps=4, num_stages=s) for s in (2, 3, 4)])
# One program holds whole [n, M] and [M, n] tiles: more warps for larger n (ptxas on sm_90 spills
# at 4 warps for n = 196); the autotuner picks per (n, M, d).
_fwd = _tuned(_cm_fwd_kernel, [triton.Config({}, num_warps=w, num_stages=1) for w in (4, 8, 16)])
_bwd_scores = _tuned(_cm_bwd_scores_kernel, [triton.Config({}, num_warps=w, num_stages=1) for w in (4, 8, 16)])
_bwd_feat = _tuned(_cm_bwd_feat_kernel,
                   [triton.Config({"BLOCK_DO": bdo}, num_warps=w, num_stages=1) for bdo in (32, 64) for w in (4, 8)])
_INTERPRET_BLOCK_DO = 16


def _meta(params, blocks: CMBlocks, dtype: torch.dtype) -> dict:
    """The constexprs every kernel of one launch shares; params: egma_fast.ops.CrossMapParams."""
    meta = dict(N_PAD=blocks.N_PAD, M_PAD=blocks.M_PAD, THRESHOLD=params.omega == "threshold",
                WITH_EGM=bool(params.with_egm), MSE=params.single_sentence == "mse",
                EGM_GAZE=bool(params.egm_use_gaze), GRAD_MODE=grad_mode(dtype))
    if interpreting():
        meta["num_warps"] = 1
    return meta


def cross_map_forward(
    P: torch.Tensor, S: torch.Tensor, smask: torch.Tensor, GS: torch.Tensor, use_gaze: torch.Tensor,
    theta: torch.Tensor, alpha: torch.Tensor, params
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward. P [B, n, d], S [B, M, d] contiguous; smask [B, M] and use_gaze [B] uint8;
    GS [B, M, n] contiguous; theta [B] fp32; alpha [1] fp32; params: egma_fast.ops.CrossMapParams
    (k_patches already clipped to n).
    Returns TERMS [B, 4] fp32 (mlce_s2p, mlce_p2s, egm_image, egm_text), A0 [B, n, M] fp32 and the
    image-side column LSE [B, n] fp32 (the last two are saved for the backward)."""
    B, n, d = P.shape
    M = S.shape[1]
    blocks = cm_blocks(n, M, d, P.dtype)
    terms = torch.empty(B, 4, device=P.device, dtype=torch.float32)
    a0 = torch.empty(B, n, M, device=P.device, dtype=torch.float32)
    lse_col = torch.zeros(B, n, device=P.device, dtype=torch.float32)
    if B == 0:
        return terms, a0, lse_col
    strides = (P.stride(0), P.stride(1), S.stride(0), S.stride(1))
    extra = dict(num_warps=1) if interpreting() else {}
    _scores[(B, triton.cdiv(n, blocks.R1))](P, S, a0, n, M, d, *strides, R1=blocks.R1, M_PAD=blocks.M_PAD,
                                             BLOCK_D=blocks.BLOCK_D, DOT_PREC=dot_precision(P.dtype), **extra)
    _fwd[(B,)](P, S, smask, GS, use_gaze, theta, alpha, a0, terms, lse_col,
               n, M, d, *strides, params.k_sentences, params.k_patches, params.floor, params.gaze_threshold,
               R=blocks.R, BLOCK_D=blocks.BLOCK_D, WITH_MLCE=bool(params.with_mlce), **_meta(params, blocks, P.dtype))
    return terms, a0, lse_col


def cross_map_backward(
    gterms: torch.Tensor, P: torch.Tensor, S: torch.Tensor, smask: torch.Tensor, GS: torch.Tensor,
    use_gaze: torch.Tensor, theta: torch.Tensor, alpha: torch.Tensor, a0: torch.Tensor, lse_col: torch.Tensor,
    params
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward from the upstream gradients gterms [B, 4] fp32. Returns dP, dS (features'
    dtype) and dalpha per instance [B] fp32 (the caller sums it)."""
    B, n, d = P.shape
    M = S.shape[1]
    blocks = cm_blocks(n, M, d, P.dtype)
    dP = torch.empty_like(P)
    dS = torch.empty_like(S)
    dalpha = torch.empty(B, device=P.device, dtype=torch.float32)
    if B == 0:
        return dP, dS, dalpha
    meta = _meta(params, blocks, P.dtype)
    meta["THRESHOLD"] = threshold = meta["THRESHOLD"] and meta["WITH_EGM"]
    da_full = torch.empty(B, n, M, device=P.device, dtype=torch.float32)
    da_rows = torch.empty(B, n, M, device=P.device, dtype=torch.float32) if threshold else da_full
    strides = (P.stride(0), P.stride(1), S.stride(0), S.stride(1))
    _bwd_scores[(B,)](P, S, smask, GS, use_gaze, theta, alpha, a0, lse_col, gterms, da_full, da_rows, dalpha,
                      n, M, d, *strides, params.k_sentences, params.k_patches, params.floor, params.gaze_threshold,
                      R=blocks.R, BLOCK_D=blocks.BLOCK_D, WITH_MLCE=bool(params.with_mlce), **meta)
    if interpreting():
        meta["BLOCK_DO"] = _INTERPRET_BLOCK_DO
    grid = lambda meta_: (B, triton.cdiv(d, meta_["BLOCK_DO"]))  # noqa: E731
    _bwd_feat[grid](P, S, smask, GS, use_gaze, theta, alpha, a0, gterms, da_full, da_rows, dP, dS,
                    n, M, d, *strides, params.k_patches, params.floor, **meta)
    return dP, dS, dalpha
