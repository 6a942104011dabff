"""Training telemetry: JSONL + TensorBoard metrics (rank 0), nvtx ranges, timers, peak memory."""
from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist

__all__ = ["MetricsLogger", "Timer", "nvtx_range", "peak_memory_bytes", "reset_peak_memory", "sum_over_ranks",
           "truncate_metrics"]


@contextlib.contextmanager
def nvtx_range(name: str, enabled: bool) -> Iterator[None]:
    """An NVTX range for Nsight Systems on GPU (torch.cuda.nvtx); nothing on CPU."""
    if not enabled:
        yield
        return
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


class Timer:
    """Accumulates wall seconds per name (synchronising CUDA first when asked, for honest times)."""

    def __init__(self, sync_cuda: bool = False) -> None:
        self.sync_cuda = sync_cuda
        self.totals: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.sync_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync_cuda:
                torch.cuda.synchronize()
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        """The accumulated totals, then reset."""
        out, self.totals = self.totals, {}
        return out


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA allocator; a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated bytes since the last reset on CUDA; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def sum_over_ranks(values: Mapping[str, float | torch.Tensor], device: torch.device, world_size: int) -> dict[str, float]:
    """Named scalars summed over every rank with one all-reduce (this rank's values when alone)."""
    names = list(values)
    vec = torch.stack([torch.as_tensor(values[n], dtype=torch.float64).reshape(()).to(device) for n in names])
    if world_size > 1:
        dist.all_reduce(vec)
    return dict(zip(names, vec.tolist()))


def truncate_metrics(path: Path, last_step: int) -> int:
    """Keep the records of ``path`` (metrics.jsonl) up to ``last_step``, rewritten atomically:
    a resumed run then continues one clean series instead of repeating the steps between its
    checkpoint and the kill. A torn last line (killed mid-write) goes too. Returns the number of
    records dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            keep = int(record["step"]) <= last_step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return dropped


def _clean(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf
    return value


class MetricsLogger:
    """Writes metric dicts to ``run_dir/metrics.jsonl`` and TensorBoard ``run_dir/tb`` (rank 0 only).

    Each record is ``{"step": s, "split": "train"|"eval"|..., "time": t, **metrics}``; TensorBoard
    tags are ``split/name``. Other ranks get a logger that writes nothing.

    ``resume_step``: the run continues from a checkpoint of this step; records after it (written
    by the killed run after its checkpoint) are dropped from metrics.jsonl and purged from
    TensorBoard, so the resumed run's metrics are one series.
    """

    def __init__(self, run_dir: str | os.PathLike, *, enabled: bool = True, jsonl: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if jsonl:
            if resume_step is not None:
                truncate_metrics(self.run_dir / "metrics.jsonl", resume_step)
            self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 (optional: the tensorboard package)
            except ImportError as exc:  # pragma: no cover - tensorboard is a train extra
                raise ImportError("log.tensorboard=true needs the tensorboard package (pip install tensorboard), or set log.tensorboard=false") from exc
            purge = None if resume_step is None else resume_step + 1  # events at steps >= purge are hidden
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=purge)

    def log(self, step: int, metrics: dict[str, Any], split: str = "train") -> None:
        """Record ``metrics`` (numbers; strings/lists go to JSONL only) at ``step``."""
        if not self.enabled:
            return
        clean = {k: _clean(v) for k, v in metrics.items()}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, "split": split, "time": time.time(), **clean}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{split}/{k}", v, step)

    def flush(self) -> None:
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close the files (idempotent)."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
