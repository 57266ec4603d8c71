"""Check-in, report-result and ingestion on the in-memory store (no emulators)."""
from __future__ import annotations

import random
import threading

import pytest

from fedcompute import layout
from fedcompute.adapters.events import decode_round_event, encode_round_event
from fedcompute.errors import InvalidRequestError, NotFoundError, PreconditionFailedError
from fedcompute.memory import InMemoryRoundEvents, InMemoryTaskStore
from fedcompute.services import assignment as svc
from fedcompute.services import ingestion
from fedcompute.settings import Settings
from fedcompute.tasks.records import (
    AssignmentStatus,
    ReportedResult,
    RoundKey,
    RoundStatus,
    TaskKind,
    TaskRecord,
    max_live_assignments,
    status_after_report,
)
from support.tasks import open_task_in_memory

SETTINGS = Settings()
POP = "pop_a"


def _open_task(store: InMemoryTaskStore, *, report_goal=3, over=0.34, min_v="100", max_v="999999999",
               kind=TaskKind.TRAINING, weight=1.0, exclusive=True) -> TaskRecord:
    return open_task_in_memory(store, POP, kind=kind, exclusive_training=exclusive, report_goal=report_goal,
                               over_selection_rate=over, total_rounds=5, min_client_version=min_v,
                               max_client_version=max_v, traffic_weight=weight, min_separation=2)


def _accept_all(data: bytes, task: TaskRecord) -> None:
    if data.startswith(b"bad"):
        raise InvalidRequestError("update is not a TensorBundle")


def _checkin(store, blobs, version="200", seed=None):
    return svc.create_task_assignment(store, blobs, SETTINGS, svc.CheckIn(POP, version),
                                      rng=random.Random(seed))


def _upload(store, blobs, events, a: svc.Assignment, body=b"update", event_id=None):
    key = RoundKey(a.population, a.task_id, a.round_number)
    instr = svc.report_result(store, blobs, SETTINGS, key, a.assignment_id, ReportedResult.COMPLETED)
    assert isinstance(instr, svc.UploadInstruction)
    blobs.complete_upload(instr.upload_location, body)
    return ingestion.ingest_upload(
        store, blobs, events, SETTINGS,
        ingestion.ObjectFinalized(event_id or f"ev-{a.assignment_id}", SETTINGS.gradient_bucket, instr.object_name,
                                  len(body)),
        validate=_accept_all,
    )


def test_cap_is_report_goal_times_one_plus_over_selection():
    assert max_live_assignments(100, 0.3) == 130
    assert max_live_assignments(3, 0.34) == 4  # floor(4.02)
    assert max_live_assignments(10, 0.1) == 11  # 11.000000000000002
    assert max_live_assignments(10, 0.0) == 10


def test_no_task_means_no_active_task_exists(store, blobs):
    result = _checkin(store, blobs)
    assert isinstance(result, svc.Rejection)
    assert result.reason == svc.RejectionReason.NO_ACTIVE_TASK_EXISTS
    assert result.retry_window == (86400, 172800)


def test_version_outside_range_is_mismatch(store, blobs):
    _open_task(store, min_v="341812000")
    result = _checkin(store, blobs, version="341717000")
    assert isinstance(result, svc.Rejection) and result.reason == svc.RejectionReason.CLIENT_VERSION_MISMATCH
    assert isinstance(_checkin(store, blobs, version="341812000"), svc.Assignment)


@pytest.mark.parametrize("bad", ["", "abc", "-1", "1.5", "9" * 30])
def test_malformed_version_code_is_invalid_request(bad, store, blobs):
    _open_task(store)
    with pytest.raises(InvalidRequestError, match="version_code"):
        _checkin(store, blobs, version=bad)


def test_assignment_carries_urls_and_round(store, blobs):
    task = _open_task(store)
    a = _checkin(store, blobs)
    assert isinstance(a, svc.Assignment)
    assert a.round_number == 1 and a.min_separation == 2
    assert a.plan_url.endswith(layout.client_plan_path(POP, task.task_id))
    assert a.checkpoint_url.endswith(layout.client_checkpoint_path(POP, task.task_id, 0))
    assert a.self_uri == f"/population/{POP}/task/{task.task_id}/aggregation/1/task-assignment/{a.assignment_id}"


