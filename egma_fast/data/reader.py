"""Streaming reader: WebDataset shards -> :class:`~egma_fast.data.collate.Batch`, sharded over
nodes and DataLoader workers, deterministic and resumable.

Use::

    loader = make_loader("data/train", tokenizer, batch_size=64, num_workers=4, seed=0)
    # or: make_loader("data/train", tokenizer, LoaderOptions(batch_size=64, num_workers=4))
    for batch in loader:            # one epoch; the next `for` runs the next epoch
        batch = batch.to("cuda", non_blocking=True)
        ...
    loader.skip_stats()             # samples lost, by reason, by shard and by worker

Pipeline per (rank, worker): shard list -> split by node (``urls[rank::world_size]``) -> split by
worker (``[worker::num_workers]``) -> tar samples (``webdataset.tarfile_to_samples``) -> sample
shuffle buffer (``webdataset.shuffle``) -> decode + pad-to-square + resize (image and heatmaps,
same geometry) -> batches of ``batch_size`` collated *inside the worker*. A sample that fails to
decode (truncated PNG, bad JSON, missing member, heatmaps that do not match the sentences, no
sentence) is skipped and counted under the member at fault; a shard read that yields fewer
samples than its sizes.json lists (truncated, unreadable) counts the shortfall as ``missing``
(see :mod:`egma_fast.data.skips`). Counts are kept per shard, reason and worker, travel with each
batch so they survive worker processes, and the first skip of each kind per shard is logged.
Data that yields nothing at all (every shard unreadable) raises :class:`DataError`, one line.

Modes:
- finite (default): each epoch reads every shard once. Shards are shuffled with
  ``Random(f"{seed}/{epoch}")`` (the same order on every rank), then split by node and worker,
  so ranks and workers read disjoint shards that together cover the data. Use at least
  ``world_size * num_workers`` shards (a warning says when some readers get none). Ranks may end
  with different batch counts; for DDP/FSDP use the resampled mode, or cap each epoch with
  ``epoch_batches``.
- resampled (``resampled=True``): every (rank, worker) draws shards with replacement from its own
  ``Random(f"{seed}/{epoch}/{rank}/{worker}")`` stream, forever; an epoch is exactly
  ``epoch_batches`` batches per rank (required), split evenly over the workers.

Sample shuffling uses ``Random(f"{seed}/{epoch}/{rank}/{worker}")`` too, and the loader
interleaves the workers' batches in a canonical order (next batch from the unfinished worker
that has handed out the fewest, ties to the lowest id), so the whole stream of batches is a
pure function of (urls, seed, epoch, rank, world_size, num_workers, batch_size).

Resuming the data position (checkpoint restore):

    state = loader.state_dict()      # JSON-serialisable; save it with the model checkpoint
    ...
    loader = make_loader(<same arguments>)
    loader.load_state_dict(state)    # the next `for batch in loader` continues exactly after
                                     # the last batch the old loader handed out

``state`` holds the epoch and, per worker, how many raw samples its (shuffled) stream had used
when it produced its last handed-out batch and how many batches it had produced (plus the
skip counts). Resuming replays each worker's deterministic stream and skips those samples
*before decoding them* (only tar bytes are read), so no batch is repeated or lost; what the
replay meets again is neither counted nor logged a second time. The world
size, rank, worker count, seed, batch size and mode must match the saved ones (ValueError
otherwise). A batch counts as consumed as soon as the loader yields it. Every rank has its own
state: save one per rank (e.g. gather the dicts and store the list) and give each rank its own
on resume.

The loader always continues from its position: a ``for`` loop left early (``break``) and
started again continues the same epoch; an epoch that runs to its end advances ``loader.epoch``
by one and the next loop starts the next epoch from its beginning. ``loader.set_epoch(e)``
jumps to the beginning of epoch ``e`` (setting the current epoch again keeps the position, so
the usual ``set_epoch`` call at the top of an epoch loop is harmless; ``restart=True`` forces
the beginning). Workers are not persistent (``persistent_workers=False``): each loop starts
them afresh from the position.
"""
from __future__ import annotations

