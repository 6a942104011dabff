"""What reading shards lost: samples skipped per shard and reason, with folded warnings.

Every shard is read on its own (:func:`read_shards`), so the end of each read is known: when
the dataset's sizes.json lists the shard, a read that yields fewer samples than listed counts the
shortfall as ``missing`` (a truncated or unreadable shard loses every sample it no longer
holds, not one per tar error). Samples that come out of the tar but fail to decode are counted
under the member at fault (``png``, ``sentences.json``, ...). A tar error of a shard whose size
is unknown counts as one ``tar`` skip (what it cost is not knowable).

Warnings are folded: the first skip of each (shard, reason) is logged, the rest only counted.
In the streaming reader the loader (main process) does the logging, from the first messages the
workers send along, so the fold holds across workers and epochs.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Iterable, Iterator, Mapping

from egma_fast.data.errors import DataError

logger = logging.getLogger("egma_fast.data")

__all__ = ["SkipLedger", "describe", "merge_counts", "read_shards", "totals_by_reason", "warn_skip"]

#: shard -> reason -> samples lost
ShardCounts = dict[str, dict[str, int]]


def merge_counts(into: dict[str, Counter], more: Mapping[str, Mapping[str, int]]) -> dict[str, Counter]:
    """Add per-shard counts ``more`` into ``into`` (in place; returned for chaining)."""
    for shard, reasons in more.items():
        into.setdefault(shard, Counter()).update(reasons)
    return into


def totals_by_reason(counts: Mapping[str, Mapping[str, int]]) -> dict[str, int]:
    """Per-shard counts summed over shards: reason -> count."""
    total: Counter = Counter()
    for reasons in counts.values():
        total.update(reasons)
    return dict(total)


def describe(counts: Mapping[str, Mapping[str, int]], most: int = 3) -> str:
    """One short phrase: 'x.tar: missing 4, png 1; y.tar: tar 1 (+2 more shards)'."""
    items = sorted(counts.items(), key=lambda kv: -sum(kv[1].values()))
    parts = ["{}: {}".format(shard, ", ".join(f"{r} {n}" for r, n in sorted(reasons.items()))) for shard, reasons in items[:most]]
    more = f" (+{len(items) - most} more shards)" if len(items) > most else ""
    return "; ".join(parts) + more if parts else "nothing"


def warn_skip(shard: str, reason: str, message: str) -> None:
    """The one warning of a (shard, reason)."""
    logger.warning("shard %s: %s (further %r problems of this shard are counted in skip_stats(), not logged)",
                   shard, message, reason)


class SkipLedger:
    """Samples lost while reading shards, per shard and reason (one per reader process).

    Args:
        expected: shard -> sample count from sizes.json (shards not listed: size unknown).
        limit: raise :class:`DataError` after this many bad events (skips, tar errors, empty
            reads) without a :meth:`progress` call in between (None: never), e.g. when every
            shard is unreadable, instead of spinning forever.
        where: what is being read, for that message.
        log: log the first problem of each (shard, reason) here; False leaves it to whoever
            reads :attr:`messages` (the loader, across its worker processes).
    """

    def __init__(self, expected: Mapping[str, int] | None = None, *, limit: int | None = None, where: str = "",
                 log: bool = True) -> None:
        self.expected = dict(expected or {})
        self.counts: dict[str, Counter] = {}
        #: While True nothing is counted or logged (a resumed stream replaying what the saved
        #: counts already hold).
        self.quiet = False
        self.last_problem = ""
        self._limit = limit
        self._where = where
        self._events = 0  # bad events (skips, tar errors, empty reads) since the last progress()
        self._log = log
        #: (shard, reason) -> the first problem's message
        self.messages: dict[tuple[str, str], str] = {}

    def progress(self) -> None:
        """A good sample arrived: the consecutive-failure count starts again."""
        self._events = 0

    def _event(self) -> None:
        self._events += 1
        if self._limit is not None and self._events > self._limit:
            raise DataError(
                f"no readable sample in {self._events} consecutive shard reads / samples of {self._where}; "
                f"lost: {describe(self.snapshot())}; last problem: {self.last_problem}")

    def _note(self, shard: str, reason: str, message: str) -> None:
        self.last_problem = f"{shard}: {message}"
        if not self.quiet and (shard, reason) not in self.messages:
            self.messages[(shard, reason)] = message
            if self._log:
                warn_skip(shard, reason, message)
        self._event()

    def skip(self, shard: str, reason: str, message: str, count: int = 1) -> None:
        """Count ``count`` samples of ``shard`` lost for ``reason``."""
        if count <= 0:
            return
        if not self.quiet:
            self.counts.setdefault(shard, Counter())[reason] += count
        self._note(shard, reason, message)

    def tar_error(self, shard: str, exn: Exception) -> bool:
        """webdataset's error handler for one shard's read: count (size unknown) or note it."""
        # webdataset appends " @ <file object>" and the url to the message: keep the reason
        detail = str(exn.args[0]).split(" @ ")[0] if exn.args else ""
        message = f"tar read error ({type(exn).__name__}: {detail})"[:300]
        if shard in self.expected:  # end_of_read counts what the error cost
            self._note(shard, "tar", message)
        else:
            self.skip(shard, "tar", message)
        return True  # keep going with the next member / shard

    def end_of_read(self, shard: str, seen: int) -> None:
        """One read of ``shard`` ended after ``seen`` samples: count the shortfall against sizes.json."""
        expected = self.expected.get(shard)
        if expected is not None and seen < expected:
            self.skip(shard, "missing", f"{expected - seen} of the {expected} samples sizes.json lists could not be "
                      "read (truncated or damaged shard)", count=expected - seen)
        elif seen == 0:
            self._event()

    def reset(self) -> None:
        """Forget the counts and first messages."""
        self.counts = {}
        self.messages = {}

    def snapshot(self) -> ShardCounts:
        """A plain copy: shard -> reason -> count."""
        return {shard: dict(c) for shard, c in self.counts.items()}


def read_shards(urls: Iterable[str], ledger: SkipLedger) -> Iterator[dict[str, Any]]:
    """Raw samples (webdataset dicts with ``__key__`` and ``__url__``) of each shard in turn,
    every read accounted for in ``ledger``."""
    import webdataset as wds  # noqa: PLC0415 (a train extra: `import egma_fast.data` works without it)

    for url in urls:
        seen = 0
        for raw in wds.tarfile_to_samples(handler=lambda exn, u=url: ledger.tar_error(u, exn))([{"url": url}]):
            seen += 1
            yield raw
        ledger.end_of_read(url, seen)
