"""The public EGMA loss API: a drop-in replacement for the authors' losses, on fused backends.

    loss_fn = EGMALoss("paper")                      # or "official", or an EGMAConfig
    out = loss_fn(patch_features, sentence_features, sentence_mask=mask,
                  gaze_heatmaps=heatmaps, has_gaze=has_gaze)
    out.total.backward()

Shapes: patch_features P [B, n, d] and sentence_features S [B, M, d], L2-normalised per token;
sentence_mask [B, M] bool (or sentence_lengths [B]); gaze_heatmaps [B, M, h, w] in [0, 1] or
pre-pooled gaze_scores GS [B, M, n]; has_gaze [B] bool; image_embeddings / text_embeddings [B, e]
for the optional global CLIP term. The heavy work runs in two fused ops (egma_fast.ops) on the
backend ``backend`` selects; the B x B cross-entropies stay in PyTorch.

Under torch.distributed (``distributed=True``, or "auto" with an initialised process group of
more than one rank), each rank passes its local batch; the loss gathers features with gradient
and returns a per-rank loss whose average over ranks is the loss of the global batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from egma_fast import ops
from egma_fast.config import EGMAConfig, resolve_config
from egma_fast.distributed import all_gather_no_grad, all_gather_with_grad, all_reduce_sum, world
from egma_fast.loss_terms import (
    EGMALossOutput,
    clip_loss,
    combine_terms,
    cross_map_params,
    egm_sample_thetas,
    logit_scale_to_alpha,
    mlce,
    pool_gaze,
)
from egma_fast.validation import (
    check_features,
    check_finite,
    check_gaze_values,
    check_has_gaze,
    check_same,
    device_assert,
    sentence_mask_from,
)

BACKEND_NAMES = ("auto", "torch", "triton", "cpp", "cuda")

__all__ = ["EGMALoss", "EGMALossOutput", "clip_loss", "egf_loss", "egm_loss", "egma_loss", "mlce"]


@dataclass
class _Inputs:
    """Validated inputs: features, bool mask, pooled gaze and flags."""

    P: torch.Tensor
    S: torch.Tensor
    mask: torch.Tensor
    GS: torch.Tensor
    has_gaze: torch.Tensor
    zI_global: torch.Tensor | None
    zT_global: torch.Tensor | None


def _prepare(
    config: EGMAConfig,
    patch_features: torch.Tensor,
    sentence_features: torch.Tensor,
    sentence_mask: torch.Tensor | None,
    sentence_lengths: torch.Tensor | None,
    gaze_heatmaps: torch.Tensor | None,
    gaze_scores: torch.Tensor | None,
    has_gaze: torch.Tensor | None,
    image_embeddings: torch.Tensor | None,
    text_embeddings: torch.Tensor | None,
) -> _Inputs:
    P = check_features("patch_features", patch_features, 3, "[B, n, d]")
    S = check_features("sentence_features", sentence_features, 3, "[B, M, d]")
    check_same("sentence_features", S, "patch_features", P, {0: 0, 2: 2})
    B, n, _ = P.shape
    M = S.shape[1]
    if n == 0 or M == 0 or P.shape[2] == 0 or B == 0:
        raise ValueError(f"patch_features {tuple(P.shape)} and sentence_features {tuple(S.shape)} must have no empty dimension")
    mask = sentence_mask_from(sentence_mask, sentence_lengths, B, M, S.device)

    if gaze_heatmaps is not None and gaze_scores is not None:
        raise ValueError("pass gaze_heatmaps [B, M, h, w] or gaze_scores [B, M, n], not both")
    # Gaze is data: GS carries no gradient to the heatmaps or scores (SPEC 3.1; every backend).
    if gaze_heatmaps is not None:
        check_features("gaze_heatmaps", gaze_heatmaps, 4, "[B, M, h, w]")
        if gaze_heatmaps.shape[:2] != (B, M) or gaze_heatmaps.device != P.device:
            raise ValueError(f"gaze_heatmaps must have shape [B, M, h, w] = [{B}, {M}, h, w] on {P.device}, got {tuple(gaze_heatmaps.shape)} on {gaze_heatmaps.device}")
        check_gaze_values("gaze_heatmaps", gaze_heatmaps, config.check_finite)
        GS = pool_gaze(gaze_heatmaps.detach(), n, config.gaze_pool).to(P.dtype)
    elif gaze_scores is not None:
        check_features("gaze_scores", gaze_scores, 3, "[B, M, n]")
        if gaze_scores.shape != (B, M, n) or gaze_scores.device != P.device:
            raise ValueError(f"gaze_scores must have shape [B, M, n] = [{B}, {M}, {n}] on {P.device}, got {tuple(gaze_scores.shape)} on {gaze_scores.device}")
        check_gaze_values("gaze_scores", gaze_scores, config.check_finite)
        GS = gaze_scores.detach().to(P.dtype)
    else:
        GS = None
    if has_gaze is not None:
        has_gaze = check_has_gaze(has_gaze, B, P.device)
        if GS is None:
            device_assert(~has_gaze.any(), "has_gaze marks samples with gaze, but neither gaze_heatmaps nor gaze_scores was given")
    else:
        has_gaze = torch.full((B,), GS is not None, dtype=torch.bool, device=P.device)
    if GS is None:
        GS = torch.zeros(B, M, n, dtype=P.dtype, device=P.device)

    if (image_embeddings is None) != (text_embeddings is None):
        raise ValueError("pass both image_embeddings and text_embeddings [B, e], or neither")
    if image_embeddings is not None:
        check_features("image_embeddings", image_embeddings, 2, "[B, e]")
        check_features("text_embeddings", text_embeddings, 2, "[B, e]")
        check_same("image_embeddings", image_embeddings, "patch_features", P, {0: 0})
        check_same("text_embeddings", text_embeddings, "image_embeddings", image_embeddings, {0: 0, 1: 1})
    elif config.lambda_clip > 0:
        raise ValueError("image_embeddings and text_embeddings [B, e] are required when lambda_clip > 0")

    if config.check_finite:
        check_finite("patch_features", P)
        check_finite("sentence_features", S)
        if image_embeddings is not None:
            check_finite("image_embeddings", image_embeddings)
            check_finite("text_embeddings", text_embeddings)
    return _Inputs(P, S, mask, GS, has_gaze, image_embeddings, text_embeddings)


def _ce_rows(logits: torch.Tensor, offset: int) -> torch.Tensor:
    """Mean softmax cross-entropy of rows [b, B] whose positive is column offset + row."""
    targets = torch.arange(logits.shape[0], device=logits.device) + offset
    return F.cross_entropy(logits, targets)


def _pad_sentences_across_ranks(S: torch.Tensor, mask: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad S [b, M, d] and mask [b, M] to the largest M of any rank (masked slots), so that ranks
    whose batches hold different sentence counts can gather; check the local batch sizes agree.

    The one host sync of the distributed path: the padding width is a shape."""
    shapes = all_gather_no_grad(torch.tensor([[b, S.shape[1]]], device=S.device))
    if bool((shapes[:, 0] != b).any()):
        raise ValueError(f"every rank must pass the same local batch size to the distributed loss; got {shapes[:, 0].tolist()}")
    extra = int(shapes[:, 1].max()) - S.shape[1]
    if extra > 0:
        S = F.pad(S, (0, 0, 0, extra))
        mask = F.pad(mask, (0, extra), value=False)
    return S, mask


