"""The training-round protocol on the real local stack (emulators + functions-framework).

Devices speak HTTP to task_assignment and upload to fake-gcs-server; fake-gcs notifies
result_ingestion through Pub/Sub, which closes the round and publishes round-ready to the
aggregator. Tasks use a tiny numpy model (no TensorFlow, see ``support/tasks.py``), each
test in its own population so tests do not interfere on the shared session stack.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import requests

from fedcompute import layout
from fedcompute.adapters.blobs import GcsBlobStore
from fedcompute.adapters.events import encode_round_event
from fedcompute.adapters.firestore_store import FirestoreTaskStore
from fedcompute.adapters.task_management_client import TaskManagementClient
from fedcompute.dp import DpParams
from fedcompute.errors import ConflictError, NotFoundError, PreconditionFailedError
from fedcompute.fleet.protocol import DeviceHttpClient, ProtocolError, Rejected
from fedcompute.identity import DeviceKey, sign_message
from fedcompute.learning.tensor_codec import decode_bundle, encode_client_update
from fedcompute.memory import InMemoryBlobStore, InMemoryRoundEvents
from fedcompute.proto import task_assignment_pb2, task_management_pb2
from fedcompute.services import aggregator as aggregator_service
from fedcompute.services import ingestion
from fedcompute.services import scheduler as scheduler_service
from fedcompute.stack.local import default_functions_dir, functions_framework_executable
from fedcompute.stack.procs import free_port, start_process
from fedcompute.tasks.records import AssignmentRecord, AssignmentStatus, RoundKey, RoundRecord, RoundStatus, TaskStatus
from support.helpers import http, unique
from support.tasks import (
    COMPLETED,
    DeviceRun,
    NumpyTask,
    central_metrics,
    check_in,
    create_numpy_task,
    gradient_object,
    log_lines,
    make_update,
    model_blob_generation,
    random_delta,
    run_device,
    seal_for_stack,
    stack_unsealer,
    wait_until,
)

if TYPE_CHECKING:
    from support.stack_plugin import StackHandle

pytestmark = pytest.mark.integration

TRAIN = "server/client_work/train/"
NON_FINITE = "server/finalizer/update_non_finite"
Result = task_assignment_pb2.ReportResultRequest
FIGURES: dict[str, dict[str, Any]] = {}  # measured numbers, printed by the tests that take them


def object_of(url: str) -> str:
    """The object a fake-gcs download URL (``.../b/{bucket}/o/{quoted name}?alt=media``) names."""
    return urllib.parse.unquote(urllib.parse.urlparse(url).path.split("/o/", 1)[1])


def device(stack: StackHandle) -> DeviceHttpClient:
    return DeviceHttpClient(stack.settings.task_assignment_url, timeout=30)



def round_name(task: NumpyTask, round_number: int = 1) -> str:
    return f"{task.population}/{task.task_id}/{round_number}"


def assert_aggregated_once(stack: StackHandle, task: NumpyTask, round_number: int) -> None:
    """The aggregator function logged AGGREGATED for the round, exactly once."""
    needle = f"round {round_name(task, round_number)}: AGGREGATED"
    stack.wait_for_log("aggregator", needle)  # the round completes in Firestore just before the log line
    assert len(log_lines(stack, "aggregator", needle)) == 1


def gradient_uri(stack: StackHandle, name: str) -> str:
    return f"gs://{stack.settings.gradient_bucket}/{name}"


def verdict(stack: StackHandle, name: str, timeout_s: float = 30.0) -> str:
    """The outcome result_ingestion logged for object ``name`` (waits for it)."""
    line = stack.wait_for_log("result_ingestion", f"ingestion of {gradient_uri(stack, name)}: ", timeout_s)
    return line.split(f"{name}: ", 1)[1].split(" ", 1)[0]


def verdicts(stack: StackHandle, name: str) -> list[str]:
    return [line.split(f"{name}: ", 1)[1].split(" ", 1)[0]
            for line in log_lines(stack, "result_ingestion", f"ingestion of {gradient_uri(stack, name)}: ")]


def write_gradient(stack: StackHandle, name: str, data: bytes) -> None:
    """What a client holding raw bucket access (not an upload session) could write."""
    GcsBlobStore(stack.clients.storage).write(stack.settings.gradient_bucket, name, data, create_only=True)


def publish(stack: StackHandle, topic: str, data: bytes, **attributes: str) -> str:
    publisher = stack.clients.publisher
    return publisher.publish(publisher.topic_path(stack.settings.project, topic), data, **attributes).result(timeout=10)


@dataclass(frozen=True)
class Snapshot:
    """Everything a rejected request must leave unchanged."""

    task_status: str
    current_round: int
    round_status: str
    assignments: tuple[tuple[str, str], ...]
    uploads: int

    @classmethod
    def of(cls, task: NumpyTask, round_number: int = 1) -> Snapshot:
        record, round_record = task.record(), task.round_record(round_number)
        assert round_record is not None
        return cls(record.status.value, record.current_round, round_record.status.value,
                   tuple(sorted(task.statuses(round_number).items())), task.count(round_number))


# --------------------------------------------------------------------------- happy path


def test_two_rounds_average_known_deltas_and_complete(local_stack: StackHandle) -> None:
    task = create_numpy_task(local_stack, unique("happy"), report_goal=3, over_selection_rate=0.34, rounds=2)
    assert task.record().max_assignments == 4
    client = device(local_stack)
    rng = np.random.default_rng(1)
    weights = [w.copy() for w in task.initial]
    latencies = []
    for round_number in (1, 2):
        deltas, stats = [], []
        for i in range(task.report_goal):
            assignment = check_in(client, task.population)
            assert assignment.aggregation_id == str(round_number)
            # What a device downloads: the plan, and the weights the previous round produced.
            assert object_of(assignment.plan.uri) == layout.client_plan_path(task.population, task.task_id)
            assert client.download(assignment.plan.uri) == task.plan_bytes
            assert object_of(assignment.init_checkpoint.uri) == layout.client_checkpoint_path(
                task.population, task.task_id, round_number - 1)
            named, _ = decode_bundle(client.download(assignment.init_checkpoint.uri))
            assert [n for n, _ in named] == task.names
            for (_, got), want in zip(named, weights):
                np.testing.assert_allclose(got, want, atol=1e-6)
            delta = random_delta(task, rng)
            payload, flat = make_update(task, delta, num_examples=5 + i, seed=100 * round_number + i)
            run = run_device(client, task.population, payload, assignment=assignment)
            assert run.upload_status == 200, run
            deltas.append(delta)
            stats.append(flat)
            if i < task.report_goal - 1:  # below the goal the round keeps collecting
                wait_until(lambda r=round_number, i=i: task.count(r) == i + 1, 20, what=f"upload {i + 1} counted")
                assert task.round_record(round_number).status == RoundStatus.COLLECTING
        round_record = task.wait_round(round_number)
        latencies.append(round(round_record.completed_time - round_record.aggregating_time, 3))
        assert task.count(round_number) == task.report_goal
        assert_aggregated_once(local_stack, task, round_number)
        expected = [w + np.mean([d[j] for d in deltas], axis=0) for j, w in enumerate(weights)]
        for got, want in zip(task.checkpoint_weights(round_number), expected):
            np.testing.assert_allclose(got, want, atol=1e-6)
        client_weights = task.client_checkpoint(round_number)
        assert [n for n, _ in client_weights] == task.names
        for (_, got), want in zip(client_weights, expected):
            np.testing.assert_allclose(got, want, atol=1e-6)
        metrics = task.round_metrics(round_number)
        assert {TRAIN + m for m in task.metrics} <= set(metrics) and metrics[NON_FINITE] == 0.0
        for name, value in central_metrics(task, stats).items():
            assert metrics[TRAIN + name] == pytest.approx(value, rel=1e-9), name
        weights = expected
        if round_number == 1:
            assert task.record().current_round == 2
            assert task.round_record(2).status == RoundStatus.COLLECTING
    record = task.record()
    assert record.status == TaskStatus.COMPLETED and record.current_round == 2
    assert record.status_reason == "completed num_max_training_rounds (2)"
    assert task.round_record(3) is None
    after = client.create_task_assignment(task.population, "1")
    assert isinstance(after, Rejected) and after.reason == "NO_ACTIVE_TASK_EXISTS"
    FIGURES["goal_to_checkpoint_s"] = {"rounds": latencies}
    print(f"\nper-round latency, goal reached -> checkpoint written and round completed: {latencies} s")


# --------------------------------------------------------------------------- exactly once


def test_redelivered_round_ready_changes_nothing(local_stack: StackHandle) -> None:
    task = create_numpy_task(local_stack, unique("redeliver"), report_goal=2, rounds=1)
    client = device(local_stack)
    rng = np.random.default_rng(2)
    for i in range(2):
        assert run_device(client, task.population, make_update(task, random_delta(task, rng), seed=i)[0]).upload_status == 200
    task.wait_round(1)
    checkpoint = layout.checkpoint_path(task.population, task.task_id, 1)
    before = (task.read_model(checkpoint), model_blob_generation(task, checkpoint), Snapshot.of(task))

    assert_aggregated_once(local_stack, task, 1)
    done = f"round {round_name(task)}: ALREADY_DONE"
    seen = len(log_lines(local_stack, "aggregator", done))
    message_id = publish(local_stack, local_stack.settings.topics.round_ready, encode_round_event(task.key(1)))
    assert local_stack.wait_for_log("aggregator", f"event received by aggregator: id={message_id} ")
    wait_until(lambda: len(log_lines(local_stack, "aggregator", done)) == seen + 1, 20, what="ALREADY_DONE")
    assert (task.read_model(checkpoint), model_blob_generation(task, checkpoint), Snapshot.of(task)) == before
    assert_aggregated_once(local_stack, task, 1)
    assert task.record().status == TaskStatus.COMPLETED


def test_same_update_uploaded_twice_is_counted_once(local_stack: StackHandle) -> None:
    task = create_numpy_task(local_stack, unique("dup"), report_goal=3, rounds=1)
    client = device(local_stack)
    payload, _ = make_update(task, random_delta(task, np.random.default_rng(3)))
    assignment = check_in(client, task.population)
    first = client.report_result(assignment.self_uri, COMPLETED)
    retry = client.report_result(assignment.self_uri, COMPLETED)  # a client retry: a fresh session, same object
    assert isinstance(first, task_assignment_pb2.UploadInstruction)
    assert isinstance(retry, task_assignment_pb2.UploadInstruction)
    assert retry.upload_location != first.upload_location
    assert task.statuses(1) == {assignment.assignment_id: "LOCAL_COMPLETED"}

    assert client.upload(first, payload) == 200
    name = gradient_object(task, 1, assignment.assignment_id)
    assert verdict(local_stack, name) == "ACCEPTED"
    before = Snapshot.of(task)
    assert before.uploads == 1 and before.round_status == "COLLECTING"

    # A report after the upload is refused (the assignment is done), and so is any new
    # upload session for the object.
    with pytest.raises(ProtocolError, match="HTTP 412.*UPLOAD_COMPLETED"):
        client.report_result(assignment.self_uri, COMPLETED)
    with pytest.raises(PreconditionFailedError, match="already uploaded"):
        GcsBlobStore(local_stack.clients.storage).create_upload_session(local_stack.settings.gradient_bucket, name)
    # The retry's session was handed out before the upload. GCS refuses its PUT
    # (ifGenerationMatch=0: 412); fake-gcs-server ignores that precondition on resumable
    # uploads and stores the bytes again. Either way the update counts once.
    second = client.upload(retry, payload)
    assert second in (200, 412)
    FIGURES["second_put_status_on_fake_gcs"] = {"status": second}
    first_verdicts = ["ACCEPTED"] if second == 412 else ["ACCEPTED", "DUPLICATE"]
    wait_until(lambda: verdicts(local_stack, name) == first_verdicts, 20, what="the verdicts of both PUTs")
    assert Snapshot.of(task) == before
    # A redelivered finalize notification of the object is recognised as a duplicate too.
    generation = local_stack.clients.storage.bucket(local_stack.settings.gradient_bucket).get_blob(name).generation
    publish(local_stack, local_stack.settings.topics.gcs_notifications, b"{}", eventType="OBJECT_FINALIZE",
            bucketId=local_stack.settings.gradient_bucket, objectId=name, objectGeneration=str(generation))
    wait_until(lambda: verdicts(local_stack, name) == [*first_verdicts, "DUPLICATE"], 20,
               what="the redelivery's verdict")
    assert Snapshot.of(task) == before


def test_reports_and_uploads_after_the_round_closed_are_rejected(local_stack: StackHandle) -> None:
    task = create_numpy_task(local_stack, unique("late"), report_goal=2, over_selection_rate=1.0, rounds=2)
    client = device(local_stack)
    rng = np.random.default_rng(4)
    on_time = [check_in(client, task.population) for _ in range(2)]
    slow_uploader, slow_reporter = check_in(client, task.population), check_in(client, task.population)
    session = client.report_result(slow_uploader.self_uri, COMPLETED)
    assert isinstance(session, task_assignment_pb2.UploadInstruction)
    for i, assignment in enumerate(on_time):
        payload = make_update(task, random_delta(task, rng), seed=i)[0]
        assert run_device(client, task.population, payload, assignment=assignment).upload_status == 200
    task.wait_round(1)
    checkpoint = layout.checkpoint_path(task.population, task.task_id, 1)
    generation = model_blob_generation(task, checkpoint)
    before, before_round2 = Snapshot.of(task, 1), Snapshot.of(task, 2)
    assert before.uploads == 2

    # A report after the close: NO_TASK_AVAILABLE, the device drops its update.
    late_report = client.report_result(slow_reporter.self_uri, COMPLETED)
    assert isinstance(late_report, Rejected) and late_report.reason == "NO_TASK_AVAILABLE"
    assert late_report.retry_min_s == 60 and late_report.retry_max_s == 300
    # An upload through a session handed out before the close lands in the bucket but is not counted.
    assert client.upload(session, make_update(task, random_delta(task, rng), seed=9)[0]) == 200
    late_upload = gradient_object(task, 1, slow_uploader.assignment_id)
    # So is an object written straight into the bucket for an assignment that never reported.
    raw = gradient_object(task, 1, slow_reporter.assignment_id)
    write_gradient(local_stack, raw, make_update(task, random_delta(task, rng), seed=10)[0])
    assert verdict(local_stack, late_upload) == "LATE_UPLOAD"
    assert verdict(local_stack, raw) == "LATE_UPLOAD"
    assert local_stack.wait_for_log("result_ingestion", f"rejected upload {late_upload}: LATE_UPLOAD")
    rejections = {r["object"]: r["outcome"] for r in task.store.list_rejections(task.key(1))}
    assert rejections == {late_upload: "LATE_UPLOAD", raw: "LATE_UPLOAD"}
    assert Snapshot.of(task, 1) == before and Snapshot.of(task, 2) == before_round2
    assert model_blob_generation(task, checkpoint) == generation


def test_concurrent_reports_across_the_goal_are_counted_exactly_once(local_stack: StackHandle) -> None:
    """104 devices (the cap for goal 40 × (1 + 1.6)) report and upload at once."""
    task = create_numpy_task(local_stack, unique("crowd"), report_goal=40, over_selection_rate=1.6, rounds=1)
    client = device(local_stack)
    capacity = task.record().max_assignments
    assert capacity == 104
    check_in_started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        assignments = list(pool.map(lambda _: check_in(client, task.population), range(capacity)))
    check_in_s = time.monotonic() - check_in_started
    assert len({a.assignment_id for a in assignments}) == capacity
    extra = client.create_task_assignment(task.population, "1")  # the cap holds
    assert isinstance(extra, Rejected) and extra.reason == "NO_TASK_AVAILABLE"
    rng = np.random.default_rng(7)
    deltas = {a.assignment_id: random_delta(task, rng) for a in assignments}
    payloads = {aid: make_update(task, d, seed=i)[0] for i, (aid, d) in enumerate(deltas.items())}

    barrier = threading.Barrier(32)

    def go(assignment: task_assignment_pb2.TaskAssignment) -> DeviceRun:
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(timeout=5)
        return run_device(client, task.population, payloads[assignment.assignment_id], assignment=assignment)

    started = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        runs = list(pool.map(go, assignments))
    uploads_s = time.monotonic() - started
    uploaded = [r for r in runs if r.upload_status == 200]
    turned_away = [r for r in runs if isinstance(r.instruction, Rejected)]
    assert len(uploaded) + len(turned_away) == capacity
    assert all(r.instruction.reason == "NO_TASK_AVAILABLE" for r in turned_away)
    assert len(uploaded) >= task.report_goal

    round_record = task.wait_round(1, timeout_s=120)
    objects = {r.assignment_id: gradient_object(task, 1, r.assignment_id) for r in uploaded}

    def all_verdicts() -> dict[str, list[str]] | None:
        found = {aid: verdicts(local_stack, name) for aid, name in objects.items()}
        return found if all(found.values()) else None

    found = wait_until(all_verdicts, 120, what="an ingestion verdict for every upload")
    verdicts_s = time.monotonic() - started
    # A Pub/Sub redelivery (at-least-once) may add verdicts; it must not change the first one.
    accepted = {aid for aid, v in found.items() if v[0] == "ACCEPTED"}
    assert all(v[0] in ("ACCEPTED", "LATE_UPLOAD") for v in found.values()), found
    assert all(set(v[1:]) <= {"DUPLICATE" if v[0] == "ACCEPTED" else "LATE_UPLOAD"} for v in found.values()), found
    statuses = task.statuses(1)
    assert accepted == {aid for aid, s in statuses.items() if s == "UPLOAD_COMPLETED"}
    assert task.count(1) == len(accepted) >= task.report_goal
    assert all(statuses[aid] == "LOCAL_COMPLETED" for aid in objects.keys() - accepted)  # late: not counted
    # No accepted report lost, no other one added: the mean of exactly the accepted deltas.
    expected = [w + np.sum([deltas[aid][j] for aid in accepted], axis=0) / len(accepted)
                for j, w in enumerate(task.initial)]
    for got, want in zip(task.checkpoint_weights(1), expected):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert task.round_metrics(1)["server/aggregator/num_reports"] == len(accepted)
    # One close, one aggregation (a duplicate round-ready, if any, finds the round done).
    assert len(log_lines(local_stack, "result_ingestion", f"round {round_name(task)} reached its goal")) == 1
    assert_aggregated_once(local_stack, task, 1)
    deliveries = len(log_lines(local_stack, "aggregator", f"round {round_name(task)}: "))
    assert task.record().status == TaskStatus.COMPLETED
    FIGURES["crowd"] = {
        "devices": capacity, "check_ins_s": round(check_in_s, 2), "uploaded": len(uploaded), "accepted": len(accepted),
        "late_uploads": len(uploaded) - len(accepted), "turned_away_at_report": len(turned_away),
        "reports_and_uploads_s": round(uploads_s, 2), "all_verdicts_s": round(verdicts_s, 2),
        "goal_to_checkpoint_s": round(round_record.completed_time - round_record.aggregating_time, 2),
        "round_ready_deliveries": deliveries, "redelivered_uploads": sum(len(v) > 1 for v in found.values()),
    }
    print(f"\n104-device round: {FIGURES['crowd']}")


class CloseDuringAccept(FirestoreTaskStore):
    """A FirestoreTaskStore on which another instance closes the round early (the scheduler's
    close of a stalled round) and, with ``freeze``, reads its accepted set, right after an
    accept's first look at the round."""

    def __init__(self, client: Any, key: RoundKey, *, freeze: bool) -> None:
        super().__init__(client)
        self.key, self.freeze, self.armed = key, freeze, True

    def _accept_snapshots(self, key: RoundKey, assignment_id: str) -> tuple[Any, Any]:
        snapshots = super()._accept_snapshots(key, assignment_id)
        if self.armed:
            self.armed = False
            other = FirestoreTaskStore(self._db)
            other.update_round(self.key, {"status": RoundStatus.AGGREGATING, "aggregating_time": time.time(),
                                              "round_ready_published": True}, expected=[RoundStatus.COLLECTING])
            if self.freeze:
                other.accepted_ids(self.key)
        return snapshots


