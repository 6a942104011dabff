"""Synthetic chest X-ray readings with informative gaze: the default data of the demo and of
``egma-fast prepare``.

Every case is a grey, chest-X-ray-like image (thorax, two lungs with vessel markings, ribs and
clavicles, mediastinum, heart, diaphragm, noise) with zero to two findings drawn at chosen
locations and severities:

    cardiomegaly        enlarged heart
    pleural_effusion    dense base of one lung with a meniscus
    opacity             irregular consolidation in one zone (upper / middle / lower) of one lung
    pneumothorax        dark, marking-free rim at the apex/lateral edge of one lung, with a
                        visible pleural line

and a templated report: one sentence per finding (location and severity in words) plus
normal-anatomy sentences consistent with the findings, in random order, with varied templates.
The simulated dictation gives every word a time window, and the simulated fixations dwell on
each sentence's region (the finding's area, or the anatomy a normal sentence speaks of) from
just before the sentence is spoken until it ends, so gaze carries real information: the
location of each finding. A configurable fraction of cases has no gaze.

"Left"/"right" are the patient's: the patient's right lung is on the viewer's left (x < W/2).

Deterministic by seed: case i depends only on (seed, i), so shards can be regenerated, extended
or produced in any order. Vectorised numpy drawing (no per-pixel loops): thousands of 224 x 224
cases take seconds.
"""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from egma_fast.data.options import HeatmapOptions, no_fields_left, take_fields
from egma_fast.data.sample import GazeSample, encode_sample
from egma_fast.data.shards import write_samples
from egma_fast.gaze.records import GazeReading, Word, make_fixations
from egma_fast.gaze.sentences import is_punctuation, split_sentences, tokenize_phrase

__all__ = [
    "CaseOptions",
    "FINDING_CLASSES",
    "SYNTHETIC_CLASS_PROMPTS",
    "Finding",
    "SyntheticCase",
    "generate_cases",
    "synthetic_case",
    "synthetic_vocabulary",
    "write_synthetic_shards",
]

FINDING_CLASSES = ("no_finding", "cardiomegaly", "pleural_effusion", "opacity", "pneumothorax")

# Zero-shot prompts per class, in the report templates' words (for the demo's evaluation).
SYNTHETIC_CLASS_PROMPTS: dict[str, list[str]] = {
    "no_finding": ["The lungs are clear.", "No acute cardiopulmonary abnormality.", "The heart size is normal."],
    "cardiomegaly": ["The heart is enlarged.", "There is cardiomegaly.", "Cardiac silhouette is enlarged."],
    "pleural_effusion": ["There is a pleural effusion.", "Pleural effusion is present."],
    "opacity": ["There is an opacity in the lung.", "Focal consolidation in the lung."],
    "pneumothorax": ["There is a pneumothorax.", "Pneumothorax is seen."],
}

_SEV_ADJ = ("mild", "moderate", "severe")
_SEV_ADV = ("mildly", "moderately", "severely")
_SIZE_ADJ = ("small", "moderate", "large")
_ZONES = ("upper", "middle", "lower")

_FINDING_TEMPLATES = {
    "cardiomegaly": [
        "The heart is {adv} enlarged.",
        "There is {adj} cardiomegaly.",
        "The cardiac silhouette is {adv} enlarged.",
    ],
    "pleural_effusion": [
        "There is a {size} {side} pleural effusion.",
        "A {size} {side} pleural effusion is present.",
        "Blunting of the {side} costophrenic angle from a {size} effusion.",
    ],
    "opacity": [
        "There is a {adj} opacity in the {side} {zone} lung zone.",
        "Focal consolidation in the {zone} {side} lung.",
        "A {adj} airspace opacity is seen in the {side} {zone} zone.",
    ],
    "pneumothorax": [
        "There is a {size} {side} pneumothorax.",
        "A {size} {side} apical pneumothorax is seen.",
        "There is a {side} pneumothorax, {size} in size.",
    ],
}

