"""Pure-PyTorch EGMA, written for reading, not speed: the oracle every fast path is tested against.

It follows shared/SPEC.md section by section, for both presets and every option, vectorised over
the batch. It materialises the B x B x n x M similarity tensor (that is what the fused kernels
avoid) and is exact in float64. It depends on torch alone.

Shapes used throughout:
    B, Bi, Bt   batch (images, texts)          n   patches per image
    M           sentence slots per text        d   feature width
    P [Bi, n, d] patch features, S [Bt, M, d] sentence features, sent_mask [Bt, M] bool.

Two functions here are the contracts of the fused ops (egma_fast.ops): :func:`late_interaction`
and :func:`cross_map`. A backend implements exactly their values and gradients.

Ties: every max / min here goes through ``torch.max(dim)`` / ``torch.min(dim)`` or a stable sort,
so the gradient goes entirely to the first maximiser / minimiser (SPEC 2.1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from egma_fast.config import EGMAConfig

__all__ = [
    "CrossMapParams",
    "CrossMapTerms",
    "EGMATerms",
    "clip_loss",
    "cross_map",
    "cross_map_params",
    "egm_sample_thetas",
    "egm_sample_weights",
    "egma_loss",
    "fine_grained_contrastive",
    "late_interaction",
    "logit_scale_to_alpha",
    "mlce",
    "pool_gaze",
]


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else (fp32, bf16, fp16) computes in fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# ----------------------------------------------------------------------------------------------
# SPEC 1: logit scale
# ----------------------------------------------------------------------------------------------
def logit_scale_to_alpha(t: torch.Tensor, config: EGMAConfig) -> torch.Tensor:
    """alpha = e^t with t clamped to [0, logit_scale_max].

    ``clamp``: differentiable clamp (gradient zero outside the range). ``inplace``: the authors'
    ``logit_scale.data = clamp(...)``: the stored value is clamped in place, gradient unmasked.
    Returns a 0-d tensor.
    """
    t = t.reshape(())
    if config.logit_scale_clamp == "inplace":
        with torch.no_grad():
            t.clamp_(0.0, config.logit_scale_max)
        return t.exp()
    return t.clamp(0.0, config.logit_scale_max).exp()


# ----------------------------------------------------------------------------------------------
# SPEC 2.1: late interaction over all Bi x Bt pairs  (contract of ops.late_interaction)
# ----------------------------------------------------------------------------------------------
def late_interaction(
    P: torch.Tensor,
    S: torch.Tensor,
    sent_mask: torch.Tensor,
    patch_mask: torch.Tensor | None = None,
    pad_as_zero: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled pooled late-interaction scores (alpha is applied by the caller; alpha > 0 commutes
    with max).

    Args:
        P: [Bi, n, d] patch features.  S: [Bt, M, d] sentence features.
        sent_mask: [Bt, M] bool, True for real sentences (any pattern, not only a prefix).
        patch_mask: optional [Bi, n] bool, True for real patches.
        pad_as_zero: the authors' zero-vector packing (SPEC 2.1): a text with fewer real sentences
            than the longest text of S (m_l < max m) has a slot scoring exactly 0 after its real
            ones, so its image-side max is floored at 0; a text with m_l = max m has none. The
            width M of the tensors never matters. Ties go to the real sentence (it comes first).
            Without it, masked slots never count.

    Returns:
        zI [Bi, Bt]: zI[k, l] = mean over valid patches i of max over slots j of <P_k,i, S_l,j>
        zT [Bi, Bt]: zT[k, l] = mean over valid sentences j of max over valid patches i.
        An image with no valid patch or a text with no valid sentence scores 0 (zero gradient).
        dtype float32 (float64 for float64 inputs).
    """
    dtype = _compute_dtype(P, S)
    Bi, n, _ = P.shape
    Bt, M, _ = S.shape
    if patch_mask is None:
        patch_mask = torch.ones(Bi, n, dtype=torch.bool, device=P.device)
    X = torch.einsum("bnd,tmd->btnm", P.to(dtype), S.to(dtype))  # [Bi, Bt, n, M]
    smask = sent_mask[None, :, None, :]
    pmask = patch_mask[:, None, :, None]
    neg_inf = torch.tensor(float("-inf"), dtype=dtype, device=P.device)
    zero = torch.zeros((), dtype=dtype, device=P.device)

    # Image side: each patch's best sentence, averaged over valid patches.
    Xi = torch.where(smask, X, neg_inf)
    if pad_as_zero:
        # The authors' packing: one zero slot after the real sentences of every shorter text.
        m = sent_mask.sum(dim=1)
        zero_slot = torch.where(m < m.max(), zero, neg_inf)  # [Bt]
        Xi = torch.cat([Xi, zero_slot[None, :, None, None].expand(Bi, Bt, n, 1)], dim=3)
    row_max = Xi.max(dim=3).values  # [Bi, Bt, n]
    text_has_sentence = sent_mask.any(dim=1)[None, :, None]
    row_max = torch.where(text_has_sentence & patch_mask[:, None, :], row_max, zero)
    n_valid = patch_mask.sum(dim=1).to(dtype).clamp_min(1.0)[:, None]
    zI = row_max.sum(dim=2) / n_valid

    # Text side: each sentence's best patch, averaged over the text's real sentences.
    Xt = torch.where(pmask, X, neg_inf)
    col_max = Xt.max(dim=2).values  # [Bi, Bt, M]
    image_has_patch = patch_mask.any(dim=1)[:, None, None]
    col_max = torch.where(sent_mask[None, :, :] & image_has_patch, col_max, zero)
    m_valid = sent_mask.sum(dim=1).to(dtype).clamp_min(1.0)[None, :]
    zT = col_max.sum(dim=2) / m_valid
    return zI, zT


