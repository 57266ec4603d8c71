"""Device check-in (create-task-assignment) and report-result: the ODP protocol's logic.

Light: no TensorFlow, no protobuf-building here (the function's ``main.py`` converts to
and from the wire messages).

Check-in is O(1): a per-process :class:`CheckInCache` holds each population's open rounds
(one query of the OPEN tasks and one read of their rounds, refreshed every ``ttl_s``; the
population's task history is never listed), their download URLs (signed once per round,
re-signed well before they expire), the slot-counter shards found exhausted and a "full"
mark. The common path is then the store's slot claim: one counter increment and one batch
creating the slot and the assignment (2 Firestore calls); a full round is rejected from
the cache with none. A cache at most ``ttl_s`` stale can assign a device to a round that
just closed: its report-result is then refused as for any device that trained too late.
"""
from __future__ import annotations

import enum
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from fedcompute import layout
from fedcompute.errors import (
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    PreconditionFailedError,
)
from fedcompute.identity import assignment_id_for
from fedcompute.learning import upload_contract
from fedcompute.ports import BlobStore, TaskStore
from fedcompute.settings import Settings
from fedcompute.tasks.records import (
    AssignmentRecord,
    AssignmentStatus,
    ReportedResult,
    RoundKey,
    RoundRecord,
    RoundStatus,
    TaskKind,
    TaskRecord,
    client_version_allowed,
    status_after_report,
)

HOUR, DAY = 3600, 86400


class RejectionReason(str, enum.Enum):
    NO_TASK_AVAILABLE = "NO_TASK_AVAILABLE"
    CLIENT_VERSION_MISMATCH = "CLIENT_VERSION_MISMATCH"
    NO_ACTIVE_TASK_EXISTS = "NO_ACTIVE_TASK_EXISTS"


# ODP's retry windows (seconds).
RETRY_WINDOWS: dict[RejectionReason, tuple[int, int]] = {
    RejectionReason.NO_TASK_AVAILABLE: (60, 300),
    RejectionReason.CLIENT_VERSION_MISMATCH: (DAY, 2 * DAY),
    RejectionReason.NO_ACTIVE_TASK_EXISTS: (DAY, 2 * DAY),
}



@dataclass
class _OpenRound:
    task: TaskRecord
    round_record: RoundRecord | None  # None: an open task whose round is not created yet
    exhausted: frozenset[int] = frozenset()  # slot-counter shards known exhausted
    full_until: float = 0.0  # "round full" known until then (re-checked after: slots get released)


# How long a check-in waits for another thread's read of the open rounds (a read takes a few
# ms) before reading itself: a hung read must not hold every check-in of the process.
REFRESH_WAIT_S = 0.2


@dataclass
class _Population:
    rounds: list[_OpenRound]
    fetched: float