def test_an_accept_racing_the_close_counts_only_if_in_the_frozen_set(local_stack: StackHandle) -> None:
    """The store's accept protocol on the emulator, with the race forced at its worst point."""
    db = local_stack.clients.firestore
    management = TaskManagementClient(local_stack.settings.task_management_url)
    for freeze, expected_outcome in ((True, "ROUND_CLOSED"), (False, "ACCEPTED")):
        task = create_numpy_task(local_stack, unique("race"), report_goal=3, rounds=1)
        key, store, now = task.key(1), task.store, time.time()
        ids = [f"{name}-{uuid.uuid4()}" for name in ("a", "b", "c", "d")]
        for slot, aid in enumerate(ids):
            store.create_assignment(AssignmentRecord(aid, task.population, task.task_id, 1,
                                                     AssignmentStatus.LOCAL_COMPLETED, "1", slot, now, now))
        assert [store.accept_upload(key, aid).outcome for aid in ids[:2]] == ["ACCEPTED", "ACCEPTED"]
        with pytest.raises(PreconditionFailedError, match="not closed"):
            store.accepted_ids(key)  # no accepted set while the round collects
        # c passes the "still collecting" check; the round closes before c's write lands.
        outcome = CloseDuringAccept(db, key, freeze=freeze).accept_upload(key, ids[2]).outcome
        assert outcome == expected_outcome, freeze
        counted = ids[:3] if expected_outcome == "ACCEPTED" else ids[:2]
        assert store.accepted_ids(key) == sorted(counted)
        assert task.count(1) == len(counted)
        if expected_outcome == "ROUND_CLOSED":  # its position was voided first: never counted
            assert store.get_assignment(key, ids[2]).status == AssignmentStatus.LOCAL_COMPLETED
        assert store.accept_upload(key, ids[0]).outcome == "DUPLICATE"
        assert store.accept_upload(key, ids[3]).outcome == "ROUND_CLOSED"
        assert store.accepted_ids(key) == sorted(counted)  # frozen: stable for every reader
        management.cancel_task(task.population, task.task_id, "test over")