# ----------------------------------------------------------------------------------------------
# SPEC 2.2 and 4: contrastive terms
# ----------------------------------------------------------------------------------------------
def clip_loss(logits: torch.Tensor) -> torch.Tensor:
    """clip_loss(G) = (CE_rows(G) + CE_rows(G^T)) / 2 with positives on the diagonal of a square G."""
    targets = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))


def fine_grained_contrastive(zI: torch.Tensor, zT: torch.Tensor, t2i_over_images: bool) -> torch.Tensor:
    """L_c from alpha-scaled pooled scores zI, zT [B, B] (pair k is image k with text k)."""
    targets = torch.arange(zI.shape[0], device=zI.device)
    image_term = F.cross_entropy(zI, targets)
    text_term = F.cross_entropy(zT.t() if t2i_over_images else zT, targets)
    return 0.5 * (image_term + text_term)


# ----------------------------------------------------------------------------------------------
# SPEC 2.3: gaze pooling
# ----------------------------------------------------------------------------------------------
def pool_gaze(heatmaps: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    """Pool sentence heatmaps [B, M, h, w] onto the sqrt(n) x sqrt(n) patch grid -> GS [B, M, n].

    ``bilinear_antialias``: torchvision Resize((g, g), antialias=True) arithmetic, no
    renormalisation (official). ``area_max``: area averaging, then division by each sentence's
    maximum; an all-zero heatmap stays zero (paper). Row-major flattening (the encoder's order).
    """
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"n (patches) must be a perfect square to pool heatmaps onto a grid, got {n}")
    B, M, h, w = heatmaps.shape
    x = heatmaps.reshape(B * M, 1, h, w).to(_compute_dtype(heatmaps))
    if mode == "bilinear_antialias":
        pooled = F.interpolate(x, size=(g, g), mode="bilinear", antialias=True, align_corners=False)
    elif mode == "area_max":
        pooled = F.adaptive_avg_pool2d(x, (g, g))
        peak = pooled.amax(dim=(2, 3), keepdim=True)
        pooled = torch.where(peak > 0, pooled / peak.clamp_min(torch.finfo(pooled.dtype).tiny), torch.zeros_like(pooled))
    else:
        raise ValueError(f"gaze_pool must be 'area_max' or 'bilinear_antialias', got {mode!r}")
    return pooled.reshape(B, M, n)


