"""Pretrained towers from a local folder or the local Hugging Face cache, never a download.

A run should not depend on the network, nor fetch code or weights nobody chose to install: a hub
id is looked up in the local cache only (``local_files_only=True``). A name that is neither a
folder nor cached is a :class:`ModelNotFoundError`, one line that says how to get it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, TypeVar

__all__ = ["ModelNotFoundError", "from_local"]

T = TypeVar("T")


class ModelNotFoundError(ValueError):
    """A model name is neither a local folder nor in the local Hugging Face cache."""


def from_local(load: Callable[..., T], name: str, field: str, **kwargs: Any) -> T:
    """``load(name, local_files_only=True, **kwargs)`` for a transformers ``from_pretrained``.

    Args:
        load: e.g. ``AutoConfig.from_pretrained``.
        name: a local folder or a hub id.
        field: the config key that named it (``model.image_model``), for the message.
    Raises:
        ModelNotFoundError: not a usable folder and not (completely) in the local cache.
    """
    from huggingface_hub.constants import HF_HUB_CACHE  # noqa: PLC0415 (the HF stack: only when a tower is built)
    from huggingface_hub.errors import HFValidationError  # noqa: PLC0415 (the same)

    if Path(name).is_dir() and not (Path(name) / "config.json").is_file():
        raise ModelNotFoundError(f"{field}={name!r}: the folder holds no config.json (not a transformers model folder)")
    try:
        return load(name, local_files_only=True, **kwargs)
    except (OSError, HFValidationError) as exc:
        if Path(name).is_dir():
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelNotFoundError(f"{field}={name!r}: the folder holds no loadable model ({first})") from None
        raise ModelNotFoundError(
            f"{field}={name!r} is neither a local folder nor in the local Hugging Face cache ({HF_HUB_CACHE}); "
            f"nothing is downloaded: fetch it once with `hf download {name}`, or name a local folder") from None
