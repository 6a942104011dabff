"""Atomic DCP checkpoints with keep-last-k and ``resume latest``.

Layout of ``<dir>/step_00000100/`` (written as ``step_00000100.tmp/`` and renamed only when
complete, so a killed run never leaves a half-written checkpoint that ``latest`` could pick)::

    dcp/              torch.distributed.checkpoint of {"model": ..., "optim": ...} from
                      get_state_dict (sharded FSDP2 parameters and optimizer state, any world size)
    trainer.json      rank 0: step, scheduler state, world size (JSON)
    rank_00000.pt     per rank: RNG states (torch, CUDA, numpy, python; as tensors and numbers)
                      and the data position
    meta.json         written last: step, world size, time, config (the "complete" marker)

``<dir>/latest`` names the newest complete checkpoint (replaced atomically, for people and
scripts); ``--resume latest`` itself picks the newest complete ``step_*`` folder.

Loading never runs code from a checkpoint: JSON for the trainer state, ``torch.load(...,
weights_only=True)`` for the rank states, and DCP through :mod:`egma_fast.train.dcp_io`. A
damaged file (0 bytes, truncated, not what it should be) raises :class:`CheckpointError`, one
line naming the file; ``Trainer.resume("latest")`` then falls back to the previous checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from egma_fast.train.dcp_io import DCPReadError, load_dcp, save_dcp
from egma_fast.train.distributed import DistInfo, barrier
from egma_fast.train.errors import CheckpointError

logger = logging.getLogger("egma_fast.train")

__all__ = ["CheckpointError", "CheckpointManager", "capture_rng_state", "restore_rng_state"]

_STEP_DIR = re.compile(r"^step_(\d{8})$")
META = "meta.json"
LATEST = "latest"
TRAINER_STATE = "trainer.json"


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states: torch CPU, every CUDA device, numpy's global, python's.

    Only tensors, numbers, strings and lists, so that it loads with ``weights_only=True``.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _damaged(path: Path, exc: BaseException) -> CheckpointError:
    if isinstance(exc, FileNotFoundError):
        why = "missing"
    elif path.is_file() and path.stat().st_size == 0:
        why = "empty (0 bytes)"
    else:
        why = f"damaged or not a checkpoint file ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return CheckpointError(f"checkpoint file {path} is {why}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _damaged(path, exc) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint file {path} is damaged (a JSON {type(data).__name__}, not an object)")
    return data


def _load_tensors(path: Path) -> Any:
    """torch.load with weights_only=True: tensors and plain containers only, never code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        raise _damaged(path, exc) from None


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoint folders (with meta.json), oldest first."""
    out = []
    if root.is_dir():
        for child in root.iterdir():
            m = _STEP_DIR.match(child.name)
            if m and (child / META).is_file():
                out.append((int(m.group(1)), child))
    return sorted(out)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CheckpointManager:
    """Saves and restores training state under ``root`` (every rank creates one; all call save/load)."""

    def __init__(self, root: str | os.PathLike, info: DistInfo, keep_last: int = 3) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.info = info
        self.keep_last = keep_last

    # --- finding checkpoints -------------------------------------------------------------------
    def complete(self) -> list[tuple[int, Path]]:
        """(step, folder) of every complete checkpoint, oldest first."""
        return _step_dirs(self.root)

    def latest(self) -> Path | None:
        """The newest complete checkpoint (a folder with meta.json), or None.

        Decided by the folders themselves, not by the ``latest`` pointer file, so that a run killed
        between the rename and the pointer update still resumes from its newest checkpoint.
        """
        found = self.complete()
        return found[-1][1] if found else None

    def resolve(self, spec: str | os.PathLike) -> Path | None:
        """"latest" -> the newest complete checkpoint (None if there is none); a path -> that folder.

        Raises:
            FileNotFoundError: a path that is not a complete checkpoint.
        """
        if str(spec) == "latest":
            return self.latest()
        path = Path(spec)
        if not (path / META).is_file():
            raise FileNotFoundError(
                f"--resume {str(spec)!r}: not a complete checkpoint folder (no {META}); "
                f"use 'latest' or a {self.root}/step_XXXXXXXX folder"
            )
        return path

    def candidates(self, spec: str | os.PathLike) -> list[Path]:
        """Checkpoints to try for ``spec``, best first: "latest" -> every complete one, newest
        first (a damaged one falls back to the one before); a path -> that folder alone.

        Raises:
            FileNotFoundError: a path that is not a complete checkpoint.
        """
        if str(spec) == "latest":
            return [p for _, p in reversed(self.complete())]
        found = self.resolve(spec)
        return [found] if found is not None else []

    # --- saving --------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        container: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        rank_state: dict[str, Any],
        meta: dict[str, Any] | None = None,
    ) -> Path:
        """Write checkpoint ``step`` atomically; every rank must call it. Returns the final folder."""
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"step_{step:08d}.tmp"
        if self.info.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)  # left over by a run killed mid-save
            tmp.mkdir()
        barrier()
        model_sd, optim_sd = get_state_dict(container, optimizer)
        save_dcp({"model": model_sd, "optim": optim_sd}, tmp / "dcp")
        torch.save(rank_state, tmp / f"rank_{self.info.rank:05d}.pt")
        barrier()
        if self.info.is_main:
            trainer = {"step": step, "scheduler": scheduler.state_dict(), "world_size": self.info.world_size}
            _write_atomic(tmp / TRAINER_STATE, json.dumps(trainer))
            record = {"step": step, "world_size": self.info.world_size, "time": time.time(), **(meta or {})}
            _write_atomic(tmp / META, json.dumps(record, indent=1, default=str))
            if final.exists():  # re-saving a step (after a resume): replace the old copy
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_atomic(self.root / LATEST, final.name + "\n")
            self._prune(keep=final)
        barrier()
        return final

    def _prune(self, keep: Path) -> None:
        done = self.complete()
        for _, path in done[: max(0, len(done) - self.keep_last)]:
            if path != keep:
                shutil.rmtree(path, ignore_errors=True)
        for child in self.root.iterdir():  # stale half-written folders of killed runs
            if child.name.endswith(".tmp") and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)

    # --- loading -------------------------------------------------------------------------------
    def _all_ranks_ok(self, error: CheckpointError | None) -> CheckpointError | None:
        """Agree across ranks whether every rank read its small files (before DCP's collectives)."""
        if self.info.world_size > 1:
            flag = torch.tensor([0.0 if error is None else 1.0], device=self.info.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if error is None and flag.item() > 0:
                return CheckpointError("another rank found its state in this checkpoint damaged (see its message)")
        return error

    def load(
        self,
        path: Path,
        container: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
    ) -> tuple[int, dict[str, Any] | None]:
        """Restore model, optimizer and scheduler from ``path``; returns (step, this rank's state).

        The rank state (RNG, data position) is None when the checkpoint was written by a different
        world size (model and optimizer are still restored: DCP reshards them). Nothing in the
        checkpoint is unpickled as code.

        Raises:
            CheckpointError: a missing, empty, truncated or foreign file, named in the message
                (the small files are checked before the model is touched).
        """
        path = Path(path)
        error: CheckpointError | None = None
        rank_state = None
        try:
            trainer = _read_json(path / TRAINER_STATE)
            if not isinstance(trainer.get("step"), int) or not isinstance(trainer.get("scheduler"), dict):
                raise CheckpointError(f"checkpoint file {path / TRAINER_STATE} is damaged (no step / scheduler)")
            rank_file = path / f"rank_{self.info.rank:05d}.pt"
            same_world = trainer.get("world_size") == self.info.world_size
            if same_world:
                rank_state = _load_tensors(rank_file)
                if not isinstance(rank_state, dict) or "rng" not in rank_state:
                    raise CheckpointError(f"checkpoint file {rank_file} is damaged (no RNG state)")
        except CheckpointError as exc:
            error = exc
        error = self._all_ranks_ok(error)
        if error is not None:
            raise error
        if not same_world:
            warnings.warn(
                f"checkpoint {path} was written by {trainer.get('world_size')} rank(s), this run has "
                f"{self.info.world_size}: model and optimizer are resharded, but RNG streams and the data "
                "position restart from the seed",
                stacklevel=2,
            )
        model_sd, optim_sd = get_state_dict(container, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        try:
            load_dcp(state, path / "dcp")
        except DCPReadError as exc:
            raise CheckpointError(f"checkpoint folder {path / 'dcp'} is damaged or not loadable ({exc})") from None
        set_state_dict(container, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        scheduler.load_state_dict(trainer["scheduler"])
        return int(trainer["step"]), rank_state
