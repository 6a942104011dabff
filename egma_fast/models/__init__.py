"""HF transformers towers for EGMA: patch tokens, sentence features and global embeddings.

Importing this package imports transformers lazily (only when a tower is built).
"""
from egma_fast.models.attention import BackendUnavailableError, resolve_attn_implementation
from egma_fast.models.config import IMAGE_SIZE_RULE, ModelConfig, minilm_path
from egma_fast.models.egma_model import EGMAModel, EGMAOutput, register_fsdp_forward_methods
from egma_fast.models.hub import ModelNotFoundError
from egma_fast.models.image_tower import ImageFeatures, ImageTower
from egma_fast.models.text_tower import TextFeatures, TextTower
from egma_fast.models.tokenizer import build_tokenizer, tokenize_reports, tokenize_texts

__all__ = [
    "BackendUnavailableError",
    "EGMAModel",
    "EGMAOutput",
    "IMAGE_SIZE_RULE",
    "ImageFeatures",
    "ImageTower",
    "ModelConfig",
    "ModelNotFoundError",
    "TextFeatures",
    "TextTower",
    "build_tokenizer",
    "minilm_path",
    "register_fsdp_forward_methods",
    "resolve_attn_implementation",
    "tokenize_reports",
    "tokenize_texts",
]
