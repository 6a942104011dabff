"""The loss's glue around the fused ops: everything ``egma_fast.losses`` computes outside them.

    config -> cross_map_params (the ops' static options) and, per sample, the EGM regime
    (egm_sample_thetas / egm_sample_weights, SPEC 3.1); log logit scale -> alpha (SPEC 1);
    heatmaps -> GS (pool_gaze, SPEC 2.3); per-sample op terms -> L_MLCE and L_EGM
    (combine_terms); the parts -> the total (EGMALossOutput.assemble, SPEC 4).

This is production code. egma_fast.reference states SPEC.md on its own (it imports nothing from
here but the output type), so a test of a backend's loss against the reference also checks this
glue.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from egma_fast.config import EGMAConfig
from egma_fast.ops.arguments import CrossMapParams, CrossMapTerms

__all__ = [
    "EGMALossOutput",
    "clip_loss",
    "combine_terms",
    "cross_map_params",
    "egm_sample_thetas",
    "egm_sample_weights",
    "logit_scale_to_alpha",
    "mlce",
    "pool_gaze",
]


@dataclass
class EGMALossOutput:
    """The total loss, every part (0-d tensors) and the alpha-scaled pooled scores.

    scores_image / scores_text: zhat^I and zhat^T of SPEC 2.1, [B_local, B_global] (rows are this
    rank's images, columns all texts of the global batch; [B, B] without distribution).
    """

    total: torch.Tensor
    loss_c: torch.Tensor
    loss_mlce: torch.Tensor
    loss_egm: torch.Tensor
    loss_clip: torch.Tensor
    scores_image: torch.Tensor
    scores_text: torch.Tensor
    logit_scale: torch.Tensor  # alpha = e^t after clamping (0-d)

    @classmethod
    def assemble(cls, config: EGMAConfig, loss_c: torch.Tensor, loss_mlce: torch.Tensor, loss_egm: torch.Tensor,
                 loss_clip: torch.Tensor, scores_image: torch.Tensor, scores_text: torch.Tensor,
                 alpha: torch.Tensor) -> "EGMALossOutput":
        """The output with its total L = lambda_clip L_clip + L_c + lambda_mlce L_MLCE + lambda_egm L_EGM."""
        total = config.lambda_clip * loss_clip + loss_c + config.lambda_mlce * loss_mlce + config.lambda_egm * loss_egm
        return cls(total, loss_c, loss_mlce, loss_egm, loss_clip, scores_image, scores_text, alpha)

    def parts(self) -> dict[str, float]:
        """Plain floats for logging (one host sync each: call at log steps)."""
        return {
            "loss": float(self.total.detach()),
            "loss_c": float(self.loss_c.detach()),
            "loss_mlce": float(self.loss_mlce.detach()),
            "loss_egm": float(self.loss_egm.detach()),
            "loss_clip": float(self.loss_clip.detach()),
            "logit_scale": float(self.logit_scale.detach()),
        }


def logit_scale_to_alpha(t: torch.Tensor, config: EGMAConfig) -> torch.Tensor:
    """alpha = e^t with t clamped to [0, logit_scale_max] (SPEC 1); t has one element.

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


def pool_gaze(heatmaps: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    """Pool sentence heatmaps [B, M, h, w] onto the sqrt(n) x sqrt(n) patch grid -> GS [B, M, n]
    (SPEC 2.3), float32 (float64 for float64 heatmaps), row-major (the encoder's token order).

    ``bilinear_antialias``: torchvision Resize((g, g), antialias=True), no renormalisation
    (official). ``area_max``: area averaging, then division by each sentence's maximum; an
    all-zero heatmap stays zero (paper).
    """
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"n (patches) must be a perfect square to pool heatmaps onto a grid, got {n}")
    B, M, h, w = heatmaps.shape
    dtype = torch.float64 if heatmaps.dtype == torch.float64 else torch.float32
    x = heatmaps.reshape(B * M, 1, h, w).to(dtype)
    if mode == "bilinear_antialias":
        pooled = F.interpolate(x, size=(g, g), mode="bilinear", antialias=True, align_corners=False)
    elif mode == "area_max":
        pooled = F.adaptive_avg_pool2d(x, (g, g))
        peak = pooled.amax(dim=(2, 3), keepdim=True)
        pooled = pooled / torch.where(peak > 0, peak, torch.ones_like(peak))
    else:
        raise ValueError(f"gaze_pool must be 'area_max' or 'bilinear_antialias', got {mode!r}")
    return pooled.reshape(B, M, n)


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
        egm_use_gaze=config.egm_use_gaze,
    )


