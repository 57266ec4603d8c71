"""Hostile devices against the live local stack (issue 13): HTTP check-ins, GCS uploads,
Pub/Sub notifications and the CLI, as an attacker would use them.

- two hostile devices (overflowing and inconsistent metric statistics) cannot keep a round
  from completing, nor set its accuracy (High 3, Medium); nor can a negative count or an
  overflowing sum stall an evaluation round (High 3);
- one identity holds at most one assignment of a round, and cannot fill a round (High 5);
- uploads sealed to another key, tampered or in plaintext are rejected and counted nowhere;
  honest devices' uploads are HPKE-sealed (item 4);
- a dead-lettered round-ready is replayed by ``fedcompute ops replay`` (Medium).
"""
from __future__ import annotations

import base64
import gzip
import json
import os
import subprocess
import sys
import time
import uuid
from typing import TYPE_CHECKING

import numpy as np
import pytest
import requests

from fedcompute.adapters.blobs import GcsBlobStore
from fedcompute.adapters.events import encode_round_event
from fedcompute.crypto.hpke import UploadKeyRing, seal_update
from fedcompute.fleet.protocol import DeviceHttpClient
from fedcompute.identity import DeviceKey
from fedcompute.proto import task_assignment_pb2
from fedcompute.settings import Topics
from fedcompute.tasks.records import AssignmentRecord, AssignmentStatus, RoundStatus
from support.helpers import http, unique
from support.tasks import (
    COMPLETED,
    NumpyTask,
    central_metrics,
    create_numpy_eval_task,
    create_numpy_task,
    gradient_object,
    log_lines,
    make_update,
    random_delta,
    random_metric_stats,
    run_device,
    seal_for_stack,
    stack_key_ring,
    wait_until,
)

if TYPE_CHECKING:
    from support.stack_plugin import StackHandle

pytestmark = pytest.mark.integration
TRAIN = "server/client_work/train/"


def _client(stack: StackHandle) -> DeviceHttpClient:
    return DeviceHttpClient(stack.settings.task_assignment_url, timeout=30)


def _verdict(stack: StackHandle, task: NumpyTask, assignment_id: str) -> str:
    name = gradient_object(task, 1, assignment_id)
    needle = f"ingestion of gs://{stack.settings.gradient_bucket}/{name}: "
    line = stack.wait_for_log("result_ingestion", needle, 60)
    return line.split(needle, 1)[1].split(" ", 1)[0]


def test_two_hostile_devices_cannot_stall_a_round_or_set_its_accuracy(local_stack: StackHandle) -> None:
    task = create_numpy_task(local_stack, unique("hostile"), report_goal=3, over_selection_rate=1.0, rounds=1)
    client, rng = _client(local_stack), np.random.default_rng(13)
    overflow, stats = make_update(task, random_delta(task, rng), seed=1)
    overflow_stats = {**stats, "loss/sum": np.float64(1.7e308)}  # twice this overflowed the round's sum
    liar_stats = {**stats, "accuracy/correct": np.float64(1e9), "accuracy/count": np.float64(1e9)}
    hostile = [run_device(client, task.population, make_update(task, random_delta(task, rng), stats=s)[0])
               for s in (overflow_stats, liar_stats)]
    assert [_verdict(local_stack, task, run.assignment_id) for run in hostile] == ["INVALID_UPLOAD"] * 2
    honest_stats = []
    for seed in range(3):
        payload, flat = make_update(task, random_delta(task, rng), seed=10 + seed)
        honest_stats.append(flat)
        assert run_device(client, task.population, payload).upload_status == 200
    task.wait_round(1, timeout_s=120)
    metrics = task.round_metrics(1)
    assert metrics["server/aggregator/num_reports"] == 3
    expected = central_metrics(task, honest_stats)
    for name, value in expected.items():  # the hostile statistics are counted nowhere
        assert metrics[TRAIN + name] == pytest.approx(value, rel=1e-6), name
    statuses = task.statuses(1)
    assert [statuses[run.assignment_id] for run in hostile] == ["UPLOAD_REJECTED"] * 2


