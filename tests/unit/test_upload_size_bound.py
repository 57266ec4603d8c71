"""Upload sessions bounded by the task's maximum update size (issue 13, Medium: 70 MiB stored,
5 TiB possible through one upload URL): the bound is derived from the model's tensor shapes
plus the gzip and HPKE envelope overhead; the cloud session carries it to GCS; ingestion
rejects and deletes a larger object by its size before reading it."""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest

from fedcompute.adapters.blobs import GcsBlobStore
from fedcompute.crypto.hpke import UploadKeyRing, seal_update
from fedcompute.errors import PayloadTooLargeError, PreconditionFailedError
from fedcompute.learning import metric_stats, upload_contract
from fedcompute.learning.tensor_codec import encode_client_update
from fedcompute.services import assignment as svc
from fedcompute.services import ingestion
from fedcompute.settings import Settings
from fedcompute.tasks.records import AssignmentStatus, ReportedResult, RoundKey, TaskRecord
from fedcompute.tensor_spec import TensorSpec
from support.tasks import open_task_in_memory

SETTINGS = Settings()
POP = "bounded_pop"
SHAPES = {"conv/kernel": (5, 5, 1, 32), "conv/bias": (32,), "dense/kernel": (512, 10), "dense/bias": (10,)}
METRICS = ("accuracy",)


def _open(store) -> TaskRecord:
    spec = tuple(TensorSpec(name, shape, "float32") for name, shape in SHAPES.items())
    return open_task_in_memory(store, POP, report_goal=2, over_selection_rate=0.5, total_rounds=1,
                               update_spec=spec, metrics=METRICS)


def _honest_sealed_update(task: TaskRecord, assignment_id: str) -> bytes:
    rng = np.random.default_rng(0)  # random floats: gzip cannot shrink them (the worst case)
    delta = [(name, rng.standard_normal(shape).astype(np.float32)) for name, shape in SHAPES.items()]
    stats = metric_stats.flatten_stats({m: metric_stats.zero_stats(m) for m in (*METRICS, "loss", "num_examples")})
    payload = encode_client_update(delta, 10, stats, metadata={"client": "x" * 1000}, compress=True)
    return seal_update(payload, UploadKeyRing.generate().current, assignment_id=assignment_id)


def test_the_bound_holds_an_honest_sealed_update_and_is_tight(store) -> None:
    task = _open(store)
    sealed = _honest_sealed_update(task, "a" * 40)
    bound = upload_contract.max_upload_bytes(task)
    raw = sum(int(np.prod(shape)) * 4 for shape in SHAPES.values())
    assert len(sealed) <= bound < 1.5 * raw + 64 * 1024  # base64 is 4/3: the bound is about that, no more


def test_the_bound_never_exceeds_the_server_ceiling(store) -> None:
    huge = (TensorSpec("w", (200_000_000,), "float32"),)
    task = open_task_in_memory(store, "huge_pop", report_goal=1, over_selection_rate=0.0, total_rounds=1,
                               update_spec=huge)
    assert upload_contract.max_upload_bytes(task) == upload_contract.DEFAULT_MAX_UPLOAD_BYTES


def _reported(store, blobs) -> tuple[TaskRecord, RoundKey, svc.Assignment, svc.UploadInstruction]:
    """A task, and one device that checked in and reported COMPLETED: its upload instruction."""
    task = _open(store)
    a = svc.create_task_assignment(store, blobs, SETTINGS, svc.CheckIn(POP, "1"), rng=random.Random(1))
    assert isinstance(a, svc.Assignment)
    key = RoundKey(POP, task.task_id, 1)
    instruction = svc.report_result(store, blobs, SETTINGS, key, a.assignment_id, ReportedResult.COMPLETED)
    assert isinstance(instruction, svc.UploadInstruction)
    return task, key, a, instruction


def test_the_upload_session_is_limited_to_the_tasks_bound(store, blobs) -> None:
    task, _, _, instruction = _reported(store, blobs)
    bound = upload_contract.max_upload_bytes(task)
    assert blobs.session_limits[instruction.upload_location] == bound
    with pytest.raises(PayloadTooLargeError, match="outside the session's range"):
        blobs.complete_upload(instruction.upload_location, b"x" * (bound + 1))
    assert blobs.list(SETTINGS.gradient_bucket, "") == []