def test_over_selection_cap_rejects_with_no_task_available(store, blobs):
    task = _open_task(store, report_goal=3, over=0.67)
    results = [_checkin(store, blobs, seed=i) for i in range(8)]
    assigned = [r for r in results if isinstance(r, svc.Assignment)]
    assert len(assigned) == task.max_assignments == 5
    assert all(r.reason == svc.RejectionReason.NO_TASK_AVAILABLE for r in results if isinstance(r, svc.Rejection))


def test_failure_report_frees_the_slot(store, blobs):
    _open_task(store, report_goal=1, over=0.0)
    a = _checkin(store, blobs)
    assert isinstance(_checkin(store, blobs), svc.Rejection)
    key = RoundKey(a.population, a.task_id, a.round_number)
    assert svc.report_result(store, blobs, SETTINGS, key, a.assignment_id, ReportedResult.NOT_ELIGIBLE) is None
    assert store.get_assignment(key, a.assignment_id).status == AssignmentStatus.LOCAL_NOT_ELIGIBLE
    assert isinstance(_checkin(store, blobs), svc.Assignment)


def test_report_twice_completed_is_a_retry_but_failed_after_completed_is_refused(store, blobs):
    _open_task(store)
    a = _checkin(store, blobs)
    key = RoundKey(a.population, a.task_id, a.round_number)
    first = svc.report_result(store, blobs, SETTINGS, key, a.assignment_id, ReportedResult.COMPLETED)
    second = svc.report_result(store, blobs, SETTINGS, key, a.assignment_id, ReportedResult.COMPLETED)
    assert first.object_name == second.object_name
    with pytest.raises(PreconditionFailedError):
        svc.report_result(store, blobs, SETTINGS, key, a.assignment_id, ReportedResult.FAILED)


def test_report_for_unknown_assignment_is_not_found(store, blobs):
    task = _open_task(store)
    with pytest.raises(NotFoundError):
        svc.report_result(store, blobs, SETTINGS, RoundKey(POP, task.task_id, 1), "nope", ReportedResult.COMPLETED)


def test_status_machine_refuses_reports_after_terminal_states():
    for status in AssignmentStatus:
        if status == AssignmentStatus.ASSIGNED:
            continue
        for result in ReportedResult:
            if status == AssignmentStatus.LOCAL_COMPLETED and result == ReportedResult.COMPLETED:
                assert status_after_report(status, result) == status
            else:
                with pytest.raises(PreconditionFailedError):
                    status_after_report(status, result)


def test_round_closes_exactly_at_goal_and_publishes_once(store, blobs, events):
    task = _open_task(store, report_goal=3, over=0.67)
    devices = [_checkin(store, blobs, seed=i) for i in range(5)]
    outcomes = [_upload(store, blobs, events, a) for a in devices[:3]]
    assert [o.outcome for o in outcomes] == ["ACCEPTED"] * 3
    assert [o.round_closed for o in outcomes] == [False, False, True]
    assert events.ready == [RoundKey(POP, task.task_id, 1)]
    it = store.get_round(RoundKey(POP, task.task_id, 1))
    assert it.status == RoundStatus.AGGREGATING and it.round_ready_published
    # A fourth device's upload after the close is late; its report-result is refused.
    late = devices[3]
    key = RoundKey(late.population, late.task_id, late.round_number)
    rejection = svc.report_result(store, blobs, SETTINGS, key, late.assignment_id, ReportedResult.COMPLETED)
    assert isinstance(rejection, svc.Rejection)
    assert store.count_assignments(key, AssignmentStatus.UPLOAD_COMPLETED) == 3
    assert events.ready == [RoundKey(POP, task.task_id, 1)]


def test_duplicate_event_changes_no_count(store, blobs, events):
    task = _open_task(store, report_goal=2)
    a = _checkin(store, blobs)
    first = _upload(store, blobs, events, a, event_id="e1")
    name = layout.gradient_path(POP, task.task_id, 1, a.assignment_id)
    again = ingestion.ingest_upload(store, blobs, events, SETTINGS,
                                    ingestion.ObjectFinalized("e1", SETTINGS.gradient_bucket, name, 6),
                                    validate=_accept_all)
    assert (first.outcome, again.outcome) == ("ACCEPTED", "DUPLICATE")
    assert store.count_assignments(RoundKey(POP, task.task_id, 1), AssignmentStatus.UPLOAD_COMPLETED) == 1
    assert events.ready == []


