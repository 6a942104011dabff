"""The trainer's own errors (kept apart so that the CLI can name them without importing DCP)."""
from __future__ import annotations

__all__ = ["CheckpointError", "RunDirError"]


class CheckpointError(RuntimeError):
    """A checkpoint is damaged or not loadable; the message names the file and what is wrong."""


class RunDirError(ValueError):
    """The run folder holds another run; the message says how to continue or start over."""