def _resolve_distributed(distributed: bool | str) -> bool:
    if distributed == "auto":
        return world()[1] > 1
    if not isinstance(distributed, bool):
        raise ValueError(f"distributed must be True, False or 'auto', got {distributed!r}")
    return distributed


def _egma_forward(
    x: _Inputs,
    logit_scale: torch.Tensor,
    config: EGMAConfig,
    backend: str,
    distributed: bool,
) -> EGMALossOutput:
    P, S, mask = x.P, x.S, x.mask
    b, n, _ = P.shape
    rank, size = world() if distributed else (0, 1)
    offset = rank * b
    if config.check_finite:
        check_finite("logit_scale", logit_scale)  # before the in-place clamp could hide an Inf
    alpha = logit_scale_to_alpha(logit_scale, config)
    # Scores and cross-entropies run in fp32 (float64 for float64 inputs, so gradcheck is exact).
    cdtype = torch.float64 if P.dtype == torch.float64 else torch.float32
    alpha32 = alpha.to(cdtype)

    # --- L_c: local images against all texts (and local texts against all images) -----------
    if size > 1:
        # Ranks may hold different sentence counts: gather at the largest (masked slots). The
        # op decides official's zero slots from this gathered mask: m_max of the global batch.
        S_pad, mask_pad = _pad_sentences_across_ranks(S, mask, b)
        S_all, mask_all = all_gather_with_grad(S_pad), all_gather_no_grad(mask_pad)
    else:
        S_all, mask_all = S, mask
    zI, zT = ops.late_interaction(P, S_all, mask_all, pad_as_zero=config.pad_as_zero, backend=backend,
                                  low_memory=config.low_memory)
    zI, zT = alpha32 * zI.to(cdtype), alpha32 * zT.to(cdtype)
    image_term = _ce_rows(zI, offset)
    if config.t2i_over_images:
        if size > 1:
            P_all = all_gather_with_grad(P)
            # Only zT of this call is used: the text side never sees the zero slots, so the
            # local mask cannot misplace them.
            _, zT_cols = ops.late_interaction(P_all, S, mask, pad_as_zero=False, backend=backend,
                                              low_memory=config.low_memory)
            text_term = _ce_rows(alpha32 * zT_cols.to(cdtype).t(), offset)
        else:
            text_term = _ce_rows(zT.t(), 0)
    else:
        text_term = _ce_rows(zT, offset)
    loss_c = 0.5 * (image_term + text_term)

    # --- per-instance MLCE and EGM on the matched pairs ------------------------------------
    use_gaze = x.has_gaze
    n_gaze = all_reduce_sum(use_gaze.sum()) if size > 1 else use_gaze.sum()
    batch_has_gaze = n_gaze > 0  # a 0-d tensor: the regime is chosen on the device, no host sync
    zero = torch.zeros((), dtype=cdtype, device=P.device)
    loss_mlce, loss_egm = zero, zero
    params = cross_map_params(config, n)
    if params.with_mlce or params.with_egm:
        theta = egm_sample_thetas(use_gaze, batch_has_gaze, config)
        terms = ops.cross_map(P, S, mask, x.GS, use_gaze, theta, alpha, params, backend=backend)
        terms = ops.CrossMapTerms(*(t.to(cdtype) for t in terms))
        loss_mlce, loss_egm = combine_terms(terms, use_gaze, batch_has_gaze, config, n_gaze=n_gaze.to(cdtype) / size, batch_size=b)

    # --- optional global CLIP term --------------------------------------------------------
    loss_clip = zero
    if x.zI_global is not None and config.lambda_clip > 0:
        zi, zt = x.zI_global.to(cdtype), x.zT_global.to(cdtype)
        zi_all = all_gather_with_grad(zi) if size > 1 else zi
        zt_all = all_gather_with_grad(zt) if size > 1 else zt
        loss_clip = 0.5 * (_ce_rows(alpha32 * zi @ zt_all.t(), offset) + _ce_rows(alpha32 * zt @ zi_all.t(), offset))

    return EGMALossOutput.assemble(config, loss_c, loss_mlce, loss_egm, loss_clip, zI, zT, alpha)


