"""torch.distributed.checkpoint (DCP) save / load that never runs code from a checkpoint.

DCP's stock reader unpickles the ``.metadata`` file with plain :mod:`pickle` and loads every
non-tensor value with ``torch.load(weights_only=False)``: a checkpoint from someone else could
execute code on load. :func:`load_dcp` reads the metadata with an unpickler that only rebuilds
DCP's own metadata classes (the "restricting globals" recipe of the pickle documentation) and
loads non-tensor values with ``weights_only=True``.

In a single process (no process group) DCP warns on every call that torch.distributed is not
initialised; that is the intended mode there, so the warning is silenced only then.
"""
from __future__ import annotations

import contextlib
import io
import os
import pickle
import warnings
from pathlib import PurePath
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

__all__ = ["DCPReadError", "UnsafeCheckpointError", "load_dcp", "save_dcp"]

# The globals DCP's metadata needs: its dataclasses / enums, sizes, dtypes, layouts, paths.
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                "torch.distributed.checkpoint.planner")
_OTHER_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file asks to rebuild something other than plain checkpoint data."""


class DCPReadError(RuntimeError):
    """A DCP folder could not be read; the message is the cause in one line."""


# the lines of DCP's multi-rank report that say what went wrong, most specific first
_CAUSES = ("refusing to load", "WeightsUnpickler error", "Error:")


def _cause(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for key in _CAUSES:
        hits = [ln for ln in lines if key in ln]
        if hits:
            return hits[-1][:300]
    return lines[-1][:300] if lines else type(exc).__name__


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module in _DCP_MODULES:
            obj = super().find_class(module, name)
            if isinstance(obj, type):  # classes only: no functions (os.system, eval, ...)
                return obj
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        elif (module, name) in _OTHER_GLOBALS:
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f"refusing to load {module}.{name} (not checkpoint data)")


class _SafeReader(FileSystemReader):
    """FileSystemReader whose metadata is read with the restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        with self.fs.create_stream(self._get_metadata_path(rank), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpointError(f"the metadata is a {type(metadata).__name__}, not DCP Metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that loads non-tensor values with ``weights_only=True``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)  # raises on anything but plain data
        # hand the stock planner a re-serialisation of what was safely loaded (values are small)
        clean = io.BytesIO()
        torch.save(obj, clean)
        clean.seek(0)
        super().load_bytes(read_item, clean)


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    if dist.is_available() and dist.is_initialized():
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save_dcp(state: dict[str, Any], path: str | os.PathLike | PurePath) -> None:
    """``dcp.save(state)`` into folder ``path`` (every rank calls it)."""
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=str(path))


def load_dcp(state: dict[str, Any], path: str | os.PathLike | PurePath) -> None:
    """``dcp.load`` into ``state`` (in place) from folder ``path``, without running pickled code.

    Raises:
        DCPReadError: the folder is missing, damaged, or asks to rebuild anything but checkpoint
            data (the message says which).
    """
    try:
        with _quiet_single_process():
            dcp.load(state, storage_reader=_SafeReader(str(path)), planner=_SafeLoadPlanner())
    except (CheckpointException, Exception) as exc:  # CheckpointException is a BaseException
        raise DCPReadError(_cause(exc)) from None
