"""Gaze pipeline: eye-tracking datasets -> canonical readings -> fixations -> word and sentence
heatmaps (SPEC section 5).

Modules: ``records`` (GazeReading, Word, ReadReport), ``egd_cxr`` and ``reflacx`` (dataset
readers), ``fixations`` (adaptive velocity-threshold detection; pymovements cross-check),
``simulate`` (raw samples from fixations), ``sentences`` (transcript -> sentences),
``heatmaps`` (word / sentence heatmaps), ``images`` (image lookup and loading).
Pooling heatmaps onto the patch grid (GS, SPEC 2.3) is ``egma_fast.loss_terms.pool_gaze``.
"""
from egma_fast.gaze.egd_cxr import read_egd_cxr, screen_to_image
from egma_fast.gaze.fixations import (
    FixationDetection,
    adaptive_velocity_thresholds,
    detect_fixations_adaptive,
    detect_fixations_pymovements,
    gaze_speed,
)
from egma_fast.gaze.heatmaps import (
    SentenceHeatmaps,
    gaussian_heatmaps,
    heatmap_size_for,
    reading_heatmap,
    sentence_heatmaps,
    word_heatmaps,
    word_weights,
)
from egma_fast.gaze.records import GazeReading, ReadReport, Word, make_fixations
from egma_fast.gaze.reflacx import read_reflacx
from egma_fast.gaze.sentences import Sentence, join_tokens, split_sentences, words_from_phrases
from egma_fast.gaze.simulate import simulate_raw_gaze

__all__ = [
    "FixationDetection",
    "GazeReading",
    "ReadReport",
    "Sentence",
    "SentenceHeatmaps",
    "Word",
    "adaptive_velocity_thresholds",
    "detect_fixations_adaptive",
    "detect_fixations_pymovements",
    "gaussian_heatmaps",
    "gaze_speed",
    "heatmap_size_for",
    "join_tokens",
    "make_fixations",
    "read_egd_cxr",
    "read_reflacx",
    "reading_heatmap",
    "screen_to_image",
    "sentence_heatmaps",
    "simulate_raw_gaze",
    "split_sentences",
    "word_heatmaps",
    "word_weights",
    "words_from_phrases",
]
