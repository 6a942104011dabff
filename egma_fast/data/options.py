"""Option objects of the data layer, each knob declared once.

- :class:`LoaderOptions`: the streaming reader (:func:`egma_fast.data.reader.make_loader` takes
  one, or its fields as keywords; the trainer builds one from its config).
- :class:`HeatmapOptions`: how stored sentence heatmaps are made, for real and synthetic data.

Functions that take an options object also take its fields as keywords (:func:`take_fields`),
so a call can name just the knobs it changes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

from egma_fast.gaze.heatmaps import SentenceHeatmaps, sentence_heatmaps
from egma_fast.gaze.records import GazeReading
from egma_fast.gaze.sentences import Sentence

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "HeatmapOptions", "LoaderOptions", "take_fields"]

T = TypeVar("T")


def take_fields(options: T | None, cls: type[T], fields: dict[str, Any]) -> T:
    """``options`` (default ``cls()``) with the entries of ``fields`` that name ``cls``'s fields set;
    those entries are removed from ``fields`` (so several option classes can share one **kwargs)."""
    names = {f.name for f in dataclasses.fields(cls)}
    mine = {k: fields.pop(k) for k in list(fields) if k in names}
    return dataclasses.replace(options if options is not None else cls(), **mine)


def no_fields_left(fields: dict[str, Any], where: str) -> None:
    """Raise TypeError naming the keywords no options class took."""
    if fields:
        raise TypeError(f"{where}() got unexpected keyword argument(s) {sorted(fields)}")


@dataclass(frozen=True)
class HeatmapOptions:
    """Sentence heatmaps as stored in shards (SPEC 5; :func:`egma_fast.gaze.heatmaps.sentence_heatmaps`)."""

    #: Longer side of the stored heatmap grid (it spans the whole image).
    heatmap_max_side: int = 64
    #: The word window is widened this many seconds backwards (gaze precedes dictation).
    pre_s: float = 1.0
    #: Gaussian sigma as a fraction of the image's longer side.
    sigma_frac: float = 0.05
    #: Fixation weight: "duration" or "count".
    weight: str = "duration"

    def sentence_heatmaps(self, reading: GazeReading, sentences: Sequence[Sentence]) -> SentenceHeatmaps:
        """The heatmaps of ``sentences`` of ``reading`` with these options."""
        return sentence_heatmaps(reading, sentences, pre_s=self.pre_s, sigma_frac=self.sigma_frac,
                                 max_side=self.heatmap_max_side, weight=self.weight)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class LoaderOptions:
    """How shards become batches (see :mod:`egma_fast.data.reader` for the modes)."""

    #: Samples per batch (each worker's last batch may be smaller unless ``drop_last``).
    batch_size: int
    #: DataLoader worker processes (0: read in this process).
    num_workers: int = 0
    #: Output image side after pad-to-square + resize.
    image_size: int = 224
    #: Output heatmap side (same geometry; e.g. 56 = 8 x 7 = 4 x 14 pools exactly onto 7 x 7 and
    #: 14 x 14 patch grids).
    heatmap_size: int = 56
    #: 3 repeats the grey image (for ImageNet-pretrained towers), or 1.
    channels: int = 3
    #: Normalisation after scaling to [0, 1] (None: ImageNet's for 3 channels, 0.5 for 1).
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    #: Sentences kept per report (the first ones).
    max_sentences: int = 16
    #: Tokens per sentence (truncation and padding length).
    max_sentence_tokens: int = 64
    #: Fixed sentence slots M (None: the per-batch maximum).
    pad_sentences_to: int | None = None
    #: "max_length" (static L) or "longest".
    token_padding: str = "max_length"
    #: Shard shuffling, and the sample shuffle buffer (samples; 0 or 1: no sample shuffling).
    shuffle: bool = True
    shuffle_buffer: int = 1000
    #: Seed of every shuffle (see the reader's module docstring for how streams are keyed).
    seed: int = 0
    #: Resampled mode (shards drawn with replacement, endless) and batches per rank per epoch
    #: (required when resampled; a cap in finite mode).
    resampled: bool = False
    epoch_batches: int | None = None
    #: Node split; None: torch.distributed's when initialised, else 0 / 1.
    rank: int | None = None
    world_size: int | None = None
    #: Drop each worker's final partial batch.
    drop_last: bool = False
    #: Passed to torch's DataLoader.
    pin_memory: bool = False
    prefetch_factor: int | None = None
    timeout: float = 0
    multiprocessing_context: Any = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "image_size", "heatmap_size", "max_sentences", "max_sentence_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.resampled and self.epoch_batches is None:
            raise ValueError("epoch_batches is required with resampled=True (the stream is endless)")
        if self.epoch_batches is not None and self.epoch_batches <= 0:
            raise ValueError(f"epoch_batches must be a positive int or None, got {self.epoch_batches}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        if self.pad_sentences_to is not None and self.pad_sentences_to < self.max_sentences:
            raise ValueError(f"pad_sentences_to ({self.pad_sentences_to}) must be >= max_sentences ({self.max_sentences})")
        if self.token_padding not in ("max_length", "longest"):
            raise ValueError(f"token_padding must be 'max_length' or 'longest', got {self.token_padding!r}")
        mean, std = self.normalisation()
        if len(mean) != self.channels or len(std) != self.channels:
            raise ValueError(f"mean and std need {self.channels} values, got {len(mean)} and {len(std)}")

    def normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) per channel, the defaults filled in."""
        mean = self.mean if self.mean is not None else (IMAGENET_MEAN if self.channels == 3 else (0.5,))
        std = self.std if self.std is not None else (IMAGENET_STD if self.channels == 3 else (0.5,))
        return tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def replace(self, **changes: Any) -> "LoaderOptions":
        """A copy with some fields changed (validated again); unknown names are a ValueError."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown loader option(s) {unknown}; known: {sorted(f.name for f in dataclasses.fields(self))}")
        return dataclasses.replace(self, **changes)
