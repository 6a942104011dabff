"""The canonical record every gaze reader produces, and the report of what a reader skipped.

One :class:`GazeReading` is one radiologist reading one image: the image, the fixations mapped
to original-image pixels and seconds, the dictation transcript as timed words, and the report
text. Readers never drop data silently: every skipped point, row or reading is counted in a
:class:`ReadReport` and logged as a warning.

Coordinates: continuous image pixels, x to the right, y down, pixel (r, c) covers
[c, c + 1) x [r, r + 1), so a point is inside an H x W image iff 0 <= x < W and 0 <= y < H.
Times: seconds from the start of the reading (the moment the image was shown; dictation
timestamps use the same origin).
"""
from __future__ import annotations

import csv
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

logger = logging.getLogger("egma_fast.gaze")

__all__ = [
    "FIX_DURATION",
    "FIX_END",
    "FIX_START",
    "FIX_X",
    "FIX_Y",
    "GazeReading",
    "ReadReport",
    "Word",
    "make_fixations",
]

# Column order of GazeReading.fixations ([F, 5] float64).
FIX_START, FIX_END, FIX_X, FIX_Y, FIX_DURATION = range(5)


@dataclass(frozen=True)
class Word:
    """One transcript token with its time window in seconds.

    Punctuation tokens ("." "," ...) stand alone; the EGD-CXR reader gives them a zero-length
    window at the end of the word they follow.
    """

    text: str
    start: float
    end: float


def make_fixations(start: Sequence[float], end: Sequence[float], x: Sequence[float], y: Sequence[float]) -> np.ndarray:
    """Stack per-fixation columns into the canonical [F, 5] float64 array.

    Columns: start (s), end (s), x (px), y (px), duration (s) = end - start.
    """
    start_a = np.asarray(start, dtype=np.float64).reshape(-1)
    end_a = np.asarray(end, dtype=np.float64).reshape(-1)
    x_a = np.asarray(x, dtype=np.float64).reshape(-1)
    y_a = np.asarray(y, dtype=np.float64).reshape(-1)
    n = start_a.shape[0]
    if not (end_a.shape[0] == x_a.shape[0] == y_a.shape[0] == n):
        raise ValueError(
            f"start, end, x, y must have the same length, got {n}, {end_a.shape[0]}, {x_a.shape[0]}, {y_a.shape[0]}"
        )
    return np.stack([start_a, end_a, x_a, y_a, end_a - start_a], axis=1) if n else np.zeros((0, 5), np.float64)


@dataclass
class GazeReading:
    """One reading of one image, in canonical units.

    Attributes:
        reading_id: unique id of the reading (REFLACX id, or the EGD-CXR dicom_id).
        dataset: "egd-cxr", "reflacx", "synthetic", ...
        image_path: path of the image file ("" when the image lives in memory, e.g. synthetic).
        image_size: (H, W) of the original image in pixels.
        fixations: [F, 5] float64, columns (start s, end s, x px, y px, duration s); only points
            inside the image.
        words: the dictation transcript, in time order.
        report: the report text as the dataset ships it (sentences for training are rebuilt
            from ``words``, see :mod:`egma_fast.gaze.sentences`).
        dicom_id: the MIMIC-CXR dicom id, when known.
        labels: per-class values the dataset provides (e.g. EGD-CXR Normal/CHF/pneumonia,
            REFLACX abnormality certainty), name -> float.
        metadata: any other per-reading fields (str -> JSON-serialisable).
    """

    reading_id: str
    dataset: str
    image_path: str
    image_size: tuple[int, int]
    fixations: np.ndarray
    words: list[Word]
    report: str = ""
    dicom_id: str = ""
    labels: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        H, W = (int(v) for v in self.image_size)
        if H <= 0 or W <= 0:
            raise ValueError(f"image_size must be positive (H, W), got {self.image_size}")
        self.image_size = (H, W)
        fx = np.asarray(self.fixations, dtype=np.float64)
        if fx.ndim != 2 or fx.shape[1] != 5:
            raise ValueError(f"fixations must be [F, 5] (start, end, x, y, duration), got shape {fx.shape}")
        self.fixations = fx

    @property
    def has_gaze(self) -> bool:
        """True when the reading has at least one fixation inside the image."""
        return self.fixations.shape[0] > 0