def test_upload_is_write_once(store, blobs):
    _open_task(store)
    a = _checkin(store, blobs)
    instr = svc.report_result(store, blobs, SETTINGS, RoundKey(a.population, a.task_id, 1), a.assignment_id,
                              ReportedResult.COMPLETED)
    assert blobs.complete_upload(instr.upload_location, b"one")
    assert not blobs.complete_upload(instr.upload_location, b"two")
    assert blobs.read(SETTINGS.gradient_bucket, instr.object_name) == b"one"


@pytest.mark.parametrize(
    "bucket,name,outcome",
    [
        ("other-bucket", "pop_a/1/1/d/x/gradient", ingestion.OUTCOME_FOREIGN),
        ("fcp-gradient", "pop_a/1/1/s/0/checkpoint", ingestion.OUTCOME_FOREIGN),
        ("fcp-gradient", "pop_a/9/1/d/abc/gradient", ingestion.OUTCOME_FOREIGN),
        ("fcp-gradient", "pop_a/1/7/d/abc/gradient", ingestion.OUTCOME_FOREIGN),
        ("fcp-gradient", "pop_a/1/1/d/unknown-assignment/gradient", ingestion.OUTCOME_UNKNOWN_ASSIGNMENT),
        ("fcp-gradient", "../etc/passwd", ingestion.OUTCOME_FOREIGN),
    ],
)
def test_foreign_and_unknown_objects_change_nothing(bucket, name, outcome, store, blobs, events):
    _open_task(store)
    blobs.write(bucket, name, b"x")
    result = ingestion.ingest_upload(store, blobs, events, SETTINGS,
                                     ingestion.ObjectFinalized("e", bucket, name, 1), validate=_accept_all)
    assert result.outcome == outcome
    assert store.count_assignments(RoundKey(POP, 1, 1), AssignmentStatus.UPLOAD_COMPLETED) == 0
    assert events.ready == []


def test_upload_without_report_result_is_not_uploadable(store, blobs, events):
    task = _open_task(store)
    a = _checkin(store, blobs)
    name = layout.gradient_path(POP, task.task_id, 1, a.assignment_id)
    blobs.write(SETTINGS.gradient_bucket, name, b"update")
    result = ingestion.ingest_upload(store, blobs, events, SETTINGS,
                                     ingestion.ObjectFinalized("e", SETTINGS.gradient_bucket, name, 6),
                                     validate=_accept_all)
    assert result.outcome == ingestion.OUTCOME_NOT_UPLOADABLE
    assert store.get_assignment(RoundKey(POP, task.task_id, 1), a.assignment_id).status == AssignmentStatus.ASSIGNED


def test_invalid_upload_is_rejected_frees_slot_and_is_recorded(store, blobs, events):
    task = _open_task(store, report_goal=1, over=0.0)
    a = _checkin(store, blobs)
    result = _upload(store, blobs, events, a, body=b"bad bytes")
    key = RoundKey(POP, task.task_id, 1)
    assert result.outcome == ingestion.OUTCOME_INVALID and "TensorBundle" in result.reason
    assert store.get_assignment(key, a.assignment_id).status == AssignmentStatus.UPLOAD_REJECTED
    assert store.count_assignments(key, AssignmentStatus.UPLOAD_COMPLETED) == 0
    assert [r["outcome"] for r in store.list_rejections(key)] == [ingestion.OUTCOME_INVALID]
    assert isinstance(_checkin(store, blobs), svc.Assignment)  # slot freed


def test_oversized_upload_is_rejected_before_reading(store, blobs, events):
    task = _open_task(store)
    a = _checkin(store, blobs)
    key = RoundKey(POP, task.task_id, 1)
    instr = svc.report_result(store, blobs, SETTINGS, key, a.assignment_id, ReportedResult.COMPLETED)
    blobs.complete_upload(instr.upload_location, b"x" * 100)
    result = ingestion.ingest_upload(store, blobs, events, SETTINGS,
                                     ingestion.ObjectFinalized("e", SETTINGS.gradient_bucket, instr.object_name, 100),
                                     validate=_accept_all, max_upload_bytes=10)
    assert result.outcome == ingestion.OUTCOME_INVALID and "exceeds" in result.reason


