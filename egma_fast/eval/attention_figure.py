"""The side-by-side attention figure: where a sentence was looked at, and where models match it.

Panels, left to right: the image; the radiologist's gaze heatmap of the sentence over it; each
model's patch-sentence similarity over it. The models' maps share one colour scale (the range
of all of them together) and one colour bar, so equal colours mean equal cosine similarity in
every model's panel; the gaze panel has its own bar (fraction of its peak). Every caption
(panel names, the sentence) is drawn outside the images, and every image panel says which side
is the patient's left (radiographic convention: the patient faces the viewer, so the patient's
left is on the image's right).

matplotlib's object API (no pyplot state): the figure can be built in any thread or process.
"""
from __future__ import annotations

import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from egma_fast.eval.attention_map import to_rgb_uint8, upsample_heatmap

__all__ = ["PATIENT_LEFT_CAPTION", "attention_figure", "save_attention_figure"]

#: Under every image panel: the patient's sides as the image shows them.
PATIENT_LEFT_CAPTION = "patient's right  \u2190  \u2192  patient's left"
_MAP_CMAP = "jet"
_GAZE_CMAP = "magma"
_OPACITY = 0.5


def attention_figure(
    image: Any,
    gaze: Any,
    similarities: Mapping[str, Any],
    sentence: str,
    *,
    title: str | None = None,
    panel_inches: float = 2.6,
) -> Figure:
    """The figure of one image and one sentence.

    Args:
        image: the picture (anything :func:`~egma_fast.eval.attention_map.to_rgb_uint8` takes),
            [H, W] / [H, W, 3] / [C, H, W].
        gaze: the sentence's gaze heatmap [h, w] in [0, 1] on a grid spanning the whole image.
        similarities: model name -> its patch-sentence cosine similarities [g, g] (row-major
            patch grid, :func:`~egma_fast.eval.attention_map.patch_sentence_similarity`).
        sentence: the sentence, shown above the panels.
        title: an optional first line above the sentence (e.g. the class).
    Returns:
        a matplotlib Figure (save it with ``fig.savefig`` or :func:`save_attention_figure`).
    """
    if not similarities:
        raise ValueError("similarities must hold at least one model's map")
    rgb = to_rgb_uint8(image)
    size = rgb.shape[:2]
    grey = rgb.mean(axis=2)
    # bilinear to the image size, values kept: one scale must mean the same in every panel
    maps = {name: upsample_heatmap(torch.as_tensor(np.asarray(sim, np.float32)), size, rescale=False)
            for name, sim in similarities.items()}
    shared = Normalize(vmin=min(float(m.min()) for m in maps.values()), vmax=max(float(m.max()) for m in maps.values()))
    gaze_up = upsample_heatmap(torch.as_tensor(np.asarray(gaze, np.float32)), size, rescale=False)

    n = 2 + len(maps)
    fig = Figure(figsize=(panel_inches * n + 1.4, panel_inches + 1.5), layout="constrained")
    FigureCanvasAgg(fig)  # renders to PNG without pyplot or a display
    axes = fig.subplots(1, n)
    for ax in axes:
        ax.imshow(grey, cmap="gray", interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(PATIENT_LEFT_CAPTION, fontsize=7)
    axes[0].set_title("image", fontsize=9)
    gaze_norm = Normalize(0.0, 1.0)
    axes[1].imshow(gaze_up, cmap=_GAZE_CMAP, norm=gaze_norm, alpha=_OPACITY, interpolation="nearest")
    axes[1].set_title("radiologist gaze", fontsize=9)
    # colour bars from opaque mappables: the bar shows the colours, the panels blend them
    fig.colorbar(ScalarMappable(gaze_norm, _GAZE_CMAP), ax=axes[1], shrink=0.8, label="gaze (fraction of peak)")
    for ax, (name, heat) in zip(axes[2:], maps.items()):
        ax.imshow(heat, cmap=_MAP_CMAP, norm=shared, alpha=_OPACITY, interpolation="nearest")
        ax.set_title(name, fontsize=9)
    fig.colorbar(ScalarMappable(shared, _MAP_CMAP), ax=list(axes[2:]), shrink=0.8,
                 label="patch-sentence cosine (shared scale)")
    caption = "\n".join(textwrap.wrap(f"\u201c{sentence}\u201d", width=int(28 * n)))
    fig.suptitle(caption if title is None else f"{title}\n{caption}", fontsize=9)
    return fig


def save_attention_figure(path: str | Path, *args: Any, dpi: int = 110, **kwargs: Any) -> Path:
    """:func:`attention_figure` written as a PNG (parent folders created); returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    attention_figure(*args, **kwargs).savefig(out, dpi=dpi, format="png")
    return out