@dataclass
class ReadReport:
    """What a reader kept and what it skipped, with reasons.

    ``readings`` / ``fixations`` count what was kept; ``no_gaze`` counts kept readings left
    without any fixation inside the image (they train without gaze terms).

    ``skipped`` counts skipped items by reason: "reading:<why>" for whole readings,
    "fixation:<why>" for fixation points (e.g. "fixation:outside_image"), "row:<why>" for
    malformed rows. ``examples`` keeps up to ``max_examples`` messages per reason.
    """

    readings: int = 0
    fixations: int = 0
    no_gaze: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5

    def skip(self, reason: str, message: str, count: int = 1, *, warn: bool = True) -> None:
        """Count ``count`` skipped items under ``reason``; the first ``max_examples`` messages of
        each reason are kept and logged as warnings (:meth:`log_summary` reports the totals)."""
        if count <= 0:
            return
        self.skipped[reason] += count
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(message)
            if warn:
                logger.warning("skipped %d (%s): %s", count, reason, message)

    def log_summary(self, source: str) -> None:
        """One log line with the totals: a warning when anything was skipped, else info."""
        if self.skipped:
            logger.warning("%s: %s", source, self.summary())
        else:
            logger.info("%s: %s", source, self.summary())

    def summary(self) -> str:
        parts = [f"{self.readings} readings ({self.no_gaze} without gaze), {self.fixations} fixations kept"]
        parts += [f"{k}: {v}" for k, v in sorted(self.skipped.items())]
        return "; ".join(parts)


# ----------------------------------------------------------------------------------------------
# small helpers shared by the readers
# ----------------------------------------------------------------------------------------------
def norm_column(name: str) -> str:
    """Column-name key that ignores case, spaces and punctuation ("Time (in secs)" -> "timeinsecs")."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


def find_column(fieldnames: Iterable[str], *candidates: str, required: bool = True, what: str = "") -> str | None:
    """Return the actual header among ``fieldnames`` matching one of ``candidates`` (normalised)."""
    by_norm = {norm_column(f): f for f in fieldnames if f is not None}
    for c in candidates:
        hit = by_norm.get(norm_column(c))
        if hit is not None:
            return hit
    if required:
        raise ValueError(
            f"{what or 'csv'}: none of the columns {list(candidates)} found; header is {list(fieldnames)}"
        )
    return None


def read_csv_rows(path: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    """Read a CSV file into (header, rows as dicts of strings)."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = list(reader.fieldnames or [])
    return header, rows


def parse_float(value: Any) -> float:
    """float(value), raising ValueError on empty / non-finite input."""
    if value is None:
        raise ValueError("missing value")
    v = float(str(value).strip())
    if not math.isfinite(v):
        raise ValueError(f"non-finite value {value!r}")
    return v


def parse_bool(value: Any) -> bool:
    s = str(value).strip().lower()
    if s in ("true", "1", "1.0", "yes", "t", "y"):
        return True
    if s in ("false", "0", "0.0", "no", "f", "n", ""):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def labels_from_row(row: Mapping[str, str], exclude: Iterable[str]) -> dict[str, float]:
    """Numeric/boolean columns of a metadata row that are not in ``exclude`` (normalised names)."""
    excl = {norm_column(e) for e in exclude}
    out: dict[str, float] = {}
    for k, v in row.items():
        if k is None or norm_column(k) in excl:
            continue
        s = (v or "").strip()
        if s == "":
            continue
        try:
            out[k] = float(parse_bool(s)) if s.lower() in ("true", "false") else parse_float(s)
        except ValueError:
            continue
    return out