# normal-anatomy sentences: (topic, templates); a topic is said only when no finding contradicts it
_NORMAL_TEMPLATES = {
    "heart": ["The heart size is normal.", "The cardiac silhouette is within normal limits.", "Heart size is normal."],
    "lungs": ["The lungs are clear.", "No focal consolidation.", "The lungs are well expanded and clear."],
    "effusion": ["No pleural effusion.", "There is no pleural effusion.", "The costophrenic angles are sharp."],
    "pneumothorax": ["No pneumothorax.", "There is no pneumothorax."],
    "mediastinum": ["The mediastinal contours are normal.", "The mediastinum is unremarkable."],
    "bones": ["The osseous structures are intact.", "No acute osseous abnormality."],
}
_CONTRADICTS = {"cardiomegaly": "heart", "opacity": "lungs", "pleural_effusion": "effusion", "pneumothorax": "pneumothorax"}


def synthetic_vocabulary() -> list[str]:
    """Every lower-cased token the report templates can produce (for a small word tokenizer)."""
    words: set[str] = set()
    texts = [t for ts in _FINDING_TEMPLATES.values() for t in ts]
    texts += [t for ts in _NORMAL_TEMPLATES.values() for t in ts]
    texts += [p for ps in SYNTHETIC_CLASS_PROMPTS.values() for p in ps]
    fill = list(_SEV_ADJ + _SEV_ADV + _SIZE_ADJ + _ZONES) + ["left", "right"]
    for t in texts + fill:
        for tok in tokenize_phrase(re.sub(r"\{\w+\}", " ", t)):  # drop the {placeholders}
            words.add(tok.lower())
    return sorted(words)


@dataclass
class Finding:
    """A drawn finding.

    Attributes:
        kind: one of FINDING_CLASSES[1:].
        side: "left" / "right" (patient side), "" for cardiomegaly.
        zone: "upper" / "middle" / "lower" for opacity, else "".
        severity: in [0, 1].
        center: (x, y) of the finding's area in pixels (intensity-weighted centroid).
        spread: (sx, sy) standard deviation of the area in pixels.
        sentence: the report sentence describing it.
    """

    kind: str
    side: str
    zone: str
    severity: float
    center: tuple[float, float] = (0.0, 0.0)
    spread: tuple[float, float] = (0.0, 0.0)
    sentence: str = ""


@dataclass
class SyntheticCase:
    """One synthetic reading: image, findings, canonical GazeReading (words + fixations), labels."""

    key: str
    image: np.ndarray
    findings: list[Finding]
    reading: GazeReading
    labels: np.ndarray
    class_index: int
    targets: list[list[tuple[float, float, float, float]]] = field(default_factory=list)

    @property
    def has_gaze(self) -> bool:
        return self.reading.has_gaze


