"""The stored training sample and its encoding as WebDataset tar members.

One sample = one reading, written as these members of a shard (``<key>.<ext>``):

| member            | content                                                                 |
|-------------------|-------------------------------------------------------------------------|
| ``png``           | the image, 8-bit grey PNG, original aspect ratio (no padding)           |
| ``sentences.json``| list[str], the report sentences (sentence j <-> heatmap j)              |
| ``heatmaps.npz``  | only when the sample has gaze: ``q`` uint8 [S, h, w] = round(255 * map), |
|                   | maps on a reduced grid spanning the whole image                         |
| ``labels.json``   | list[float] multi-hot over the dataset's classes                        |
| ``cls``           | the single class index as ASCII text (-1 when none)                     |
| ``meta.json``     | dict: ``has_gaze`` (bool), ``image_size`` [H, W] of the stored image,    |
|                   | ``classes`` (names), ``fallback`` (per-sentence bool), source fields      |

Keys never contain "." (WebDataset splits member names at the first dot).
"""
from __future__ import annotations

import io
import json
import re
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["GazeSample", "SampleDecodeError", "decode_sample", "encode_sample", "sanitize_key"]


class SampleDecodeError(ValueError):
    """A stored sample could not be decoded; ``field`` names the member at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def sanitize_key(key: str) -> str:
    """A WebDataset-safe key: no dots or slashes, no whitespace."""
    k = re.sub(r"[.\s/\\]", "_", str(key))
    if not k:
        raise ValueError("key must be a non-empty string")
    return k


@dataclass
class GazeSample:
    """One training sample in memory.

    Attributes:
        key: unique sample key.
        image: uint8 [H, W] grey image.
        sentences: report sentences.
        heatmaps: float32 [S, h, w] in [0, 1] with S = len(sentences), or None (no gaze).
        labels: float32 [K] multi-hot.
        class_index: single class index (-1 when not defined).
        meta: JSON-serialisable extras.
    """

    key: str
    image: np.ndarray
    sentences: list[str]
    heatmaps: np.ndarray | None
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    class_index: int = -1
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def has_gaze(self) -> bool:
        return self.heatmaps is not None


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    """np.savez_compressed, but with a fixed timestamp so equal arrays give equal bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w") as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def encode_sample(sample: GazeSample, png_compress_level: int = 1) -> dict[str, Any]:
    """Tar members (ext -> bytes) of a sample, plus ``__key__``."""
    from PIL import Image  # noqa: PLC0415 (pillow is the train extra: imported where an image is coded)

    img = np.asarray(sample.image)
    if img.dtype != np.uint8 or img.ndim != 2:
        raise ValueError(f"image must be uint8 [H, W], got {img.dtype} {img.shape}")
    sentences = [str(s) for s in sample.sentences]
    meta = dict(sample.meta)
    meta["has_gaze"] = sample.has_gaze
    meta["image_size"] = [int(img.shape[0]), int(img.shape[1])]
    out: dict[str, Any] = {"__key__": sanitize_key(sample.key)}
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=png_compress_level)
    out["png"] = buf.getvalue()
    out["sentences.json"] = json.dumps(sentences).encode("utf-8")
    if sample.heatmaps is not None:
        hm = np.asarray(sample.heatmaps, np.float32)
        if hm.ndim != 3 or hm.shape[0] != len(sentences):
            raise ValueError(f"heatmaps must be [S={len(sentences)}, h, w], got shape {hm.shape}")
        q = np.round(np.clip(hm, 0.0, 1.0) * 255.0).astype(np.uint8)
        out["heatmaps.npz"] = _npz_bytes(q=q)
    out["labels.json"] = json.dumps([float(v) for v in np.asarray(sample.labels).reshape(-1)]).encode("utf-8")
    out["cls"] = str(int(sample.class_index)).encode("ascii")
    out["meta.json"] = json.dumps(meta).encode("utf-8")
    return out


def _json(raw: dict, name: str) -> Any:
    if name not in raw:
        raise SampleDecodeError(name, "missing")
    try:
        return json.loads(raw[name])
    except (ValueError, UnicodeDecodeError) as e:
        raise SampleDecodeError(name, f"bad JSON ({e})") from e


def decode_sample(raw: dict[str, Any]) -> GazeSample:
    """Inverse of :func:`encode_sample`; raises :class:`SampleDecodeError` on any bad member."""
    from PIL import Image  # noqa: PLC0415 (pillow is the train extra: imported where an image is coded)

    key = raw.get("__key__", "?")
    if "png" not in raw:
        raise SampleDecodeError("png", "missing")
    try:
        with Image.open(io.BytesIO(raw["png"])) as im:
            im.load()
            image = np.array(im.convert("L"), dtype=np.uint8)  # writable copy
    except Exception as e:  # PIL raises many types for truncated / garbage data
        raise SampleDecodeError("png", f"cannot decode ({type(e).__name__}: {e})") from e
    sentences = _json(raw, "sentences.json")
    if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
        raise SampleDecodeError("sentences.json", "expected a list of strings")
    meta = _json(raw, "meta.json")
    if not isinstance(meta, dict):
        raise SampleDecodeError("meta.json", "expected an object")
    labels = _json(raw, "labels.json")
    try:
        labels_a = np.asarray(labels, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError) as e:
        raise SampleDecodeError("labels.json", f"expected a list of numbers ({e})") from e
    try:
        cls = int(raw["cls"].decode("ascii").strip()) if "cls" in raw else -1
    except (ValueError, UnicodeDecodeError, AttributeError) as e:
        raise SampleDecodeError("cls", f"expected an integer ({e})") from e
    heatmaps = None
    if meta.get("has_gaze", False):
        if "heatmaps.npz" not in raw:
            raise SampleDecodeError("heatmaps.npz", "missing although meta.json says has_gaze")
        try:
            with np.load(io.BytesIO(raw["heatmaps.npz"])) as z:
                q = z["q"]
        except Exception as e:  # zipfile / numpy errors on corrupt data
            raise SampleDecodeError("heatmaps.npz", f"cannot decode ({type(e).__name__}: {e})") from e
        if q.dtype != np.uint8 or q.ndim != 3 or q.shape[0] != len(sentences):
            raise SampleDecodeError(
                "heatmaps.npz", f"expected uint8 [S={len(sentences)}, h, w], got {q.dtype} {q.shape}")
        heatmaps = q.astype(np.float32) / 255.0
    return GazeSample(key=key, image=image, sentences=sentences, heatmaps=heatmaps,
                      labels=labels_a, class_index=cls, meta=meta)
