"""EGMAModel: image tower + text tower producing everything the EGMA loss consumes.

FSDP2: ``transformer_blocks()`` lists the transformer block modules of both towers, in
execution order. The trainer applies ``fully_shard`` to each of them, then to the root
(``fully_shard(model)``); the projections, embeddings and final norms live in the root group.
Because the root's parameters are only gathered by the root's forward hooks, the evaluation
entry points ``encode_*`` must be routed through the root: call
:func:`register_fsdp_forward_methods` (which uses ``torch.distributed.fsdp.register_fsdp_forward_method``)
after wrapping, and call them on every rank (they issue collectives).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from egma_fast.models.config import ModelConfig
from egma_fast.models.image_tower import ImageTower
from egma_fast.models.text_tower import TextTower


@dataclass
class EGMAOutput:
    """Everything the loss needs for one batch (SPEC 1 notation).

    patch_features: P, [B, n, d], L2-normalised per token, row-major patch grid.
    sentence_features: S, [B, M, d], L2-normalised; zero where sentence_mask is False.
    sentence_mask: [B, M] bool, True = real sentence.
    image_embeddings: z^I, [B, d], L2-normalised.
    text_embeddings: z^T, [B, d], L2-normalised (zero for a report without sentences).
    """

    patch_features: torch.Tensor
    sentence_features: torch.Tensor
    sentence_mask: torch.Tensor
    image_embeddings: torch.Tensor
    text_embeddings: torch.Tensor


class EGMAModel(nn.Module):
    """Dual encoder for EGMA pretraining and evaluation.

    Example::

        model = EGMAModel(ModelConfig.tiny())
        out = model(images, sentence_input_ids, sentence_attention_mask, sentence_mask)
        loss = EGMALoss(...)(out.patch_features, out.sentence_features, out.sentence_mask, ...)
    """

    #: Methods besides ``forward`` that evaluation calls; register them with FSDP2 (see module doc).
    FSDP_FORWARD_METHODS: tuple[str, ...] = (
        "encode_image",
        "encode_patches",
        "encode_text",
        "encode_sentences",
        "encode_reports",
    )

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else ModelConfig()
        self.image_tower = ImageTower(self.config)
        self.text_tower = TextTower(self.config)

    @property
    def embed_dim(self) -> int:
        """d."""
        return self.config.embed_dim

    @property
    def num_patches(self) -> int:
        """n for images of ``config.image_size`` px."""
        return self.image_tower.num_patches

    def forward(
        self,
        images: torch.Tensor,
        sentence_input_ids: torch.Tensor,
        sentence_attention_mask: torch.Tensor,
        sentence_mask: torch.Tensor,
    ) -> EGMAOutput:
        """images [B, C, H, W]; sentence_input_ids / sentence_attention_mask [B, M, L]; sentence_mask [B, M]."""
        if isinstance(images, torch.Tensor) and isinstance(sentence_input_ids, torch.Tensor):
            if images.dim() == 4 and sentence_input_ids.dim() == 3 and images.shape[0] != sentence_input_ids.shape[0]:
                raise ValueError(
                    f"images and sentence_input_ids must have the same batch size, got "
                    f"{images.shape[0]} and {sentence_input_ids.shape[0]}"
                )
        image = self.image_tower(images)
        text = self.text_tower(sentence_input_ids, sentence_attention_mask, sentence_mask)
        return EGMAOutput(
            patch_features=image.patches,
            sentence_features=text.sentence_features,
            sentence_mask=sentence_mask.bool(),
            image_embeddings=image.embedding,
            text_embeddings=text.embedding,
        )

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Global image embeddings z^I: [B, C, H, W] -> [B, d], L2-normalised."""
        return self.image_tower(images).embedding

    def encode_patches(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens P: [B, C, H, W] -> [B, n, d], L2-normalised per token."""
        return self.image_tower(images).patches

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Report embeddings of one-sentence texts such as prompts: [N, L] -> [N, d] (zero-shot, retrieval)."""
        return self.text_tower.encode_text(input_ids, attention_mask)

    def encode_sentences(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sentence features (as in S) of single sentences: [N, L] -> [N, d] (attention maps)."""
        return self.text_tower.encode_sentences(input_ids, attention_mask)

    def encode_reports(
        self,
        sentence_input_ids: torch.Tensor,
        sentence_attention_mask: torch.Tensor,
        sentence_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Report embeddings z^T of sentence-split reports, exactly as in ``forward``: [B, M, L] -> [B, d]."""
        return self.text_tower(sentence_input_ids, sentence_attention_mask, sentence_mask).embedding

    def transformer_blocks(self) -> list[nn.Module]:
        """Transformer block modules of both towers (image blocks first), for per-block FSDP2.

        Swin: every SwinLayer (patch merging stays with the root); ViT: every ViTLayer;
        BERT family: every encoder layer. Usage::

            for block in model.transformer_blocks():
                fully_shard(block, mp_policy=policy)
            fully_shard(model, mp_policy=policy)
            register_fsdp_forward_methods(model)
        """
        return self.image_tower.blocks() + self.text_tower.blocks()


def register_fsdp_forward_methods(model: nn.Module) -> None:
    """Make ``model.encode_*`` trigger FSDP2's root pre/post-forward hooks (all-gather of root params).

    Call once after ``fully_shard(model)``. A no-op for methods the model does not have.
    """
    from torch.distributed.fsdp import register_fsdp_forward_method  # noqa: PLC0415 (FSDP only when wrapping)

    for name in EGMAModel.FSDP_FORWARD_METHODS:
        if hasattr(model, name):
            register_fsdp_forward_method(model, name)