# ----------------------------------------------------------------------------------------------
# drawing (normalised coordinates: x, y in [0, 1], pixel centres)
# ----------------------------------------------------------------------------------------------
def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a coarse random grid, bilinearly upsampled, one axis
    at a time (cheap gathers; no BLAS call, whose threads thrash on a busy machine)."""
    H, W = shape
    g = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)

    def axis(n: int) -> tuple[np.ndarray, np.ndarray]:
        pos = np.linspace(0, cells, n, dtype=np.float32)
        i0 = np.minimum(pos.astype(np.int64), cells - 1)
        return i0, pos - i0

    x0, fx = axis(W)
    rows = g[:, x0] * (1 - fx) + g[:, x0 + 1] * fx  # [cells + 1, W]
    y0, fy = axis(H)
    return rows[y0] * (1 - fy)[:, None] + rows[y0 + 1] * fy[:, None]


class _Anatomy:
    """Randomised anatomy of one case; all in normalised units."""

    def __init__(self, rng: np.random.Generator):
        j = lambda s: float(rng.uniform(-s, s))  # noqa: E731
        self.scale = 1.0 + j(0.05)
        self.cx = 0.5 + j(0.02)
        self.top = 0.17 + j(0.02)
        self.bottom = 0.78 + j(0.03)
        self.lung_rx = 0.15 * self.scale
        self.lung_dx = 0.18 * self.scale  # lung centre offset from the midline
        self.heart = [self.cx + 0.05 + j(0.01), 0.64 + j(0.02), 0.13 * self.scale, 0.10 * self.scale]

    def lung_center(self, side: str) -> tuple[float, float]:
        # patient's right lung is on the viewer's left
        sx = -1.0 if side == "right" else 1.0
        return self.cx + sx * self.lung_dx, 0.5 * (self.top + self.bottom)

    def lung_dist(self, xx: np.ndarray, yy: np.ndarray, side: str) -> np.ndarray:
        """Normalised distance to the lung outline (< 1 inside); the lung widens towards its base."""
        cx, cy = self.lung_center(side)
        ry = 0.5 * (self.bottom - self.top)
        t = np.clip((yy - self.top) / (self.bottom - self.top), 0.0, 1.0)
        rx = self.lung_rx * (0.55 + 0.45 * np.sqrt(t))
        return np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)


def _mask_moments(mask: np.ndarray, H: int, W: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """Centroid (x, y) and spread (sx, sy) of a [H, W] weight mask, in pixels."""
    m = mask.astype(np.float64)
    tot = m.sum()
    if tot <= 0:
        return (W / 2, H / 2), (W / 8, H / 8)
    ys = (np.arange(H) + 0.5)[:, None]
    xs = (np.arange(W) + 0.5)[None, :]
    mx, my = (m * xs).sum() / tot, (m * ys).sum() / tot
    sx = np.sqrt((m * (xs - mx) ** 2).sum() / tot)
    sy = np.sqrt((m * (ys - my) ** 2).sum() / tot)
    return (float(mx), float(my)), (float(max(sx, 1.0)), float(max(sy, 1.0)))


def _draw(rng: np.random.Generator, size: int, findings: list[Finding]) -> tuple[np.ndarray, _Anatomy]:
    """Draw the image (uint8 [size, size]) and fill each finding's centre/spread."""
    H = W = size
    an = _Anatomy(rng)
    yy, xx = np.meshgrid((np.arange(H, dtype=np.float32) + 0.5) / H,
                         (np.arange(W, dtype=np.float32) + 0.5) / W, indexing="ij")
    px = 1.0 / size  # one pixel, for edge softness
    soft = max(px, 0.006)

    # body and soft tissue
    body_d = np.sqrt(((xx - an.cx) / (0.43 * an.scale)) ** 2 + ((yy - 0.58) / 0.52) ** 2)
    img = 0.04 + 0.38 * _sigmoid((1.0 - body_d) / 0.03)

    # lungs: dark, with vessel markings (low-frequency texture) fading towards the periphery
    markings = 0.5 * _smooth_noise(rng, (H, W), 14) + 0.5 * _smooth_noise(rng, (H, W), 28)
    lungs = {}
    for side in ("right", "left"):
        d = an.lung_dist(xx, yy, side)
        lungs[side] = (_sigmoid((1.0 - d) / (soft * 4)), d)
    lung = np.maximum(lungs["right"][0], lungs["left"][0])
    lung_texture = 0.09 * markings * (1.0 - 0.6 * np.maximum(lungs["right"][1], lungs["left"][1]).clip(0, 1))

    # pneumothorax: a marking-free dark rim at the apex / lateral edge of one lung
    ptx_mask = np.zeros((H, W), np.float32)
    for f in findings:
        if f.kind != "pneumothorax":
            continue
        lm, d = lungs[f.side]
        cx, cy = an.lung_center(f.side)
        lateral = (xx - cx) * (-1.0 if f.side == "right" else 1.0)
        width = 0.12 + 0.22 * f.severity  # fraction of the lung radius that collapsed
        rim = _sigmoid((d - (1.0 - width)) / 0.02) * lm
        upper = _sigmoid((cy + 0.05 - yy) / 0.03) * _sigmoid((lateral + 0.02) / 0.02)
        m = (rim * upper).astype(np.float32)
        ptx_mask = np.maximum(ptx_mask, m)
        line = np.exp(-(((d - (1.0 - width)) / 0.012) ** 2)) * upper * lm
        img = img + 0.18 * line
        f.center, f.spread = _mask_moments(m, H, W)

    img = img * (1.0 - 0.62 * lung) + lung_texture * lung * (1.0 - ptx_mask)
    img = img * (1.0 - 0.6 * ptx_mask)

    # ribs (posterior arcs) and clavicles, inside the body
    # one periodic pattern instead of nine separate arcs: ribs are evenly spaced copies of one arc
    u = np.abs(xx - an.cx) / (0.36 * an.scale)
    arc = an.top - 0.02 + 0.16 * u - 0.12 * u**2
    spacing = (an.bottom - an.top) / 8.5
    phase = (yy - arc) / spacing
    ribs = ((0.5 + 0.5 * np.cos(2.0 * np.pi * phase)) ** 12) * (phase > -0.5) * (phase < 8.5) * (u > 0.08) * (u < 1.0)
    img = img + 0.10 * ribs * _sigmoid((1.0 - body_d) / 0.03)
    for s in (-1.0, 1.0):
        clav_y = 0.13 + 0.12 * np.abs(xx - an.cx) * (1 if s > 0 else 1)
        clav = np.exp(-(((yy - clav_y) / 0.014) ** 2)) * ((xx - an.cx) * s > 0.03) * ((xx - an.cx) * s < 0.3)
        img = img + 0.14 * clav

    # mediastinum and spine
    medi = _sigmoid((0.045 * an.scale - np.abs(xx - an.cx)) / 0.01) * _sigmoid((0.70 - yy) / 0.03) * _sigmoid((yy - 0.05) / 0.03)
    img = np.maximum(img, 0.55 * medi)

    # heart (enlarged for cardiomegaly)
    hx, hy, hrx, hry = an.heart
    for f in findings:
        if f.kind == "cardiomegaly":
            hrx *= 1.25 + 0.35 * f.severity
            hry *= 1.10 + 0.20 * f.severity
            hx += 0.01 * f.severity
    heart = _sigmoid((1.0 - np.sqrt(((xx - hx) / hrx) ** 2 + ((yy - hy) / hry) ** 2)) / 0.04)
    img = np.maximum(img, 0.62 * heart)
    for f in findings:
        if f.kind == "cardiomegaly":
            f.center, f.spread = _mask_moments(heart > 0.5, H, W)

    # diaphragm: bright abdomen below two domes
    for side in ("right", "left"):
        cx, _ = an.lung_center(side)
        dome = an.bottom - 0.05 + 1.6 * (xx - cx) ** 2 + (0.015 if side == "left" else 0.0)
        below = _sigmoid((yy - dome) / 0.01) * (np.abs(xx - cx) < an.lung_rx * 1.2)
        img = np.maximum(img, 0.58 * below * _sigmoid((1.0 - body_d) / 0.03))

    # effusions and opacities: dense areas inside one lung
    for f in findings:
        if f.kind == "pleural_effusion":
            lm, _ = lungs[f.side]
            cx, _ = an.lung_center(f.side)
            lateral = np.clip((xx - cx) * (-1.0 if f.side == "right" else 1.0) / an.lung_rx, -1, 1)
            level = an.bottom - (0.06 + 0.16 * f.severity) * (an.bottom - an.top) * 2.0
            meniscus = level - 0.05 * (lateral + 1.0) ** 2 / 4.0
            m = (_sigmoid((yy - meniscus) / 0.012) * lm).astype(np.float32)
            a = 0.7 + 0.3 * f.severity
            img = img * (1.0 - a * m) + 0.6 * a * m
            f.center, f.spread = _mask_moments(m, H, W)
        elif f.kind == "opacity":
            lm, _ = lungs[f.side]
            cx, _ = an.lung_center(f.side)
            zy = {"upper": 0.30, "middle": 0.47, "lower": 0.63}[f.zone]
            oy = an.top + (zy - 0.17) / 0.61 * (an.bottom - an.top) + float(rng.uniform(-0.03, 0.03))
            ox = cx + float(rng.uniform(-0.5, 0.5)) * an.lung_rx * 0.6
            r = 0.045 + 0.05 * f.severity
            blob = np.exp(-(((xx - ox) ** 2 + (yy - oy) ** 2) / (2 * r * r)))
            irregular = 0.75 + 0.5 * _smooth_noise(rng, (H, W), 20)
            m = (np.clip(blob * irregular, 0, 1) * lm).astype(np.float32)
            img = img + (0.28 + 0.2 * f.severity) * m
            f.center, f.spread = _mask_moments(m, H, W)

    # detector noise and a soft vignette
    img = img + 0.012 * rng.standard_normal((H, W)).astype(np.float32) + 0.02 * _smooth_noise(rng, (H, W), 4)
    img = np.clip(img, 0.0, 1.0)
    return np.round(img * 255.0).astype(np.uint8), an