def test_negative_count_or_overflowing_sum_cannot_stall_an_evaluation_round(local_stack: StackHandle) -> None:
    """By the code, one negative count stalled an evaluation round (High 3): statistics are
    checked at ingestion, so hostile ones are rejected and the round completes without them."""
    training = create_numpy_task(local_stack, unique("hostile_eval"), report_goal=1, rounds=1)
    evaluation = create_numpy_eval_task(training, report_goal=2, over_selection_rate=1.0)
    client, rng = _client(local_stack), np.random.default_rng(31)
    assert run_device(client, training.population, make_update(training, random_delta(training, rng))[0]
                      ).upload_status == 200
    training.wait_round(1, timeout_s=60)
    # The scheduler runs on the round-completed event and opens evaluation round 1 on it.
    opened = evaluation.wait_round(1, RoundStatus.COLLECTING, timeout_s=60)
    assert opened.evaluated_round == 1
    honest_count = random_metric_stats(evaluation, rng, 10)["sparse_categorical_accuracy/count"]
    negative = {**random_metric_stats(evaluation, rng, 10),
                "sparse_categorical_accuracy/count": -np.asarray(honest_count)}  # cancels an honest device's count
    overflowing = {**random_metric_stats(evaluation, rng, 10), "loss/sum": np.float64(1.7e308)}
    hostile = {what: run_device(client, evaluation.population, make_update(evaluation, [], stats=stats)[0])
               for what, stats in (("negative count", negative), ("overflowing sum", overflowing))}
    for run in hostile.values():
        assert _verdict(local_stack, evaluation, run.assignment_id) == "INVALID_UPLOAD"
    reasons = {r["object"].split("/d/")[1].split("/")[0]: r["reason"]
               for r in evaluation.store.list_rejections(evaluation.key(1))}
    assert "sparse_categorical_accuracy/count is a count: it must be a non-negative integer" in \
        reasons[hostile["negative count"].assignment_id]
    assert "exceeds count" in reasons[hostile["overflowing sum"].assignment_id]
    assert evaluation.count(1) == 0  # counted nowhere
    honest_stats = []
    for seed in range(2):
        payload, flat = make_update(evaluation, [], seed=40 + seed)
        honest_stats.append(flat)
        assert run_device(client, evaluation.population, payload).upload_status == 200
    assert evaluation.wait_round(1, timeout_s=120).status == RoundStatus.COMPLETED  # not left AGGREGATING
    metrics = evaluation.round_metrics(1)
    assert metrics["server/aggregator/num_reports"] == 2
    assert metrics["server/evaluation/training_round"] == 1
    for name, value in central_metrics(evaluation, honest_stats).items():  # the honest devices' metrics alone
        assert metrics["server/client_work/eval/" + name] == pytest.approx(value, rel=1e-6), name
    statuses = evaluation.statuses(1)
    assert [statuses[run.assignment_id] for run in hostile.values()] == ["UPLOAD_REJECTED"] * 2


def test_one_identity_holds_one_assignment_per_round_and_cannot_fill_it(local_stack: StackHandle) -> None:
    task = create_numpy_task(local_stack, unique("sybil"), report_goal=3, over_selection_rate=0.34, rounds=1)
    client, greedy = _client(local_stack), DeviceKey.generate()
    outcomes = []
    for _ in range(8):  # one client hammering check-in with one key: its one assignment, then 429s
        result = client.create_task_assignment(task.population, "1", key=greedy)
        outcomes.append(result.assignment_id if isinstance(result, task_assignment_pb2.TaskAssignment)
                        else result.reason)
    assert outcomes[0] not in {"NO_TASK_AVAILABLE", "RATE_LIMITED"}
    assert set(outcomes[1:]) <= {outcomes[0], "RATE_LIMITED"} and outcomes[-1] == "RATE_LIMITED"
    honest = [client.create_task_assignment(task.population, "1", key=DeviceKey.generate()) for _ in range(3)]
    assert all(isinstance(r, task_assignment_pb2.TaskAssignment) for r in honest)  # slots left for others
    assert task.store.count_assignments(task.key(1)) == 4
    unsigned = http().post(f"{local_stack.settings.task_assignment_url}/taskassignment/v1/population/"
                           f"{task.population}:create-task-assignment", json={"clientVersion": {"versionCode": "1"}},
                           timeout=30)
    assert unsigned.status_code == 401 and "device_auth" in unsigned.json()["error"]["message"]