def test_crash_between_close_and_publish_is_repaired_by_next_event(store, blobs, events):
    task = _open_task(store, report_goal=1, over=1.0)
    a = _checkin(store, blobs)
    key = RoundKey(POP, task.task_id, 1)

    class CrashingEvents(InMemoryRoundEvents):
        def round_ready(self, k):
            raise RuntimeError("crash before publish")

    with pytest.raises(RuntimeError):
        _upload(store, blobs, CrashingEvents(), a, event_id="e1")
    assert store.get_round(RoundKey(POP, task.task_id, 1)).status == RoundStatus.AGGREGATING
    assert not store.get_round(RoundKey(POP, task.task_id, 1)).round_ready_published
    # Pub/Sub redelivers the same finalize event: the duplicate path publishes.
    name = layout.gradient_path(POP, task.task_id, 1, a.assignment_id)
    again = ingestion.ingest_upload(store, blobs, events, SETTINGS,
                                    ingestion.ObjectFinalized("e1", SETTINGS.gradient_bucket, name, 6),
                                    validate=_accept_all)
    assert again.outcome == "DUPLICATE"
    assert events.ready == [key]
    assert store.get_round(RoundKey(POP, task.task_id, 1)).round_ready_published


def test_concurrent_uploads_across_goal_boundary_count_exactly(store, blobs, events):
    task = _open_task(store, report_goal=40, over=1.5)
    devices = [_checkin(store, blobs, seed=i) for i in range(100)]
    assert all(isinstance(d, svc.Assignment) for d in devices)
    outcomes: list[str] = []
    lock = threading.Lock()

    def run(a):
        try:
            out = _upload(store, blobs, events, a).outcome
        except Exception as error:  # report-result after the close is a Rejection
            out = type(error).__name__
        with lock:
            outcomes.append(out)

    threads = [threading.Thread(target=run, args=(d,)) for d in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    key = RoundKey(POP, task.task_id, 1)
    accepted = store.count_assignments(key, AssignmentStatus.UPLOAD_COMPLETED)
    assert accepted == outcomes.count("ACCEPTED") >= 40
    assert len(events.ready) == 1


def test_round_event_codec_round_trips_and_rejects_garbage():
    key = RoundKey("p", 3, 7)
    assert decode_round_event(encode_round_event(key)) == key
    for bad in (b"", b"{}", b'{"population": 1, "task_id": 1, "round": 1}', b"\xff"):
        with pytest.raises((ValueError, KeyError)):
            decode_round_event(bad)


def test_uploads_for_a_canceled_task_are_rejected_and_its_round_not_aggregated(store, blobs, events):
    from fedcompute.services import aggregator
    from fedcompute.services import task_management as tm

    task = _open_task(store, report_goal=1, over=1.0)
    first, second = _checkin(store, blobs, seed=1), _checkin(store, blobs, seed=2)
    key = RoundKey(POP, task.task_id, 1)
    instr = svc.report_result(store, blobs, SETTINGS, key, first.assignment_id, ReportedResult.COMPLETED)
    tm.cancel_task(store, POP, task.task_id, "operator stop")
    blobs.complete_upload(instr.upload_location, b"update")
    result = ingestion.ingest_upload(store, blobs, events, SETTINGS,
                                     ingestion.ObjectFinalized("e", SETTINGS.gradient_bucket, instr.object_name, 6),
                                     validate=_accept_all)
    assert result.outcome == ingestion.OUTCOME_TASK_NOT_OPEN
    assert store.count_assignments(key, AssignmentStatus.UPLOAD_COMPLETED) == 0
    # A round that closed before the cancel is not aggregated either.
    store.update_round(key, {"status": RoundStatus.AGGREGATING}, expected=[RoundStatus.COLLECTING])
    outcome = aggregator.aggregate_round(store, blobs, events, SETTINGS, key)
    assert outcome.status == "TASK_NOT_OPEN"
    assert store.get_round(RoundKey(POP, task.task_id, 1)).status == RoundStatus.CANCELED
    assert second is not None


class _ReadCountingStore(InMemoryTaskStore):
    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def get_upload_context(self, key, assignment_id):
        self.reads.append("task, round and assignment")
        reads = len(self.reads)
        context = super().get_upload_context(key, assignment_id)
        del self.reads[reads:]  # one round trip, however the fake composes it
        return context

    def get_assignment(self, key, assignment_id):
        self.reads.append("assignment")
        return super().get_assignment(key, assignment_id)


def test_a_cached_round_costs_each_upload_one_read_of_its_assignment(blobs, events):
    store = _ReadCountingStore()
    task = _open_task(store, report_goal=4, over=0.0)
    clock = [0.0]
    rounds = ingestion.RoundContextCache(ttl_s=1.0, clock=lambda: clock[0])
    devices = [_checkin(store, blobs, seed=i) for i in range(4)]
    outcomes = []
    for i, a in enumerate(devices):
        key = RoundKey(a.population, a.task_id, a.round_number)
        instr = svc.report_result(store, blobs, SETTINGS, key, a.assignment_id, ReportedResult.COMPLETED)
        blobs.complete_upload(instr.upload_location, b"update")
        clock[0] = 0.4 * i  # the fourth upload comes 1.2 s after the first: the round is read again
        store.reads.clear()
        outcomes.append(ingestion.ingest_upload(
            store, blobs, events, SETTINGS,
            ingestion.ObjectFinalized(f"ev-{i}", SETTINGS.gradient_bucket, instr.object_name, 6),
            validate=_accept_all, context=rounds).outcome)
        expected = ["assignment"] if i in (1, 2) else ["task, round and assignment"]
        assert store.reads == expected, i
    assert outcomes == ["ACCEPTED"] * 4
    assert events.ready == [RoundKey(POP, task.task_id, 1)]


def test_the_round_cache_holds_a_bounded_number_of_rounds_and_no_missing_ones(store):
    rounds = ingestion.RoundContextCache(ttl_s=60)
    rounds.MAX_ROUNDS = 2
    keys = []
    for population in ("p0", "p1", "p2"):
        task = open_task_in_memory(store, population, report_goal=2, over_selection_rate=0.0, total_rounds=1)
        keys.append(RoundKey(population, task.task_id, 1))
        missing = RoundKey(population, task.task_id, 2)  # named by an upload, never created
        assert rounds.upload_context(store, missing, "x")[1] is None
        assert rounds.upload_context(store, keys[-1], "x")[1] is not None
    assert list(rounds._rounds) == keys[1:]  # the oldest went; no entry for a missing round


def test_a_refusal_judged_on_a_cached_round_says_late_once_the_round_closed(store, blobs, events):
    """Without the cache the closed round's verdict comes first; with it, the round is read again
    before any other refusal, so the verdict stays LATE_UPLOAD."""
    task = _open_task(store, report_goal=3, over=1.0)
    rounds = ingestion.RoundContextCache(ttl_s=600)
    key = RoundKey(POP, task.task_id, 1)
    devices = [_checkin(store, blobs, seed=i) for i in range(2)]
    on_time, never_reported = devices

    def ingest(a: svc.Assignment, event_id: str) -> str:
        name = layout.gradient_path(POP, task.task_id, 1, a.assignment_id)
        blobs.write(SETTINGS.gradient_bucket, name, b"update")
        return ingestion.ingest_upload(store, blobs, events, SETTINGS,
                                       ingestion.ObjectFinalized(event_id, SETTINGS.gradient_bucket, name, 6),
                                       validate=_accept_all, context=rounds).outcome

    assert ingest(never_reported, "e1") == "ASSIGNMENT_NOT_UPLOADABLE"  # the round collects: the true reason
    store.update_round(key, {"status": RoundStatus.AGGREGATING}, expected=[RoundStatus.COLLECTING])
    assert rounds.upload_context(store, key, on_time.assignment_id)[1].status == RoundStatus.COLLECTING  # stale
    assert ingest(never_reported, "e2") == "LATE_UPLOAD"
    assert store.count_assignments(key, AssignmentStatus.UPLOAD_COMPLETED) == 0