# ----------------------------------------------------------------------------------------------
# report, dictation and gaze
# ----------------------------------------------------------------------------------------------
def _severity_words(sev: float) -> dict[str, str]:
    i = min(2, int(sev * 3))
    return {"adj": _SEV_ADJ[i], "adv": _SEV_ADV[i], "size": _SIZE_ADJ[i]}


def _normal_targets(an: _Anatomy, topic: str, H: int, W: int) -> list[tuple[float, float, float, float]]:
    """Gaze regions (x, y, sx, sy) in pixels for a normal-anatomy sentence."""
    out = []
    ry = 0.5 * (an.bottom - an.top)
    if topic == "heart":
        hx, hy, hrx, hry = an.heart
        out = [(hx, hy, hrx * 0.5, hry * 0.5)]
    elif topic == "mediastinum":
        out = [(an.cx, 0.35, 0.03, 0.10)]
    else:
        for side in ("right", "left"):
            cx, cy = an.lung_center(side)
            lat = -1.0 if side == "right" else 1.0
            if topic == "lungs":
                out.append((cx, cy, an.lung_rx * 0.5, ry * 0.45))
            elif topic == "effusion":
                out.append((cx + lat * an.lung_rx * 0.6, an.bottom - 0.04, 0.03, 0.025))
            elif topic == "pneumothorax":
                out.append((cx + lat * an.lung_rx * 0.2, an.top + 0.06, 0.035, 0.03))
            elif topic == "bones":
                out.append((cx + lat * an.lung_rx * 0.9, cy, 0.025, ry * 0.5))
    return [(x * W, y * H, sx * W, sy * H) for x, y, sx, sy in out]