def test_an_accept_from_an_earlier_read_racing_the_close_counts_only_if_in_the_frozen_set(
        local_stack: StackHandle) -> None:
    """Ingestion accepts from the round and assignment it read before fetching the update (no
    second read): a close in between must not let that stale view count an upload twice or
    outside the frozen set."""
    management = TaskManagementClient(local_stack.settings.task_management_url)
    for freeze, expected_outcome in ((True, "ROUND_CLOSED"), (False, "ACCEPTED")):
        # Goal 4: the duplicate below gives its position up (void), so c's is the last one.
        task = create_numpy_task(local_stack, unique("race-read"), report_goal=4, rounds=1)
        key, store, now = task.key(1), task.store, time.time()
        ids = [f"{name}-{uuid.uuid4()}" for name in ("a", "b", "c")]
        for slot, aid in enumerate(ids):
            store.create_assignment(AssignmentRecord(aid, task.population, task.task_id, 1,
                                                     AssignmentStatus.LOCAL_COMPLETED, "1", slot, now, now))
        # Two deliveries of a's upload read before either accepts: one counts, one is a duplicate.
        deliveries = [store.get_upload_context(key, ids[0])[1:] for _ in range(2)]
        _, round_record, assignment = store.get_upload_context(key, ids[1])
        outcomes = [store.accept_upload(key, ids[0], read=read).outcome for read in deliveries]  # type: ignore[arg-type]
        assert outcomes == ["ACCEPTED", "DUPLICATE"]
        assert round_record is not None and assignment is not None
        assert store.accept_upload(key, ids[1], read=(round_record, assignment)).outcome == "ACCEPTED"
        _, round_record, assignment = store.get_upload_context(key, ids[2])  # still COLLECTING here
        assert round_record is not None and assignment is not None and assignment.version is not None
        store.update_round(key, {"status": RoundStatus.AGGREGATING, "aggregating_time": time.time(),
                                 "round_ready_published": True}, expected=[RoundStatus.COLLECTING])
        if freeze:
            store.accepted_ids(key)
        assert store.accept_upload(key, ids[2], read=(round_record, assignment)).outcome == expected_outcome
        counted = ids if expected_outcome == "ACCEPTED" else ids[:2]
        assert store.accepted_ids(key) == sorted(counted)
        assert task.count(1) == len(counted)
        management.cancel_task(task.population, task.task_id, "test over")


