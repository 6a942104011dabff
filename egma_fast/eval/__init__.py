"""Evaluation (SPEC 6): zero-shot classification, retrieval P@K, linear probe, attention maps.

Metrics are plain torch; functions that drive a model only call its ``encode_*`` methods (see
:mod:`egma_fast.eval.encode` for the distributed contract: every rank calls them).
"""
from egma_fast.eval.attention_map import (
    AttentionMap,
    model_attention_map,
    patch_sentence_similarity,
    render_attention_map,
    upsample_heatmap,
)
from egma_fast.eval.encode import encode_image_loader, encode_reports, encode_texts, gather_across_ranks
from egma_fast.eval.linear_probe import LinearProbe, fit_linear_probe, label_subset, linear_probe_auroc
from egma_fast.eval.metrics import (
    accuracy,
    auroc_per_class,
    average_ranks,
    binary_auroc,
    macro_auroc,
    macro_f1,
    precision_at_k,
)
from egma_fast.eval.prompts import (
    DEFAULT_PROMPTS,
    PROMPT_SETS,
    PromptSets,
    align_prompts,
    dataset_prompts,
    get_prompts,
    resolve_prompts,
)
from egma_fast.eval.retrieval import relevance_matrix, retrieval_evaluate, retrieval_precision_at_k
from egma_fast.eval.zero_shot import (
    ZeroShotResult,
    class_scores,
    zero_shot_classify,
    zero_shot_from_embeddings,
    zero_shot_metrics,
)

__all__ = [
    "AttentionMap",
    "DEFAULT_PROMPTS",
    "LinearProbe",
    "PROMPT_SETS",
    "PromptSets",
    "ZeroShotResult",
    "accuracy",
    "align_prompts",
    "auroc_per_class",
    "average_ranks",
    "binary_auroc",
    "class_scores",
    "dataset_prompts",
    "encode_image_loader",
    "encode_reports",
    "encode_texts",
    "fit_linear_probe",
    "gather_across_ranks",
    "get_prompts",
    "label_subset",
    "linear_probe_auroc",
    "macro_auroc",
    "macro_f1",
    "model_attention_map",
    "patch_sentence_similarity",
    "precision_at_k",
    "relevance_matrix",
    "render_attention_map",
    "retrieval_evaluate",
    "resolve_prompts",
    "retrieval_precision_at_k",
    "upsample_heatmap",
    "zero_shot_classify",
    "zero_shot_from_embeddings",
    "zero_shot_metrics",
]