def egma_loss(
    patch_features: torch.Tensor,
    sentence_features: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    sentence_mask: torch.Tensor | None = None,
    sentence_lengths: torch.Tensor | None = None,
    gaze_heatmaps: torch.Tensor | None = None,
    gaze_scores: torch.Tensor | None = None,
    has_gaze: torch.Tensor | None = None,
    image_embeddings: torch.Tensor | None = None,
    text_embeddings: torch.Tensor | None = None,
    config: EGMAConfig | str | None = None,
    backend: str = "auto",
    distributed: bool | str = False,
) -> EGMALossOutput:
    """The whole EGMA loss (SPEC 4). ``logit_scale`` is the log scale t (0-d or [1])."""
    config = resolve_config(config)
    if not isinstance(logit_scale, torch.Tensor) or logit_scale.numel() != 1 or not logit_scale.dtype.is_floating_point:
        raise ValueError("logit_scale must be a floating tensor with one element (the log logit scale t)")
    x = _prepare(config, patch_features, sentence_features, sentence_mask, sentence_lengths, gaze_heatmaps, gaze_scores, has_gaze, image_embeddings, text_embeddings)
    return _egma_forward(x, logit_scale, config, backend, _resolve_distributed(distributed))


def egf_loss(
    patch_features: torch.Tensor,
    sentence_features: torch.Tensor,
    logit_scale: torch.Tensor,
    **kwargs,
) -> torch.Tensor:
    """L_EGF = L_c + lambda_mlce * L_MLCE (SPEC 2); same keyword arguments as :func:`egma_loss`."""
    config = resolve_config(kwargs.pop("config", None))
    out = egma_loss(patch_features, sentence_features, logit_scale, config=config.replace(lambda_egm=0.0, lambda_clip=0.0), **kwargs)
    return out.loss_c + config.lambda_mlce * out.loss_mlce