def _egm_gaze(use_gaze: torch.Tensor, batch_has_gaze: bool | torch.Tensor,
              config: EGMAConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample gaze [B], batch has gaze 0-d) as EGM sees them: nobody's without egm_use_gaze."""
    batch = torch.as_tensor(batch_has_gaze, device=use_gaze.device)
    if not config.egm_use_gaze:
        return torch.zeros_like(use_gaze), torch.zeros_like(batch)
    return use_gaze, batch


def egm_sample_thetas(use_gaze: torch.Tensor, batch_has_gaze: bool | torch.Tensor, config: EGMAConfig) -> torch.Tensor:
    """theta per sample for the threshold omega (SPEC 3.1 regimes), float32 [B].

    batch_has_gaze may be a 0-d bool tensor: the regime is then picked on the device, without a
    host sync. Without egm_use_gaze every sample takes the no-gaze-batch theta."""
    use_gaze, batch = _egm_gaze(use_gaze, batch_has_gaze, config)

    def const(value: float) -> torch.Tensor:
        return torch.tensor(value, dtype=torch.float32, device=use_gaze.device)

    with_gaze = torch.where(use_gaze, const(config.egm_theta_gaze), const(config.egm_theta_mixed_no_gaze))
    return torch.where(batch, with_gaze, const(config.egm_theta_no_gaze_batch))


def egm_sample_weights(use_gaze: torch.Tensor, batch_has_gaze: bool | torch.Tensor, config: EGMAConfig) -> torch.Tensor:
    """(w_I, w_T) per sample [B, 2] float32: egm_weights, except samples without gaze in a batch
    with gaze (egm_weights_mixed_no_gaze). batch_has_gaze: a bool or a 0-d bool tensor."""
    use_gaze, batch = _egm_gaze(use_gaze, batch_has_gaze, config)
    full = torch.tensor(config.egm_weights, dtype=torch.float32, device=use_gaze.device)
    mixed = torch.tensor(config.egm_weights_mixed_no_gaze, dtype=torch.float32, device=use_gaze.device)
    return torch.where((use_gaze | ~batch)[:, None], full, mixed)


def combine_terms(
    terms: CrossMapTerms,
    use_gaze: torch.Tensor,
    batch_has_gaze: bool | torch.Tensor,
    config: EGMAConfig,
    n_gaze: torch.Tensor | int | None = None,
    batch_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L_MLCE and L_EGM (0-d) from the per-sample terms [B] of cross_map.

    n_gaze / batch_size default to this batch's; the distributed loss passes the global gaze
    count over the world size and the local batch, so that per-rank losses average to the global one.
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


def clip_loss(logits: torch.Tensor) -> torch.Tensor:
    """clip_loss(G) = (CE_rows(G) + CE_rows(G^T)) / 2 with positives on the diagonal of a square G."""
    targets = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))


def mlce(scores: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-label cross-entropy per row (SPEC 2.4): log(1 + sum_{y=0} e^s) + log(1 + sum_{y=1} e^-s).

    scores [..., C]; labels [..., C] bool; valid [..., C] bool (entries that exist, all if None).
    Returns [...]. Stable: log(1 + sum e^x) = logaddexp(0, logsumexp(x)), -inf for an empty sum.
    """
    labels = labels.bool()
    keep = torch.ones_like(labels) if valid is None else valid.bool()
    neg_inf = torch.full((), float("-inf"), dtype=scores.dtype, device=scores.device)
    zero = torch.zeros((), dtype=scores.dtype, device=scores.device)
    negatives = torch.logsumexp(torch.where(keep & ~labels, scores, neg_inf), dim=-1)
    positives = torch.logsumexp(torch.where(keep & labels, -scores, neg_inf), dim=-1)
    return torch.logaddexp(zero, negatives) + torch.logaddexp(zero, positives)