import math
import random
import warnings
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from egma_fast.data.collate import Batch, DecodedSample, collate_samples
from egma_fast.data.errors import DataError
from egma_fast.data.options import LoaderOptions
from egma_fast.data.sample import SampleDecodeError, decode_sample
from egma_fast.data.shards import expand_urls, shard_sizes
from egma_fast.data.skips import (
    ShardCounts,
    SkipLedger,
    describe,
    merge_counts,
    read_shards,
    totals_by_reason,
    warn_skip,
)
from egma_fast.data.transforms import pad_resize_heatmaps, pad_resize_image

__all__ = ["GazeLoader", "GazeShardDataset", "LoaderOptions", "expand_urls", "make_loader"]


@dataclass
class _WorkerItem:
    """What a worker sends: a batch (or None at its end) with its position and skip counts, or
    the one-line message of a :class:`DataError` that ended its stream."""

    batch: Batch | None
    worker: int
    num_workers: int
    position: int  # raw samples of this worker's shuffled stream used so far
    batches: int  # batches this worker has produced this epoch (including resumed ones)
    skipped: ShardCounts
    #: [shard, reason, message] of the first problem of each kind this worker met (the loader logs them once)
    messages: list[tuple[str, str, str]] = field(default_factory=list)
    error: str | None = None

    def pin_memory(self) -> "_WorkerItem":
        if self.batch is not None:
            self.batch = self.batch.pin_memory()
        return self


def _split_even(total: int, parts: int, index: int) -> int:
    return total // parts + (1 if index < total % parts else 0)


