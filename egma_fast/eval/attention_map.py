"""Attention-map pictures: where on the image a sentence matches the patch tokens.

The map is the patch-sentence similarity P s (cosine of each patch token with the sentence
feature, on the sqrt(n) x sqrt(n) grid in the encoder's row-major order), upsampled bilinearly
to the image size, min-max scaled to [0, 1], coloured with a jet colormap and blended over the
image. Pillow writes the PNG (imported only when saving). To compare models, draw their maps on
one scale with :mod:`egma_fast.eval.attention_figure` (matplotlib, with colour bars).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from egma_fast.eval.encode import encode_texts, evaluating, model_device, unwrap_model


@dataclass
class AttentionMap:
    """similarity: [g, g] cosines; heatmap: [H, W] float32 in [0, 1]; overlay: [H, W, 3] uint8 RGB;
    path: where the PNG was written (None if not saved)."""

    similarity: np.ndarray
    heatmap: np.ndarray
    overlay: np.ndarray
    path: Path | None = None


def patch_sentence_similarity(patch_features: torch.Tensor, sentence_feature: torch.Tensor) -> torch.Tensor:
    """Cosine of every patch with the sentence, on the patch grid.

    Args:
        patch_features: [n, d] (or [1, n, d]) with n a perfect square.
        sentence_feature: [d] (or [1, d]).
    Returns:
        [g, g] float32, g = sqrt(n), row-major (patch i at row i // g, column i % g).
    """
    p, s = torch.as_tensor(patch_features), torch.as_tensor(sentence_feature)
    if p.dim() == 3 and p.shape[0] == 1:
        p = p[0]
    if s.dim() == 2 and s.shape[0] == 1:
        s = s[0]
    if p.dim() != 2:
        raise ValueError(f"patch_features must be [n, d], got shape {tuple(p.shape)}")
    if s.dim() != 1 or s.shape[0] != p.shape[1]:
        raise ValueError(f"sentence_feature must be [d={p.shape[1]}], got shape {tuple(s.shape)}")
    g = math.isqrt(p.shape[0])
    if g * g != p.shape[0] or g == 0:
        raise ValueError(f"patch_features must have a square number of patches, got n={p.shape[0]}")
    sim = F.normalize(p.detach().float(), dim=-1) @ F.normalize(s.detach().float().to(p.device), dim=0)
    return sim.view(g, g).cpu()


def upsample_heatmap(similarity: torch.Tensor, size: tuple[int, int], rescale: bool = True) -> np.ndarray:
    """[g, g] map -> [H, W] float32: bilinear (half-pixel centres), then, with ``rescale``, min-max
    to [0, 1] (a flat map gives 0). ``rescale=False`` keeps the values, for maps drawn on a
    shared scale (:mod:`egma_fast.eval.attention_figure`)."""
    sim = torch.as_tensor(similarity).float()
    if sim.dim() != 2:
        raise ValueError(f"similarity must be [g, g], got shape {tuple(sim.shape)}")
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive (H, W), got {size}")
    up = F.interpolate(sim[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    if not rescale:
        return up.numpy().astype(np.float32)
    lo, hi = float(up.min()), float(up.max())
    up = (up - lo) / (hi - lo) if hi > lo else torch.zeros_like(up)
    return up.numpy().astype(np.float32)


def jet_colormap(x: np.ndarray) -> np.ndarray:
    """[...] values in [0, 1] -> [..., 3] uint8 RGB (jet: blue -> cyan -> yellow -> red)."""
    x = np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0)
    rgb = np.stack([1.5 - np.abs(4 * x - 3), 1.5 - np.abs(4 * x - 2), 1.5 - np.abs(4 * x - 1)], axis=-1)
    return (np.clip(rgb, 0.0, 1.0) * 255).round().astype(np.uint8)


def to_rgb_uint8(image: Any) -> np.ndarray:
    """An image as [H, W, 3] uint8: PIL image, numpy [H, W] / [H, W, 3], torch [H, W] / [C, H, W] (C in 1, 3).

    Floating-point arrays are min-max scaled to 0..255 (works for normalised model inputs).
    """
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.dim() == 3 and t.shape[0] in (1, 3):
            t = t.permute(1, 2, 0)
        arr = t.float().numpy() if t.is_floating_point() else t.numpy()
    else:
        arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise ValueError(f"image must be [H, W], [H, W, 3] or [C, H, W] with C in (1, 3), got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating):
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
    arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return arr


def render_attention_map(
    image: Any,
    patch_features: torch.Tensor,
    sentence_feature: torch.Tensor,
    path: str | Path | None = None,
    *,
    opacity: float = 0.5,
) -> AttentionMap:
    """Overlay the patch-sentence similarity of one image and one sentence; optionally save a PNG.

    Args:
        image: the picture to draw on (see :func:`to_rgb_uint8`), any size.
        patch_features: [n, d] patch tokens of that image; sentence_feature: [d].
        path: PNG path (parent folders are created); None = do not save.
        opacity: weight of the heatmap in the blend, in [0, 1].
    """
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    rgb = to_rgb_uint8(image)
    sim = patch_sentence_similarity(patch_features, sentence_feature)
    heat = upsample_heatmap(sim, rgb.shape[:2])
    overlay = ((1.0 - opacity) * rgb.astype(np.float32) + opacity * jet_colormap(heat).astype(np.float32))
    overlay = np.clip(overlay.round(), 0, 255).astype(np.uint8)
    saved = None
    if path is not None:
        from PIL import Image  # noqa: PLC0415 (pillow is only needed to write the picture)

        saved = Path(path)
        saved.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(overlay).save(saved, format="PNG")
    return AttentionMap(similarity=sim.numpy(), heatmap=heat, overlay=overlay, path=saved)


def model_attention_map(
    model: nn.Module,
    tokenizer: Any,
    image: torch.Tensor,
    sentence: str,
    path: str | Path | None = None,
    *,
    display_image: Any = None,
    opacity: float = 0.5,
    max_length: int = 64,
) -> AttentionMap:
    """Attention map of a model for one preprocessed image [C, H, W] and one sentence / phrase.

    Uses ``model.encode_patches`` and ``model.encode_sentences`` (the S-side sentence feature)
    in eval mode under no_grad. ``display_image`` (default: ``image`` itself) is what is drawn.
    """
    img = torch.as_tensor(image)
    if img.dim() != 3:
        raise ValueError(f"image must be one preprocessed image [C, H, W], got shape {tuple(img.shape)}")
    if not isinstance(sentence, str) or not sentence:
        raise ValueError("sentence must be a non-empty string")
    net = unwrap_model(model)
    with evaluating(net):
        patches = net.encode_patches(img[None].to(model_device(net)))[0]
    sent = encode_texts(net, tokenizer, [sentence], max_length=max_length, sentence_features=True)[0]
    return render_attention_map(img if display_image is None else display_image, patches, sent, path, opacity=opacity)
