"""Fused late interaction over all Bi x Bt (image, text) pairs (SPEC 2.1), without ever forming the
Bi x Bt x n x M similarity tensor.

Contract: egma_fast.reference.late_interaction (unscaled; alpha is applied by the caller).

Tiling. A similarity tile X [BLOCK_N patches, BLOCK_L = BLOCK_T texts x M_PAD slots] of one image
against a block of texts is always computed by :func:`_scores_tile`: the same loop over d in
BLOCK_D chunks in every kernel, so the backward's recomputed tile (and therefore its argmax) is the
forward's bitwise. Column (l, j) of a tile is sentence slot j of text l; slots j >= M (power-of-two
padding) never exist, slots j < M with sent_mask False are masked.

Forward   (grid Bi x text blocks, in GEMM-style groups of images for L2 reuse): loop over patch
          chunks; image side: max over each text's slots per patch, summed into zI; text side:
          per-slot running max and argmax over patches. Saves the winning patch per (k, l, slot)
          (uint8 / int16 / int32) for the backward.
Backward  dP (grid Bi x patch blocks x d-out blocks) loops over every text block; dS (grid text
          blocks x d-out blocks x image splits) loops over the images of its split. Both recompute
          the tile, build the sparse gradient tile G (dzI/n_valid at each patch's winning slot,
          dzT/m_l at each slot's winning patch) and multiply it by S (dP) or P (dS) on the tensor
          cores. Each gradient element is written once (no atomics): deterministic.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .utils import dot_precision, grad_mode, interpreting, mixed_dot, next_pow2, pick_block

__all__ = ["LIBlocks", "li_blocks", "late_interaction_backward", "late_interaction_forward", "winner_dtype"]


# One num_warps for all three kernels (ptxas on sm_90: 8 warps keeps the 64 x 64 fp32 tiles and
# their 3-D max / argmax epilogues in registers; 4 warps spills).
_NUM_WARPS = 8


def winner_dtype(n: int) -> torch.dtype:
    """Smallest integer dtype that holds a patch index < n."""
    if n <= 255:
        return torch.uint8
    if n <= 32767:
        return torch.int16
    return torch.int32


@dataclass(frozen=True)
class LIBlocks:
    """Tile sizes shared by the forward and both backward kernels (they must agree for the
    recomputed similarity tiles to be bitwise the forward's)."""

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
    # Tensor-core dots need every tile dimension >= 16: BLOCK_T * M_PAD = 64 slots (or M_PAD > 64).
    block_t = max(1, 64 // m_pad)
    block_n = pick_block(n, (64, 32, 16))
    if dtype in (torch.bfloat16, torch.float16) and n > 32:
        # Hopper's wgmma needs 64-row tiles here (8 warps as 4 x 2); at 32 rows Triton emits the
        # older mma.sync (the PTX says so: benchmarks/gpu/ptxas_report.py). n = 196 then pads to
        # 256 rows instead of 224, cheaper than the slower instruction.
        block_n = 64
    block_d = 64 if dtype in (torch.bfloat16, torch.float16) else 32
    return LIBlocks(BLOCK_N=block_n, BLOCK_T=block_t, M_PAD=m_pad, BLOCK_D=block_d, num_warps=_NUM_WARPS)


# ----------------------------------------------------------------------------------------------
# Shared tile pieces
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
def _grad_tile(X, i, p_ok, sv, zslot, win, c_img, c_txt, img_has_patch,
               BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, M_PAD: tl.constexpr):
    """Sparse gradient of (zI, zT) with respect to one similarity tile X [BLOCK_N, BLOCK_L]:
    c_img[col] at each valid patch's first winning slot (none where the text's zero slot wins:
    zslot [BLOCK_T] and every real slot below 0), plus c_txt[col] at each valid slot's saved
    winning patch ``win``."""
    xi = tl.reshape(tl.where(sv[None, :], X, float("-inf")), (BLOCK_N, BLOCK_T, M_PAD))
    best = tl.argmax(xi, axis=2, tie_break_left=True)
    best = tl.where(zslot[None, :] & (tl.max(xi, axis=2) < 0), M_PAD, best)
    # Each column (l, j) sees its text's winning slot: broadcast over the slots, back to 2-D.
    best = tl.reshape(tl.broadcast_to(best[:, :, None], (BLOCK_N, BLOCK_T, M_PAD)), (BLOCK_N, BLOCK_T * M_PAD))
    hit = best == (tl.arange(0, BLOCK_T * M_PAD) % M_PAD)[None, :]
    g = tl.where(hit & sv[None, :] & p_ok[:, None], c_img[None, :], 0.0)
    g += tl.where((win[None, :].to(tl.int32) == i[:, None]) & sv[None, :] & img_has_patch, c_txt[None, :], 0.0)
    return g


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["Bi", "Bt"])
def _li_fwd_kernel(P, S, SMASK, PMASK, NVALID, MVALID, ZSLOT, ZI, ZT, WIN,
                   Bi, Bt, n, M, d, sPb, sPn, sSb, sSm,
                   BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
                   M_PAD: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, GROUP_K: tl.constexpr):
    """One program: image k against texts [l0, l0 + BLOCK_T). Writes zI, zT [Bi, Bt] and WIN [Bi, Bt, M].

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
        xi = tl.where(sv[None, :], X, float("-inf"))
        row_max = tl.max(tl.reshape(xi, (BLOCK_N, BLOCK_T, M_PAD)), axis=2)
        row_max = tl.where(zs_t[None, :], tl.maximum(row_max, 0.0), row_max)  # the zero slot
        zi += tl.sum(tl.where(p_ok[:, None] & (m_t > 0)[None, :], row_max, 0.0), axis=0)
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
    tl.store(WIN + (k * Bt + l) * M + j, run_arg.to(WIN.dtype.element_ty), mask=slot_ok)


@triton.jit(do_not_specialize=["Bt"])
def _li_bwd_dp_kernel(P, S, SMASK, PMASK, NVALID, MVALID, ZSLOT, WIN, DZI, DZT, DP,
                      Bt, n, M, d, sPb, sPn, sSb, sSm,
                      BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
                      M_PAD: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
                      GRAD_MODE: tl.constexpr, BLOCK_DO: tl.constexpr):
    """One program: dP[k, patch block, d-out block] = sum over all texts of G_tile @ S_tile."""
    BLOCK_L: tl.constexpr = BLOCK_T * M_PAD
    k = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    do = tl.program_id(2) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    do_ok = do < d
    p_ok = tl.load(PMASK + k * n + i, mask=i < n, other=0) != 0
    nv = tl.load(NVALID + k)
    inv_nv = 1.0 / tl.maximum(nv, 1).to(tl.float32)
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
        c_img = tl.load(DZI + k * Bt + l, mask=l < Bt, other=0.0) * inv_nv
        c_txt = tl.load(DZT + k * Bt + l, mask=l < Bt, other=0.0) / tl.maximum(m_l, 1).to(tl.float32)
        win = tl.load(WIN + (k * Bt + l) * M + j, mask=slot_ok, other=0)
        X = _scores_tile(P, S, k, i, l, j, slot_ok, n, d, sPb, sPn, sSb, sSm, BLOCK_N, BLOCK_L, BLOCK_D, DOT_PREC)
        G = _grad_tile(X, i, p_ok, sv, zs_t, win, c_img, c_txt, nv > 0, BLOCK_N, BLOCK_T, M_PAD)
        s_out = tl.load(S + l.to(tl.int64)[:, None] * sSb + j[:, None] * sSm + do[None, :],
                        mask=slot_ok[:, None] & do_ok[None, :], other=0.0)
        acc = mixed_dot(G, s_out, acc, GRAD_MODE)
    tl.store(DP + k * sPb + i.to(tl.int64)[:, None] * sPn + do[None, :], acc.to(DP.dtype.element_ty),
             mask=(i < n)[:, None] & do_ok[None, :])


@triton.jit(do_not_specialize=["Bi", "Bt", "k_per_split"])
def _li_bwd_ds_kernel(P, S, SMASK, PMASK, NVALID, MVALID, ZSLOT, WIN, DZI, DZT, OUT,
                      Bi, Bt, n, M, d, sPb, sPn, sSb, sSm, k_per_split,
                      BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
                      M_PAD: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
                      GRAD_MODE: tl.constexpr, BLOCK_DO: tl.constexpr):
    """One program: OUT[split, text block, d-out block] = sum over the split's images and all their
    patch chunks of G_tile^T @ P_tile. OUT is dS itself ([Bt, M, d]) when there is one split, else an
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
    acc = tl.zeros((BLOCK_L, BLOCK_DO), dtype=tl.float32)
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, Bi)
    for kk in range(k_lo, k_hi):
        k = tl.cast(kk, tl.int64)
        nv = tl.load(NVALID + k)
        c_img = tl.load(DZI + k * Bt + l, mask=l < Bt, other=0.0) / tl.maximum(nv, 1).to(tl.float32)
        c_txt = tl.load(DZT + k * Bt + l, mask=l < Bt, other=0.0) * inv_m
        win = tl.load(WIN + (k * Bt + l) * M + j, mask=slot_ok, other=0)
        for i0 in range(0, n, BLOCK_N):
            i = i0 + tl.arange(0, BLOCK_N)
            p_ok = tl.load(PMASK + k * n + i, mask=i < n, other=0) != 0
            X = _scores_tile(P, S, k, i, l, j, slot_ok, n, d, sPb, sPn, sSb, sSm, BLOCK_N, BLOCK_L, BLOCK_D, DOT_PREC)
            G = _grad_tile(X, i, p_ok, sv, zs_t, win, c_img, c_txt, nv > 0, BLOCK_N, BLOCK_T, M_PAD)
            p_out = tl.load(P + k * sPb + i.to(tl.int64)[:, None] * sPn + do[None, :],
                            mask=(i < n)[:, None] & do_ok[None, :], other=0.0)
            acc = mixed_dot(tl.trans(G), p_out, acc, GRAD_MODE)
    out = OUT + split.to(tl.int64) * Bt * M * d + (l.to(tl.int64)[:, None] * M + j[:, None]) * d + do[None, :]
    tl.store(out, acc.to(OUT.dtype.element_ty), mask=slot_ok[:, None] & do_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Launch configuration: autotuned on GPUs (keyed on n, M, d and the dtypes, never on the batch
# sizes), fixed under the interpreter. Only launch parameters that leave the similarity tile's
# arithmetic unchanged are tuned (stages; the backward's d-out block), and num_warps is fixed per
# LIBlocks, so every kernel recomputes the forward's tiles bitwise.
# ----------------------------------------------------------------------------------------------
_KEY = ["n", "M", "d"]


def _tuned(kernel, configs):
    return kernel if interpreting() else triton.autotune(configs=configs, key=_KEY)(kernel)


_fwd = _tuned(_li_fwd_kernel,
              [triton.Config({"GROUP_K": g}, num_warps=_NUM_WARPS, num_stages=s) for g in (4, 8) for s in (2, 3, 4)])
_bwd_configs = [triton.Config({"BLOCK_DO": bdo}, num_warps=_NUM_WARPS, num_stages=s) for bdo in (64, 128, 256) for s in (2, 3)]
_bwd_dp = _tuned(_li_bwd_dp_kernel, _bwd_configs)
_bwd_ds = _tuned(_li_bwd_ds_kernel, _bwd_configs)

_INTERPRET_BLOCK_DO = 32
_INTERPRET_GROUP_K = 2

#: Tests may force the number of image splits of the dS kernel (None: heuristic).
FORCE_DS_SPLITS: int | None = None


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


def _common(P: torch.Tensor, S: torch.Tensor, blocks: LIBlocks) -> dict:
    return dict(BLOCK_N=blocks.BLOCK_N, BLOCK_T=blocks.BLOCK_T, M_PAD=blocks.M_PAD,
                BLOCK_D=blocks.BLOCK_D, DOT_PREC=dot_precision(P.dtype))


def late_interaction_forward(
    P: torch.Tensor, S: torch.Tensor, smask: torch.Tensor, pmask: torch.Tensor, zslot: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward. P [Bi, n, d], S [Bt, M, d] contiguous (same float dtype); smask [Bt, M],
    pmask [Bi, n] and zslot [Bt] (texts with a zero slot) uint8. Returns zI, zT [Bi, Bt] fp32 and WIN [Bi, Bt, M] (winner_dtype(n))."""
    Bi, n, d = P.shape
    Bt, M, _ = S.shape
    blocks = li_blocks(n, M, d, P.dtype)
    zI = torch.empty(Bi, Bt, device=P.device, dtype=torch.float32)
    zT = torch.empty(Bi, Bt, device=P.device, dtype=torch.float32)
    win = torch.empty(Bi, Bt, M, device=P.device, dtype=winner_dtype(n))
    if Bi == 0 or Bt == 0:
        return zI, zT, win
    nvalid = pmask.sum(1, dtype=torch.int32)
    mvalid = smask.sum(1, dtype=torch.int32)
    meta = _common(P, S, blocks)
    if interpreting():
        meta.update(num_warps=blocks.num_warps, GROUP_K=_INTERPRET_GROUP_K)
    grid = (Bi * triton.cdiv(Bt, blocks.BLOCK_T),)
    _fwd[grid](P, S, smask, pmask, nvalid, mvalid, zslot, zI, zT, win,
               Bi, Bt, n, M, d, P.stride(0), P.stride(1), S.stride(0), S.stride(1), **meta)
    return zI, zT, win


def late_interaction_backward(
    dzI: torch.Tensor, dzT: torch.Tensor, P: torch.Tensor, S: torch.Tensor, smask: torch.Tensor,
    pmask: torch.Tensor, zslot: torch.Tensor, win: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the two backward kernels. dzI, dzT [Bi, Bt] fp32 contiguous. Returns dP, dS in the
    features' dtype."""
    Bi, n, d = P.shape
    Bt, M, _ = S.shape
    blocks = li_blocks(n, M, d, P.dtype)
    dP = torch.empty_like(P)
    dS = torch.empty_like(S)
    if Bi == 0 or Bt == 0:
        return dP.zero_(), dS.zero_()
    nvalid = pmask.sum(1, dtype=torch.int32)
    mvalid = smask.sum(1, dtype=torch.int32)
    meta = _common(P, S, blocks)
    meta["GRAD_MODE"] = grad_mode(P.dtype)
    if interpreting():
        meta.update(num_warps=blocks.num_warps, BLOCK_DO=_INTERPRET_BLOCK_DO)
    strides = (P.stride(0), P.stride(1), S.stride(0), S.stride(1))

    grid_dp = lambda meta_: (Bi, triton.cdiv(n, blocks.BLOCK_N), triton.cdiv(d, meta_["BLOCK_DO"]))  # noqa: E731
    _bwd_dp[grid_dp](P, S, smask, pmask, nvalid, mvalid, zslot, win, dzI, dzT, dP, Bt, n, M, d, *strides, **meta)

    splits = _ds_splits(Bi, Bt, blocks, P.device)
    out = dS if splits == 1 else torch.empty(splits, Bt, M, d, device=S.device, dtype=torch.float32)
    grid_ds = lambda meta_: (triton.cdiv(Bt, blocks.BLOCK_T), triton.cdiv(d, meta_["BLOCK_DO"]), splits)  # noqa: E731
    _bwd_ds[grid_ds](P, S, smask, pmask, nvalid, mvalid, zslot, win, dzI, dzT, out,
                     Bi, Bt, n, M, d, *strides, triton.cdiv(Bi, splits), **meta)
    if splits > 1:
        dS = out.sum(0).to(S.dtype)
    return dP, dS
