"""Bounded waits on storage: an HTTP request answers 503 fast instead of hanging.

The Firestore and GCS clients retry a paused or unreachable backend for up to a minute;
a device's check-in must not hang that long. :func:`call_with_deadline` runs a storage-
bound service call on a small worker pool and gives up waiting after ``deadline_s``
(``FEDCOMPUTE_STORAGE_DEADLINE_S``, default 10 s) with a :class:`TransientError`: HTTP 503
with a ``Retry-After`` window. The abandoned call finishes (or fails) on its worker within
the client's own retry deadline; the pool is small, so an outage cannot pile up threads.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TypeVar

from fedcompute.errors import RETRY_AFTER_S, TransientError

T = TypeVar("T")
DEADLINE_ENV = "FEDCOMPUTE_STORAGE_DEADLINE_S"
DEFAULT_DEADLINE_S = 10.0
# Operator APIs (task creation runs a Firestore transaction) may wait longer than a device.
OPERATOR_DEADLINE_FACTOR = 3.0
_POOL = ThreadPoolExecutor(max_workers=16, thread_name_prefix="storage-call")


def storage_deadline_s() -> float:
    return float(os.environ.get(DEADLINE_ENV, DEFAULT_DEADLINE_S) or DEFAULT_DEADLINE_S)


def operator_deadline_s() -> float:
    return OPERATOR_DEADLINE_FACTOR * storage_deadline_s()


def call_with_deadline(fn: Callable[..., T], *args: object, deadline_s: float | None = None, **kwargs: object) -> T:
    """``fn(*args, **kwargs)``, or TransientError when it has not returned after ``deadline_s``."""
    limit = storage_deadline_s() if deadline_s is None else deadline_s
    future = _POOL.submit(fn, *args, **kwargs)
    try:
        return future.result(timeout=limit)
    except FutureTimeout:
        raise TransientError(f"storage did not answer within {limit:g} s",
                             hint=f"retry in {RETRY_AFTER_S} s; the service is degraded") from None
