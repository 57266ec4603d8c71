"""Check-in and ingestion in O(1): sharded positions, exact goal, the check-in cache, repairs."""
from __future__ import annotations

import random
import threading
from collections import Counter
from typing import Any

import pytest

from fedcompute import layout
from fedcompute.memory import InMemoryBlobStore, InMemoryRoundEvents, InMemoryTaskStore
from fedcompute.services import assignment as svc
from fedcompute.services import ingestion, scheduler
from fedcompute.settings import Settings
from fedcompute.tasks.quota import ShardedQuota
from fedcompute.tasks.records import (
    AssignmentStatus,
    ReportedResult,
    RoundKey,
    RoundRecord,
    RoundStatus,
    TaskKind,
    TaskRecord,
    TaskStatus,
)

SETTINGS = Settings()
POP = "pop_o1"


class CountingStore:
    """Counts the store calls a service makes (each is one or more Firestore round trips)."""

    def __init__(self, inner: InMemoryTaskStore) -> None:
        self.inner, self.calls = inner, Counter[str]()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return attr(*args, **kwargs)

        return counted


class CountingBlobs(InMemoryBlobStore):
    def __init__(self) -> None:
        super().__init__()
        self.signed = 0

    def download_url(self, bucket: str, name: str) -> str:
        self.signed += 1
        return super().download_url(bucket, name)


def _open(store: InMemoryTaskStore, report_goal: int, over: float = 0.5) -> TaskRecord:
    task = store.create_task(POP, lambda tid: TaskRecord(
        population=POP, task_id=tid, kind=TaskKind.TRAINING, status=TaskStatus.OPEN, report_goal=report_goal,
        over_selection_rate=over, total_rounds=3, current_round=1))
    store.create_round(RoundRecord(POP, task.task_id, 1, RoundStatus.COLLECTING, report_goal,
                                           task.max_assignments))
    return task


@pytest.mark.parametrize("total", [1, 7, 99, 100, 101, 1000, 10_000, 28_001])
def test_sharded_quota_positions_are_a_partition_of_the_total(total: int) -> None:
    quota = ShardedQuota.for_total(total)
    granted = [quota.position(s, n) for s in range(quota.shards) for n in range(1, quota.capacity(s) + 2)]
    positions = [p for p in granted if p is not None]
    assert sorted(positions) == list(range(total))  # each position once; one past capacity grants none
    assert all(quota.shard_of(p) == s for s in range(quota.shards)
               for p in range(quota.offset(s), quota.offset(s) + quota.capacity(s)))
    assert quota.shards <= 64 and (total <= 100 or quota.shards > 1)


