"""The one error type of the data layer: bad or missing data, said in one line."""
from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """Training or evaluation data is missing, malformed or unreadable.

    The message is one line that names the path and what is wrong; the CLI prints it as is.
    """