class GazeShardDataset(IterableDataset):
    """Iterable over batches (wrapped with their worker position); use through :class:`GazeLoader`.

    Args:
        urls: see :func:`make_loader`.
        options: the reader's options.
        tokenizer: HF tokenizer for the sentences (None: no token tensors, L = 0).
    """

    def __init__(self, urls: str | Path | Sequence[str | Path], options: LoaderOptions, tokenizer: Any | None = None):
        super().__init__()
        self.urls = expand_urls(urls)
        #: shard -> samples listed in its sizes.json (the shortfall of a read is counted)
        self.expected = shard_sizes(self.urls)
        self.options = options
        rank, world_size = options.rank, options.world_size
        if rank is None or world_size is None:
            d_rank, d_world = 0, 1
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                d_rank, d_world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            rank = d_rank if rank is None else rank
            world_size = d_world if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.tokenizer = tokenizer
        mean, std = options.normalisation()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.epoch = 0
        # worker -> (position, batches) to resume from, valid for self._resume_epoch only
        self._resume: dict[int, tuple[int, int]] = {}
        self._resume_epoch = -1

    # the fields a resumed state must match, and that the loader reports
    @property
    def seed(self) -> int:
        return int(self.options.seed)

    @property
    def batch_size(self) -> int:
        return self.options.batch_size

    @property
    def resampled(self) -> bool:
        return self.options.resampled

    # -- per-sample work ---------------------------------------------------------------------
    def decode(self, raw: dict[str, Any]) -> DecodedSample:
        """Raw tar members -> DecodedSample (raises SampleDecodeError on bad data)."""
        o = self.options
        s = decode_sample(raw)
        if not s.sentences:
            raise SampleDecodeError("sentences.json", "no sentence")
        sentences = s.sentences[: o.max_sentences]
        H, W = s.image.shape
        if s.heatmaps is not None and min(s.heatmaps.shape[1:]) == 0:
            raise SampleDecodeError("heatmaps.npz", f"empty heatmap grid {s.heatmaps.shape}")
        try:
            img = pad_resize_image(torch.from_numpy(s.image), o.image_size) / 255.0  # [1, S, S]
            if o.channels == 3:
                img = img.expand(3, -1, -1)
            img = (img - self.mean) / self.std
            hm = None
            if s.heatmaps is not None:
                hm = pad_resize_heatmaps(torch.from_numpy(s.heatmaps[: len(sentences)]), (H, W), o.heatmap_size)
                hm = hm.clamp_(0.0, 1.0)
        except (RuntimeError, ValueError) as e:  # data-dependent failure: a bad sample, not a bug here
            raise SampleDecodeError("transform", f"{type(e).__name__}: {e}") from e
        return DecodedSample(key=s.key, image=img.contiguous(), sentences=sentences, heatmaps=hm,
                             labels=torch.from_numpy(s.labels), class_index=s.class_index)

    def collate(self, samples: list[DecodedSample]) -> Batch:
        o = self.options
        return collate_samples(samples, self.tokenizer, o.max_sentence_tokens, o.pad_sentences_to,
                               o.token_padding, heatmap_size=o.heatmap_size)

    # -- stream ------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def worker_shards(self, worker: int, num_workers: int) -> list[str]:
        """Shards read by (self.rank, worker) in the current epoch, finite mode."""
        order = list(self.urls)
        if self.options.shuffle:
            random.Random(f"{self.seed}/{self.epoch}").shuffle(order)
        return order[self.rank :: self.world_size][worker::num_workers]

    def _shard_source(self, worker: int, num_workers: int) -> Iterator[str]:
        if self.resampled:
            rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}/shards")
            while True:
                yield self.urls[rng.randrange(len(self.urls))]
        else:
            yield from self.worker_shards(worker, num_workers)

    def __iter__(self) -> Iterator[_WorkerItem]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # e.g. every shard unreadable: fail with one line instead of spinning forever
        ledger = SkipLedger(self.expected, limit=100 + 10 * len(self.urls), log=False,
                            where=f"{describe_urls(self.urls)} (rank {self.rank}, worker {worker})")
        try:
            for item in self._worker_items(worker, num_workers, ledger):
                item.messages = [(shard, reason, msg) for (shard, reason), msg in ledger.messages.items()]
                yield item
        except DataError as exc:  # sent as a message: a worker's traceback would bury the one line
            yield _WorkerItem(None, worker, num_workers, 0, 0, ledger.snapshot(), error=str(exc),
                              messages=[(shard, reason, msg) for (shard, reason), msg in ledger.messages.items()])

    def _worker_items(self, worker: int, num_workers: int, ledger: SkipLedger) -> Iterator[_WorkerItem]:
        import webdataset as wds  # noqa: PLC0415 (a train extra: `import egma_fast.data` works without it)

        o = self.options
        skip_to, batches = (0, 0)
        if self._resume_epoch == self.epoch:
            skip_to, batches = self._resume.get(worker, (0, 0))
        quota = math.inf
        if o.epoch_batches is not None:
            quota = _split_even(o.epoch_batches, num_workers, worker)
        ledger.quiet = skip_to > 0  # resume: the saved counts already hold what the replay meets
        stream: Any = read_shards(self._shard_source(worker, num_workers), ledger)
        if o.shuffle and o.shuffle_buffer > 1:
            rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}")
            # start yielding once min(buffer, 100) samples are in (webdataset's default warm-up)
            stream = wds.shuffle(o.shuffle_buffer, initial=min(o.shuffle_buffer, 100), rng=rng)(stream)
        pos = 0
        n_labels: int | None = None  # label vector length, fixed by the first good sample
        buf: list[DecodedSample] = []
        if batches >= quota:
            stream = iter(())
        for raw in stream:
            pos += 1
            if pos <= skip_to:  # resume: already consumed before the checkpoint (not decoded)
                ledger.progress()
                if pos == skip_to:
                    ledger.quiet = False
                    ledger.reset()
                continue
            try:
                sample = self.decode(raw)
                if n_labels is not None and sample.labels.numel() != n_labels:
                    raise SampleDecodeError("labels.json", f"{sample.labels.numel()} labels, expected {n_labels}")
            except SampleDecodeError as e:
                ledger.skip(raw.get("__url__", "?"), e.field, f"bad sample {raw.get('__key__', '?')} ({e})")
                continue
            ledger.progress()
            n_labels = sample.labels.numel()
            buf.append(sample)
            if len(buf) == o.batch_size:
                batches += 1
                yield _WorkerItem(self.collate(buf), worker, num_workers, pos, batches, ledger.snapshot())
                buf = []
                if batches >= quota:
                    break
        if buf and not o.drop_last and batches < quota:
            batches += 1
            yield _WorkerItem(self.collate(buf), worker, num_workers, pos, batches, ledger.snapshot())
        yield _WorkerItem(None, worker, num_workers, pos, batches, ledger.snapshot())

    def __len__(self) -> int:
        if self.options.epoch_batches is None:
            raise TypeError("the number of batches is known only with epoch_batches set")
        return self.options.epoch_batches


def describe_urls(urls: Sequence[str]) -> str:
    """'data/train/shard-000000.tar' or 'the 12 shards in data/train' (for messages)."""
    if len(urls) == 1:
        return repr(urls[0])
    folders = {str(Path(u).parent) for u in urls}
    return f"the {len(urls)} shards in {folders.pop()!r}" if len(folders) == 1 else f"{len(urls)} shards"


