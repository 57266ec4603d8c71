"""Group commit: concurrent requests share one storage call, each gets its own answer."""
from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from fedcompute.adapters.group_commit import GroupCommit


class Recorder:
    def __init__(self, delay_s: float = 0.05) -> None:
        self.groups: list[list[int]] = []
        self.delay_s = delay_s
        self.running = 0
        self.lock = threading.Lock()

    def run(self, items: Sequence[int]) -> list[int | BaseException]:
        with self.lock:
            self.running += 1
            assert self.running == 1, "two groups ran at once"
            self.groups.append(list(items))
        time.sleep(self.delay_s)
        with self.lock:
            self.running -= 1
        return [ValueError(f"odd {i}") if i % 7 == 6 else i * 10 for i in items]


def test_concurrent_submits_share_calls_and_each_gets_its_own_result() -> None:
    recorder = Recorder()
    group = GroupCommit(recorder.run, max_group=8)

    def submit(i: int) -> object:
        try:
            return group.submit(i)
        except ValueError as error:
            return str(error)

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(submit, range(64)))
    assert results == [f"odd {i}" if i % 7 == 6 else i * 10 for i in range(64)]
    assert sorted(i for g in recorder.groups for i in g) == list(range(64))  # each item ran once
    assert max(len(g) for g in recorder.groups) <= 8
    assert len(recorder.groups) < 64 / 2  # shared: far fewer calls than requests


def test_a_lone_submit_runs_at_once_in_a_group_of_its_own() -> None:
    recorder = Recorder(delay_s=0.0)
    group = GroupCommit(recorder.run)
    assert [group.submit(1), group.submit(2)] == [10, 20]
    assert recorder.groups == [[1], [2]]


def test_a_failing_call_fails_its_whole_group_and_the_next_group_still_runs() -> None:
    calls = []
    release = threading.Event()

    def run(items: Sequence[str]) -> list[str]:
        calls.append(list(items))
        if items[0] == "first":
            release.wait(5)
            raise ConnectionError("store unreachable")
        return [item.upper() for item in items]

    group = GroupCommit(run)
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(group.submit, "first")
        while not calls:
            time.sleep(0.01)
        later = [pool.submit(group.submit, item) for item in ("b", "c")]
        time.sleep(0.1)  # both queue behind the running call
        release.set()
        with pytest.raises(ConnectionError):
            first.result(5)
        assert [f.result(5) for f in later] == ["B", "C"]
    assert calls == [["first"], ["b", "c"]]


def test_a_call_returning_the_wrong_number_of_results_fails_its_group_loudly() -> None:
    group = GroupCommit(lambda items: [])
    with pytest.raises(RuntimeError, match="0 results for 1 items"):
        group.submit("x")