def egm_loss(
    patch_features: torch.Tensor,
    sentence_features: torch.Tensor,
    logit_scale: torch.Tensor,
    **kwargs,
) -> torch.Tensor:
    """L_EGM (SPEC 3); same keyword arguments as :func:`egma_loss`."""
    config = resolve_config(kwargs.pop("config", None))
    out = egma_loss(patch_features, sentence_features, logit_scale, config=config.replace(lambda_mlce=0.0, lambda_egm=1.0, lambda_clip=0.0), **kwargs)
    return out.loss_egm


class EGMALoss(nn.Module):
    """EGMA loss as a module that owns the learnable log logit scale t (a shape-[1] parameter,
    initialised to ln(1/0.07)) unless one is passed in.

    Args:
        config: an EGMAConfig or a preset name ("paper" default, "official").
        logit_scale: an existing parameter to use instead of owning one (e.g. the model's).
        backend: "auto", "torch", "triton", "cpp" or "cuda".
        distributed: True, False or "auto" (True when torch.distributed runs more than one rank).
        **overrides: EGMAConfig fields to change.
    """

    def __init__(
        self,
        config: EGMAConfig | str | None = None,
        logit_scale: nn.Parameter | None = None,
        backend: str = "auto",
        distributed: bool | str = "auto",
        **overrides,
    ) -> None:
        super().__init__()
        self.config = resolve_config(config, **overrides)
        if logit_scale is None:
            logit_scale = nn.Parameter(torch.full((1,), self.config.logit_scale_init))
        elif not isinstance(logit_scale, torch.Tensor) or logit_scale.numel() != 1:
            raise ValueError("logit_scale must be a one-element tensor or parameter (the log logit scale t)")
        self.logit_scale = logit_scale
        if backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
        self.backend = backend
        self.distributed = distributed

    def forward(
        self,
        patch_features: torch.Tensor,
        sentence_features: torch.Tensor,
        sentence_mask: torch.Tensor | None = None,
        *,
        sentence_lengths: torch.Tensor | None = None,
        gaze_heatmaps: torch.Tensor | None = None,
        gaze_scores: torch.Tensor | None = None,
        has_gaze: torch.Tensor | None = None,
        image_embeddings: torch.Tensor | None = None,
        text_embeddings: torch.Tensor | None = None,
    ) -> EGMALossOutput:
        x = _prepare(self.config, patch_features, sentence_features, sentence_mask, sentence_lengths, gaze_heatmaps, gaze_scores, has_gaze, image_embeddings, text_embeddings)
        return _egma_forward(x, self.logit_scale, self.config, self.backend, _resolve_distributed(self.distributed))

    def extra_repr(self) -> str:
        return f"preset={self.config.preset_name!r}, backend={self.backend!r}, distributed={self.distributed!r}"