class SlowFirstPosition(FirestoreTaskStore):
    """Holds the first accept between taking its position and writing it, so a second
    delivery of the same upload overlaps it."""

    def __init__(self, client: Any) -> None:
        super().__init__(client)
        self.taken = threading.Event()

    def _take_positions(self, *args: Any, **kwargs: Any) -> Any:
        taken = super()._take_positions(*args, **kwargs)
        if not self.taken.is_set():
            self.taken.set()
            time.sleep(0.5)
        return taken


def test_two_deliveries_of_one_upload_at_once_cost_the_round_no_report(local_stack: StackHandle) -> None:
    """Both deliveries read the assignment before either accepts; the second must not take
    (and then void) an accept position, or the round ends a report short and turns away the
    last honest upload."""
    task = create_numpy_task(local_stack, unique("twice-at-once"), report_goal=3, rounds=1)
    key, now = task.key(1), time.time()
    store = SlowFirstPosition(local_stack.clients.firestore)
    ids = [f"{name}-{uuid.uuid4()}" for name in ("a", "b", "c")]
    for slot, aid in enumerate(ids):
        store.create_assignment(AssignmentRecord(aid, task.population, task.task_id, 1,
                                                 AssignmentStatus.LOCAL_COMPLETED, "1", slot, now, now))
    reads = [store.get_upload_context(key, ids[0])[1:] for _ in range(2)]
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(store.accept_upload, key, ids[0], read=reads[0])
        assert store.taken.wait(10)  # the first holds its position; the second delivery arrives now
        second = pool.submit(store.accept_upload, key, ids[0], read=reads[1])
        outcomes = [first.result().outcome, second.result().outcome]
    assert outcomes == ["ACCEPTED", "DUPLICATE"]
    assert [store.accept_upload(key, aid).outcome for aid in ids[1:]] == ["ACCEPTED", "ACCEPTED"]
    assert store.acceptance_state(key, 3).full
    store.update_round(key, {"status": RoundStatus.AGGREGATING, "aggregating_time": time.time(),
                             "round_ready_published": True}, expected=[RoundStatus.COLLECTING])
    assert store.accepted_ids(key) == sorted(ids)  # no position voided
    TaskManagementClient(local_stack.settings.task_management_url).cancel_task(task.population, task.task_id,
                                                                              "test over")


def test_uploads_beyond_the_goal_are_refused_without_counting_the_round(local_stack: StackHandle) -> None:
    """Exactly report_goal accepts, from the sharded counters alone (the round is never counted)."""
    task = create_numpy_task(local_stack, unique("surplus"), report_goal=3, rounds=1)
    key, store, now = task.key(1), task.store, time.time()
    ids = [f"d{i}-{uuid.uuid4()}" for i in range(5)]
    for slot, aid in enumerate(ids):
        store.create_assignment(AssignmentRecord(aid, task.population, task.task_id, 1,
                                                 AssignmentStatus.LOCAL_COMPLETED, "1", slot, now, now))
    with ThreadPoolExecutor(5) as pool:
        results = list(pool.map(lambda aid: store.accept_upload(key, aid), ids))
    outcomes = [r.outcome for r in results]
    assert sorted(outcomes) == ["ACCEPTED"] * 3 + ["ROUND_CLOSED"] * 2
    assert sum(r.round_full for r in results) >= 1  # whoever filled the last position knows it
    assert store.acceptance_state(key, 3).full and task.count(1) == 3
    TaskManagementClient(local_stack.settings.task_management_url).cancel_task(task.population, task.task_id, "over")


class SlowFirstClaimGroup(FirestoreTaskStore):
    """Holds the first group of slot claims, so concurrent check-ins queue behind it; records group sizes."""

    def __init__(self, client: Any) -> None:
        super().__init__(client)
        self.groups: list[int] = []

    def _claim_together(self, key: RoundKey, capacity: int, requests: Any) -> Any:
        self.groups.append(len(requests))
        if len(self.groups) == 1:
            time.sleep(0.5)
        return super()._claim_together(key, capacity, requests)


def test_concurrent_slot_claims_share_storage_calls_and_never_exceed_the_capacity(local_stack: StackHandle) -> None:
    """40 check-ins at once for 20 slots, plus a second check-in of one identity: grouped into a
    few increments and batches, exactly 20 assignments on 20 distinct slots, the repeated
    identity refused alone."""
    task = create_numpy_task(local_stack, unique("grouped-claims"), report_goal=20, rounds=1)
    key, now = task.key(1), time.time()
    store = SlowFirstClaimGroup(local_stack.clients.firestore)
    records = [AssignmentRecord(f"d{i}-{uuid.uuid4()}", task.population, task.task_id, 1,
                                AssignmentStatus.ASSIGNED, "1", -1, now, now) for i in range(40)]
    records.append(records[5])  # the same identity checking in twice at once

    def claim(record: AssignmentRecord) -> object:
        try:
            return store.claim_assignment(record, 20).record
        except ConflictError:
            return "conflict"

    with ThreadPoolExecutor(41) as pool:
        results = list(pool.map(claim, records))
    granted = [r for r in results if isinstance(r, AssignmentRecord)]
    assert len(granted) == 20 and sorted(r.slot for r in granted) == list(range(20))
    assert results.count("conflict") <= 1  # a twin that won a slot is refused and gives it back
    assert store.claimed_slots(key) == set(range(20))
    assert store.count_assignments(key, AssignmentStatus.ASSIGNED) == 20
    # Grouped: each group costs one increment per counter it drew from and one batch.
    assert sum(store.groups) == 41 and len(store.groups) < 10 and max(store.groups) > 1
    TaskManagementClient(local_stack.settings.task_management_url).cancel_task(task.population, task.task_id,
                                                                              "test over")