class CheckInCache:
    """What check-in needs to know about a population's open rounds, kept per process.

    Thread-safe enough for functions-framework's threads: entries are replaced whole, one
    thread at a time refreshes them (the others use its result), and the worst a race does
    is one extra probe of an exhausted shard.

    Between two rounds every check-in finds no collecting round and asks for a refresh; at
    most one per ``min_refresh_s`` reaches the store, so a crowd of devices checking in while
    a round aggregates costs the store a few reads a second, not two per device.
    """

    def __init__(self, *, ttl_s: float = 2.0, url_max_age_s: float = 300.0, min_refresh_s: float = 0.25,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s, self.url_max_age_s, self.clock = ttl_s, url_max_age_s, clock
        self.min_refresh_s = min(min_refresh_s, ttl_s)
        self._populations: dict[str, _Population] = {}
        self._urls: dict[tuple[str, str], tuple[str, float]] = {}
        self._refreshing = threading.Lock()

    def open_rounds(self, store: TaskStore, population: str, *, refresh: bool = False,
                    stale_at: float | None = None) -> list[_OpenRound]:
        """The population's open rounds, read again after ``ttl_s`` or on ``refresh``.

        ``refresh``: the caller found the cached view out of date; it is read again unless
        that happened less than ``min_refresh_s`` ago (by this thread or another).
        ``stale_at``: when the caller learned that a cached round had closed. A view read
        before then is read again even inside ``min_refresh_s``: it cannot hold the round that
        opened after the close (a device checking in right after a round ended was refused).
        """
        max_age = self.min_refresh_s if refresh else self.ttl_s

        def fresh(entry: _Population | None) -> bool:
            return (entry is not None and self.clock() - entry.fetched < max_age
                    and (stale_at is None or entry.fetched > stale_at))

        entry = self._populations.get(population)
        if fresh(entry):
            assert entry is not None
            return entry.rounds
        must_wait = refresh or entry is None
        if not self._refreshing.acquire(timeout=REFRESH_WAIT_S if must_wait else 0):
            if not must_wait:
                assert entry is not None
                return entry.rounds  # merely old, and another thread is reading it already
            # Another thread's read is slow (storage trouble?): read, rather than queue behind it.
            return self._read(store, population, entry)
        try:
            entry = self._populations.get(population)
            if fresh(entry):
                assert entry is not None
                return entry.rounds  # another thread read it while this one waited
            return self._read(store, population, entry)
        finally:
            self._refreshing.release()

    def _read(self, store: TaskStore, population: str, entry: _Population | None) -> list[_OpenRound]:
        t = self.clock()
        previous = {(r.task.task_id, r.task.current_round): r for r in (entry.rounds if entry else [])}
        rounds = []
        for task, round_record in store.open_rounds(population):
            known = previous.get((task.task_id, task.current_round)) if round_record is not None else None
            rounds.append(_OpenRound(task, round_record, known.exhausted if known else frozenset()))
        self._populations[population] = _Population(rounds, t)
        return rounds

    def url(self, blobs: BlobStore, bucket: str, name: str) -> str:
        """A download URL, signed at most once per ``url_max_age_s`` (well inside its 15-minute life)."""
        t = self.clock()
        cached = self._urls.get((bucket, name))
        if cached is not None and t - cached[1] < self.url_max_age_s:
            return cached[0]
        if len(self._urls) > 1024:  # old rounds' URLs: bounded memory
            self._urls.clear()
        url = blobs.download_url(bucket, name)
        self._urls[(bucket, name)] = (url, t)
        return url

    def mark_full(self, round_: _OpenRound, exhausted: frozenset[int]) -> None:
        round_.exhausted = exhausted
        round_.full_until = self.clock() + self.ttl_s

    def is_full(self, round_: _OpenRound) -> bool:
        return self.clock() < round_.full_until


@dataclass(frozen=True)
class CheckIn:
    population: str
    client_version: str
    # Verified identity of a signed check-in (fedcompute.identity); "" for unsigned ones.
    device_id: str = ""


@dataclass(frozen=True)
class Rejection:
    reason: RejectionReason
    detail: str = ""

    @property
    def retry_window(self) -> tuple[int, int]:
        return RETRY_WINDOWS[self.reason]


@dataclass(frozen=True)
class Assignment:
    population: str
    task_id: int
    round_number: int
    assignment_id: str
    kind: TaskKind
    plan_url: str
    checkpoint_url: str
    min_separation: int

    @property
    def task_name(self) -> str:
        return f"/population/{self.population}/task/{self.task_id}"

    @property
    def self_uri(self) -> str:
        return f"{self.task_name}/aggregation/{self.round_number}/task-assignment/{self.assignment_id}"


@dataclass(frozen=True)
class UploadInstruction:
    upload_location: str
    extra_request_headers: dict[str, str]
    object_name: str
    gzip: bool = False  # the device gzips its update (the wire's compression_format)


# Float model deltas barely compress (gzip level 1 saved 7 % of the seed CNN's 6.2 MB
# update) while inflating cost the aggregator more than half of its time per update, so
# uploads are raw unless FEDCOMPUTE_UPLOAD_GZIP=1 asks for gzip.
def upload_gzip_enabled() -> bool:
    import os

    return os.environ.get("FEDCOMPUTE_UPLOAD_GZIP", "0") == "1"


def validate_version_code(version: str) -> str:
    """Version codes are decimal integers (ODP compares them numerically)."""
    if not layout.is_ascii_decimal(version):
        raise InvalidRequestError(
            f"client_version.version_code {version[:40]!r} is not a decimal version code (ASCII digits 0-9, "
            f"at most {layout.MAX_ID_DIGITS})",
            hint="send the OnDevicePersonalization module version, e.g. \"341912000\"",
        )
    return version


def create_task_assignment(
    store: TaskStore,
    blobs: BlobStore,
    settings: Settings,
    request: CheckIn,
    *,
    rng: random.Random | None = None,
    now: Callable[[], float] = time.time,
    cache: CheckInCache | None = None,
) -> Assignment | Rejection:
    """Assign a device to an open round of the population, or say why not."""
    rng = rng or random.Random()
    cache = cache or CheckInCache(ttl_s=0.0)
    validate_version_code(request.client_version)
    result = _check_in(store, blobs, settings, request, rng, now, cache)
    if isinstance(result, _Stale):  # the round closed since the cache read it: look again, once
        result = _check_in(store, blobs, settings, request, rng, now, cache, refresh=True, stale_at=result.seen_at)
    return result if not isinstance(result, _Stale) else Rejection(RejectionReason.NO_TASK_AVAILABLE,
                                                                  "no round is collecting right now")


@dataclass(frozen=True)
class _Stale:
    """The cached view of the population is out of date; ``seen_at``: when a claim proved a
    cached round closed (cache clock), None when the view merely showed no collecting round."""

    seen_at: float | None = None


def _check_in(store: TaskStore, blobs: BlobStore, settings: Settings, request: CheckIn, rng: random.Random,
              now: Callable[[], float], cache: CheckInCache, *, refresh: bool = False,
              stale_at: float | None = None) -> Assignment | Rejection | _Stale:
    rounds = cache.open_rounds(store, request.population, refresh=refresh, stale_at=stale_at)
    if not rounds:
        if not refresh and cache.ttl_s > 0:
            return _Stale()
        return Rejection(RejectionReason.NO_ACTIVE_TASK_EXISTS, f"population {request.population!r} has no open task")
    eligible = [r for r in rounds
                if client_version_allowed(request.client_version, r.task.min_client_version, r.task.max_client_version)]
    if not eligible:
        return Rejection(
            RejectionReason.CLIENT_VERSION_MISMATCH,
            f"version {request.client_version} is outside every open task's range",
        )
    candidates = [r for r in eligible if r.round_record is not None
                  and r.round_record.status == RoundStatus.COLLECTING and r.task.traffic_weight > 0]
    if not candidates:
        if not refresh and cache.ttl_s > 0:
            return _Stale()  # between rounds: the next one may have opened since the cache read
        return Rejection(RejectionReason.NO_TASK_AVAILABLE, "no round is collecting right now")
    # ODP's traffic split: one weighted pick among the open rounds; a full round rejects.
    chosen = rng.choices(candidates, weights=[r.task.traffic_weight for r in candidates], k=1)[0]
    task, round_record = chosen.task, chosen.round_record
    assert round_record is not None
    if cache.is_full(chosen):
        return Rejection(RejectionReason.NO_TASK_AVAILABLE, f"round {round_record.round_number} is full")
    key = RoundKey(task.population, task.task_id, round_record.round_number)
    assignment_id = _assignment_id(task, key, request.device_id, rng)
    t = now()
    record = AssignmentRecord(
        assignment_id=assignment_id, population=task.population, task_id=task.task_id,
        round_number=round_record.round_number, status=AssignmentStatus.ASSIGNED, client_version=request.client_version,
        slot=-1, created_time=t, updated_time=t, device_id=request.device_id,
        max_upload_bytes=upload_contract.max_upload_bytes(task),
    )
    try:
        # The assignment is create-only and its id derives from the identity: one per identity per round.
        claim = store.claim_assignment(record, round_record.max_assignments, exhausted=chosen.exhausted, rng=rng)
    except ConflictError:
        # The identity's one assignment of this round exists. If it is still ASSIGNED, this is
        # the device retrying a check-in whose answer it never got (a timeout or a 503 while
        # the write was in flight): hand the same assignment back, so the device is not locked
        # out of the round. Never a second one.
        held = store.get_assignment(key, assignment_id)
        if held is None or held.device_id != request.device_id or held.status != AssignmentStatus.ASSIGNED:
            return Rejection(RejectionReason.NO_TASK_AVAILABLE,
                             f"this device already holds its assignment of round {round_record.round_number}")
    else:
        if claim.round_stopped:
            return _Stale(seen_at=cache.clock())
        if claim.record is None:
            cache.mark_full(chosen, claim.exhausted)
            return Rejection(RejectionReason.NO_TASK_AVAILABLE, f"round {round_record.round_number} is full")
        chosen.exhausted = claim.exhausted
    return Assignment(
        population=task.population,
        task_id=task.task_id,
        round_number=round_record.round_number,
        assignment_id=assignment_id,
        kind=task.kind,
        plan_url=cache.url(blobs, settings.model_bucket, _plan_object(task)),
        checkpoint_url=cache.url(blobs, settings.model_bucket, _checkpoint_object(task, round_record)),
        min_separation=task.min_separation,
    )


def _assignment_id(task: TaskRecord, key: RoundKey, device_id: str, rng: random.Random) -> str:
    """Signed check-ins: the identity's one id of this round; unsigned ones: a random GUID."""
    if not device_id:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    secret = bytes.fromhex(task.noise_secret) if task.noise_secret else task.population.encode()
    return assignment_id_for(secret, device_id, key.population, key.task_id, key.round_number)


def _plan_object(task: TaskRecord) -> str:
    if task.kind == TaskKind.EVALUATION:
        return layout.eval_plan_path(task.population, task.task_id)
    return layout.client_plan_path(task.population, task.task_id)


def _checkpoint_object(task: TaskRecord, round_record: RoundRecord) -> str:
    if task.kind == TaskKind.EVALUATION:
        return layout.client_checkpoint_path(task.source_population, task.source_task_id, round_record.evaluated_round)
    return layout.client_checkpoint_path(task.population, task.task_id, round_record.round_number - 1)


def report_result(
    store: TaskStore,
    blobs: BlobStore,
    settings: Settings,
    key: RoundKey,
    assignment_id: str,
    result: ReportedResult,
    *,
    device_id: str = "",
) -> UploadInstruction | Rejection | None:
    """Record a device's result; on COMPLETED return where to upload its update.

    Returns a :class:`Rejection` when the round stopped collecting (the device should drop
    its update), None for a failure report.
    """
    # The round and the assignment in one round trip; the transition below is conditional on
    # the assignment's version read here (report-result: 2 storage calls, not 4).
    _, round_record, assignment = store.get_upload_context(key, assignment_id)
    if assignment is None:
        raise NotFoundError(
            f"no assignment {assignment_id} in round {key.round_number} of task {key.population}/{key.task_id}",
            hint="use the self_uri of the TaskAssignment you were given",
        )
    if assignment.device_id and device_id != assignment.device_id:
        raise PermissionDeniedError(f"assignment {assignment_id} belongs to another device",
                                    hint="report with the device key that checked in")
    new_status = status_after_report(assignment.status, result)
    if result != ReportedResult.COMPLETED:
        store.transition_assignment(key, assignment_id, expected=[AssignmentStatus.ASSIGNED], new_status=new_status,
                                    reason=f"device reported {result.value}", current=assignment)
        store.release_slot(key, assignment.slot, assignment_id)
        return None
    if round_record is None or round_record.status != RoundStatus.COLLECTING:
        return Rejection(RejectionReason.NO_TASK_AVAILABLE, f"round {key.round_number} is no longer collecting")
    first = False  # this report moved the assignment: no upload session for it existed before
    if assignment.status == AssignmentStatus.ASSIGNED:
        try:
            store.transition_assignment(key, assignment_id, expected=[AssignmentStatus.ASSIGNED],
                                        new_status=AssignmentStatus.LOCAL_COMPLETED, current=assignment)
            first = True
        except PreconditionFailedError:
            # A concurrent retry of the same report won; it is LOCAL_COMPLETED now.
            current = store.get_assignment(key, assignment_id)
            if current is None or current.status != AssignmentStatus.LOCAL_COMPLETED:
                raise
    object_name = layout.gradient_path(key.population, key.task_id, key.round_number, assignment_id)
    gzip = upload_gzip_enabled()
    # The session stores at most the task's largest honest update (sealed): a device cannot
    # park arbitrary data in the gradient bucket through its upload URL.
    max_bytes = assignment.max_upload_bytes or upload_contract.DEFAULT_MAX_UPLOAD_BYTES
    url, headers = blobs.create_upload_session(settings.gradient_bucket, object_name, gzip=gzip, max_bytes=max_bytes,
                                               first=first)
    return UploadInstruction(upload_location=url, extra_request_headers=headers, object_name=object_name, gzip=gzip)
