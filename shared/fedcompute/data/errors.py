"""Dataset errors: specific, actionable, and still catchable as the builtin they refine."""
from __future__ import annotations

from fedcompute.errors import FedComputeError


class DatasetNotFoundError(FedComputeError, FileNotFoundError):
    """A dataset's files are not where we looked for them."""


class DatasetFormatError(FedComputeError, ValueError):
    """A dataset file exists but is not in the expected format (bad magic, truncated, ...)."""
