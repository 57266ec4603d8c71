"""Worker processes for large fleets: each loads the model once and serves many devices.

A device's identity, data and schedule are the parent's (:class:`~fedcompute.fleet.runner.
ProcessFleet`); a session is sent to a worker process as a small :class:`SessionJob`
(device id, session count, contribution history) and comes back as a
:class:`SessionReport`. Inside a worker, a few threads run sessions concurrently (HTTP
waits overlap; TensorFlow releases the GIL in its kernels) over one shared
:class:`HttpSessionRunner`:

* one keep-alive HTTP session per thread (no connection set-up per device);
* one plan/checkpoint cache per process, keyed by URL, like a CDN edge: the plan is
  unpacked and its SavedModel loaded once per process, each round's checkpoint is
  downloaded once per process; every device still checks in and reports by itself;
* no per-device temporary directory, no per-device model load.

Each report carries the session's wall time per protocol step and its CPU time inside
and outside training, so the protocol's cost per device can be measured.
"""
from __future__ import annotations

import logging
import os
import queue
import random
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fedcompute.errors import FedComputeError
from fedcompute.fleet.device import ArrayApp, PlanCache, SessionOutcome, SimulatedDevice
from fedcompute.fleet.population import PopulationSpec
from fedcompute.fleet.protocol import DeviceHttpClient
from fedcompute.identity import DeviceKey

log = logging.getLogger(__name__)

PROTOCOL_STEPS = ("check_in", "download", "report", "upload")


@dataclass(frozen=True)
class SessionJob:
    """One session of one device, as sent to a worker process."""

    device_id: int
    session_index: int  # the device's sessions so far: seeds its random source for this one
    last_contribution: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class SessionReport:
    """What a worker sends back: the outcome, the device's new history, and where time went."""

    device_id: int
    outcome: SessionOutcome
    last_contribution: tuple[tuple[str, int], ...]
    wall_s: float = 0.0
    cpu_s: float = 0.0  # this session's thread CPU time
    compute_s: float = 0.0  # training (or evaluation) wall time
    compute_cpu_s: float = 0.0
    steps_s: dict[str, float] = field(default_factory=dict)  # wall time per protocol step
    downloads: int = 0  # plan/checkpoint fetches from the origin (cache misses)
    worker_pid: int = 0
    fatal: str = ""  # a bug, not a server answer: the fleet stops and shows it


class SessionRunner(Protocol):
    """Runs one device session in a worker process (thread-safe)."""

    def run(self, job: SessionJob) -> SessionReport: ...

    def close(self) -> None: ...


RunnerFactory = Callable[[], SessionRunner]
"""Picklable; called once in each worker process."""