def test_exactly_the_goal_is_accepted_under_concurrency_and_the_rest_is_late() -> None:
    store, blobs, events = InMemoryTaskStore(), InMemoryBlobStore(), InMemoryRoundEvents()
    task = _open(store, report_goal=40, over=1.5)
    devices = [svc.create_task_assignment(store, blobs, SETTINGS, svc.CheckIn(POP, "1"), rng=random.Random(i))
               for i in range(100)]
    assert all(isinstance(d, svc.Assignment) for d in devices)
    key = RoundKey(POP, task.task_id, 1)
    names = []
    for d in devices:
        instr = svc.report_result(store, blobs, SETTINGS, key, d.assignment_id, ReportedResult.COMPLETED)
        blobs.complete_upload(instr.upload_location, b"update")
        names.append(instr.object_name)
    outcomes: list[str] = []
    lock = threading.Lock()

    def ingest(i: int) -> None:
        result = ingestion.ingest_upload(store, blobs, events, SETTINGS,
                                         ingestion.ObjectFinalized(f"e{i}", SETTINGS.gradient_bucket, names[i], 6),
                                         validate=lambda data, task: None)
        with lock:
            outcomes.append(result.outcome)

    threads = [threading.Thread(target=ingest, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert Counter(outcomes) == {"ACCEPTED": 40, "LATE_UPLOAD": 60}
    assert store.count_assignments(key, AssignmentStatus.UPLOAD_COMPLETED) == 40
    assert len(store.accepted_ids(key)) == 40 and events.ready == [key]


def test_scheduler_closes_a_full_round_whose_closer_crashed() -> None:
    store, events = InMemoryTaskStore(), InMemoryRoundEvents()
    task = _open(store, report_goal=1)
    key = RoundKey(POP, task.task_id, 1)
    from fedcompute.tasks.records import AssignmentRecord

    store.create_assignment(AssignmentRecord("a", POP, task.task_id, 1, AssignmentStatus.LOCAL_COMPLETED, "1", 0, 0, 0))
    assert store.accept_upload(key, "a").round_full  # ...and the ingestion died before closing
    report = scheduler.tick(store, events, now=lambda: 100.0)
    assert report.closed == [key] and events.ready == [key]
    assert store.get_round(RoundKey(POP, task.task_id, 1)).status == RoundStatus.AGGREGATING


class StalledStore(InMemoryTaskStore):
    """Every accept position handed out, one never filled (an ingestion crashed holding it)."""

    def acceptance_state(self, key, report_goal):  # type: ignore[no-untyped-def]
        from fedcompute.tasks.records import AcceptanceState

        return AcceptanceState(issued_all=True, full=False)


def test_scheduler_closes_a_stalled_round_only_after_the_ingestion_timeout() -> None:
    store, events = StalledStore(), InMemoryRoundEvents()
    task = _open(store, report_goal=2)
    key = RoundKey(POP, task.task_id, 1)
    timeouts = scheduler.Timeouts(ingestion=60)
    assert scheduler.tick(store, events, timeouts=timeouts, now=lambda: 1000.0).closed == []
    assert store.get_round(RoundKey(POP, task.task_id, 1)).stalled_time == 1000.0
    assert scheduler.tick(store, events, timeouts=timeouts, now=lambda: 1030.0).closed == []
    assert scheduler.tick(store, events, timeouts=timeouts, now=lambda: 1061.0).closed == [key]
    round_record = store.get_round(RoundKey(POP, task.task_id, 1))
    assert round_record.status == RoundStatus.AGGREGATING and "crashed ingestions" in round_record.status_reason


def test_scheduler_tick_reads_only_expired_assignments_page_by_page(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedcompute.tasks.records import AssignmentRecord

    inner, events = InMemoryTaskStore(), InMemoryRoundEvents()
    task = _open(inner, report_goal=1000, over=2.0)
    key = RoundKey(POP, task.task_id, 1)
    for i in range(700):  # 25 stale, 675 live (a big round in training)
        t = 0.0 if i < 25 else 5000.0
        inner.create_assignment(AssignmentRecord(f"a{i:04d}", POP, task.task_id, 1, AssignmentStatus.ASSIGNED, "1",
                                                 i, t, t))
    read: list[int] = []
    original = inner.expired_assignments

    def expired(key, status, cutoff, limit):  # type: ignore[no-untyped-def]
        found = original(key, status, cutoff, limit)
        read.append(len(found))
        return found

    monkeypatch.setattr(inner, "expired_assignments", expired)
    monkeypatch.setattr(scheduler, "EXPIRY_PAGE_SIZE", 10)
    store = CountingStore(inner)
    report = scheduler.tick(store, events, timeouts=scheduler.Timeouts(local_training=900), now=lambda: 5100.0)  # type: ignore[arg-type]
    assert report.local_timeouts == 25
    assert store.calls["list_assignments"] == 0 and store.calls["count_assignments"] == 0
    assert sum(read) == 25 and max(read) <= 10  # pages of the expired ones only: 10, 10, 5, then 0
    assert inner.count_assignments(key, AssignmentStatus.LOCAL_TIMEOUT) == 25
    assert inner.count_assignments(key, AssignmentStatus.ASSIGNED) == 675


def test_expiry_buckets_never_report_an_assignment_updated_after_the_cutoff() -> None:
    from fedcompute.tasks.records import UPDATED_BUCKET_S, AssignmentRecord, updated_bucket

    store = InMemoryTaskStore()
    task = _open(store, report_goal=10)
    key = RoundKey(POP, task.task_id, 1)
    cutoff = 1234.5
    times = [cutoff - 2 * UPDATED_BUCKET_S, cutoff - 0.1, cutoff, cutoff + 0.1]
    for i, t in enumerate(times):
        store.create_assignment(AssignmentRecord(f"b{i}", POP, task.task_id, 1, AssignmentStatus.ASSIGNED, "1",
                                                 i, t, t))
    found = store.expired_assignments(key, AssignmentStatus.ASSIGNED, cutoff, 100)
    assert [a.assignment_id for a in found] == ["b0"]  # the cutoff's own bucket waits for the next tick
    assert all(a.updated_time <= cutoff for a in found)
    assert AssignmentRecord("x", POP, 1, 1, AssignmentStatus.ASSIGNED, "1", 0, 0.0, 77.0).to_dict()[
        "updated_bucket"] == updated_bucket(77.0) == 7


def test_cached_check_in_claims_with_one_store_call_and_signs_urls_once_per_round() -> None:
    inner, blobs = InMemoryTaskStore(), CountingBlobs()
    _open(inner, report_goal=100)
    store = CountingStore(inner)
    cache = svc.CheckInCache(ttl_s=60, clock=lambda: 0.0)
    for i in range(50):
        assert isinstance(svc.create_task_assignment(store, blobs, SETTINGS, svc.CheckIn(POP, "1"),  # type: ignore[arg-type]
                                                     rng=random.Random(i), cache=cache), svc.Assignment)
    assert store.calls == {"open_rounds": 1, "claim_assignment": 50}
    assert blobs.signed == 2  # the plan and the checkpoint, once


def test_full_round_is_rejected_from_the_cache_without_store_calls() -> None:
    inner, blobs = InMemoryTaskStore(), InMemoryBlobStore()
    _open(inner, report_goal=2, over=0.5)  # cap 3
    store = CountingStore(inner)
    now = [0.0]
    cache = svc.CheckInCache(ttl_s=2, clock=lambda: now[0])
    results = [svc.create_task_assignment(store, blobs, SETTINGS, svc.CheckIn(POP, "1"),  # type: ignore[arg-type]
                                          rng=random.Random(i), cache=cache) for i in range(10)]
    assert [isinstance(r, svc.Assignment) for r in results] == [True] * 3 + [False] * 7
    assert all(r.reason == svc.RejectionReason.NO_TASK_AVAILABLE for r in results[3:])
    assert store.calls["claim_assignment"] == 4  # three claims and the one that found the round full
    now[0] = 5.0  # after the cache's ttl the round is looked at again (slots may have been released)
    svc.create_task_assignment(store, blobs, SETTINGS, svc.CheckIn(POP, "1"), cache=cache)  # type: ignore[arg-type]
    assert store.calls["open_rounds"] == 2 and store.calls["claim_assignment"] == 5


@pytest.mark.parametrize("after_s", [1.0, 0.1])
def test_stale_cache_sees_the_next_round_once_the_cached_one_closed(after_s: float) -> None:
    """Past the minimum interval between refreshes (1.0 s), and inside it (0.1 s): a check-in
    whose claim finds the cached round stopped reads again and gets the round that opened next."""
    store, blobs = InMemoryTaskStore(), InMemoryBlobStore()
    task = _open(store, report_goal=5)
    now = [0.0]
    cache = svc.CheckInCache(ttl_s=600, min_refresh_s=0.25, clock=lambda: now[0])
    first = svc.create_task_assignment(store, blobs, SETTINGS, svc.CheckIn(POP, "1"), cache=cache)
    assert isinstance(first, svc.Assignment) and first.round_number == 1
    store.update_round(RoundKey(POP, task.task_id, 1), {"status": RoundStatus.AGGREGATING},
                       expected=[RoundStatus.COLLECTING])
    store.finish_round(RoundKey(POP, task.task_id, 1), {"status": RoundStatus.COMPLETED}, {"current_round": 2},
                       RoundRecord(POP, task.task_id, 2, RoundStatus.COLLECTING, 5, task.max_assignments))
    now[0] = after_s  # well inside the ttl
    assert cache.open_rounds(store, POP)[0].round_record.round_number == 1  # the cache still says round 1
    second = svc.create_task_assignment(store, blobs, SETTINGS, svc.CheckIn(POP, "1"), cache=cache)
    assert isinstance(second, svc.Assignment) and second.round_number == 2
    assert second.checkpoint_url.endswith(layout.client_checkpoint_path(POP, task.task_id, 1))


def test_check_ins_between_rounds_refresh_the_cache_at_most_once_per_interval_across_threads() -> None:
    import threading

    inner, blobs = InMemoryTaskStore(), InMemoryBlobStore()
    task = _open(inner, report_goal=5)
    key = RoundKey(POP, task.task_id, 1)
    now = [0.0]
    cache = svc.CheckInCache(ttl_s=2, min_refresh_s=0.25, clock=lambda: now[0])
    store = CountingStore(inner)
    assert isinstance(svc.create_task_assignment(store, blobs, SETTINGS, svc.CheckIn(POP, "1"), cache=cache),  # type: ignore[arg-type]
                      svc.Assignment)
    inner.update_round(key, {"status": RoundStatus.AGGREGATING}, expected=[RoundStatus.COLLECTING])
    now[0] = 0.5
    results: list[object] = []

    def check_in(i: int) -> None:
        for j in range(25):
            results.append(svc.create_task_assignment(store, blobs, SETTINGS, svc.CheckIn(POP, "1"),  # type: ignore[arg-type]
                                                      rng=random.Random(100 * i + j), cache=cache))

    threads = [threading.Thread(target=check_in, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 200
    assert all(isinstance(r, svc.Rejection) and r.reason == svc.RejectionReason.NO_TASK_AVAILABLE for r in results)
    assert store.calls["open_rounds"] == 2  # the first check-in's read, then one refresh for all 200
    inner.finish_round(key, {"status": RoundStatus.COMPLETED}, {"current_round": 2},
                       RoundRecord(POP, task.task_id, 2, RoundStatus.COLLECTING, 5, task.max_assignments))
    now[0] = 0.8  # the next round is seen as soon as the interval has passed
    nxt = svc.create_task_assignment(store, blobs, SETTINGS, svc.CheckIn(POP, "1"), cache=cache)  # type: ignore[arg-type]
    assert isinstance(nxt, svc.Assignment) and nxt.round_number == 2
    assert store.calls["open_rounds"] == 3


def test_load_cli_without_a_server_says_how_to_name_one(capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from fedcompute.cli.main import main as cli_main

    monkeypatch.delenv("FEDCOMPUTE_TASK_ASSIGNMENT_URL", raising=False)
    assert cli_main(["load", "--population", "p"]) == 2
    assert "--url" in capsys.readouterr().err


def test_percentiles_are_in_milliseconds() -> None:
    from fedcompute.load import percentiles

    assert percentiles([0.001] * 98 + [0.1, 0.2]) == {"p50_ms": 1.0, "p95_ms": 1.0, "p99_ms": 101.0}
    assert percentiles([]) == {"p50_ms": 0.0, "p95_ms": 0.0, "p99_ms": 0.0}


def test_uploads_are_raw_unless_gzip_is_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    store, blobs = InMemoryTaskStore(), InMemoryBlobStore()
    task = _open(store, report_goal=2)
    key = RoundKey(POP, task.task_id, 1)
    for setting, expected in (("0", False), ("1", True)):
        monkeypatch.setenv("FEDCOMPUTE_UPLOAD_GZIP", setting)
        a = svc.create_task_assignment(store, blobs, SETTINGS, svc.CheckIn(POP, "1"))
        instruction = svc.report_result(store, blobs, SETTINGS, key, a.assignment_id, ReportedResult.COMPLETED)
        assert instruction.gzip is expected