# ----------------------------------------------------------------------------------------------
# SPEC 2.4: multi-label cross-entropy
# ----------------------------------------------------------------------------------------------
def mlce(scores: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """mlce(s, y) = log(1 + sum_{y=0} e^s) + log(1 + sum_{y=1} e^-s), per row of the last dim.

    Args: scores [..., C]; labels [..., C] bool; valid [..., C] bool (entries that exist).
    Returns [...]. Computed as log-sum-exp with an appended zero logit.
    """
    labels = labels.bool()
    if valid is None:
        valid = torch.ones_like(labels)
    neg_inf = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)
    negatives = torch.where(valid & ~labels, scores, neg_inf)
    positives = torch.where(valid & labels, -scores, neg_inf)
    zero = torch.zeros(scores.shape[:-1] + (1,), dtype=scores.dtype, device=scores.device)
    return torch.logsumexp(torch.cat([zero, negatives], -1), -1) + torch.logsumexp(torch.cat([zero, positives], -1), -1)


# ----------------------------------------------------------------------------------------------
# SPEC 2.4 and 3: per-instance terms on the matched pairs  (contract of ops.cross_map)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CrossMapParams:
    """Static options of the per-instance op (hashable: fast backends specialise on them)."""

    omega: str = "topk"  # "topk" | "threshold"
    k_sentences: int = 1  # top-k over sentences (rows of A); clipped to m_k
    k_patches: int = 7  # top-k over patches (rows of T); clipped to n
    floor: float = 0.01  # threshold omega: + floor after thresholding
    single_sentence: str = "drop"  # m_k = 1: "drop" | "mse"
    gaze_threshold: float = 0.0  # GL = GS > gaze_threshold
    with_mlce: bool = True
    with_egm: bool = True


class CrossMapTerms(NamedTuple):
    """Per-sample outputs of :func:`cross_map`, each [B] (float32, float64 for float64 inputs)."""

    mlce_s2p: torch.Tensor  # fL^{S2P}_k (0 where use_gaze is False or with_mlce is off)
    mlce_p2s: torch.Tensor  # fL^{P2S}_k
    egm_image: torch.Tensor  # mL^I_k (0 where dropped / off)
    egm_text: torch.Tensor  # mL^T_k


def cross_map_params(config: EGMAConfig, n: int) -> CrossMapParams:
    """The static op options a config implies for n patches."""
    return CrossMapParams(
        omega=config.egm_omega,
        k_sentences=config.egm_topk_sentences,
        k_patches=config.topk_patches(n),
        floor=config.egm_floor,
        single_sentence=config.egm_single_sentence,
        gaze_threshold=config.gaze_threshold,
        with_mlce=config.lambda_mlce > 0,
        with_egm=config.lambda_egm > 0,
    )


def egm_sample_thetas(use_gaze: torch.Tensor, batch_has_gaze: bool | torch.Tensor, config: EGMAConfig) -> torch.Tensor:
    """theta per sample for the threshold omega (SPEC 3.1 regimes), float32 [B].

    batch_has_gaze may be a 0-d bool tensor: the regime is then picked on the device, without a
    host sync."""
    dev = use_gaze.device
    with_gaze = torch.where(
        use_gaze,
        torch.tensor(config.egm_theta_gaze, dtype=torch.float32, device=dev),
        torch.tensor(config.egm_theta_mixed_no_gaze, dtype=torch.float32, device=dev),
    )
    no_gaze = torch.tensor(config.egm_theta_no_gaze_batch, dtype=torch.float32, device=dev)
    return torch.where(torch.as_tensor(batch_has_gaze, device=dev), with_gaze, no_gaze)


def egm_sample_weights(use_gaze: torch.Tensor, batch_has_gaze: bool | torch.Tensor, config: EGMAConfig) -> torch.Tensor:
    """(w_I, w_T) per sample [B, 2]: egm_weights, except samples without gaze in a batch with gaze.
    batch_has_gaze: a bool or a 0-d bool tensor (no host sync)."""
    dev = use_gaze.device
    full = torch.tensor(config.egm_weights, dtype=torch.float32, device=dev)
    mixed = torch.tensor(config.egm_weights_mixed_no_gaze, dtype=torch.float32, device=dev)
    # Only samples without gaze in a batch that has some take the mixed weights.
    takes_full = use_gaze | ~torch.as_tensor(batch_has_gaze, device=dev)
    return torch.where(takes_full[:, None], full, mixed)


