"""Data: sample schema, synthetic generator, WebDataset shard writer and streaming reader.

- ``synthetic.write_synthetic_shards(out_dir, n_samples, seed, samples_per_shard, image_size=...)``:
  the embedded demo dataset (knobs: ``synthetic.CaseOptions``, ``options.HeatmapOptions``).
- ``shards.write_shards_from_records(records, out_dir, ...)``: shards from EGD-CXR / REFLACX
  readings (``egma_fast.gaze``).
- ``reader.make_loader(urls, tokenizer, LoaderOptions(...))`` (or the options as keywords): a
  resumable DataLoader of ``collate.Batch`` (see ``egma_fast.data.reader`` for the data-position
  mechanism, ``egma_fast.data.skips`` for what a lost sample is counted as).
- ``DataError``: missing, malformed or unreadable data, one line naming the path.
"""
from egma_fast.data.collate import Batch, DecodedSample, collate_samples
from egma_fast.data.errors import DataError
from egma_fast.data.options import HeatmapOptions, LoaderOptions
from egma_fast.data.reader import GazeLoader, GazeShardDataset, make_loader
from egma_fast.data.sample import GazeSample, SampleDecodeError, decode_sample, encode_sample
from egma_fast.data.shards import (
    RecordOptions,
    expand_urls,
    iter_shard_samples,
    read_sizes,
    samples_from_records,
    shard_sizes,
    shard_urls,
    write_samples,
    write_shards_from_records,
)
from egma_fast.data.simple_tokenizer import build_word_tokenizer
from egma_fast.data.synthetic import (
    FINDING_CLASSES,
    CaseOptions,
    SYNTHETIC_CLASS_PROMPTS,
    SyntheticCase,
    generate_cases,
    synthetic_case,
    synthetic_vocabulary,
    write_synthetic_shards,
)
from egma_fast.data.transforms import pad_resize_heatmaps, pad_resize_image, square_geometry

__all__ = [
    "Batch",
    "CaseOptions",
    "DataError",
    "DecodedSample",
    "FINDING_CLASSES",
    "GazeLoader",
    "GazeSample",
    "GazeShardDataset",
    "HeatmapOptions",
    "LoaderOptions",
    "RecordOptions",
    "SYNTHETIC_CLASS_PROMPTS",
    "SampleDecodeError",
    "SyntheticCase",
    "build_word_tokenizer",
    "collate_samples",
    "decode_sample",
    "encode_sample",
    "expand_urls",
    "generate_cases",
    "iter_shard_samples",
    "make_loader",
    "pad_resize_heatmaps",
    "pad_resize_image",
    "read_sizes",
    "samples_from_records",
    "shard_sizes",
    "shard_urls",
    "square_geometry",
    "synthetic_case",
    "synthetic_vocabulary",
    "write_samples",
    "write_shards_from_records",
    "write_synthetic_shards",
]