class RecordingAccepts:
    """A TaskStore wrapper recording which uploads reached the store's accept."""

    def __init__(self, inner: FirestoreTaskStore) -> None:
        self.inner = inner
        self.tried: list[str] = []

    def accept_upload(self, key: RoundKey, assignment_id: str, **kwargs: Any) -> Any:
        self.tried.append(assignment_id)
        return self.inner.accept_upload(key, assignment_id, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.parametrize("closed_by", ["goal", "deadline"])
def test_an_upload_judged_on_a_cached_collecting_round_after_the_close_is_late_and_counted_nowhere(
        local_stack: StackHandle, closed_by: str) -> None:
    """Ingestion reuses the round it read for a second; uploads that still see it COLLECTING
    after it closed (at its goal, or at its deadline with positions never handed out) must be
    refused by the store's accept, and the accepted set stay what it was at the close."""
    task = create_numpy_task(local_stack, unique(f"stale-{closed_by}"), report_goal=2, rounds=1)
    key, store, now = task.key(1), task.store, time.time()
    settings, blobs, events = local_stack.settings, InMemoryBlobStore(), InMemoryRoundEvents()
    ids = [f"{name}-{uuid.uuid4()}" for name in ("a", "b", "c")]
    for slot, aid in enumerate(ids):
        store.create_assignment(AssignmentRecord(aid, task.population, task.task_id, 1,
                                                 AssignmentStatus.LOCAL_COMPLETED, "1", slot, now, now))
        blobs.write(settings.gradient_bucket, layout.gradient_path(task.population, task.task_id, 1, aid), b"update")
    rounds = ingestion.RoundContextCache(ttl_s=600)
    accepts = RecordingAccepts(store)

    def ingest(aid: str, context: ingestion.RoundContextCache | None) -> str:
        name = layout.gradient_path(task.population, task.task_id, 1, aid)
        return ingestion.ingest_upload(accepts, blobs, events, settings,  # type: ignore[arg-type]
                                       ingestion.ObjectFinalized(f"e-{aid}", settings.gradient_bucket, name, 6),
                                       validate=lambda data, task: None, context=context).outcome

    assert ingest(ids[0], rounds) == "ACCEPTED"  # the cache now holds the round as COLLECTING
    if closed_by == "goal":
        assert ingest(ids[1], None) == "ACCEPTED"
        assert len(events.ready) == 1  # the second accept filled the round and closed it
        counted = ids[:2]
    else:
        store.update_round(key, {"status": RoundStatus.AGGREGATING, "aggregating_time": time.time(),
                                 "round_ready_published": True}, expected=[RoundStatus.COLLECTING])
        assert store.accepted_ids(key) == [ids[0]]  # frozen with one position never handed out
        counted = ids[:1]
    assert store.get_round(key).status == RoundStatus.AGGREGATING  # type: ignore[union-attr]
    assert ingest(ids[2], rounds) == "LATE_UPLOAD"
    assert accepts.tried[-1] == ids[2]  # judged COLLECTING from the cache: the store's accept refused it
    assert store.accepted_ids(key) == sorted(counted)
    assert task.count(1) == len(counted)
    TaskManagementClient(local_stack.settings.task_management_url).cancel_task(task.population, task.task_id,
                                                                              "test over")


class RecordingBlobs:
    """A BlobStore wrapper: records writes; ``dry`` keeps them out of storage; ``kill_at``
    raises (like a killed process) when the object whose name ends with it is written."""

    def __init__(self, inner: GcsBlobStore, *, dry: bool = False, kill_at: str | None = None) -> None:
        self.inner, self.dry, self.kill_at = inner, dry, kill_at
        self.writes: dict[str, bytes] = {}

    def write(self, bucket: str, name: str, data: bytes, **kwargs: Any) -> bool:
        if self.kill_at and name.endswith(self.kill_at):
            raise KeyboardInterrupt(f"killed before writing {name}")
        self.writes[name] = bytes(data)
        return True if self.dry else self.inner.write(bucket, name, data, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class NoCommitStore:
    """A TaskStore wrapper whose finish_round commits nothing (a dry, side-effect free run)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def finish_round(self, *args: Any, **kwargs: Any) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # TensorFlow / tensorflow_privacy imports
def test_killed_aggregation_reruns_to_the_same_outputs(local_stack: StackHandle) -> None:
    """DP noise included: the re-run (another process, via the scheduler) adds the same noise."""
    task = create_numpy_task(local_stack, unique("rerun"), report_goal=2, rounds=2, target_epsilon=1e6,
                             dp=DpParams(mechanism="FIXED_GAUSSIAN", noise_multiplier=0.5, clip_norm=1.0))
    settings, key = local_stack.settings, task.key(1)
    rng = np.random.default_rng(5)
    ids = [str(uuid.uuid4()) for _ in range(2)]
    deltas = [random_delta(task, rng) for _ in ids]
    # Updates land before their assignments exist (ingestion ignores them), then the round is
    # put in AGGREGATING by hand without publishing round-ready: nothing aggregates it yet.
    for aid, delta in zip(ids, deltas):
        write_gradient(local_stack, gradient_object(task, 1, aid),
                       seal_for_stack(local_stack, aid, make_update(task, delta, seed=len(aid))[0]))
        assert verdict(local_stack, gradient_object(task, 1, aid)) == "UNKNOWN_ASSIGNMENT"
    now = time.time()
    unseal = stack_unsealer(local_stack)
    for slot, aid in enumerate(ids):
        task.store.create_assignment(AssignmentRecord(aid, task.population, task.task_id, 1,
                                                      AssignmentStatus.LOCAL_COMPLETED, "1", slot, now, now))
        assert task.store.accept_upload(key, aid).outcome == "ACCEPTED"
    # Marked announced, so the stack's periodic scheduler tick leaves it alone for now.
    task.store.update_round(key, {"status": RoundStatus.AGGREGATING, "aggregating_time": now,
                                      "round_ready_published": True}, expected=[RoundStatus.COLLECTING])
    blobs, events = GcsBlobStore(local_stack.clients.storage), InMemoryRoundEvents()

    clean = RecordingBlobs(blobs, dry=True)  # the reference: a whole run that changes nothing
    assert aggregator_service.aggregate_round(NoCommitStore(task.store), clean, events, settings, key,
                                              unseal=unseal).status == "ALREADY_DONE"
    outputs = [layout.checkpoint_path(task.population, task.task_id, 1),
               layout.client_checkpoint_path(task.population, task.task_id, 1),
               layout.metrics_path(task.population, task.task_id, 1)]
    assert sorted(clean.writes) == sorted(outputs)
    assert not any(blobs.exists(settings.model_bucket, name) for name in outputs)

    killed = RecordingBlobs(blobs, kill_at="/d/0/client_checkpoint")  # dies writing the client checkpoint
    with pytest.raises(KeyboardInterrupt):
        aggregator_service.aggregate_round(task.store, killed, events, settings, key, unseal=unseal)
    # The checkpoint and the metrics are written at once, before the client checkpoint is due:
    # both land, the client checkpoint does not, and the round is not completed.
    assert [blobs.exists(settings.model_bucket, name) for name in outputs] == [True, False, True]
    assert task.round_record(1).status == RoundStatus.AGGREGATING and not events.completed

    # The round now looks stuck (aggregating longer than the timeout): a scheduler tick (ours,
    # or the stack's periodic one first) re-publishes round-ready, and the aggregator function
    # re-runs the round.
    task.store.update_round(key, {"aggregating_time": now - 2 * scheduler_service.Timeouts().aggregation},
                                expected=[RoundStatus.AGGREGATING])
    message_id = publish(local_stack, settings.topics.scheduler_tick, b"{}")
    local_stack.wait_for_log("scheduler", f"scheduler tick {message_id}:")
    assert any("0 rounds re-published" not in line for line in log_lines(local_stack, "scheduler", "re-published"))
    task.wait_round(1, timeout_s=180)
    for name in outputs:
        assert task.read_model(name) == clean.writes[name], name
    assert_aggregated_once(local_stack, task, 1)
    noisy = task.checkpoint_weights(1)
    mean = [w + (deltas[0][j] + deltas[1][j]) / 2 for j, w in enumerate(task.initial)]
    assert not all(np.allclose(a, b, atol=1e-3) for a, b in zip(noisy, mean))  # the noise is there
    metrics = json.loads(clean.writes[outputs[2]])
    assert metrics["server/privacy/epsilon"] > 0 and metrics["server/aggregator/noise_multiplier"] == 0.5
    assert task.round_record(2).status == RoundStatus.COLLECTING


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def guarded(local_stack: StackHandle) -> NumpyTask:
    """An open task (goal 5, cap 10, client versions >= 100) that bad requests must not change."""
    return create_numpy_task(local_stack, unique("guarded"), report_goal=5, over_selection_rate=1.0, rounds=1,
                             min_client_version="100")


def _check_in_url(stack: StackHandle, population: str) -> str:
    return f"{stack.settings.task_assignment_url}/taskassignment/v1/population/{population}:create-task-assignment"


PROTOBUF = {"content-type": "application/x-protobuf"}
JSON = {"content-type": "application/json"}

CHECK_IN_CASES = {
    # name: (method, headers, body, status, message fragment)
    "malformed_protobuf": ("POST", PROTOBUF, b"\x0a\xff\xff\xff\xff", 400,
                           "not a valid binary google.ondevicepersonalization"),
    "json_unknown_field": ("POST", JSON, b'{"clientVersion": {"versionCode": "200"}, "deviceColour": "red"}', 400,
                           "deviceColour"),
    "wrong_content_type": ("POST", {"content-type": "text/plain"}, b"version=200", 415,
                           "unsupported Content-Type 'text/plain'"),
    "oversized_body": ("POST", PROTOBUF, b"\x00" * 70_000, 413, "accepts at most 65536 bytes"),
    "missing_client_version": ("POST", JSON, b"{}", 400, "client_version is required"),
    "non_numeric_version": ("POST", JSON, b'{"clientVersion": {"versionCode": "v2.0"}}', 400,
                            "'v2.0' is not a decimal version code"),
    "wrong_method": ("GET", {}, b"", 405, "GET is not allowed"),
}


@pytest.mark.parametrize("case", sorted(CHECK_IN_CASES))
def test_bad_check_in_is_refused_without_state_change(local_stack: StackHandle, guarded: NumpyTask,
                                                      case: str) -> None:
    method, headers, body, status, fragment = CHECK_IN_CASES[case]
    before = Snapshot.of(guarded)
    response = http().request(method, _check_in_url(local_stack, guarded.population), headers=headers, data=body,
                              timeout=30)
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]["message"]
    if status == 405:
        assert response.headers["Allow"] == "POST"
    assert Snapshot.of(guarded) == before


def test_unknown_route_and_population_and_old_version(local_stack: StackHandle, guarded: NumpyTask) -> None:
    before = Snapshot.of(guarded)
    missing = http().post(f"{local_stack.settings.task_assignment_url}/taskassignment/v2/checkin", timeout=30)
    assert missing.status_code == 404 and "no route for POST /taskassignment/v2/checkin" in missing.json()["error"][
        "message"]
    client = device(local_stack)
    unknown = client.create_task_assignment(unique("nobody-here"), "200")
    assert isinstance(unknown, Rejected) and unknown.reason == "NO_ACTIVE_TASK_EXISTS"
    assert (unknown.retry_min_s, unknown.retry_max_s) == (86400, 172800)
    old = client.create_task_assignment(guarded.population, "99")
    assert isinstance(old, Rejected) and old.reason == "CLIENT_VERSION_MISMATCH"
    assert Snapshot.of(guarded) == before


def _report(stack: StackHandle, self_uri: str, body: bytes, headers: dict[str, str] = PROTOBUF,
            key: DeviceKey | None = None) -> requests.Response:
    """PUT a raw report body; signed by ``key`` (a fresh one by default) when it is a valid message."""
    url = f"{stack.settings.task_assignment_url}/taskassignment/v1{self_uri}:report-result"
    if headers is PROTOBUF:
        message = Result.FromString(body)
        if message.result in Result.Result.values():
            sign_message(key or DeviceKey.generate(), message, "PUT", f"/taskassignment/v1{self_uri}:report-result")
            body = message.SerializeToString()
    return http().put(url, data=body, headers=headers, timeout=30)


def test_bad_reports_are_refused_without_state_change(local_stack: StackHandle, guarded: NumpyTask) -> None:
    client = device(local_stack)
    fresh = check_in(client, guarded.population, "200")
    done = check_in(client, guarded.population, "200")
    assert isinstance(client.report_result(done.self_uri, COMPLETED), task_assignment_pb2.UploadInstruction)
    before = Snapshot.of(guarded)
    prefix = f"/population/{guarded.population}/task/{guarded.task_id}"

    def expect(response: requests.Response, status: int, fragment: str) -> None:
        assert response.status_code == status, response.text
        assert fragment in response.json()["error"]["message"], response.text
        assert Snapshot.of(guarded) == before

    completed = Result(result=Result.COMPLETED).SerializeToString()
    expect(_report(local_stack, f"{prefix}/aggregation/1/task-assignment/{uuid.uuid4()}", completed), 404,
           "no assignment")
    expect(_report(local_stack, fresh.self_uri, Result(result=Result.UNKNOWN).SerializeToString()), 400,
           "result is UNKNOWN")
    expect(_report(local_stack, fresh.self_uri, b"\x08\x63"), 400, "result 99 is not a ReportResultRequest.Result")
    expect(_report(local_stack, fresh.self_uri, b'{"result": "DONE"}', JSON), 400, "DONE")
    expect(_report(local_stack, done.self_uri, Result(result=Result.FAILED).SerializeToString(),
                   key=client.session_key(done.self_uri)), 412,
           "assignment is LOCAL_COMPLETED; a FAILED report is only accepted for an ASSIGNED assignment")
    expect(_report(local_stack, fresh.self_uri.replace("/aggregation/1/", "/aggregation/2/"), completed), 404,
           "in round 2 of task")
    expect(_report(local_stack, fresh.self_uri.replace(f"/task/{guarded.task_id}/", "/task/999/"), completed), 404,
           "of task")
    expect(_report(local_stack, fresh.self_uri.replace(guarded.population, unique("other")), completed), 404,
           "no assignment")
    expect(http().post(f"{local_stack.settings.task_assignment_url}/taskassignment/v1{fresh.self_uri}:report-result",
                       data=completed, headers=PROTOBUF, timeout=30), 405, "POST is not allowed")


def _upload_case(stack: StackHandle, task: NumpyTask, payload: bytes) -> tuple[str, str]:
    """A device that checks in and uploads ``payload``: (assignment id, ingestion verdict)."""
    run = run_device(device(stack), task.population, payload, version="200")
    assert run.upload_status == 200
    return run.assignment_id, verdict(stack, gradient_object(task, 1, run.assignment_id))


def test_invalid_uploads_are_rejected_and_never_counted(local_stack: StackHandle, guarded: NumpyTask) -> None:
    rng = np.random.default_rng(6)
    delta = random_delta(guarded, rng)
    good_stats = make_update(guarded, delta)[1]
    named = list(zip(guarded.names, delta))
    cases = {
        "wrong shape": (encode_client_update([(n, np.zeros((2, 2), np.float32)) if i == 0 else (n, d)
                                              for i, (n, d) in enumerate(named)], 10, good_stats, compress=False),
                        "trainable/0"),
        "wrong dtype": (encode_client_update([(n, d.astype(np.float64)) for n, d in named], 10, good_stats,
                                             compress=False), "float64"),
        "wrong names": (encode_client_update([(f"dense/{i}", d) for i, (_, d) in enumerate(named)], 10, good_stats,
                                             compress=False), "dense/0"),
        "missing metric statistics": (encode_client_update(named, 10, {k: v for k, v in good_stats.items()
                                                                       if not k.startswith("loss/")},
                                                           compress=False), "loss/"),
        "garbage": (b"this is not an update \x00\x01", "neither gzip nor a ClientUpdate"),
    }
    for what, (payload, fragment) in cases.items():
        slots_before = guarded.store.claimed_slots(guarded.key(1))
        before = Snapshot.of(guarded)
        assignment_id, outcome = _upload_case(local_stack, guarded, payload)
        assert outcome == "INVALID_UPLOAD", what
        record = guarded.store.get_assignment(guarded.key(1), assignment_id)
        assert record.status == AssignmentStatus.UPLOAD_REJECTED and fragment in record.status_reason, \
            (what, record.status_reason)
        after = Snapshot.of(guarded)
        assert after.uploads == before.uploads == 0 and after.round_status == "COLLECTING", what
        assert dict(after.assignments).items() - dict(before.assignments).items() == {
            (assignment_id, "UPLOAD_REJECTED")}, what
        assert guarded.store.claimed_slots(guarded.key(1)) == slots_before, f"{what}: slot not released"
        rejection = next(r for r in guarded.store.list_rejections(guarded.key(1))
                         if r["object"] == gradient_object(guarded, 1, assignment_id))
        assert rejection["outcome"] == "INVALID_UPLOAD" and fragment in rejection["reason"], what


def test_objects_not_from_an_assignment_are_ignored(local_stack: StackHandle, guarded: NumpyTask) -> None:
    before = Snapshot.of(guarded)
    payload = make_update(guarded, random_delta(guarded, np.random.default_rng(8)))[0]
    foreign = f"{guarded.population}/{guarded.task_id}/1/uploads/{uuid.uuid4()}.bin"
    write_gradient(local_stack, foreign, payload)
    assert verdict(local_stack, foreign) == "FOREIGN_OBJECT"
    stranger = gradient_object(guarded, 1, str(uuid.uuid4()))
    write_gradient(local_stack, stranger, payload)
    assert verdict(local_stack, stranger) == "UNKNOWN_ASSIGNMENT"
    other_task = gradient_object(guarded, 1, str(uuid.uuid4())).replace(f"/{guarded.task_id}/1/", "/77/1/")
    write_gradient(local_stack, other_task, payload)
    assert verdict(local_stack, other_task) == "FOREIGN_OBJECT"
    assert local_stack.wait_for_log("result_ingestion", f"no round 1 of task {guarded.population}/77")
    assert Snapshot.of(guarded) == before


def test_non_finite_update_is_accepted_then_excluded_and_counted(local_stack: StackHandle) -> None:
    task = create_numpy_task(local_stack, unique("nan"), report_goal=3, rounds=1)
    client = device(local_stack)
    rng = np.random.default_rng(9)
    good = [random_delta(task, rng) for _ in range(2)]
    bad = random_delta(task, rng)
    bad[0][1, 2], bad[1][0] = np.nan, np.inf
    stats = []
    for i, delta in enumerate([good[0], bad, good[1]]):
        payload, flat = make_update(task, delta, seed=20 + i)
        stats.append(flat)
        run = run_device(client, task.population, payload)
        assert verdict(local_stack, gradient_object(task, 1, run.assignment_id)) == "ACCEPTED"
    task.wait_round(1)
    metrics = task.round_metrics(1)
    assert metrics[NON_FINITE] == 1.0 and metrics["server/aggregator/num_reports"] == 2.0
    expected = [w + (good[0][j] + good[1][j]) / 2 for j, w in enumerate(task.initial)]
    for got, want in zip(task.checkpoint_weights(1), expected):
        np.testing.assert_allclose(got, want, atol=1e-6)
    # Like TFF, the diverged client's metric statistics still count.
    for name, value in central_metrics(task, stats).items():
        assert metrics[TRAIN + name] == pytest.approx(value, rel=1e-9)


class OnePopulation:
    """A TaskStore view listing one population's tasks only, so a tick with a future clock
    does not time out other tests' assignments on the shared stack."""

    def __init__(self, inner: Any, population: str) -> None:
        self.inner, self.population = inner, population

    def list_tasks(self, population: str | None = None) -> list:
        return self.inner.list_tasks(self.population)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_scheduler_times_out_stale_assignments_and_refuses_their_replays(local_stack: StackHandle) -> None:
    task = create_numpy_task(local_stack, unique("stale"), report_goal=3, over_selection_rate=1.0, rounds=1)
    client = device(local_stack)
    silent = check_in(client, task.population)  # never reports
    reported = check_in(client, task.population)  # reports, never uploads (in time)
    session = client.report_result(reported.self_uri, COMPLETED)
    uploaded = run_device(client, task.population, make_update(task, random_delta(task, np.random.default_rng(11)))[0])
    assert verdict(local_stack, gradient_object(task, 1, uploaded.assignment_id)) == "ACCEPTED"
    key = task.key(1)
    assert len(task.store.claimed_slots(key)) == 3

    events = InMemoryRoundEvents()
    now = lambda: time.time() + 3600  # noqa: E731 - an hour later, past both 15-minute timeouts
    report = scheduler_service.tick(OnePopulation(task.store, task.population), events, now=now)
    assert (report.local_timeouts, report.upload_timeouts, report.republished) == (1, 1, [])
    assert task.statuses(1) == {silent.assignment_id: "LOCAL_TIMEOUT", reported.assignment_id: "UPLOAD_TIMEOUT",
                                uploaded.assignment_id: "UPLOAD_COMPLETED"}
    assert task.store.claimed_slots(key) == {task.store.get_assignment(key, uploaded.assignment_id).slot}
    again = scheduler_service.tick(OnePopulation(task.store, task.population), events, now=now)
    assert (again.local_timeouts, again.upload_timeouts) == (0, 0)

    before = Snapshot.of(task)
    with pytest.raises(ProtocolError, match="HTTP 412.*assignment is LOCAL_TIMEOUT"):
        client.report_result(silent.self_uri, COMPLETED)  # a replayed assignment
    assert client.upload(session, make_update(task, random_delta(task, np.random.default_rng(12)))[0]) == 200
    name = gradient_object(task, 1, reported.assignment_id)
    assert verdict(local_stack, name) == "ASSIGNMENT_NOT_UPLOADABLE"
    assert local_stack.wait_for_log("result_ingestion", "assignment is UPLOAD_TIMEOUT, not LOCAL_COMPLETED")
    assert Snapshot.of(task) == before
    assert isinstance(check_in(client, task.population), task_assignment_pb2.TaskAssignment)  # slots were freed


def test_scheduler_tick_message_reaches_the_scheduler(local_stack: StackHandle) -> None:
    message_id = publish(local_stack, local_stack.settings.topics.scheduler_tick, b"{}")
    line = local_stack.wait_for_log("scheduler", f"scheduler tick {message_id}: ")
    assert "local timeouts" in line and "upload timeouts" in line and "rounds re-published" in line


# --------------------------------------------------------------------------- task management


def _create_json(stack: StackHandle, population: str, body: dict[str, Any], headers: dict[str, str] | None = None,
                 base_url: str | None = None) -> requests.Response:
    url = f"{base_url or stack.settings.task_management_url}/taskmanagement/v1/population/{population}:create-task"
    return http().post(url, data=json.dumps(body), headers={**JSON, **(headers or {})}, timeout=30)


GOOD_TASK = {"totalIteration": 2, "minAggregationSize": 3, "maxAggregationSize": 4}

CREATE_CASES = {
    "no rounds": ({**GOOD_TASK, "totalIteration": 0}, 400, "task.total_iteration must be > 0"),
    "no report goal": ({**GOOD_TASK, "minAggregationSize": 0}, 400, "min_aggregation_size (the report goal) must be > 0"),
    "max below min": ({**GOOD_TASK, "maxAggregationSize": 2}, 400, "max_aggregation_size must be >= min_aggregation_size"),
    "population mismatch": ({**GOOD_TASK, "populationName": "elsewhere"}, 400, "differs from the URL's population"),
    "bad version code": ({**GOOD_TASK, "minClientVersion": "1.2"}, 400, "task.min_client_version '1.2' is not a decimal"),
    "versions reversed": ({**GOOD_TASK, "minClientVersion": "9", "maxClientVersion": "3"}, 400,
                          "min_client_version is above max_client_version"),
    "traffic weight": ({**GOOD_TASK, "info": {"trafficWeight": 5000, "trainingInfo": {}}}, 400,
                       "traffic_weight must be in [0, 1000]"),
    "unknown field": ({**GOOD_TASK, "reportGoal": 3}, 400, "reportGoal"),
}


def test_bad_create_task_requests_are_refused(local_stack: StackHandle) -> None:
    population = unique("tm-bad")
    management = TaskManagementClient(local_stack.settings.task_management_url)
    for what, (body, status, fragment) in CREATE_CASES.items():
        response = _create_json(local_stack, population, {"task": body})
        assert response.status_code == status, (what, response.text)
        assert fragment in response.json()["error"]["message"], (what, response.text)
    assert management.list_tasks(population) == []
    # A valid request works; a second active training task in the population conflicts.
    created = _create_json(local_stack, population, {"task": GOOD_TASK})
    assert created.status_code == 201, created.text
    task_id = int(created.json()["task"]["taskId"])
    with pytest.raises(ConflictError, match="already has an active training task"):
        management.create_task(population, task_management_pb2.Task(total_iteration=1, min_aggregation_size=1))
    with pytest.raises(NotFoundError, match=f"task {task_id + 5} does not exist"):
        management.open_task(population, task_id + 5)
    with pytest.raises(PreconditionFailedError, match="cannot open: gs://.*/server_phase does not exist"):
        management.open_task(population, task_id)  # no artifacts uploaded yet
    assert [t.status for t in management.list_tasks(population)] == [task_management_pb2.TaskStatus.CREATED]
    management.cancel_task(population, task_id, "test over")
    with pytest.raises(PreconditionFailedError, match="is CANCELED"):
        management.cancel_task(population, task_id)
    assert [(t.task_id, t.status) for t in management.list_tasks(population)] == [
        (task_id, task_management_pb2.TaskStatus.CANCELED)]


@pytest.fixture
def keyed_task_management(local_stack: StackHandle, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A second task_management process on the same emulators with FEDCOMPUTE_API_KEY set."""
    key, port = uuid.uuid4().hex, free_port()
    source = default_functions_dir() / "task_management" / "main.py"
    process = start_process(
        [str(functions_framework_executable()), "--source", str(source), "--target", "task_management",
         "--signature-type", "http", "--host", "127.0.0.1", "--port", str(port)],
        log_path=tmp_path / "task_management.log",
        env={**os.environ, "FEDCOMPUTE_API_KEY": key, "PYTHONUNBUFFERED": "1"}, cwd=source.parent)
    url = f"http://127.0.0.1:{port}"
    try:
        def healthy() -> bool:
            with contextlib.suppress(requests.RequestException):
                return http().get(f"{url}/healthz", timeout=2).status_code == 200
            assert process.poll() is None, (tmp_path / "task_management.log").read_text()
            return False

        wait_until(healthy, 30, what="the keyed task_management process to answer")
        yield url, key
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGINT)  # gunicorn's quick shutdown
        try:
            process.wait(timeout=10)
        except Exception:  # noqa: BLE001 - then by force, the whole session it leads
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)


def test_task_management_requires_the_api_key_when_configured(local_stack: StackHandle,
                                                              keyed_task_management: tuple[str, str]) -> None:
    url, key = keyed_task_management
    population = unique("keyed")
    missing = _create_json(local_stack, population, {"task": GOOD_TASK}, base_url=url)
    assert missing.status_code == 401 and "missing x-api-key header" in missing.json()["error"]["message"]
    wrong = _create_json(local_stack, population, {"task": GOOD_TASK}, {"x-api-key": "guess"}, base_url=url)
    assert wrong.status_code == 401 and "invalid x-api-key" in wrong.json()["error"]["message"]
    listed = http().get(f"{url}/taskmanagement/v1/tasks", timeout=30)
    assert listed.status_code == 401
    assert TaskManagementClient(local_stack.settings.task_management_url).list_tasks(population) == []
    assert http().get(f"{url}/healthz", timeout=10).status_code == 200  # liveness needs no key
    created = TaskManagementClient(url, api_key=key).create_task(
        population, task_management_pb2.Task(total_iteration=1, min_aggregation_size=2))
    assert created.task_id == 1 and created.status == task_management_pb2.TaskStatus.CREATED


class CountingFirestore:
    """Counts the Firestore RPCs (reads and commits) made through a real client."""

    def __init__(self, client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rpcs: list[str] = []
        api = client._firestore_api
        for name in ("batch_get_documents", "commit", "run_query", "begin_transaction", "run_aggregation_query"):
            original = getattr(api, name)

            def counted(*args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
                self.rpcs.append(_name)
                return _original(*args, **kwargs)

            monkeypatch.setattr(api, name, counted)


def test_report_result_takes_two_firestore_round_trips_and_refuses_a_concurrent_move(
        local_stack: StackHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedcompute.services import assignment as assignment_service
    from fedcompute.tasks.records import ReportedResult

    task = create_numpy_task(local_stack, unique("report-rpcs"), report_goal=5, over_selection_rate=0.0)
    client = device(local_stack)
    first, second = check_in(client, task.population), check_in(client, task.population)
    key = task.key(1)
    store = FirestoreTaskStore(local_stack.clients.firestore)
    blobs = GcsBlobStore(local_stack.clients.storage)
    counter = CountingFirestore(local_stack.clients.firestore, monkeypatch)

    owner = task.store.get_assignment(key, first.assignment_id)
    assert owner is not None
    counter.rpcs.clear()
    instruction = assignment_service.report_result(store, blobs, local_stack.settings, key, first.assignment_id,
                                                   ReportedResult.COMPLETED, device_id=owner.device_id)
    assert isinstance(instruction, assignment_service.UploadInstruction)
    # One read of the round and the assignment together, one conditional write.
    assert counter.rpcs == ["batch_get_documents", "commit"]
    assert task.statuses(1)[first.assignment_id] == AssignmentStatus.LOCAL_COMPLETED.value

    # The write is conditional on the version read: a move in between (here the scheduler
    # timing the assignment out) wins, and the device's report changes nothing.
    _, _, read = store.get_upload_context(key, second.assignment_id)
    assert read is not None and read.version is not None
    store.transition_assignment(key, second.assignment_id, expected=[AssignmentStatus.ASSIGNED],
                                new_status=AssignmentStatus.LOCAL_TIMEOUT)
    with pytest.raises(PreconditionFailedError):
        store.transition_assignment(key, second.assignment_id, expected=[AssignmentStatus.ASSIGNED],
                                    new_status=AssignmentStatus.LOCAL_COMPLETED, current=read)
    assert task.statuses(1)[second.assignment_id] != AssignmentStatus.LOCAL_COMPLETED.value


def test_start_round_on_firestore_opens_the_next_round_exactly_once(local_stack: StackHandle) -> None:
    """The round and the task's pointer to it in one transaction: of racing callers one wins,
    the task never points at a missing round, and a stopped task starts nothing."""
    task = create_numpy_task(local_stack, unique("start-round"), report_goal=50, rounds=5)
    store = task.store
    record = store.get_task(task.population, task.task_id)
    assert record is not None and record.current_round == 1
    second = RoundRecord.opening(record, 2, time.time())
    with ThreadPoolExecutor(4) as pool:
        started = list(pool.map(lambda _: FirestoreTaskStore(local_stack.clients.firestore).start_round(second),
                                range(4)))
    assert sorted(started) == [False, False, False, True]
    assert store.get_task(task.population, task.task_id).current_round == 2  # type: ignore[union-attr]
    assert store.get_round(task.key(2)) is not None
    assert store.start_round(RoundRecord.opening(record, 4, time.time())) is False  # no skip
    assert store.get_round(task.key(4)) is None
    TaskManagementClient(local_stack.settings.task_management_url).cancel_task(task.population, task.task_id,
                                                                              "test over")
    assert store.start_round(RoundRecord.opening(record, 3, time.time())) is False
    assert store.get_round(task.key(3)) is None
