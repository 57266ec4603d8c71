"""Group commit: requests that arrive while a storage call is under way share the next call.

Each storage round trip costs the store a fixed amount whatever it carries (the Firestore
emulator: ~2 ms of its CPU per call, a fraction of that per extra document), so an instance
serving many requests at once does better sending one call for all of those waiting than one
each. No timer: the first request runs at once; requests that arrive meanwhile queue, and the
first of them leads the next call with every request queued by then. A lone request pays
nothing extra.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(eq=False)
class _Waiting(Generic[Item, Result]):
    item: Item
    done: threading.Event = field(default_factory=threading.Event)
    leads: bool = False
    result: Result | None = None
    error: BaseException | None = None


class GroupCommit(Generic[Item, Result]):
    """``submit(item)`` returns ``run(items)[i]`` for its item, ``run`` called on groups of at
    most ``max_group`` concurrently submitted items, one group at a time.

    ``run`` returns one result per item, in order; a result that is an exception is raised to
    that item's submitter alone, an exception ``run`` raises reaches every submitter of the group.
    """

    def __init__(self, run: Callable[[Sequence[Item]], Sequence[Result | BaseException]], *,
                 max_group: int = 32) -> None:
        self._run, self._max_group = run, max_group
        self._lock = threading.Lock()
        self._queue: list[_Waiting[Item, Result]] = []
        self._running = False

    def submit(self, item: Item) -> Result:
        me: _Waiting[Item, Result] = _Waiting(item)
        with self._lock:
            self._queue.append(me)
            me.leads = not self._running
            self._running = True
        if not me.leads:
            me.done.wait()
        if me.leads:  # first in, or handed the lead by the group before: run the queue's head
            self._lead()
        if me.error is not None:
            raise me.error
        return me.result  # type: ignore[return-value]  # set by run for this item

    def _lead(self) -> None:
        with self._lock:
            group, self._queue = self._queue[:self._max_group], self._queue[self._max_group:]
        try:
            results = list(self._run([waiting.item for waiting in group]))
            if len(results) != len(group):
                raise RuntimeError(f"group commit: {len(results)} results for {len(group)} items")
        except BaseException as error:  # noqa: BLE001 - every submitter of the group gets it
            results = [error] * len(group)
        with self._lock:
            successor = self._queue[0] if self._queue else None
            self._running = successor is not None
            if successor is not None:
                successor.leads = True
        for waiting, result in zip(group, results):
            if isinstance(result, BaseException):
                waiting.error = result
            else:
                waiting.result = result
            waiting.leads = False
            waiting.done.set()
        if successor is not None:
            successor.done.set()
