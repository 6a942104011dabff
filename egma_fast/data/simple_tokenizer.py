"""A small offline word-level HF tokenizer (for the synthetic demo and for tests).

Real training uses the text tower's own tokenizer. For the synthetic data, whose reports use a
closed vocabulary, a word-level tokenizer built in memory needs no download:

    tok = build_word_tokenizer(synthetic_vocabulary())
    tok(["The heart is mildly enlarged."], padding="max_length", max_length=16, truncation=True)

It lower-cases, splits on whitespace and punctuation, maps unknown words to [UNK], and wraps
every sentence as "[CLS] ... [SEP]"; [PAD] has id 0.
"""
from __future__ import annotations

from typing import Iterable

__all__ = ["SPECIAL_TOKENS", "build_word_tokenizer"]

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def build_word_tokenizer(vocabulary: Iterable[str], model_max_length: int = 512):
    """A ``transformers.PreTrainedTokenizerFast`` over ``vocabulary`` (words, lower-cased).

    Returns:
        tokenizer with pad/unk/cls/sep/mask tokens ids 0..4, then the words in sorted order.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors  # noqa: PLC0415 (the HF stack is imported only when a tokenizer is built)
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415 (the HF stack is imported only when a tokenizer is built)

    words = sorted({w.lower() for w in vocabulary if w and w.strip()} - set(SPECIAL_TOKENS))
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=model_max_length,
    )
