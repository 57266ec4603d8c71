"""Device identity and per-identity limits (issue 13, High 5), through the check-in HTTP entry point.

The task_assignment function runs in-process on the in-memory store; requests are the
protobuf bodies a device sends (signed by :class:`fedcompute.identity.DeviceKey`).
"""
from __future__ import annotations

import pickle
import time

import pytest

from conftest import AssignmentServer
from fedcompute.errors import UnauthenticatedError
from fedcompute.identity import DeviceKey, RateLimiter, SignedRequest, device_id_for, verify_request


def test_a_signed_request_verifies_and_names_the_key() -> None:
    key = DeviceKey.generate()
    signed = key.sign("POST", "/p", b"d" * 32)
    assert verify_request(signed, "POST", "/p", b"d" * 32) == key.device_id == device_id_for(key.public_key)


@pytest.mark.parametrize("change", ["path", "body", "key", "stale"])
def test_a_forged_or_stale_signature_is_refused(change: str) -> None:
    key, other = DeviceKey.generate(), DeviceKey.generate()
    signed = key.sign("POST", "/p", b"d" * 32, now=(lambda: 0.0) if change == "stale" else time.time)
    path, digest = ("/q" if change == "path" else "/p"), (b"e" * 32 if change == "body" else b"d" * 32)
    if change == "key":
        signed = SignedRequest(other.public_key, signed.timestamp_ms, signed.nonce, signed.signature)
    with pytest.raises(UnauthenticatedError):
        verify_request(signed, "POST", path, digest)


def test_unsigned_check_in_is_refused_with_401(assignment_server: AssignmentServer) -> None:
    status, _ = assignment_server.check_in(None)
    assert status == 401


def test_one_identity_cannot_hold_two_assignments_of_a_round(assignment_server: AssignmentServer) -> None:
    key = DeviceKey.generate()
    status, first = assignment_server.check_in(key)
    assert status == 201 and first.WhichOneof("result") == "task_assignment"
    for _ in range(5):  # retries of a check-in whose answer was lost: the same assignment, never a second
        status, again = assignment_server.check_in(key)
        assert status == 201 and again.task_assignment.assignment_id == first.task_assignment.assignment_id
    assignments = assignment_server.store.list_assignments(assignment_server.key)
    assert [a.device_id for a in assignments] == [key.device_id]
    assert assignment_server.report(first.task_assignment.self_uri, key) == 200
    status, after = assignment_server.check_in(key)  # reported: the round has nothing more for it
    assert status == 200 and after.WhichOneof("result") == "rejection_info"


def test_one_client_cannot_take_every_slot_and_honest_devices_still_get_in(assignment_server: AssignmentServer) -> None:
    greedy = DeviceKey.generate()
    taken = {assignment_server.check_in(greedy)[1].task_assignment.assignment_id for _ in range(10)} - {""}
    assert len(taken) == 1
    honest = [assignment_server.check_in(DeviceKey.generate())[1].WhichOneof("result") for _ in range(3)]
    assert honest == ["task_assignment"] * 3  # capacity 4: the greedy client holds one slot only


def test_report_signed_by_another_key_is_refused(assignment_server: AssignmentServer) -> None:
    owner, thief = DeviceKey.generate(), DeviceKey.generate()
    _, response = assignment_server.check_in(owner)
    self_uri = response.task_assignment.self_uri
    assert assignment_server.report(self_uri, thief) == 403
    assert assignment_server.report(self_uri, owner) == 200


def test_check_ins_of_one_identity_are_rate_limited(assignment_server: AssignmentServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(assignment_server.module, "_LIMITER", RateLimiter(rate_per_s=0.0001, burst=3))
    key = DeviceKey.generate()
    statuses = [assignment_server.check_in(key)[0] for _ in range(5)]
    assert statuses[:3] == [201, 201, 201] and statuses[3:] == [429, 429]  # retries get the same assignment
    assert assignment_server.check_in(DeviceKey.generate())[0] == 201  # other identities are not affected


def test_rate_limiter_memory_is_bounded() -> None:
    limiter = RateLimiter(rate_per_s=1.0, burst=1, max_keys=10)
    for i in range(1000):
        limiter.allow(f"device-{i}")
    assert len(limiter._buckets) == 10


def test_device_keys_survive_pickling_for_worker_processes() -> None:
    key = DeviceKey.generate()
    copy = pickle.loads(pickle.dumps(key))
    assert copy.device_id == key.device_id
    assert verify_request(copy.sign("GET", "/x", b""), "GET", "/x", b"") == key.device_id


def test_a_storage_outage_is_a_fast_503_with_a_retry_window(assignment_server: AssignmentServer,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 13: a Firestore outage made check-in hang > 25 s and answer 500."""
    from google.api_core import exceptions

    monkeypatch.setenv("FEDCOMPUTE_STORAGE_DEADLINE_S", "0.5")
    store = assignment_server.store

    # Check-in reads a population's open rounds (one query): that is where the outage bites.
    def hangs(population: str) -> list:  # type: ignore[type-arg]
        time.sleep(3)
        return []

    monkeypatch.setattr(store, "open_rounds", hangs)
    started = time.monotonic()
    status, _ = assignment_server.check_in(DeviceKey.generate())
    assert status == 503 and time.monotonic() - started < 2.5

    def unavailable(population: str) -> list:  # type: ignore[type-arg]
        raise exceptions.ServiceUnavailable("firestore emulator paused")

    monkeypatch.setattr(store, "open_rounds", unavailable)
    response = assignment_server.check_in_response(DeviceKey.generate())
    assert response.status_code == 503 and response.headers["Retry-After"] == "30"
    assert "unavailable" in response.get_json()["error"]["message"]

