"""One run per run folder: a new run never mixes with (or prunes) an earlier run's files.

Training into a folder that already holds a run (config.json, metrics.jsonl or complete
checkpoints) is refused unless the run is resumed (``--resume latest``) or the earlier run is
explicitly discarded (``--overwrite``): otherwise the new run would overwrite config.json, move
``latest``, and checkpoint rotation would delete the new run's checkpoints while a later
``--resume latest`` picked the old run's.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from egma_fast.train.checkpoint import LATEST, CheckpointManager
from egma_fast.train.errors import RunDirError

__all__ = ["RunDirError", "clear_run", "describe_run"]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


def describe_run(run_dir: Path, checkpoints: CheckpointManager) -> str | None:
    """What an earlier run left in ``run_dir`` ("checkpoints up to step 300, metrics.jsonl"), or None."""
    found = []
    complete = checkpoints.complete()
    if complete:
        found.append(f"checkpoints up to step {complete[-1][0]}")
    for name in (METRICS_FILE, CONFIG_FILE):
        if (run_dir / name).is_file() and (run_dir / name).stat().st_size > 0:
            found.append(name)
    return ", ".join(found) if found else None


def refusal(run_dir: Path, what: str) -> RunDirError:
    """The error for training into ``run_dir`` that holds ``what`` without resuming."""
    return RunDirError(
        f"run_dir {str(run_dir)!r} already holds a run ({what}); continue it with --resume latest, "
        "discard it with --overwrite, or choose another run_dir (--set run_dir=...)")


def clear_run(run_dir: Path, checkpoints: CheckpointManager) -> None:
    """Delete what a run writes (checkpoints, ``latest``, metrics, TensorBoard, config.json) and
    nothing else: other files in the folder are the user's."""
    root = checkpoints.root
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith("step_") and child.is_dir():
                shutil.rmtree(child)
        (root / LATEST).unlink(missing_ok=True)
    for name in (METRICS_FILE, CONFIG_FILE):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / TB_DIR, ignore_errors=True)
