"""Image tower: a transformers Swin / ViT encoder -> patch tokens P [B, n, d] and z^I [B, d].

Patch tokens are the encoder's last-stage tokens in its own order (row-major over the
sqrt(n) x sqrt(n) grid, which is the order SPEC 2.3 pools gaze heatmaps into); ViT's CLS token
is dropped from them. Each goes through a linear projection to d and is L2-normalised per token.
The global embedding is Swin's average-pooled last stage, or ViT's (final-layer-normed) CLS
token, through its own projection, L2-normalised.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from egma_fast.models.attention import resolve_attn_implementation
from egma_fast.models.blocks import enable_activation_checkpointing, find_transformer_blocks
from egma_fast.models.config import ModelConfig
from egma_fast.models.hub import from_local

SUPPORTED_IMAGE_MODEL_TYPES = ("swin", "swinv2", "vit")


@dataclass
class ImageFeatures:
    """Output of :class:`ImageTower`.

    patches: [B, n, d] L2-normalised patch tokens (row-major grid order).
    embedding: [B, d] L2-normalised global image embedding z^I.
    """

    patches: torch.Tensor
    embedding: torch.Tensor


def _tiny_image_config(config: ModelConfig):
    from transformers import SwinConfig, ViTConfig  # noqa: PLC0415 (heavy import kept local)

    g, w, layers, heads = config.grid, config.tiny_width, config.tiny_layers, config.tiny_heads
    common = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_channels=3)
    if config.image_model == "tiny-swin":
        # Two stages: a 2g x 2g stage in g x g windows (4 windows, shifted), merged to g x g.
        return SwinConfig(
            image_size=config.image_size,
            patch_size=config.image_size // (2 * g),
            embed_dim=w,
            depths=[layers, layers],
            num_heads=[heads, 2 * heads],
            window_size=g,
            mlp_ratio=2.0,
            drop_path_rate=0.0,
            **common,
        )
    return ViTConfig(
        image_size=config.image_size,
        patch_size=config.image_size // g,
        hidden_size=w,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * w,
        **common,
    )


def build_image_encoder(config: ModelConfig) -> nn.Module:
    """The HF image encoder named by ``config.image_model`` (no classification head, no ViT pooler)."""
    from transformers import AutoConfig, AutoModel  # noqa: PLC0415 (transformers is imported only when a tower is built)

    attn = resolve_attn_implementation(config.attn_implementation)
    if config.image_model in ("tiny-swin", "tiny-vit"):
        hf_config, pretrained = _tiny_image_config(config), False
    else:
        hf_config, pretrained = from_local(AutoConfig.from_pretrained, config.image_model, "model.image_model"), config.pretrained
    if hf_config.model_type not in SUPPORTED_IMAGE_MODEL_TYPES:
        raise ValueError(
            f"ModelConfig.image_model={config.image_model!r} is a {hf_config.model_type!r} model; "
            f"supported image towers: {SUPPORTED_IMAGE_MODEL_TYPES}"
        )
    if pretrained:
        model = from_local(AutoModel.from_pretrained, config.image_model, "model.image_model", config=hf_config,
                           attn_implementation=attn)
    else:
        model = AutoModel.from_config(hf_config, attn_implementation=attn)
    # ViT's pooler (dense + tanh on CLS) would be unused parameters (breaks DDP/FSDP gradient
    # bookkeeping); dropped after loading so checkpoints load without "unexpected keys".
    # Swin's pooler is a parameter-free average pool and is what gives z^I.
    if hf_config.model_type == "vit" and isinstance(getattr(model, "pooler", None), nn.Module):
        model.pooler = None
    if config.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return model


class ImageTower(nn.Module):
    """Swin / ViT encoder plus projections to the shared dimension d.

    forward(images [B, C, H, W]) -> ImageFeatures(patches [B, n, d], embedding [B, d]).
    C may be 1 (grayscale X-rays, repeated to 3 channels) or the encoder's channel count.
    """

    def __init__(self, config: ModelConfig, encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder if encoder is not None else build_image_encoder(config)
        hf = self.encoder.config
        self.model_type: str = hf.model_type
        width = hf.hidden_size  # for Swin: the last stage's width
        self.patch_proj = nn.Linear(width, config.embed_dim, bias=config.projection_bias)
        self.global_proj = nn.Linear(width, config.embed_dim, bias=config.projection_bias)

    def grid_size(self, image_size: int | None = None) -> int:
        """Side of the last-stage token grid for a square input of ``image_size`` px (n = side ** 2)."""
        size = self.config.image_size if image_size is None else image_size
        hf = self.encoder.config
        if self.model_type == "vit":
            return size // hf.patch_size
        side = math.ceil(size / hf.patch_size)
        for _ in range(len(hf.depths) - 1):
            side = math.ceil(side / 2)  # patch merging pads odd sides
        return side

    @property
    def num_patches(self) -> int:
        """n at ``config.image_size``."""
        return self.grid_size() ** 2

    def blocks(self) -> list[nn.Module]:
        """The transformer blocks (SwinLayer / Swinv2Layer / ViTLayer), in execution order."""
        return find_transformer_blocks(self.encoder)

    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a tensor [B, C, H, W], got {got}")
        if not images.is_floating_point():
            raise ValueError(f"images must be a floating-point tensor, got dtype {images.dtype}")
        channels = self.encoder.config.num_channels
        if images.shape[1] == 1 and channels != 1:
            images = images.expand(-1, channels, -1, -1)
        elif images.shape[1] != channels:
            raise ValueError(f"images must have 1 or {channels} channels, got shape {tuple(images.shape)}")
        # Match the patch-embedding weight's dtype, read at call time (under FSDP2 that is the
        # unsharded compute dtype), so a bf16 model takes fp32 images as ViT already does.
        patch_embed = getattr(self.encoder.embeddings, "patch_embeddings", None)
        weight = getattr(getattr(patch_embed, "projection", None), "weight", None)
        autocast = torch.is_autocast_enabled(images.device.type)
        if isinstance(weight, torch.Tensor) and weight.dtype != images.dtype and not autocast:
            images = images.to(weight.dtype)
        return images

    def forward(self, images: torch.Tensor) -> ImageFeatures:
        images = self._check_images(images)
        if self.model_type == "vit":
            native = self.encoder.config.image_size
            interpolate = images.shape[-1] != native or images.shape[-2] != native
            out = self.encoder(pixel_values=images, interpolate_pos_encoding=interpolate)
            tokens = out.last_hidden_state
            pooled, tokens = tokens[:, 0], tokens[:, 1:]  # CLS is the global token, not a patch
        else:
            out = self.encoder(pixel_values=images)
            tokens, pooled = out.last_hidden_state, out.pooler_output
        patches = F.normalize(self.patch_proj(tokens), dim=-1)
        embedding = F.normalize(self.global_proj(pooled), dim=-1)
        return ImageFeatures(patches=patches, embedding=embedding)