def _dictate(rng: np.random.Generator, sentences: list[str], t0: float) -> tuple[list[Word], list[tuple[float, float]]]:
    """Timed words for the sentences, and each sentence's (start, end) window."""
    words: list[Word] = []
    windows = []
    t = t0
    for s in sentences:
        start = t
        for tok in tokenize_phrase(s):
            if is_punctuation(tok):
                words.append(Word(tok, t, t))
                continue
            d = 0.12 + 0.045 * len(tok) * float(rng.uniform(0.8, 1.2))
            words.append(Word(tok, t, t + d))
            t += d + float(rng.uniform(0.0, 0.06))
        windows.append((start, t))
        t += float(rng.uniform(0.5, 1.2))  # pause between sentences
    return words, windows


def _simulate_fixations(
    rng: np.random.Generator,
    windows: list[tuple[float, float]],
    targets: list[list[tuple[float, float, float, float]]],
    scan_targets: list[tuple[float, float, float, float]],
    t_end: float,
    H: int,
    W: int,
    on_target: float = 0.85,
    lead: tuple[float, float] = (0.4, 0.9),
) -> np.ndarray:
    """Fixations from t = 0 to t_end: dwelling on sentence j's targets from lead_j s before it
    starts until it ends (with probability ``on_target`` per fixation), elsewhere a free scan."""
    leads = rng.uniform(*lead, size=len(windows))
    rows = []
    t = float(rng.uniform(0.05, 0.2))
    while t < t_end:
        dur = float(rng.uniform(0.18, 0.45))
        active = [j for j, (a, b) in enumerate(windows) if a - leads[j] <= t < b]
        if active and rng.random() < on_target:
            regions = targets[active[-1]]
        else:
            regions = scan_targets
        x, y, sx, sy = regions[int(rng.integers(len(regions)))]
        px = float(np.clip(x + rng.normal(0.0, sx * 0.6), 0.0, W - 1e-3))
        py = float(np.clip(y + rng.normal(0.0, sy * 0.6), 0.0, H - 1e-3))
        rows.append((t, t + dur, px, py))
        t += dur + float(rng.uniform(0.02, 0.06))  # saccade
    arr = np.array(rows, np.float64).reshape(-1, 4)
    return make_fixations(arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3])


