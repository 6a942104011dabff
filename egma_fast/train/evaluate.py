"""Evaluation during and after training, safe under FSDP2: every rank takes part.

Every rank reads the whole evaluation set (it is small: e.g. CheckXpert 5x200) in the same order
and runs the model on every ``world_size``-th batch; in the last round a rank without a batch
runs a padding batch whose rows are dropped, so all ranks issue the same collectives. The model's
full forward gives, for each image and its own report, exactly what training sees: z^I, z^T
(the report embedding from its sentences), the patch tokens P and the sentence features S.
Results are gathered to every rank, which then computes:

- zero-shot classification (SPEC 6): per class, prompts -> z^T (``encode_text``), score =
  max or mean over prompts of cos(z^I, z^T); accuracy, macro-F1, macro AUROC;
- fine-grained zero-shot: the same with the late-interaction score of SPEC 2.1 between the patch
  tokens and the prompt's sentence feature (mean over patches of P_i . s), which is what the
  EGMA terms train directly;
- retrieval P@K both ways between images and the eval reports (relevant = same class);
- gaze pointing: for samples with gaze, the fraction of sentences whose most similar patch lies
  where the gaze heatmap is at least half its maximum (with the chance rate for comparison).

Samples without a single class (class_index < 0) are left out of the class metrics.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from egma_fast import loss_terms
from egma_fast.eval import (
    PromptSets,
    encode_texts,
    gather_across_ranks,
    macro_auroc,
    retrieval_precision_at_k,
    zero_shot_from_embeddings,
)
from egma_fast.train.distributed import DistInfo

__all__ = ["EvalSettings", "evaluate_model"]


@dataclass(frozen=True)
class EvalSettings:
    """How :func:`evaluate_model` scores a model (everything but the data and the prompts)."""

    #: Prompt reduction per class: "max" (official) or "mean" (prompt ensembling).
    reduction: str = "mean"
    #: Retrieval P@K values (those above the number of classified samples are left out).
    ks: tuple[int, ...] = (1, 5, 10)
    #: Run retrieval as well as zero-shot classification.
    retrieval: bool = True
    #: How gaze heatmaps pool onto the patch grid for gaze pointing (EGMAConfig.gaze_pool).
    gaze_pool: str = "area_max"
    #: Token limits: sentences (fine-grained prompts) / prompts of global zero-shot (which may be
    #: several sentences long).
    max_length: int = 32
    prompt_max_length: int = 128
    #: Stop after this many samples (whole batches, so it may read slightly more); None: all.
    max_samples: int | None = None
    #: alpha, the temperature of the softmax over classes behind zs_auroc.
    logit_scale: float = 1.0
    #: Autocast dtype of the forward passes (None: none).
    autocast_dtype: torch.dtype | None = None


def _rounds(n_batches: int, world: int) -> int:
    return -(-n_batches // world)


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    tokenizer: Any,
    batches: Iterable[Any],
    prompts: PromptSets | Mapping[str, Sequence[str]],
    settings: EvalSettings = EvalSettings(),
    info: DistInfo | None = None,
) -> dict[str, float]:
    """Evaluate ``model`` (an EGMAModel, plain or FSDP2-wrapped) on ``batches``; call on every rank.

    Args:
        batches: the full evaluation set as :class:`egma_fast.data.collate.Batch` objects, the
            same sequence on every rank.
        prompts: the prompt sets (a plain class -> prompts mapping is the main set alone); class
            index c of a sample is the c-th class name. Extra sets add zs_<name>_accuracy,
            zs_<name>_macro_f1 and zs_<name>_auroc.
        settings: how to score (:class:`EvalSettings`).
        info: where this rank runs (default: one process on the CPU).
    Returns:
        flat dict of floats: zs_accuracy, zs_macro_f1, zs_auroc (one-vs-rest AUROC of the
        softmax over classes of alpha * scores, as CLIP-style evaluations report it; the raw
        cosine scores carry an image-dependent offset shared by all classes that blurs the
        per-class ranking), zs_auroc_raw (of the raw scores), zs_fine_accuracy,
        i2t_p@K / t2i_p@K, gaze_pointing, gaze_pointing_chance, n_samples, n_classified.
    """
    if not isinstance(prompts, PromptSets):
        prompts = PromptSets(classes={str(k): list(v) for k, v in prompts.items()})
    rank, world_size = (info.rank, info.world_size) if info is not None else (0, 1)
    device = info.device if info is not None else torch.device("cpu")
    names = list(prompts.classes)
    if not names:
        raise ValueError("prompts must name at least one class")
    sets = prompts.all_sets()
    fine_prompts = prompts.fine_or_classes()
    for label, class_prompts in {**sets, "fine": fine_prompts}.items():
        if list(class_prompts) != names:
            raise ValueError(f"prompt set {label!r} must list the classes {names} in that order, got {list(class_prompts)}")
    reduction = settings.reduction
    was_training = model.training
    model.eval()
    amp = (torch.autocast(device.type, dtype=settings.autocast_dtype) if settings.autocast_dtype is not None
           else contextlib.nullcontext())
    try:
        with amp:
            prompt_global = {
                label: list(torch.split(
                    encode_texts(model, tokenizer, [p for n in names for p in class_prompts[n]], device=device,
                                 max_length=settings.prompt_max_length),
                    [len(class_prompts[n]) for n in names]))
                for label, class_prompts in sets.items()
            }
            sizes = [len(fine_prompts[n]) for n in names]
            prompt_sent = encode_texts(model, tokenizer, [p for n in names for p in fine_prompts[n]], device=device,
                                       max_length=settings.max_length, sentence_features=True)
        own: list[Any] = []
        all_batches = []
        seen = 0
        for i, batch in enumerate(batches):
            if settings.max_samples is not None and seen >= settings.max_samples:
                break
            seen += len(batch)
            all_batches.append(i)
            if i % world_size == rank:
                own.append(batch)
        n_rounds = _rounds(len(all_batches), world_size)
        if n_rounds == 0:
            raise ValueError("the evaluation set is empty")
        zi, zt, labels, fine, point_hit, point_chance = [], [], [], [], [], []
        pad_template = own[0] if own else None
        for r in range(n_rounds):
            is_pad = r >= len(own)
            batch = own[r] if not is_pad else pad_template
            if batch is None:  # this rank got no batch at all (more ranks than batches)
                raise ValueError(f"evaluation set has {len(all_batches)} batch(es) for {world_size} ranks; "
                                 "use a smaller data.eval_batch_size")
            batch = batch.to(device)
            with amp:
                out = model(batch.images, batch.sentence_input_ids, batch.sentence_attention_mask, batch.sentence_mask)
            y = batch.class_index.to(device).clone()
            if is_pad:
                y.fill_(-2)  # padding rows, dropped after the gather
            zi.append(out.image_embeddings.float())
            zt.append(out.text_embeddings.float())
            labels.append(y)
            P = out.patch_features.float()
            # image-side late interaction with a one-sentence text: mean over patches of P_i . s
            sims = F.normalize(P, dim=-1).mean(1) @ prompt_sent.to(device).T  # [B, prompts]
            per_class = torch.stack([s.mean(1) if reduction == "mean" else s.amax(1) for s in sims.split(sizes, dim=1)], 1)
            fine.append(per_class)
            hit, chance = _pointing(P, out.sentence_features.float(), batch.sentence_mask, batch.heatmaps, batch.has_gaze,
                                    settings.gaze_pool)
            if is_pad:
                hit, chance = hit[:0], chance[:0]
            point_hit.append(hit)
            point_chance.append(chance)
        zi_all = gather_across_ranks(torch.cat(zi)).cpu()
        zt_all = gather_across_ranks(torch.cat(zt)).cpu()
        y_all = gather_across_ranks(torch.cat(labels)).cpu()
        fine_all = gather_across_ranks(torch.cat(fine)).cpu()
        hits = gather_across_ranks(_pad1(torch.cat(point_hit), device)).cpu()
        chances = gather_across_ranks(_pad1(torch.cat(point_chance), device)).cpu()
    finally:
        model.train(was_training)

    real = y_all > -2
    out: dict[str, float] = {"n_samples": float(int(real.sum()))}
    valid = y_all >= 0
    out["n_classified"] = float(int(valid.sum()))
    if int(valid.sum()) > 0:
        for label, per_class in prompt_global.items():
            res = zero_shot_from_embeddings(zi_all[valid], y_all[valid], per_class, reduction=reduction, class_names=names)
            probs = torch.softmax(settings.logit_scale * res.scores, dim=1)
            key = f"zs_{label}_" if label else "zs_"
            out.update({f"{key}accuracy": res.accuracy, f"{key}macro_f1": res.macro_f1, f"{key}auroc": macro_auroc(probs, res.labels)})
            if not label:
                out["zs_auroc_raw"] = res.auroc
        out["zs_fine_accuracy"] = float((fine_all[valid].argmax(1) == y_all[valid]).float().mean())
        if settings.retrieval:
            n = int(valid.sum())
            usable = [k for k in settings.ks if k <= n]
            if usable:
                out.update(retrieval_precision_at_k(zi_all[valid], zt_all[valid], y_all[valid], y_all[valid], ks=usable))
    hits = hits[hits >= 0]
    chances = chances[chances >= 0]
    if hits.numel():
        out["gaze_pointing"] = float(hits.float().mean())
        out["gaze_pointing_chance"] = float(chances.float().mean())
    return out


def _pad1(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    # gather_across_ranks needs a tensor on every rank, also an empty one
    return x.to(device).float().reshape(-1)


def _pointing(
    P: torch.Tensor,
    S: torch.Tensor,
    sentence_mask: torch.Tensor,
    heatmaps: torch.Tensor,
    has_gaze: torch.Tensor,
    gaze_pool: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (gaze sample, real sentence with gaze): hit = the most similar patch is in the gaze
    region (pooled heatmap >= half its max); chance = the region's share of the patches."""
    if not bool(has_gaze.any()):
        return P.new_zeros(0), P.new_zeros(0)
    n = P.shape[1]
    GS = loss_terms.pool_gaze(heatmaps.to(P.device).float(), n, gaze_pool)  # [B, M, n]
    peak = GS.amax(-1, keepdim=True)
    region = (GS >= 0.5 * peak) & (peak > 0)
    sim = torch.einsum("bnd,bmd->bmn", P, S)  # [B, M, n]
    best = sim.argmax(-1, keepdim=True)
    hit = region.gather(-1, best).squeeze(-1)
    use = sentence_mask.to(P.device).bool() & has_gaze.to(P.device).bool()[:, None] & (peak.squeeze(-1) > 0)
    return hit[use].float(), region.float().mean(-1)[use]
