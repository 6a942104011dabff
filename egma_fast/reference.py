"""Pure-PyTorch EGMA, written for reading, not speed: the oracle every fast path is tested against.

It follows shared/SPEC.md section by section, for both presets and every option, vectorised over
the batch. It materialises the B x B x n x M similarity tensor (that is what the fused kernels
avoid) and is exact in float64. It depends on torch and the config (and the two shared types
below).

Shapes used throughout:
    B, Bi, Bt   batch (images, texts)          n   patches per image
    M           sentence slots per text        d   feature width
    P [Bi, n, d] patch features, S [Bt, M, d] sentence features, sent_mask [Bt, M] bool.

Two functions here are the contracts of the fused ops (egma_fast.ops): :func:`late_interaction`
and :func:`cross_map`. A backend implements exactly their values and gradients.

Nothing in production imports this module (a test asserts it): the loss's glue lives in
egma_fast.loss_terms, and this file states SPEC.md on its own, so a test of a backend's loss
against :func:`egma_loss` checks that glue too. It shares only the op's argument types
(egma_fast.ops.arguments) and the loss's output type.

Ties: every max / min here goes through ``torch.max(dim)`` / ``torch.min(dim)`` or a stable sort,
so the gradient goes entirely to the first maximiser / minimiser (SPEC 2.1).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from egma_fast.config import EGMAConfig
from egma_fast.loss_terms import EGMALossOutput
from egma_fast.ops.arguments import CrossMapParams, CrossMapTerms

__all__ = [
    "CrossMapParams",
    "CrossMapTerms",
    "EGMALossOutput",
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
    """alpha = e^t, t clamped to [0, logit_scale_max] (a 0-d tensor).

    paper (``clamp``): alpha = exp(clamp(t)), no gradient outside the range. official
    (``inplace``): the authors' ``logit_scale.data = torch.clamp(logit_scale.data, 0, 4.6052)``,
    then exp(t) with an unmasked gradient.
    """
    if config.logit_scale_clamp == "inplace":
        t.data.clamp_(0.0, config.logit_scale_max)
        return torch.exp(t.reshape(()))
    return torch.exp(torch.clamp(t.reshape(()), min=0.0, max=config.logit_scale_max))


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
def _area_weights(size: int, g: int) -> torch.Tensor:
    """[g, size] float64: output cell i is the mean of input pixels floor(i size / g) up to
    ceil((i + 1) size / g) - 1 (adaptive average pooling's cells)."""
    W = torch.zeros(g, size, dtype=torch.float64)
    for i in range(g):
        lo, hi = (i * size) // g, -(-(i + 1) * size // g)
        W[i, lo:hi] = 1.0 / (hi - lo)
    return W


def _antialiased_bilinear_weights(size: int, g: int) -> torch.Tensor:
    """[g, size] float64: PIL's (and torchvision's antialiased) bilinear resize. Output pixel i,
    centred at (i + 1/2) size / g in input pixels, weighs input pixel x by the triangle filter
    1 - |x + 1/2 - centre| / s, widened to s = size / g when shrinking (s = 1 when enlarging), over
    the pixels within s of the centre; the weights are normalised to sum to 1."""
    scale = size / g
    s = max(scale, 1.0)
    W = torch.zeros(g, size, dtype=torch.float64)
    for i in range(g):
        centre = (i + 0.5) * scale
        for x in range(max(int(centre - s + 0.5), 0), min(int(centre + s + 0.5), size)):
            W[i, x] = max(0.0, 1.0 - abs(x + 0.5 - centre) / s)
        W[i] /= W[i].sum()
    return W


def pool_gaze(heatmaps: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    """Pool sentence heatmaps [B, M, h, w] onto the sqrt(n) x sqrt(n) patch grid -> GS [B, M, n]
    (SPEC 2.3), as separable linear maps GS = W_h H W_w^T, row-major (the encoder's order).

    ``bilinear_antialias``: torchvision Resize((g, g), antialias=True) arithmetic, no
    renormalisation (official). ``area_max``: area averaging, then division by each sentence's
    maximum; an all-zero heatmap stays zero (paper).
    """
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"n (patches) must be a perfect square to pool heatmaps onto a grid, got {n}")
    B, M, h, w = heatmaps.shape
    if mode == "bilinear_antialias":
        Wh, Ww = _antialiased_bilinear_weights(h, g), _antialiased_bilinear_weights(w, g)
    elif mode == "area_max":
        Wh, Ww = _area_weights(h, g), _area_weights(w, g)
    else:
        raise ValueError(f"gaze_pool must be 'area_max' or 'bilinear_antialias', got {mode!r}")
    dtype = _compute_dtype(heatmaps)
    Wh, Ww = Wh.to(heatmaps.device, dtype), Ww.to(heatmaps.device, dtype)
    pooled = torch.einsum("ih,bmhw,jw->bmij", Wh, heatmaps.to(dtype), Ww).reshape(B, M, n)
    if mode == "area_max":
        peak = pooled.max(dim=2, keepdim=True).values
        pooled = torch.where(peak > 0, pooled / torch.where(peak > 0, peak, 1.0), 0.0)
    return pooled


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
def cross_map_params(config: EGMAConfig, n: int) -> CrossMapParams:
    """The op options a config states (SPEC 2.4, 3) for images of n patches."""
    k_patches = config.egm_topk_patches if config.egm_topk_patches is not None else math.ceil(n / 7)
    return CrossMapParams(
        omega=config.egm_omega, k_sentences=config.egm_topk_sentences, k_patches=max(1, min(k_patches, n)),
        floor=config.egm_floor, single_sentence=config.egm_single_sentence, gaze_threshold=config.gaze_threshold,
        with_mlce=config.lambda_mlce > 0, with_egm=config.lambda_egm > 0, egm_use_gaze=config.egm_use_gaze,
    )


def _egm_regimes(use_gaze: torch.Tensor, batch_has_gaze: bool | torch.Tensor, config: EGMAConfig) -> torch.Tensor:
    """SPEC 3.1's regime of each sample, [B] int: 0 batch without gaze maps (every sample), 1 gaze
    sample in a batch with gaze, 2 sample without gaze in a batch with gaze. Without
    egm_use_gaze, EGM sees no gaze: every sample is in regime 0."""
    batch = torch.as_tensor(batch_has_gaze, device=use_gaze.device) & config.egm_use_gaze
    return torch.where(batch, torch.where(use_gaze, 1, 2), 0)


def egm_sample_thetas(use_gaze: torch.Tensor, batch_has_gaze: bool | torch.Tensor, config: EGMAConfig) -> torch.Tensor:
    """theta of the threshold omega per sample, float32 [B], by regime (SPEC 3.1)."""
    table = torch.tensor([config.egm_theta_no_gaze_batch, config.egm_theta_gaze, config.egm_theta_mixed_no_gaze],
                         dtype=torch.float32, device=use_gaze.device)
    return table[_egm_regimes(use_gaze, batch_has_gaze, config)]


def egm_sample_weights(use_gaze: torch.Tensor, batch_has_gaze: bool | torch.Tensor, config: EGMAConfig) -> torch.Tensor:
    """(w_I, w_T) per sample, float32 [B, 2], by regime (SPEC 3.1, 3.2)."""
    table = torch.tensor([config.egm_weights, config.egm_weights, config.egm_weights_mixed_no_gaze],
                         dtype=torch.float32, device=use_gaze.device)
    return table[_egm_regimes(use_gaze, batch_has_gaze, config)]


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
        use_gaze [B] bool: the sample has gaze: MLCE, and the EGM gaze prior when
            params.egm_use_gaze (without it EGM sees no gaze at all).
        theta [B] float: the threshold omega's theta per sample (SPEC 3.1 regimes; unused by topk).
        alpha: 0-d logit scale (differentiable).
        params: static options.
    Returns: CrossMapTerms of [B] tensors. Gradients flow to P, S and alpha; GS and theta are data
    (no gradient, whatever their requires_grad).
    """
    dtype = _compute_dtype(P, S)
    P = P.to(dtype)
    S = S.to(dtype)
    alpha = alpha.to(dtype)
    B, n, _ = P.shape
    M = S.shape[1]
    valid = sent_mask.bool()
    GS, theta = GS.detach(), theta.detach()
    gaze = GS.to(dtype) * (use_gaze[:, None, None] & valid[:, :, None]).to(dtype)  # [B, M, n], MLCE's
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
        # EGM's view of the gaze (SPEC 3.2): none at all without egm_use_gaze.
        egm_gaze_flag = use_gaze & params.egm_use_gaze
        gaze = gaze * params.egm_use_gaze
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
            g = egm_gaze_flag[:, None, None]
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
) -> EGMALossOutput:
    """The whole EGMA loss of SPEC 4 on one (non-distributed) batch, with every part.

    Args: P [B, n, d], S [B, M, d], sent_mask [B, M], logit_scale t (0-d or [1]), GS [B, M, n]
    pre-pooled gaze (None: no gaze), has_gaze [B] bool, global embeddings [B, d] (needed when
    lambda_clip > 0).
    """
    B, n, _ = P.shape
    dtype = _compute_dtype(P, S)
    alpha = logit_scale_to_alpha(logit_scale, config)
    a = alpha.to(dtype)
    if has_gaze is None or GS is None:
        has_gaze = torch.zeros(B, dtype=torch.bool, device=P.device)
        GS = torch.zeros(B, S.shape[1], n, dtype=P.dtype, device=P.device)

    # SPEC 2: L_EGF = L_c + lambda_mlce L_MLCE
    zI, zT = late_interaction(P, S, sent_mask, pad_as_zero=config.pad_as_zero)
    zI, zT = a * zI, a * zT
    loss_c = fine_grained_contrastive(zI, zT, config.t2i_over_images)
    batch_has_gaze = bool(has_gaze.any())
    theta = egm_sample_thetas(has_gaze, batch_has_gaze, config)
    terms = cross_map(P, S, sent_mask, GS, has_gaze, theta, alpha, cross_map_params(config, n))
    w_s2p, w_p2s = config.mlce_weights
    # (1/|G|) over the gaze samples G; 0 when there are none (their terms are 0).
    loss_mlce = (w_s2p * terms.mlce_s2p + w_p2s * terms.mlce_p2s).sum() / max(int(has_gaze.sum()), 1)

    # SPEC 3.2: L_EGM = (1/B) sum_k (w_I mL^I_k + w_T mL^T_k)
    w = egm_sample_weights(has_gaze, batch_has_gaze, config).to(dtype)
    loss_egm = (w[:, 0] * terms.egm_image + w[:, 1] * terms.egm_text).mean()

    loss_clip = torch.zeros((), dtype=dtype, device=P.device)
    if config.lambda_clip > 0:
        if image_embeddings is None or text_embeddings is None:
            raise ValueError("image_embeddings and text_embeddings are required when lambda_clip > 0")
        loss_clip = clip_loss(a * image_embeddings.to(dtype) @ text_embeddings.to(dtype).t())
    total = config.lambda_clip * loss_clip + loss_c + config.lambda_mlce * loss_mlce + config.lambda_egm * loss_egm
    return EGMALossOutput(total, loss_c, loss_mlce, loss_egm, loss_clip, zI, zT, alpha)
