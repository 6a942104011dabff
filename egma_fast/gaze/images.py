"""Finding, sizing and loading the chest X-ray image of a reading.

Both gaze datasets point into MIMIC-CXR by a DICOM path. Users usually have MIMIC-CXR-JPG
(same pixel size, .jpg) instead, so a path is resolved by also trying the other extensions.
PNG/JPEG are read with Pillow; DICOM needs ``pydicom`` (optional, imported on demand).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["image_size_from_file", "load_grey_image", "resolve_image_path"]

_ALT_EXTS = (".jpg", ".jpeg", ".png", ".dcm")


def resolve_image_path(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> Path | None:
    """The existing file for ``path`` (joined to ``image_root``), trying .jpg/.jpeg/.png/.dcm; else None."""
    if not str(path):
        return None
    p = Path(image_root) / path if image_root is not None else Path(path)
    if p.is_file():
        return p
    for ext in _ALT_EXTS:
        q = p.with_suffix(ext)
        if q.is_file():
            return q
    return None


def _pydicom():
    try:
        import pydicom  # noqa: PLC0415 (optional: only DICOM images need it)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "reading DICOM images needs pydicom (pip install pydicom), or point image_root at "
            "MIMIC-CXR-JPG (.jpg files of the same size)"
        ) from e
    return pydicom


def image_size_from_file(path: str | os.PathLike) -> tuple[int, int]:
    """(H, W) of an image file, reading only its header."""
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        ds = _pydicom().dcmread(str(path), stop_before_pixels=True)
        return int(ds.Rows), int(ds.Columns)
    from PIL import Image  # noqa: PLC0415 (pillow is the train extra: imported where an image is coded)

    with Image.open(path) as im:
        w, h = im.size
    return int(h), int(w)


def load_grey_image(path: str | os.PathLike) -> np.ndarray:
    """The image as uint8 grey [H, W] (DICOM: min-max scaled, MONOCHROME1 inverted)."""
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        ds = _pydicom().dcmread(str(path))
        a = ds.pixel_array.astype(np.float64)
        a = (a - a.min()) / max(a.max() - a.min(), 1e-12)
        if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
            a = 1.0 - a
        return np.round(a * 255).astype(np.uint8)
    from PIL import Image  # noqa: PLC0415 (pillow is the train extra: imported where an image is coded)

    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I", "F"):
            a = np.asarray(im, dtype=np.float64)
            a = (a - a.min()) / max(a.max() - a.min(), 1e-12)
            return np.round(a * 255).astype(np.uint8)
        return np.asarray(im.convert("L"), dtype=np.uint8).copy()