def _topk_binary(x: torch.Tensor, valid: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """1 at the k largest valid entries of each row of x (ties to the lowest index), else 0.

    x, valid [..., C]; k [...] or broadcastable (already clipped to the number of valid entries).
    """
    neg_inf = torch.tensor(float("-inf"), dtype=x.dtype, device=x.device)
    order = torch.sort(torch.where(valid, x, neg_inf), dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(x.shape[-1], device=x.device).expand_as(order).contiguous())
    return ((rank < k[..., None]) & valid).to(x.dtype)


def _minmax_rows(x: torch.Tensor, valid: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Row-wise (x - min) / (max - min) over valid entries, the authors' way.

    A row whose range is zero is divided by 1 / count instead (value 0, gradient
    count * (dx - dmin)), SPEC 3.1. Gradient flows through min and max (first arg-extremum).
    """
    pos_inf = torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
    neg_inf = torch.tensor(float("-inf"), dtype=x.dtype, device=x.device)
    lo = torch.where(valid, x, pos_inf).min(dim=-1, keepdim=True).values
    hi = torch.where(valid, x, neg_inf).max(dim=-1, keepdim=True).values
    # Rows with nothing valid (padding rows) get lo = hi = 0 so nothing below turns into NaN.
    any_valid = valid.any(dim=-1, keepdim=True)
    lo = torch.where(any_valid, lo, torch.zeros_like(lo))
    hi = torch.where(any_valid, hi, torch.zeros_like(hi))
    span = hi - lo
    denom = torch.where(span == 0, 1.0 / count.to(x.dtype).clamp_min(1.0)[..., None], span)
    return (x - lo) / denom


def _row_l1(w: torch.Tensor) -> torch.Tensor:
    """Row-wise L1 normalisation of non-negative weights (all-zero rows stay zero)."""
    total = w.sum(dim=-1, keepdim=True)
    return w / torch.where(total > 0, total, torch.ones_like(total))


def _masked_clip_rows(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """clip_loss per instance over the valid rows/cols of square logits [B, C, C] -> [B].

    valid [B, C]; positives on the diagonal. Instances with no valid row give 0.
    """
    neg_inf = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
    col_ok = valid[:, None, :]
    diag = torch.diagonal(logits, dim1=1, dim2=2)  # [B, C]
    rows = torch.logsumexp(torch.where(col_ok, logits, neg_inf), dim=2) - diag
    cols = torch.logsumexp(torch.where(col_ok, logits.transpose(1, 2), neg_inf), dim=2) - diag
    zero = torch.zeros_like(rows)
    count = valid.sum(dim=1).to(logits.dtype).clamp_min(1.0)
    rows = torch.where(valid, rows, zero).sum(dim=1) / count
    cols = torch.where(valid, cols, zero).sum(dim=1) / count
    return 0.5 * (rows + cols)


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
    """Per-instance EGMA terms on the B matched pairs (image k with text k): MLCE (SPEC 2.4) and
    the EGM cross-mapping losses (SPEC 3).

    Args:
        P [B, n, d], S [B, M, d], sent_mask [B, M] bool.
        GS [B, M, n]: pooled gaze in [0, 1] (ignored where use_gaze is False and on masked slots).
        use_gaze [B] bool: the sample's gaze prior and MLCE are used.
        theta [B] float: the threshold omega's theta per sample (SPEC 3.1 regimes; unused by topk).
        alpha: 0-d logit scale (differentiable).
        params: static options.
    Returns: CrossMapTerms of [B] tensors. Gradients flow to P, S and alpha (not GS, theta).
    """
    dtype = _compute_dtype(P, S)
    P = P.to(dtype)
    S = S.to(dtype)
    alpha = alpha.to(dtype)
    B, n, _ = P.shape
    M = S.shape[1]
    valid = sent_mask.bool()
    gaze = GS.to(dtype) * (use_gaze[:, None, None] & valid[:, :, None]).to(dtype)  # [B, M, n]
    m = valid.sum(dim=1)  # [B]
    zeros = torch.zeros(B, dtype=dtype, device=P.device)

    A = alpha * torch.einsum("bnd,bmd->bnm", P, S)  # X_kk [B, n, M]
    T = A.transpose(1, 2)  # [B, M, n]

    mlce_s2p, mlce_p2s = zeros, zeros
    if params.with_mlce:
        GL = gaze > params.gaze_threshold  # [B, M, n]
        s2p_rows = mlce(T, GL)  # [B, M] (every patch is an entry of a sentence row)
        mlce_s2p = torch.where(valid, s2p_rows, torch.zeros_like(s2p_rows)).sum(1) / m.clamp_min(1).to(dtype)
        p2s_rows = mlce(A, GL.transpose(1, 2), valid[:, None, :].expand(B, n, M))  # [B, n]
        mlce_p2s = p2s_rows.mean(dim=1)
        mlce_s2p = torch.where(use_gaze, mlce_s2p, zeros)
        mlce_p2s = torch.where(use_gaze, mlce_p2s, zeros)

    egm_image, egm_text = zeros, zeros
    if params.with_egm:
        valid_A = valid[:, None, :].expand(B, n, M)  # rows over sentences
        all_T = torch.ones(B, M, n, dtype=torch.bool, device=P.device)  # rows over patches
        if params.omega == "topk":
            with torch.no_grad():
                k_s = m.clamp(max=params.k_sentences)[:, None].expand(B, n)
                k_p = torch.full((B, M), min(params.k_patches, n), device=P.device)
                w_i2t = _row_l1(_topk_binary(A, valid_A, k_s) + gaze.transpose(1, 2))
                w_t2i = _row_l1(_topk_binary(T, all_T, k_p) + gaze)
                w_t2i = w_t2i * valid[:, :, None].to(dtype)
        elif params.omega == "threshold":
            th = theta.to(dtype)[:, None, None]
            g = use_gaze[:, None, None]
            a_tilde = _minmax_rows(A, valid_A, m[:, None].expand(B, n))
            t_tilde = _minmax_rows(T, all_T, torch.full((B, M), n, device=P.device))
            a_pre = torch.where(g, a_tilde + gaze.transpose(1, 2) / 2, a_tilde)
            t_pre = torch.where(g, (t_tilde + gaze) / 2, t_tilde)
            a_hat = torch.where(a_pre < th, torch.zeros_like(a_pre), a_pre) + params.floor
            t_hat = torch.where(t_pre < th, torch.zeros_like(t_pre), t_pre) + params.floor
            w_i2t = _row_l1(a_hat * valid_A.to(dtype))
            w_t2i = _row_l1(t_hat) * valid[:, :, None].to(dtype)
        else:
            raise ValueError(f"omega must be 'topk' or 'threshold', got {params.omega!r}")

        cross_p = torch.einsum("bnm,bmd->bnd", w_i2t, S)  # each patch rebuilt from sentences
        cross_s = torch.einsum("bmn,bnd->bmd", w_t2i, P)  # each sentence rebuilt from patches
        logits_i = alpha * torch.einsum("bnd,bpd->bnp", cross_p, P)  # [B, n, n]
        logits_t = alpha * torch.einsum("bmd,bqd->bmq", cross_s, S)  # [B, M, M]
        all_patches = torch.ones(B, n, dtype=torch.bool, device=P.device)
        egm_image = _masked_clip_rows(logits_i, all_patches)
        egm_text = _masked_clip_rows(logits_t, valid)

        single = m == 1
        if params.single_sentence == "drop":
            egm_image = torch.where(single, zeros, egm_image)
            egm_text = torch.where(single, zeros, egm_text)
        elif params.single_sentence == "mse":
            sq = ((cross_s - S) ** 2 * valid[:, :, None].to(dtype)).sum(dim=(1, 2))
            egm_image = torch.where(single, zeros, egm_image)
            egm_text = torch.where(single, sq, egm_text)
        else:
            raise ValueError(f"single_sentence must be 'drop' or 'mse', got {params.single_sentence!r}")
    return CrossMapTerms(mlce_s2p, mlce_p2s, egm_image, egm_text)


# ----------------------------------------------------------------------------------------------
# SPEC 4: the total
# ----------------------------------------------------------------------------------------------
class EGMATerms(NamedTuple):
    """Every part of the loss (0-d tensors) and the alpha-scaled pooled score matrices [B, B]."""

    total: torch.Tensor
    loss_c: torch.Tensor
    loss_mlce: torch.Tensor
    loss_egm: torch.Tensor
    loss_clip: torch.Tensor
    scores_image: torch.Tensor
    scores_text: torch.Tensor
    alpha: torch.Tensor


def combine_terms(
    terms: CrossMapTerms,
    use_gaze: torch.Tensor,
    batch_has_gaze: bool | torch.Tensor,
    config: EGMAConfig,
    n_gaze: torch.Tensor | int | None = None,
    batch_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L_MLCE and L_EGM from the per-sample terms.

    n_gaze / batch_size default to this batch's; the distributed loss passes global counts so
    that per-rank losses average to the global one.
    """
    dtype = terms.mlce_s2p.dtype
    w_s2p, w_p2s = config.mlce_weights
    per_sample_mlce = w_s2p * terms.mlce_s2p + w_p2s * terms.mlce_p2s
    if n_gaze is None:
        n_gaze = use_gaze.sum()
    n_gaze = torch.as_tensor(n_gaze, dtype=dtype, device=per_sample_mlce.device)
    loss_mlce = torch.where(use_gaze, per_sample_mlce, torch.zeros_like(per_sample_mlce)).sum() / n_gaze.clamp_min(1.0)
    weights = egm_sample_weights(use_gaze, batch_has_gaze, config).to(dtype)
    per_sample_egm = weights[:, 0] * terms.egm_image + weights[:, 1] * terms.egm_text
    loss_egm = per_sample_egm.sum() / (batch_size if batch_size is not None else per_sample_egm.shape[0])
    return loss_mlce, loss_egm


def egma_loss(
    P: torch.Tensor,
    S: torch.Tensor,
    sent_mask: torch.Tensor,
    logit_scale: torch.Tensor,
    config: EGMAConfig,
    GS: torch.Tensor | None = None,
    has_gaze: torch.Tensor | None = None,
    image_embeddings: torch.Tensor | None = None,
    text_embeddings: torch.Tensor | None = None,
) -> EGMATerms:
    """The whole EGMA loss of SPEC 4 on one (non-distributed) batch.

    Args: P [B, n, d], S [B, M, d], sent_mask [B, M], logit_scale t (0-d or [1]), GS [B, M, n]
    pre-pooled gaze (None: no gaze), has_gaze [B] bool, global embeddings [B, d] (needed when
    lambda_clip > 0).
    """
    B, n, _ = P.shape
    alpha = logit_scale_to_alpha(logit_scale, config)
    if has_gaze is None or GS is None:
        has_gaze = torch.zeros(B, dtype=torch.bool, device=P.device)
        GS = torch.zeros(B, S.shape[1], n, dtype=P.dtype, device=P.device)
    dtype = _compute_dtype(P, S)
    zI, zT = late_interaction(P, S, sent_mask, pad_as_zero=config.pad_as_zero)
    zI, zT = alpha.to(dtype) * zI, alpha.to(dtype) * zT
    loss_c = fine_grained_contrastive(zI, zT, config.t2i_over_images)

    batch_has_gaze = bool(has_gaze.any())
    theta = egm_sample_thetas(has_gaze, batch_has_gaze, config)
    terms = cross_map(P, S, sent_mask, GS, has_gaze, theta, alpha, cross_map_params(config, n))
    loss_mlce, loss_egm = combine_terms(terms, has_gaze, batch_has_gaze, config)

    loss_clip = torch.zeros((), dtype=dtype, device=P.device)
    if config.lambda_clip > 0:
        if image_embeddings is None or text_embeddings is None:
            raise ValueError("image_embeddings and text_embeddings are required when lambda_clip > 0")
        loss_clip = clip_loss(alpha.to(dtype) * image_embeddings.to(dtype) @ text_embeddings.to(dtype).t())
    total = config.lambda_clip * loss_clip + loss_c + config.lambda_mlce * loss_mlce + config.lambda_egm * loss_egm
    return EGMATerms(total, loss_c, loss_mlce, loss_egm, loss_clip, zI, zT, alpha)