def _random_findings(rng: np.random.Generator, normal_fraction: float, second_finding_prob: float) -> list[Finding]:
    findings: list[Finding] = []
    if rng.random() >= normal_fraction:
        kinds = list(FINDING_CLASSES[1:])
        first = kinds[int(rng.integers(len(kinds)))]
        chosen = [first]
        if rng.random() < second_finding_prob:
            rest = [k for k in kinds if k != first]
            chosen.append(rest[int(rng.integers(len(rest)))])
        for kind in chosen:
            side = "" if kind == "cardiomegaly" else ("left" if rng.random() < 0.5 else "right")
            zone = _ZONES[int(rng.integers(3))] if kind == "opacity" else ""
            findings.append(Finding(kind, side, zone, float(rng.uniform(0.25, 1.0))))
    return findings


def _check_findings(findings: Sequence[Finding | tuple[str, str, str, float]]) -> list[Finding]:
    out: list[Finding] = []
    for i, f in enumerate(findings):
        kind, side, zone, sev = (f.kind, f.side, f.zone, f.severity) if isinstance(f, Finding) else f
        if kind not in FINDING_CLASSES[1:]:
            raise ValueError(f"findings[{i}]: kind must be one of {FINDING_CLASSES[1:]}, got {kind!r}")
        if kind in {o.kind for o in out}:
            raise ValueError(f"findings[{i}]: {kind!r} given twice")
        want_side = kind != "cardiomegaly"
        if (side in ("left", "right")) != want_side or (not want_side and side != ""):
            raise ValueError(f"findings[{i}]: side must be {'left or right' if want_side else 'empty'} for {kind}, got {side!r}")
        if (kind == "opacity") != (zone in _ZONES) or (kind != "opacity" and zone != ""):
            raise ValueError(f"findings[{i}]: zone must be one of {_ZONES} for opacity and empty otherwise, got {zone!r}")
        if not 0.0 <= float(sev) <= 1.0:
            raise ValueError(f"findings[{i}]: severity must be in [0, 1], got {sev}")
        out.append(Finding(kind, side, zone, float(sev)))
    return out