def test_only_a_retried_report_pays_the_emulators_existence_check(store, blobs, monkeypatch) -> None:
    """The first report's session is for an object nothing could have written (no session for
    it existed); a retried report's may follow an upload, so that one is checked."""
    firsts: list[bool] = []
    original = blobs.create_upload_session

    def recording(*args: Any, first: bool = False, **kwargs: Any) -> Any:
        firsts.append(first)
        return original(*args, first=first, **kwargs)

    monkeypatch.setattr(blobs, "create_upload_session", recording)
    _, key, a, instruction = _reported(store, blobs)
    retry = svc.report_result(store, blobs, SETTINGS, key, a.assignment_id, ReportedResult.COMPLETED)
    assert isinstance(retry, svc.UploadInstruction)
    assert firsts == [True, False]
    blobs.complete_upload(instruction.upload_location, b"update")
    with pytest.raises(PreconditionFailedError, match="already uploaded"):
        svc.report_result(store, blobs, SETTINGS, key, a.assignment_id, ReportedResult.COMPLETED)


def test_ingestion_rejects_and_deletes_an_oversized_object_before_reading_it(store, blobs, events) -> None:
    task, key, a, instruction = _reported(store, blobs)
    bound = upload_contract.max_upload_bytes(task)
    blobs.write(SETTINGS.gradient_bucket, instruction.object_name, b"x" * (bound + 1))  # e.g. fake-gcs: no range
    reads: list[str] = []
    original_read = blobs.read
    blobs.read = lambda bucket, name: reads.append(name) or original_read(bucket, name)  # type: ignore[method-assign]
    result = ingestion.ingest_upload(
        store, blobs, events, SETTINGS,
        ingestion.ObjectFinalized("e1", SETTINGS.gradient_bucket, instruction.object_name, bound + 1),
        validate=lambda data, task: None)
    assert result.outcome == ingestion.OUTCOME_INVALID
    assert f"exceeds this task's maximum update size of {bound} bytes" in result.reason
    assert reads == []
    assert not blobs.exists(SETTINGS.gradient_bucket, instruction.object_name)
    assert store.get_assignment(key, a.assignment_id).status == AssignmentStatus.UPLOAD_REJECTED
    assert store.count_assignments(key, AssignmentStatus.UPLOAD_COMPLETED) == 0


class _RecordingSession:
    """Stands in for the authorized HTTP session to storage.googleapis.com."""

    def __init__(self, status: int, headers: dict[str, str]) -> None:
        self.status, self.headers, self.calls = status, headers, []

    def post(self, url: str, **kwargs: Any) -> Any:
        self.calls.append((url, kwargs["headers"]))
        return type("Response", (), {"status_code": self.status, "headers": self.headers, "text": ""})()


def test_the_cloud_session_carries_a_content_length_range_and_is_create_only() -> None:
    session = _RecordingSession(201, {"Location": "https://storage.googleapis.com/b/o?upload_id=u1"})
    store = GcsBlobStore(client=object(), public_base_url="", xml_session=session)
    url, headers = store.create_upload_session("fcp-gradient", "pop/1/1/d/a b/gradient", max_bytes=12345)
    assert url == "https://storage.googleapis.com/b/o?upload_id=u1"
    assert headers == {"content-type": "application/octet-stream"}
    (called, sent), = session.calls
    assert called == "https://storage.googleapis.com/fcp-gradient/pop/1/1/d/a%20b/gradient"
    assert sent["x-goog-content-length-range"] == "0,12345"
    assert sent["x-goog-if-generation-match"] == "0" and sent["x-goog-resumable"] == "start"


def test_a_second_cloud_session_for_an_uploaded_object_is_refused() -> None:
    store = GcsBlobStore(client=object(), public_base_url="", xml_session=_RecordingSession(412, {}))
    with pytest.raises(PreconditionFailedError, match="written once"):
        store.create_upload_session("fcp-gradient", "pop/1/1/d/a/gradient", max_bytes=10)