def test_sealed_uploads_count_and_foreign_tampered_or_plain_ones_count_nowhere(local_stack: StackHandle) -> None:
    task = create_numpy_task(local_stack, unique("sealed"), report_goal=2, over_selection_rate=1.0, rounds=1)
    client, rng, stranger = _client(local_stack), np.random.default_rng(4), UploadKeyRing.generate()

    def upload_raw(body_for: object) -> str:
        assignment = client.create_task_assignment(task.population, "1")
        assert isinstance(assignment, task_assignment_pb2.TaskAssignment)
        assert assignment.upload_encryption.required and len(assignment.upload_encryption.public_key) == 32
        instruction = client.report_result(assignment.self_uri, COMPLETED)
        assert isinstance(instruction, task_assignment_pb2.UploadInstruction)
        payload = gzip.compress(make_update(task, random_delta(task, rng))[0])
        body = body_for(assignment.assignment_id, payload)  # type: ignore[operator]
        response = requests.put(instruction.upload_location, data=gzip.compress(body),
                                headers=dict(instruction.extra_request_headers), timeout=30)
        assert response.status_code == 200
        return assignment.assignment_id

    def tampered(aid: str, payload: bytes) -> bytes:
        envelope = json.loads(seal_update(payload, stack_key_ring(local_stack).current, assignment_id=aid))
        sealed = bytearray(base64.b64decode(envelope["encryptedPayload"]))
        sealed[-1] ^= 1
        envelope["encryptedPayload"] = base64.b64encode(bytes(sealed)).decode()
        return json.dumps(envelope).encode()

    bad = {
        "another key": lambda aid, p: seal_update(p, stranger.current, assignment_id=aid),
        "tampered": tampered,
        "plaintext": lambda aid, p: p,
    }
    rejected = {what: upload_raw(body) for what, body in bad.items()}
    for what, aid in rejected.items():
        assert _verdict(local_stack, task, aid) == "INVALID_UPLOAD", what
    reasons = {r["object"].split("/d/")[1].split("/")[0]: r["reason"]
               for r in task.store.list_rejections(task.key(1))}
    assert "unknown key" in reasons[rejected["another key"]]
    assert "does not decrypt" in reasons[rejected["tampered"]]
    assert "plaintext upload refused" in reasons[rejected["plaintext"]]
    assert task.count(1) == 0  # counted nowhere
    honest = [run_device(client, task.population, make_update(task, random_delta(task, rng), seed=s)[0])
              for s in range(2)]
    stored = GcsBlobStore(local_stack.clients.storage).read(
        local_stack.settings.gradient_bucket, gradient_object(task, 1, honest[0].assignment_id))
    # Uploads are raw unless FEDCOMPUTE_UPLOAD_GZIP=1: the stored object is the envelope itself.
    assert set(json.loads(stored)) == {"keyId", "encryptedPayload", "associatedData"}
    assert task.wait_round(1, timeout_s=120).status == RoundStatus.COMPLETED
    assert task.round_metrics(1)["server/aggregator/num_reports"] == 2


def test_a_dead_lettered_round_ready_is_replayed_by_the_cli(local_stack: StackHandle) -> None:
    """Locally nothing replayed dead letters: the round stayed AGGREGATING forever."""
    task = create_numpy_task(local_stack, unique("replay"), report_goal=1, rounds=1)
    key, now, aid = task.key(1), time.time(), str(uuid.uuid4())
    payload = make_update(task, random_delta(task, np.random.default_rng(2)))[0]
    GcsBlobStore(local_stack.clients.storage).write(local_stack.settings.gradient_bucket, gradient_object(task, 1, aid),
                                                    seal_for_stack(local_stack, aid, gzip.compress(payload)))
    # Ingestion has seen the object (else its notification may race the accept below).
    assert _verdict(local_stack, task, aid) == "UNKNOWN_ASSIGNMENT"
    task.store.create_assignment(AssignmentRecord(aid, task.population, task.task_id, 1,
                                                  AssignmentStatus.LOCAL_COMPLETED, "1", 0, now, now))
    assert task.store.accept_upload(key, aid).outcome == "ACCEPTED"  # what ingestion does
    task.store.update_round(key, {"status": RoundStatus.AGGREGATING, "aggregating_time": now,
                                      "round_ready_published": True}, expected=[RoundStatus.COLLECTING])
    publisher = local_stack.clients.publisher
    dead = publisher.topic_path(local_stack.settings.project, Topics.dead_letter(local_stack.settings.topics.round_ready))
    publisher.publish(dead, encode_round_event(key)).result(timeout=10)  # where 5 failed deliveries put it
    env = {**os.environ, **local_stack.env()}
    result = subprocess.run([sys.executable, "-m", "fedcompute.cli.main", "ops", "replay"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    replayed_by_cli = f"{local_stack.settings.topics.round_ready}: 1 replayed" in result.stdout
    assert task.wait_round(1, timeout_s=120).status == RoundStatus.COMPLETED
    # The scheduler's ticker may have replayed it first: either way it was replayed once.
    assert replayed_by_cli or log_lines(local_stack, "scheduler", "1 dead-lettered messages replayed")
    wait_until(lambda: task.round_metrics(1).get("server/aggregator/num_reports") == 1.0, 30)
