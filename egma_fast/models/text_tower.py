"""Text tower: a BERT-family encoder -> sentence features S [B, M, d] and report embedding z^T [B, d].

Each sentence is encoded on its own. Only real sentences (``sentence_mask`` True) go through
the encoder: they are gathered into one [N, L] batch, and token columns that are padding in
every one of them are trimmed, so padding costs no encoder compute. Tokens are mean-pooled with
the attention mask to h_j (encoder width), then

    S_j  = normalize(W_s h_j)                       sentence feature, zero in padded slots
    z^T  = normalize(W_r mean_{j real} h_j)         report embedding (zero for a report with no
                                                    real sentence)

so the report embedding is the projection of the mask-aware mean of the token-pooled sentence
features. A prompt (``encode_text``) is a one-sentence report: z^T = normalize(W_r h).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from egma_fast.models.attention import resolve_attn_implementation
from egma_fast.models.blocks import enable_activation_checkpointing, find_transformer_blocks
from egma_fast.models.config import MINILM, ModelConfig, minilm_path
from egma_fast.models.hub import from_local

# These BERT-family classes take add_pooling_layer (their pooler would be unused parameters).
_HAS_POOLER = ("bert", "roberta", "xlm-roberta", "camembert")
#: Vocabulary of the standard BERT uncased tokenizer (the one shipped with MiniLM), used by tiny-bert.
BERT_UNCASED_VOCAB = 30522


@dataclass
class TextFeatures:
    """Output of :class:`TextTower`.

    sentence_features: [B, M, d], L2-normalised; exactly zero where sentence_mask is False.
    embedding: [B, d] L2-normalised report embedding z^T.
    """

    sentence_features: torch.Tensor
    embedding: torch.Tensor


def _tiny_text_config(config: ModelConfig):
    from transformers import BertConfig  # noqa: PLC0415 (transformers is imported only when a tower is built)

    w = config.tiny_width
    return BertConfig(
        vocab_size=BERT_UNCASED_VOCAB,
        hidden_size=w,
        num_hidden_layers=config.tiny_layers,
        num_attention_heads=config.tiny_heads,
        intermediate_size=2 * w,
        max_position_embeddings=512,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def build_text_encoder(config: ModelConfig) -> nn.Module:
    """The HF text encoder named by ``config.text_model`` (BERT family, without pooler)."""
    from transformers import AutoConfig, AutoModel  # noqa: PLC0415 (transformers is imported only when a tower is built)

    attn = resolve_attn_implementation(config.attn_implementation)
    if config.text_model == "tiny-bert":
        source, hf_config, pretrained = None, _tiny_text_config(config), False
    else:
        source = str(minilm_path()) if config.text_model == MINILM else config.text_model
        pretrained = True if config.text_model == MINILM else config.pretrained
        hf_config = from_local(AutoConfig.from_pretrained, source, "model.text_model")
    if getattr(hf_config, "is_encoder_decoder", False) or getattr(hf_config, "is_decoder", False):
        raise ValueError(
            f"ModelConfig.text_model={config.text_model!r} is not an encoder-only (BERT-family) model"
        )
    if pretrained:
        model = from_local(AutoModel.from_pretrained, source, "model.text_model", config=hf_config, attn_implementation=attn)
    elif hf_config.model_type in _HAS_POOLER:
        model = AutoModel.from_config(hf_config, attn_implementation=attn, add_pooling_layer=False)
    else:
        model = AutoModel.from_config(hf_config, attn_implementation=attn)
    # The pooler (dense + tanh on [CLS]) is unused here: unused parameters break DDP/FSDP
    # gradient bookkeeping. Dropped after loading so checkpoints load without "unexpected keys".
    if isinstance(getattr(model, "pooler", None), nn.Module):
        model.pooler = None
    if config.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return model


def _check_ids_and_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, ids_name: str, mask_name: str, dims: int) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != dims:
        shape = "[N, L]" if dims == 2 else "[B, M, L]"
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"{ids_name} must be a tensor {shape}, got {got}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{ids_name} must be an integer tensor, got dtype {input_ids.dtype}")
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"{mask_name} must have the shape of {ids_name} {tuple(input_ids.shape)}, got {got}")
    if input_ids.shape[-1] == 0:
        raise ValueError(f"{ids_name} has zero tokens per sequence (L == 0)")


class TextTower(nn.Module):
    """BERT-family encoder plus sentence and report projections to d.

    forward(sentence_input_ids [B, M, L], sentence_attention_mask [B, M, L], sentence_mask [B, M])
      -> TextFeatures(sentence_features [B, M, d], embedding [B, d]).
    """

    def __init__(self, config: ModelConfig, encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder if encoder is not None else build_text_encoder(config)
        width = self.encoder.config.hidden_size
        self.sentence_proj = nn.Linear(width, config.embed_dim, bias=config.projection_bias)
        self.report_proj = nn.Linear(width, config.embed_dim, bias=config.projection_bias)

    def blocks(self) -> list[nn.Module]:
        """The transformer blocks (e.g. BertLayer), in execution order."""
        return find_transformer_blocks(self.encoder)

    def pool_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mask-aware mean of the last hidden states: [N, L] ids and mask -> [N, H] (encoder width).

        Trailing token columns that are padding in every row are trimmed first (positions of the
        kept tokens do not change, so the result is the same).
        """
        keep = attention_mask.bool().any(dim=0).nonzero()
        length = int(keep.max()) + 1 if keep.numel() else 1
        input_ids, attention_mask = input_ids[:, :length], attention_mask[:, :length]
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.to(torch.float32).unsqueeze(-1)
        # Sum in fp32, hand back the encoder's dtype (FSDP mixed precision runs the heads in it).
        pooled = (hidden.float() * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return pooled.to(hidden.dtype)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Report embeddings of one-sentence texts (prompts): [N, L] -> [N, d], L2-normalised."""
        _check_ids_and_mask(input_ids, attention_mask, "input_ids", "attention_mask", dims=2)
        return F.normalize(self.report_proj(self.pool_tokens(input_ids, attention_mask)), dim=-1)

    def encode_sentences(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sentence features of single sentences: [N, L] -> [N, d], L2-normalised (as in S)."""
        _check_ids_and_mask(input_ids, attention_mask, "input_ids", "attention_mask", dims=2)
        return F.normalize(self.sentence_proj(self.pool_tokens(input_ids, attention_mask)), dim=-1)

    def forward(
        self,
        sentence_input_ids: torch.Tensor,
        sentence_attention_mask: torch.Tensor,
        sentence_mask: torch.Tensor,
    ) -> TextFeatures:
        _check_ids_and_mask(
            sentence_input_ids, sentence_attention_mask, "sentence_input_ids", "sentence_attention_mask", dims=3
        )
        b, m, length = sentence_input_ids.shape
        if b == 0 or m == 0:
            raise ValueError(f"sentence_input_ids must have B >= 1 and M >= 1, got shape {(b, m, length)}")
        if not isinstance(sentence_mask, torch.Tensor) or sentence_mask.shape != (b, m):
            got = tuple(sentence_mask.shape) if isinstance(sentence_mask, torch.Tensor) else type(sentence_mask).__name__
            raise ValueError(f"sentence_mask must be a [B, M] = {(b, m)} tensor, got {got}")
        flat_valid = sentence_mask.reshape(-1).bool()
        index = flat_valid.nonzero().squeeze(1)  # [N] positions of the real sentences in B*M
        ids = sentence_input_ids.reshape(b * m, length)
        mask = sentence_attention_mask.reshape(b * m, length)
        d = self.config.embed_dim

        if index.numel() == 0:
            # No real sentence anywhere: still run the encoder once on a 1-token dummy so that
            # every FSDP rank issues the same collectives; its output enters with weight 0.
            dummy = self.pool_tokens(ids[:1, :1], torch.ones_like(mask[:1, :1]))
            zero = (self.sentence_proj(dummy).sum() + self.report_proj(dummy).sum()) * 0.0
            sentence_features = dummy.new_zeros(b, m, d) + zero
            return TextFeatures(sentence_features=sentence_features, embedding=dummy.new_zeros(b, d) + zero)

        pooled = self.pool_tokens(ids.index_select(0, index), mask.index_select(0, index))  # [N, H]
        local = F.normalize(self.sentence_proj(pooled), dim=-1)  # [N, d]
        sentence_features = local.new_zeros(b * m, d).index_copy(0, index, local).view(b, m, d)

        # Report embedding: projection of the mean of the real sentences' pooled features.
        report = torch.div(index, m, rounding_mode="floor")
        sums = pooled.new_zeros(b, pooled.shape[1], dtype=torch.float32).index_add(0, report, pooled.float())
        counts = torch.bincount(report, minlength=b).to(torch.float32).unsqueeze(1)
        mean = (sums / counts.clamp(min=1.0)).to(pooled.dtype)
        embedding = F.normalize(self.report_proj(mean), dim=-1)
        embedding = embedding * (counts > 0).to(embedding.dtype)  # a report with no sentence stays 0
        return TextFeatures(sentence_features=sentence_features, embedding=embedding)