def _passthrough(x: Any) -> Any:
    return x


class GazeLoader(DataLoader):
    """A DataLoader over a :class:`GazeShardDataset` that yields :class:`Batch` objects, tracks
    the data position (``state_dict`` / ``load_state_dict``) and what was lost (``skip_stats``).
    See the module docstring."""

    def __init__(self, dataset: GazeShardDataset):
        o = dataset.options
        super().__init__(
            dataset, batch_size=None, collate_fn=_passthrough, num_workers=o.num_workers, pin_memory=o.pin_memory,
            prefetch_factor=o.prefetch_factor if o.num_workers > 0 else None, persistent_workers=False,
            timeout=o.timeout, multiprocessing_context=o.multiprocessing_context,
        )
        self.gaze_dataset = dataset
        n = max(1, o.num_workers)
        self._readers = n
        self._positions: dict[int, tuple[int, int]] = {}
        # shard -> reason -> count: folded over finished passes / resumed runs (base) and per
        # worker for the pass in progress (live) or the last finished one (last)
        self._skip_base: dict[str, Counter] = {}
        self._skip_live: dict[int, ShardCounts] = {}
        self._skip_last: dict[int, ShardCounts] = {}
        self._warned: set[tuple[str, str]] = set()  # (shard, reason) already logged, over workers and epochs
        if not dataset.resampled and len(dataset.urls) < dataset.world_size * n:
            warnings.warn(
                f"{len(dataset.urls)} shards for {dataset.world_size} rank(s) x {n} worker(s): some readers get "
                "no shard; write more, smaller shards", stacklevel=2)

    @property
    def epoch(self) -> int:
        return self.gaze_dataset.epoch

    def __len__(self) -> int:
        """Batches per epoch (only with ``epoch_batches``; TypeError otherwise)."""
        return len(self.gaze_dataset)

    def set_epoch(self, epoch: int, restart: bool = False) -> None:
        """Move to epoch ``epoch``: from its beginning when it differs from the current epoch or
        ``restart`` is set; setting the current epoch again keeps the position (so the usual
        ``loader.set_epoch(e)`` at the top of an epoch loop does not undo a resume)."""
        if int(epoch) != self.gaze_dataset.epoch or restart:
            self._positions = {}
        self.gaze_dataset.set_epoch(epoch)

    def _take(self, item: _WorkerItem) -> None:
        """Record a worker item's skip counts and log the first problem of each new kind."""
        self._skip_live[item.worker] = item.skipped
        for shard, reason, message in item.messages:
            if (shard, reason) not in self._warned:
                self._warned.add((shard, reason))
                warn_skip(shard, reason, message)
        if item.error is not None:
            raise DataError(item.error)

    def _fold_live(self) -> None:
        for counts in self._skip_live.values():
            merge_counts(self._skip_base, counts)

    def __iter__(self) -> Iterator[Batch]:  # type: ignore[override]
        ds = self.gaze_dataset
        # always continue from the loader's position in this epoch: nothing after set_epoch /
        # an epoch end, the saved one after load_state_dict, the last batch handed out after
        # a `for` loop that was left early
        ds._resume, ds._resume_epoch = dict(self._positions), ds.epoch
        self._fold_live()
        self._skip_live = {}
        self._skip_last = {}
        W = self._readers
        # Canonical interleaving: the next batch comes from the unfinished worker that has
        # handed out the fewest batches (ties: lowest id), i.e. round-robin that skips finished
        # workers. DataLoader itself always restarts its round-robin at worker 0, so after a
        # resume its order would differ; buffering (at most a batch or two per worker) and
        # re-ordering makes the stream a function of the per-worker counts alone.
        counts = {w: self._positions.get(w, (0, 0))[1] for w in range(W)}
        started_with = sum(counts.values())
        pending: dict[int, deque] = {w: deque() for w in range(W)}
        finished: set[int] = set()

        def drain() -> Iterator[Batch]:
            while True:
                live = [w for w in range(W) if w not in finished]
                if not live:
                    return
                w = min(live, key=lambda v: (counts[v], v))
                if not pending[w]:
                    return  # wait for that worker's next item
                item = pending[w].popleft()
                # position and skip counts advance only with what is handed out
                self._take(item)
                self._positions[w] = (item.position, item.batches)
                if item.batch is None:
                    finished.add(w)
                    continue
                counts[w] += 1
                yield item.batch

        for item in super().__iter__():
            if item.error is not None:  # stop at once, whichever worker it is
                self._take(item)
            pending[item.worker].append(item)
            yield from drain()
        yield from drain()
        if started_with == 0 and sum(counts.values()) == 0 and self._live_counts():
            raise DataError(f"no readable sample in {describe_urls(ds.urls)}: lost {describe(self._live_counts())}")
        # the epoch ran to its end: fold the counts, advance
        self._fold_live()
        self._skip_last, self._skip_live = self._skip_live, {}
        self.set_epoch(ds.epoch + 1)

    def _live_counts(self) -> dict[str, Counter]:
        out: dict[str, Counter] = {}
        for counts in self._skip_live.values():
            merge_counts(out, counts)
        return out

    def _all_counts(self) -> dict[str, Counter]:
        return merge_counts(merge_counts({}, self._skip_base), self._live_counts())

    def skip_stats(self) -> dict[str, Any]:
        """Samples lost (all epochs, resumed runs included):

        - ``total``: reason -> count; ``count``: their sum;
        - ``per_shard``: shard -> reason -> count;
        - ``per_worker``: worker -> reason -> count for the epoch in progress, or for the last
          finished one when none is in progress.
        """
        per_shard = {shard: dict(c) for shard, c in sorted(self._all_counts().items())}
        total = totals_by_reason(per_shard)
        per = self._skip_live or self._skip_last
        return {"total": total, "per_shard": per_shard, "count": sum(total.values()),
                "per_worker": {w: totals_by_reason(c) for w, c in sorted(per.items())}}

    def state_dict(self) -> dict[str, Any]:
        """The data position after the last batch handed out (JSON-serialisable)."""
        ds = self.gaze_dataset
        return {
            "epoch": ds.epoch,
            "seed": ds.seed,
            "rank": ds.rank,
            "world_size": ds.world_size,
            "num_workers": self._readers,
            "batch_size": ds.batch_size,
            "resampled": ds.resampled,
            "positions": [list(self._positions.get(w, (0, 0))) for w in range(self._readers)],
            "skipped": {shard: dict(c) for shard, c in sorted(self._all_counts().items())},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` at the next iteration."""
        ds = self.gaze_dataset
        expect = {"seed": ds.seed, "world_size": ds.world_size, "num_workers": self._readers,
                  "batch_size": ds.batch_size, "resampled": ds.resampled, "rank": ds.rank}
        for k, v in expect.items():
            if state.get(k) != v:
                raise ValueError(f"state[{k!r}] = {state.get(k)!r} but this loader has {v!r}; "
                                 "resume needs the same seed, world size, rank, workers, batch size and mode")
        pos = state.get("positions")
        if not isinstance(pos, list) or len(pos) != self._readers:
            raise ValueError(f"state['positions'] must be a list of {self._readers} [position, batches] pairs")
        ds.set_epoch(int(state["epoch"]))
        self._positions = {w: (int(p), int(b)) for w, (p, b) in enumerate(pos)}
        skipped = state.get("skipped", {})
        if any(not isinstance(v, dict) for v in skipped.values()):  # older states: reason -> count
            skipped = {"?": skipped}
        self._skip_base = merge_counts({}, skipped)
        self._skip_live, self._skip_last = {}, {}


def make_loader(
    urls: str | Path | Sequence[str | Path],
    tokenizer: Any | None = None,
    options: LoaderOptions | None = None,
    **fields: Any,
) -> GazeLoader:
    """A DataLoader of :class:`Batch` over WebDataset shards (see the module docstring).

    Args:
        urls: dataset folder (sizes.json), brace pattern, path or list of shards.
        tokenizer: HF tokenizer for the sentences (None: no token tensors, L = 0).
        options: the reader's options (:class:`LoaderOptions`).
        **fields: LoaderOptions fields, set on top of ``options`` (or the whole options when
            ``options`` is None; ``batch_size`` is then required).

    Raises:
        DataError: missing or empty data folders, malformed sizes.json.
        ValueError: bad options.
    """
    if options is None:
        if "batch_size" not in fields:
            raise ValueError("make_loader needs batch_size= (or a LoaderOptions)")
        options = LoaderOptions(batch_size=fields.pop("batch_size"))
    return GazeLoader(GazeShardDataset(urls, options.replace(**fields), tokenizer))