class _TimedClient(DeviceHttpClient):
    """A device HTTP client that adds each call's wall time to the calling thread's tally."""

    def __init__(self, assignment_url: str, *, timeout: float = 60.0) -> None:
        super().__init__(assignment_url, timeout=timeout)
        self._tally = threading.local()

    def start_tally(self) -> None:
        self._tally.steps = dict.fromkeys(PROTOCOL_STEPS, 0.0)
        self._tally.downloads = 0

    def tally(self) -> tuple[dict[str, float], int]:
        return dict(self._tally.steps), self._tally.downloads

    def _timed(self, step: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            steps = getattr(self._tally, "steps", None)
            if steps is not None:
                steps[step] += time.perf_counter() - start

    def create_task_assignment(self, population: str, version_code: str, *, key: DeviceKey | None = None) -> Any:
        return self._timed("check_in", super().create_task_assignment, population, version_code, key=key)

    def report_result(self, self_uri: str, result: Any, *, key: DeviceKey | None = None) -> Any:
        return self._timed("report", super().report_result, self_uri, result, key=key)

    def download(self, url: str) -> bytes:
        if hasattr(self._tally, "downloads"):
            self._tally.downloads += 1
        return self._timed("download", super().download, url)

    def upload(self, instruction: Any, payload: bytes, assignment: Any = None) -> int:
        return self._timed("upload", super().upload, instruction, payload, assignment)


_WARM = threading.Event()
_WARM_LOCK = threading.Lock()


class _TimedDevice(SimulatedDevice):
    """A simulated device that times its training (wall and thread CPU).

    The process's first training runs alone: TensorFlow traces the model's step functions
    on first use, and threads tracing at once take several times longer than one.
    """

    compute_s: float = 0.0
    compute_cpu_s: float = 0.0

    def _compute(self, *args: Any, **kwargs: Any) -> bytes:
        if not _WARM.is_set():
            with _WARM_LOCK:
                result = self._timed_compute(*args, **kwargs)
                _WARM.set()
                return result
        return self._timed_compute(*args, **kwargs)

    def _timed_compute(self, *args: Any, **kwargs: Any) -> bytes:
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return super()._compute(*args, **kwargs)
        finally:
            self.compute_s += time.perf_counter() - wall
            self.compute_cpu_s += time.thread_time() - cpu


@dataclass(frozen=True)
class HttpRunnerFactory:
    """Builds the :class:`HttpSessionRunner` of a worker process (picklable)."""

    assignment_url: str
    population: str
    spec: PopulationSpec
    timeout_s: float = 60.0

    def __call__(self) -> HttpSessionRunner:
        return HttpSessionRunner(self)


class HttpSessionRunner:
    """Real device sessions against the server; one per worker process, shared by its threads."""

    def __init__(self, config: HttpRunnerFactory) -> None:
        _single_threaded_tensorflow()
        self.config = config
        self.client = _TimedClient(config.assignment_url, timeout=config.timeout_s)
        self._dir = tempfile.TemporaryDirectory(prefix="fedcompute-fleet-worker-")
        self.cache = PlanCache(Path(self._dir.name))  # one directory per process, not per device
        self._keys: dict[int, DeviceKey] = {}

    def close(self) -> None:
        self._dir.cleanup()

    def device_key(self, device_id: int) -> DeviceKey:
        """The device's one identity for the whole run, the same in every worker process: a
        phone keeps its key across sessions, so the server's one-assignment-per-identity rule
        and its rate limits see one device, not a new one each session."""
        key = self._keys.get(device_id)
        if key is None:
            key = DeviceKey.from_seed(f"{self.config.population}/{self.config.spec.seed}/{device_id}".encode())
            self._keys[device_id] = key
        return key

    def run(self, job: SessionJob) -> SessionReport:
        spec = self.config.spec
        x, y = spec.examples(job.device_id)
        device = _TimedDevice(
            job.device_id, ArrayApp(x, y), version_code=spec.version_code,
            rng=random.Random(f"{spec.seed}/{job.device_id}/{job.session_index}"),
            last_contribution=dict(job.last_contribution), key=self.device_key(job.device_id),
        )
        self.client.start_tally()
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            outcome = device.run_session(self.client, self.config.population, self.cache)
        except FedComputeError as error:  # transient server trouble: back off like a device
            outcome = SessionOutcome("ERROR", retry_after=60.0, detail=str(error)[:300])
        steps, downloads = self.client.tally()
        return SessionReport(
            device_id=job.device_id, outcome=outcome, last_contribution=tuple(device.last_contribution.items()),
            wall_s=time.perf_counter() - wall, cpu_s=time.thread_time() - cpu, compute_s=device.compute_s,
            compute_cpu_s=device.compute_cpu_s, steps_s=steps, downloads=downloads, worker_pid=os.getpid(),
        )


def _single_threaded_tensorflow() -> None:
    """One TensorFlow thread per worker process: the processes are the parallelism."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # already initialized in this process: keep its setting
        pass


def worker_main(factory: RunnerFactory, threads: int, jobs: Any, results: Any) -> None:
    """A worker process: build the runner once, then ``threads`` threads serve jobs until ``None``."""
    try:
        runner = factory()
    except BaseException as error:  # noqa: BLE001 - reported to the parent, which stops the fleet
        results.put(("startup", f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=5)}"))
        return
    results.put(("ready", os.getpid()))
    parent = os.getppid()

    def serve() -> None:
        while True:
            try:
                job = jobs.get(timeout=1.0)
            except queue.Empty:
                if os.getppid() != parent:
                    return  # the fleet process is gone (killed): do not linger
                continue
            if job is None:
                return
            try:
                report = runner.run(job)
            except Exception as error:  # noqa: BLE001 - a bug: send it to the parent with its trace
                report = SessionReport(job.device_id, SessionOutcome("ERROR", retry_after=60.0, detail=str(error)),
                                       job.last_contribution, worker_pid=os.getpid(),
                                       fatal=f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=8)}")
            results.put(("report", report))

    pool = [threading.Thread(target=serve, name=f"device-session-{i}", daemon=True) for i in range(threads)]
    for thread in pool:
        thread.start()
    try:
        for thread in pool:
            thread.join()
    finally:
        runner.close()