@dataclass(frozen=True)
class CaseOptions:
    """How synthetic cases are drawn."""

    #: Side of the square image, pixels.
    image_size: int = 224
    #: Probability that the case has gaze (fixations).
    gaze_fraction: float = 0.8
    #: Probability of "no finding".
    normal_fraction: float = 0.25
    #: Probability of a second finding of another kind.
    second_finding_prob: float = 0.3
    #: Probability that a fixation during a sentence's window lands on its region.
    on_target: float = 0.85

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        for name in ("gaze_fraction", "normal_fraction", "second_finding_prob", "on_target"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


def synthetic_case(
    index: int,
    seed: int = 0,
    options: CaseOptions | None = None,
    *,
    findings: Sequence[Finding | tuple[str, str, str, float]] | None = None,
    **fields: Any,
) -> SyntheticCase:
    """Case ``index`` of the synthetic dataset ``seed`` (deterministic in (seed, index)).

    Args:
        options: how cases are drawn (:class:`CaseOptions`); ``fields``: its fields as keywords.
        findings: draw exactly these findings instead of random ones: ``Finding`` objects or
            (kind, side, zone, severity) tuples, e.g. ``[("opacity", "left", "lower", 0.8)]``;
            side is the patient's "left"/"right" ("" for cardiomegaly), zone "upper"/"middle"/
            "lower" for opacity ("" otherwise), severity in [0, 1]; ``[]`` gives "no finding".
    """
    o = take_fields(options, CaseOptions, fields)
    no_fields_left(fields, "synthetic_case")
    rng = np.random.default_rng([int(seed), int(index)])
    H = W = int(o.image_size)

    if findings is not None:
        findings = _check_findings(findings)
    else:
        findings = _random_findings(rng, o.normal_fraction, o.second_finding_prob)
    image, an = _draw(rng, H, findings)

    # report sentences with their gaze regions
    sentences: list[str] = []
    targets: list[list[tuple[float, float, float, float]]] = []
    for f in findings:
        tmpl = _FINDING_TEMPLATES[f.kind][int(rng.integers(len(_FINDING_TEMPLATES[f.kind])))]
        f.sentence = tmpl.format(side=f.side, zone=f.zone, **_severity_words(f.severity))
        f.sentence = f.sentence[0].upper() + f.sentence[1:]
        sentences.append(f.sentence)
        targets.append([(f.center[0], f.center[1], f.spread[0], f.spread[1])])
    said = {_CONTRADICTS[f.kind] for f in findings}
    topics = ["heart", "lungs", "effusion", "pneumothorax"]
    topics += [t for t in ("mediastinum", "bones") if rng.random() < 0.5]
    for topic in topics:
        if topic in said:
            continue
        opts = _NORMAL_TEMPLATES[topic]
        sentences.append(opts[int(rng.integers(len(opts)))])
        targets.append(_normal_targets(an, topic, H, W))
    order = rng.permutation(len(sentences))
    sentences = [sentences[i] for i in order]
    targets = [targets[i] for i in order]

    words, windows = _dictate(rng, sentences, t0=float(rng.uniform(1.0, 2.5)))
    has_gaze = rng.random() < o.gaze_fraction
    if has_gaze:
        scan = _normal_targets(an, "lungs", H, W) + _normal_targets(an, "heart", H, W)
        fixations = _simulate_fixations(rng, windows, targets, scan, windows[-1][1] + 0.3, H, W, o.on_target)
    else:
        fixations = np.zeros((0, 5))

    labels = np.zeros(len(FINDING_CLASSES), np.float32)
    if findings:
        for f in findings:
            labels[FINDING_CLASSES.index(f.kind)] = 1.0
        class_index = FINDING_CLASSES.index(findings[0].kind)
    else:
        labels[0] = 1.0
        class_index = 0
    key = f"synth-{int(seed)}-{int(index):08d}"
    reading = GazeReading(
        reading_id=key, dataset="synthetic", image_path="", image_size=(H, W), fixations=fixations,
        words=words, report=" ".join(sentences),
        labels={c: float(v) for c, v in zip(FINDING_CLASSES, labels)},
    )
    return SyntheticCase(key, image, findings, reading, labels, class_index, targets)


def generate_cases(n_samples: int, seed: int = 0, start: int = 0, **kwargs: Any) -> Iterator[SyntheticCase]:
    """Cases start .. start + n_samples - 1 of dataset ``seed`` (kwargs: :func:`synthetic_case`)."""
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0, got {n_samples}")
    for i in range(start, start + n_samples):
        yield synthetic_case(i, seed, **kwargs)


def case_to_sample(case: SyntheticCase, heatmaps: HeatmapOptions | None = None, **fields: Any) -> GazeSample:
    """The training sample of a case: sentences and heatmaps through the same path as real data
    (``fields``: HeatmapOptions fields as keywords)."""
    heatmaps = take_fields(heatmaps, HeatmapOptions, fields)
    no_fields_left(fields, "case_to_sample")
    sents = split_sentences(case.reading.words)
    shm = heatmaps.sentence_heatmaps(case.reading, sents)
    return GazeSample(
        key=case.key,
        image=case.image,
        sentences=[s.text for s in sents],
        heatmaps=shm.heatmaps if shm.has_gaze else None,
        labels=case.labels,
        class_index=case.class_index,
        meta={
            "reading_id": case.key,
            "dataset": "synthetic",
            "report": case.reading.report,
            "classes": list(FINDING_CLASSES),
            "fallback": shm.fallback.tolist(),
            "findings": [
                {"kind": f.kind, "side": f.side, "zone": f.zone, "severity": round(f.severity, 4),
                 "center": [round(v, 2) for v in f.center], "sentence": f.sentence}
                for f in case.findings
            ],
        },
    )


def write_synthetic_shards(
    out_dir: str | os.PathLike,
    n_samples: int,
    seed: int = 0,
    samples_per_shard: int = 1000,
    *,
    cases: CaseOptions | None = None,
    heatmaps: HeatmapOptions | None = None,
    start: int = 0,
    num_workers: int = 0,
    progress: bool = True,
    prefix: str = "shard",
    **fields: Any,
) -> dict[str, Any]:
    """Generate ``n_samples`` synthetic cases and write them as WebDataset shards.

    Args:
        out_dir: output folder (created); gets shard-%06d.tar and sizes.json.
        n_samples: number of cases; seed: dataset seed (case i depends only on (seed, i)).
        samples_per_shard: cases per shard.
        cases: how cases are drawn (:class:`CaseOptions`: image_size, gaze_fraction, ...).
        heatmaps: the stored heatmaps (:class:`~egma_fast.data.options.HeatmapOptions`).
        **fields: fields of either options class, as keywords (``image_size=64``).
        start: index of the first case (to extend a dataset or split train / val by range).
        num_workers: processes drawing and encoding cases in parallel (0: in this process); the
            output is identical for any value.
        progress: tqdm progress bar.

    Returns:
        sizes.json content (``shards``, ``total``, ``info`` with ``classes`` and the settings)
        plus ``urls`` and ``pattern``.
    """
    cases = take_fields(cases, CaseOptions, fields)
    heatmaps = take_fields(heatmaps, HeatmapOptions, fields)
    no_fields_left(fields, "write_synthetic_shards")
    # the class prompts travel with the data: evaluation's eval.prompts="auto" reads them here
    info = {"generator": "egma_fast.data.synthetic", "seed": int(seed), "start": int(start),
            "classes": list(FINDING_CLASSES), "class_prompts": SYNTHETIC_CLASS_PROMPTS,
            **dataclasses.asdict(heatmaps), **dataclasses.asdict(cases)}
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    jobs = ((i, int(seed), cases, heatmaps) for i in range(start, start + n_samples))
    if num_workers == 0:
        return write_samples(map(_encoded_case, jobs), out_dir, samples_per_shard=samples_per_shard,
                             prefix=prefix, total=n_samples, progress=progress, info=info)
    with mp.get_context().Pool(num_workers) as pool:
        # ordered imap: the shards are identical to the single-process output
        encoded = pool.imap(_encoded_case, jobs, chunksize=16)
        return write_samples(encoded, out_dir, samples_per_shard=samples_per_shard, prefix=prefix,
                             total=n_samples, progress=progress, info=info)


def _encoded_case(job: tuple[int, int, CaseOptions, HeatmapOptions]) -> dict[str, Any]:
    index, seed, cases, heatmaps = job
    return encode_sample(case_to_sample(synthetic_case(index, seed, cases), heatmaps))
