"""The demo's attention figure: one colour scale shared by the models' maps, colour bars, captions
outside the images, the patient's left marked."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from egma_fast.eval.attention_figure import PATIENT_LEFT_CAPTION, attention_figure, save_attention_figure  # noqa: E402


def _inputs():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (48, 48), dtype=np.uint8)
    gaze = np.zeros((8, 8), np.float32)
    gaze[2, 6] = 1.0
    weak = rng.uniform(0.0, 0.2, (4, 4)).astype(np.float32)    # a model whose maps are all low
    strong = rng.uniform(0.5, 0.9, (4, 4)).astype(np.float32)  # one whose maps are all high
    return image, gaze, {"EGMA": strong, "no gaze": weak}


def test_models_share_one_scale_with_a_colour_bar():
    image, gaze, sims = _inputs()
    fig = attention_figure(image, gaze, sims, "There is a small left pleural effusion.", title="pleural_effusion")
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in panels] == ["image", "radiologist gaze", "EGMA", "no gaze"]
    norms = [(ax.images[-1].norm.vmin, ax.images[-1].norm.vmax) for ax in panels[2:]]
    lo = min(float(s.min()) for s in sims.values())
    hi = max(float(s.max()) for s in sims.values())
    assert norms[0] == norms[1] == pytest.approx((lo, hi), abs=0.02)  # not each map min-max scaled alone
    bars = [ax for ax in fig.axes if not ax.images and ax.get_ylabel()]
    labels = {ax.get_ylabel() for ax in bars}
    assert any("shared" in label for label in labels) and any("gaze" in label for label in labels), labels


def test_captions_outside_the_images_and_the_patients_left_marked(tmp_path):
    image, gaze, sims = _inputs()
    sentence = "There is a small left pleural effusion."
    fig = attention_figure(image, gaze, sims, sentence)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in (ax for ax in fig.axes if ax.images):
        assert not ax.texts  # nothing written over an image
        box = ax.get_window_extent(renderer)
        assert ax.title.get_window_extent(renderer).y0 >= box.y1 - 1  # the panel name above it
        assert ax.get_xlabel() == PATIENT_LEFT_CAPTION and ax.xaxis.label.get_window_extent(renderer).y1 <= box.y0 + 1
    assert PATIENT_LEFT_CAPTION.endswith("patient's left")  # the right end of the caption: the image's right
    assert sentence in fig.get_suptitle()
    path = save_attention_figure(tmp_path / "fig" / "case.png", image, gaze, sims, sentence)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
