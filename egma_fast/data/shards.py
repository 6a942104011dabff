"""Write training samples into WebDataset shards, with a sizes.json index.

``out_dir/shard-000000.tar, shard-000001.tar, ...`` (``webdataset.ShardWriter``, members as
described in :mod:`egma_fast.data.sample`) and ``out_dir/sizes.json``::

    {"shards": {"shard-000000.tar": 1000, ...}, "total": N, "info": {...}}

``info`` carries what a reader or trainer needs to know without opening a shard (class names,
heatmap grid, generator settings).

:func:`write_shards_from_records` turns canonical :class:`~egma_fast.gaze.records.GazeReading`
records (EGD-CXR, REFLACX, ...) into samples: it loads the image, splits the transcript into
sentences, computes the sentence heatmaps (SPEC 5) on a reduced grid, and writes them.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from egma_fast.data.errors import DataError
from egma_fast.data.options import HeatmapOptions, no_fields_left, take_fields
from egma_fast.data.sample import GazeSample, SampleDecodeError, decode_sample, encode_sample, sanitize_key
from egma_fast.data.skips import SkipLedger, read_shards, totals_by_reason
from egma_fast.gaze.images import load_grey_image
from egma_fast.gaze.records import GazeReading
from egma_fast.gaze.sentences import split_sentences

logger = logging.getLogger("egma_fast.data")

__all__ = [
    "RecordOptions",
    "expand_urls",
    "iter_shard_samples",
    "read_sizes",
    "samples_from_records",
    "shard_sizes",
    "shard_urls",
    "write_samples",
    "write_shards_from_records",
]

SIZES_FILE = "sizes.json"


def write_samples(
    samples: Iterable[GazeSample | dict[str, Any]],
    out_dir: str | os.PathLike,
    *,
    samples_per_shard: int = 1000,
    prefix: str = "shard",
    total: int | None = None,
    progress: bool = True,
    png_compress_level: int = 1,
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write samples into ``out_dir/<prefix>-%06d.tar`` shards and ``out_dir/sizes.json``.

    Args:
        samples: the samples, in order (keys must be unique); a dict with "__key__" is taken as
            already encoded by :func:`~egma_fast.data.sample.encode_sample`.
        samples_per_shard: samples per shard (the last shard may hold fewer).
        total: number of samples, for the progress bar only.
        progress: show a tqdm progress bar.
        info: extra JSON-serialisable fields stored under "info" in sizes.json.

    Returns:
        the sizes.json content plus ``urls`` (shard paths, in order) and ``pattern`` (a brace
        pattern usable as ``urls`` for :func:`egma_fast.data.reader.make_loader`).
    """
    import webdataset as wds  # noqa: PLC0415 (a train extra: `import egma_fast.data` works without it)

    if samples_per_shard <= 0:
        raise ValueError(f"samples_per_shard must be a positive int, got {samples_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    keys: set[str] = set()
    pattern = str(out / f"{prefix}-%06d.tar")
    # fixed member mtime: the same samples always give byte-identical shards
    with wds.ShardWriter(pattern, maxcount=samples_per_shard, maxsize=float("inf"), verbose=0, mtime=0.0) as writer:
        for s in tqdm(samples, total=total, disable=not progress, desc=f"writing {out.name}", unit="sample"):
            enc = s if isinstance(s, dict) else encode_sample(s, png_compress_level=png_compress_level)
            if enc["__key__"] in keys:
                raise ValueError(f"samples: duplicate key {enc['__key__']!r}")
            keys.add(enc["__key__"])
            writer.write(enc)
            name = os.path.basename(writer.fname)
            counts[name] = counts.get(name, 0) + 1
    if not counts:  # ShardWriter opened an empty first shard; drop it
        empty = Path(pattern % 0)
        if empty.exists():
            empty.unlink()
    sizes = {"shards": counts, "total": sum(counts.values()), "info": info or {}}
    with open(out / SIZES_FILE, "w") as f:
        json.dump(sizes, f, indent=1)
    names = list(counts)
    result = dict(sizes)
    result["urls"] = [str(out / n) for n in names]
    result["pattern"] = (
        str(out / f"{prefix}-{{{0:06d}..{len(names) - 1:06d}}}.tar") if names else ""
    )
    return result


def read_sizes(path: str | os.PathLike) -> dict[str, Any]:
    """Load sizes.json (``path`` is the file or the folder holding it).

    Raises:
        DataError: a missing file, invalid JSON, or no ``shards`` / ``total`` (one line naming the file).
    """
    p = Path(path)
    if p.is_dir():
        p = p / SIZES_FILE
    try:
        with open(p) as f:
            sizes = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{p}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{p}: cannot be read ({type(exc).__name__}: {exc})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{p}: not valid JSON ({exc}); rewrite the shards (egma-fast prepare) or fix the file") from None
    shards = sizes.get("shards") if isinstance(sizes, dict) else None
    if (not isinstance(shards, dict) or not isinstance(sizes.get("total"), int)
            or not all(isinstance(k, str) and isinstance(v, int) and v >= 0 for k, v in shards.items())):
        raise DataError(f"{p}: not a sizes.json (needs 'shards': {{name: count}} and 'total': count)")
    return sizes


def shard_urls(path: str | os.PathLike) -> list[str]:
    """Shard paths listed in a dataset folder's sizes.json, in order."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    return [str(folder / name) for name in read_sizes(p)["shards"]]


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def expand_urls(urls: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard list from a dataset folder (its sizes.json, else its *.tar sorted), a sizes.json path, a brace pattern
    ("data/shard-{000000..000099}.tar"), a single path, or a list of those.

    Raises:
        DataError: a folder or local shard that does not exist, a folder without shards.
    """
    import webdataset as wds  # noqa: PLC0415 (a train extra: `import egma_fast.data` works without it)

    if isinstance(urls, (str, os.PathLike)):
        p = Path(urls)
        if p.is_dir() and not (p / SIZES_FILE).is_file():
            out = sorted(str(q) for q in p.glob("*.tar"))
            if not out:
                raise DataError(f"{p}: no shards here (no sizes.json and no *.tar); write them with egma-fast prepare")
        elif p.is_dir() or p.name == SIZES_FILE:
            out = shard_urls(p)
        else:
            out = wds.shardlists.expand_urls(str(urls))
            missing = [u for u in out if _is_local(u) and not Path(u).exists()]
            if missing:
                raise DataError(f"{str(urls)!r}: no such file or folder" if len(out) == 1 else
                                f"{str(urls)!r}: {len(missing)} of its {len(out)} shards do not exist (e.g. {missing[0]!r})")
    else:
        out = []
        for u in urls:
            out.extend(expand_urls(u))
    if not out:
        raise DataError(f"no shards found in {urls!r}")
    return [str(u) for u in out]


def shard_sizes(urls: Sequence[str]) -> dict[str, int]:
    """Expected samples per shard from the sizes.json beside each local shard (shards it does not
    list, or without one, are left out: their size is unknown)."""
    out: dict[str, int] = {}
    listed: dict[Path, dict[str, int]] = {}
    for url in urls:
        if not _is_local(url):
            continue
        folder = Path(url).parent
        if folder not in listed:
            listed[folder] = read_sizes(folder)["shards"] if (folder / SIZES_FILE).is_file() else {}
        n = listed[folder].get(Path(url).name)
        if n is not None:
            out[url] = n
    return out


def iter_shard_samples(
    urls: str | os.PathLike | Sequence[str | os.PathLike], skipped: Counter | None = None
) -> Iterator[GazeSample]:
    """Decode every sample of the given shards (one path, or a sequence of paths), in stored
    order, without any transform.

    Bad samples and unreadable or short shards (against sizes.json) are skipped, counted in
    ``skipped`` (reason -> count) and logged, the first of each kind per shard. For training use
    :func:`egma_fast.data.reader.make_loader`.
    """
    paths = [str(urls)] if isinstance(urls, (str, os.PathLike)) else [str(u) for u in urls]
    skipped = skipped if skipped is not None else Counter()
    ledger = SkipLedger(shard_sizes(paths))
    try:
        for raw in read_shards(paths, ledger):
            try:
                yield decode_sample(raw)
            except SampleDecodeError as e:
                ledger.skip(raw.get("__url__", "?"), e.field, f"bad sample {raw.get('__key__', '?')} ({e})")
    finally:
        skipped.update(totals_by_reason(ledger.snapshot()))


def _default_labels(record: GazeReading, class_names: Sequence[str], threshold: float) -> tuple[np.ndarray, int]:
    lab = np.array([1.0 if record.labels.get(c, 0.0) > threshold else 0.0 for c in class_names], np.float32)
    pos = np.flatnonzero(lab)
    return lab, int(pos[0]) if pos.size else -1


def _downscale(image: np.ndarray, max_side: int | None) -> np.ndarray:
    if max_side is None or max(image.shape) <= max_side:
        return image
    from PIL import Image  # noqa: PLC0415 (pillow is the train extra: imported where an image is coded)

    H, W = image.shape
    s = max_side / max(H, W)
    size = (max(1, round(W * s)), max(1, round(H * s)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0))


@dataclass(frozen=True)
class RecordOptions:
    """How canonical readings become training samples (besides the heatmaps)."""

    #: Label names; labels = 1 where ``record.labels[name] > label_threshold``, class index =
    #: the first positive (-1 when none).
    class_names: Sequence[str] = ()
    #: ``label_fn(record) -> (multi_hot, class_index)`` instead of the rule above.
    label_fn: Callable[[GazeReading], tuple[np.ndarray, int]] | None = None
    label_threshold: float = 0.0
    #: path -> uint8 [H, W] (default: Pillow, or pydicom for .dcm).
    image_loader: Callable[[str], np.ndarray] = load_grey_image
    #: Images larger than this are stored downscaled (heatmaps are stored on their own grid,
    #: which spans the whole image, so alignment is unaffected).
    image_max_side: int | None = 512


def samples_from_records(
    records: Iterable[GazeReading],
    options: RecordOptions | None = None,
    heatmaps: HeatmapOptions | None = None,
    *,
    skipped: Counter | None = None,
    **fields: Any,
) -> Iterator[GazeSample]:
    """Training samples from canonical readings (see :func:`write_shards_from_records`; ``fields``:
    RecordOptions / HeatmapOptions fields as keywords).

    Readings whose image cannot be loaded, or whose transcript has no sentence, are skipped,
    counted in ``skipped`` (reason -> count) and logged.
    """
    options = take_fields(options, RecordOptions, fields)
    heatmaps = take_fields(heatmaps, HeatmapOptions, fields)
    no_fields_left(fields, "samples_from_records")
    skipped = skipped if skipped is not None else Counter()
    for rec in records:
        sents = split_sentences(rec.words)
        if not sents:
            skipped["no_sentences"] += 1
            logger.warning("skipping %s: transcript has no sentence", rec.reading_id)
            continue
        try:
            image = options.image_loader(rec.image_path)
        except Exception as e:  # any loader failure skips the reading, loudly
            skipped["image_unreadable"] += 1
            logger.warning("skipping %s: cannot load image %r: %s", rec.reading_id, rec.image_path, e)
            continue
        if image.shape[:2] != tuple(rec.image_size):
            skipped["image_size_mismatch"] += 1
            logger.warning("skipping %s: image is %s, record says %s", rec.reading_id, image.shape[:2], rec.image_size)
            continue
        shm = heatmaps.sentence_heatmaps(rec, sents)
        labels, cls = (options.label_fn(rec) if options.label_fn is not None
                       else _default_labels(rec, options.class_names, options.label_threshold))
        yield GazeSample(
            key=sanitize_key(f"{rec.dataset}-{rec.reading_id}"),
            image=_downscale(image, options.image_max_side),
            sentences=[s.text for s in sents],
            heatmaps=shm.heatmaps if shm.has_gaze else None,
            labels=np.asarray(labels, np.float32),
            class_index=int(cls),
            meta={
                "reading_id": rec.reading_id,
                "dataset": rec.dataset,
                "dicom_id": rec.dicom_id,
                "report": rec.report,
                "classes": list(options.class_names),
                "fallback": shm.fallback.tolist(),
                "source_image_size": list(rec.image_size),
            },
        )


def write_shards_from_records(
    records: Iterable[GazeReading],
    out_dir: str | os.PathLike,
    options: RecordOptions | None = None,
    heatmaps: HeatmapOptions | None = None,
    *,
    samples_per_shard: int = 1000,
    progress: bool = True,
    prefix: str = "shard",
    **fields: Any,
) -> dict[str, Any]:
    """Shard canonical readings for training.

    Args:
        records: readings from :func:`~egma_fast.gaze.egd_cxr.read_egd_cxr`,
            :func:`~egma_fast.gaze.reflacx.read_reflacx`, or your own.
        out_dir: output folder (created).
        options: labels and images (:class:`RecordOptions`).
        heatmaps: the stored heatmaps (:class:`~egma_fast.data.options.HeatmapOptions`).
        samples_per_shard, progress, prefix: as :func:`write_samples`.
        **fields: fields of either options class, as keywords (``class_names=[...]``).

    Returns:
        as :func:`write_samples`, with ``info["skipped"]`` (reason -> count).
    """
    options = take_fields(options, RecordOptions, fields)
    heatmaps = take_fields(heatmaps, HeatmapOptions, fields)
    no_fields_left(fields, "write_shards_from_records")
    recs = list(records) if not isinstance(records, list) else records
    skipped: Counter = Counter()
    info = {"classes": list(options.class_names), **dataclasses.asdict(heatmaps),
            "source": sorted({r.dataset for r in recs})}
    gen = samples_from_records(recs, options, heatmaps, skipped=skipped)
    # the same Counter object: write_samples drains the generator before it writes sizes.json,
    # so the final skip counts land on disk
    info["skipped"] = skipped
    result = write_samples(gen, out_dir, samples_per_shard=samples_per_shard, prefix=prefix,
                           total=len(recs), progress=progress, info=info)
    info["skipped"] = dict(skipped)
    return result
