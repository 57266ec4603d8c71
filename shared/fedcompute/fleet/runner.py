"""Run many simulated devices against a server, concurrently, with progress.

Devices are scheduled like ODP's ``TrainingInterval``: after a session a device waits its
minimum interval (recurrent) or retires (one-time); after a rejection it waits a random
time inside the server's retry window. Simulated waits are real seconds × ``time_scale``.
"""
from __future__ import annotations

import heapq
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from queue import Empty
from typing import Any

from fedcompute.errors import FedComputeError
from fedcompute.fleet.device import PlanCache, SessionOutcome, SimulatedDevice
from fedcompute.fleet.protocol import DeviceHttpClient
from fedcompute.fleet.workers import (
    PROTOCOL_STEPS,
    RunnerFactory,
    SessionJob,
    SessionReport,
    worker_main,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingInterval:
    """ODP's TrainingInterval: scheduling mode 1 = one time, 2 = recurrent."""

    minimum_interval_s: float = 10.0
    scheduling_mode: int = 2

    @property
    def recurrent(self) -> bool:
        return self.scheduling_mode == 2


@dataclass
class FleetStats:
    """Counts by session outcome, plus the uploads per (task, round)."""

    outcomes: Counter = field(default_factory=Counter)
    uploads: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    sessions: int = 0
    started: float = field(default_factory=time.monotonic)

    def record(self, outcome: SessionOutcome) -> None:
        self.sessions += 1
        self.outcomes[outcome.status] += 1
        if outcome.status == "UPLOADED":
            self.uploads[(outcome.task_id, outcome.round_number)] += 1


class Fleet:
    """A set of devices checking in to one population."""

    def __init__(
        self,
        devices: Sequence[SimulatedDevice],
        client: DeviceHttpClient,
        population: str,
        *,
        workers: int = 2,
        interval: TrainingInterval = TrainingInterval(),
        time_scale: float = 0.01,
        cache: PlanCache | None = None,
    ) -> None:
        if not devices:
            raise FedComputeError("a fleet needs at least one device", hint="pass --devices N with N >= 1")
        self.devices = list(devices)
        self.client = client
        self.population = population
        self.workers = max(1, workers)
        self.interval = interval
        self.time_scale = time_scale
        self._owns_cache = cache is None
        self.cache = cache or PlanCache()
        self.stats = FleetStats()
        self._lock = threading.Condition()
        self._queue: list[tuple[float, int]] = []
        self._stop = threading.Event()

    def close(self) -> None:
        """Remove the plan cache's temporary directory (if this fleet made the cache)."""
        if self._owns_cache:
            self.cache.close()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(
        self,
        until: Callable[[FleetStats], bool],
        *,
        timeout_s: float = 3600.0,
        on_session: Callable[[SessionOutcome, FleetStats], None] | None = None,
        poll_s: float = 0.5,
    ) -> FleetStats:
        """Run sessions until ``until(stats)`` is true (checked after sessions and every ``poll_s``)."""
        start = time.monotonic()
        rng = self.devices[0].rng
        order = list(range(len(self.devices)))
        rng.shuffle(order)
        self._queue = [(start + i * 1e-4, idx) for i, idx in enumerate(order)]
        heapq.heapify(self._queue)
        threads = [threading.Thread(target=self._work, args=(until, on_session), daemon=True, name=f"device-{i}")
                   for i in range(self.workers)]
        for thread in threads:
            thread.start()
        try:
            while not self._stop.is_set():
                if until(self.stats):
                    break
                if time.monotonic() - start > timeout_s:
                    raise FedComputeError(f"the fleet did not finish within {timeout_s:.0f} s",
                                          hint="check `fedcompute status` and the function logs")
                if all(not t.is_alive() for t in threads):
                    break
                self._stop.wait(poll_s)
        finally:
            self._stop.set()
            with self._lock:
                self._lock.notify_all()
            for thread in threads:
                thread.join(timeout=120)
        return self.stats

    def _next_device(self) -> int | None:
        with self._lock:
            while not self._stop.is_set():
                if not self._queue:
                    return None
                ready_at, idx = self._queue[0]
                delay = ready_at - time.monotonic()
                if delay <= 0:
                    heapq.heappop(self._queue)
                    return idx
                self._lock.wait(timeout=min(delay, 0.5))
            return None

    def _reschedule(self, idx: int, outcome: SessionOutcome) -> None:
        if outcome.status == "UPLOADED" and not self.interval.recurrent:
            return  # one-time schedule: done
        wait = outcome.retry_after if outcome.status == "REJECTED" else self.interval.minimum_interval_s
        with self._lock:
            heapq.heappush(self._queue, (time.monotonic() + wait * self.time_scale, idx))
            self._lock.notify()

    def _work(self, until: Callable[[FleetStats], bool],
              on_session: Callable[[SessionOutcome, FleetStats], None] | None) -> None:
        while not self._stop.is_set():
            idx = self._next_device()
            if idx is None:
                return
            device = self.devices[idx]
            try:
                outcome = device.run_session(self.client, self.population, self.cache)
            except FedComputeError as error:  # transient server trouble: back off like a device
                log.warning("device %d: %s", device.device_id, error)
                outcome = SessionOutcome("ERROR", retry_after=60.0, detail=str(error))
                with self._lock:
                    self.stats.errors.append(str(error)[:300])
            with self._lock:
                self.stats.record(outcome)
            if on_session is not None:
                on_session(outcome, self.stats)
            self._reschedule(idx, outcome)
            if until(self.stats):
                self._stop.set()


def first_check_ins(num_devices: int, start: float, within_s: float, seed: int) -> list[tuple[float, int]]:
    """The devices' first check-ins as a heap of ``(time, device)``: uniformly at random over
    ``within_s`` real seconds from ``start``, or (``within_s`` 0) all due at once in a shuffled order."""
    order = list(range(num_devices))
    rng = random.Random(seed)
    rng.shuffle(order)
    heap = [(start + (rng.uniform(0.0, within_s) if within_s > 0 else i * 1e-4), idx) for i, idx in enumerate(order)]
    heapq.heapify(heap)
    return heap


@dataclass
class FleetCost:
    """Where the fleet's time went, summed over sessions (the per-device protocol cost)."""

    sessions: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    compute_s: float = 0.0
    compute_cpu_s: float = 0.0
    steps_s: Counter = field(default_factory=Counter)
    origin_downloads: int = 0
    worker_pids: set[int] = field(default_factory=set)

    def add(self, report: SessionReport) -> None:
        self.sessions += 1
        self.wall_s += report.wall_s
        self.cpu_s += report.cpu_s
        self.compute_s += report.compute_s
        self.compute_cpu_s += report.compute_cpu_s
        self.steps_s.update(report.steps_s)
        self.origin_downloads += report.downloads
        self.worker_pids.add(report.worker_pid)

    def per_session_ms(self) -> dict[str, float]:
        """Mean wall milliseconds per session: each protocol step, training, and the whole session."""
        n = max(self.sessions, 1)
        out = {step: 1000 * self.steps_s.get(step, 0.0) / n for step in PROTOCOL_STEPS}
        out.update(training=1000 * self.compute_s / n, session=1000 * self.wall_s / n)
        return out

    @property
    def cpu_share_outside_training(self) -> float:
        """Share of the sessions' thread CPU time not spent training (protocol, encoding, caching)."""
        return 1.0 - self.compute_cpu_s / self.cpu_s if self.cpu_s > 0 else float("nan")


class ProcessFleet:
    """Thousands of devices served by a few worker processes (see :mod:`fedcompute.fleet.workers`).

    This process keeps every device's schedule and contribution history (ODP's retry
    windows, TrainingInterval and minimum separation stay per device); worker processes
    each load the model once and run sessions for whichever devices are due. At most
    ``processes × threads`` sessions run at once.
    """

    def __init__(
        self,
        num_devices: int,
        runner_factory: RunnerFactory,
        *,
        processes: int = 2,
        threads: int = 6,
        interval: TrainingInterval = TrainingInterval(),
        time_scale: float = 0.01,
        seed: int = 0,
        start_method: str = "spawn",
        progress: str | None = None,
        first_check_in_within_s: float = 0.0,
    ) -> None:
        if num_devices < 1:
            raise FedComputeError("a fleet needs at least one device", hint="pass --devices N with N >= 1")
        self.num_devices = num_devices
        self.runner_factory = runner_factory
        self.processes = max(1, processes)
        self.threads = max(1, threads)
        self.interval = interval
        self.time_scale = time_scale
        self.seed = seed
        self.start_method = start_method
        self.progress = progress
        # Simulated seconds over which the devices' first check-ins are spread (uniformly at
        # random, as their job schedulers fire); 0: all at once, in a shuffled order.
        self.first_check_in_within_s = first_check_in_within_s
        self.stats = FleetStats()
        self.cost = FleetCost()
        self.rounds_seen = 0
        self._sessions_run = [0] * num_devices
        self._history: list[tuple[tuple[str, int], ...]] = [()] * num_devices
        self._workers: list[Any] = []
        self._jobs: Any = None
        self._results: Any = None

    def run(
        self,
        until: Callable[[FleetStats], bool],
        *,
        timeout_s: float = 3600.0,
        on_session: Callable[[SessionOutcome, FleetStats], None] | None = None,
        poll_s: float = 0.5,
    ) -> FleetStats:
        """Run sessions until ``until(stats)`` is true (checked every ``poll_s``) or no device is left."""
        self.start()
        jobs, results, workers = self._jobs, self._results, self._workers
        start = time.monotonic()
        queue_ = first_check_ins(self.num_devices, start, self.first_check_in_within_s * self.time_scale, self.seed)
        bar = _ProgressBar(self.progress) if self.progress else None
        in_flight, ready = 0, 0
        last_check = 0.0
        try:
            while True:
                now = time.monotonic()
                if now - last_check >= poll_s:
                    last_check = now
                    if until(self.stats):
                        break
                    if now - start > timeout_s:
                        raise FedComputeError(f"the fleet did not finish within {timeout_s:.0f} s",
                                              hint="check `fedcompute status` and the function logs")
                    if not any(w.is_alive() for w in workers):
                        raise FedComputeError("every fleet worker process exited",
                                              hint="see the worker's error above; rerun with fewer --processes")
                if ready:  # dispatch as soon as one worker is up
                    while in_flight < ready * self.threads and queue_ and queue_[0][0] <= now:
                        _, idx = heapq.heappop(queue_)
                        jobs.put(SessionJob(idx, self._sessions_run[idx], self._history[idx]))
                        in_flight += 1
                if not queue_ and in_flight == 0 and ready:
                    break  # every device retired (one-time schedules)
                wait = poll_s if not queue_ else max(0.0, min(poll_s, queue_[0][0] - now))
                try:
                    kind, payload = results.get(timeout=max(wait, 0.005))
                except Empty:
                    continue
                if kind == "startup":
                    raise FedComputeError(f"a fleet worker process failed to start: {payload}")
                if kind == "ready":
                    ready += 1
                    continue
                in_flight -= 1
                self._record(payload, queue_, on_session, bar)
        finally:
            self.stop()
            if bar is not None:
                bar.close()
        return self.stats

    def start(self) -> None:
        """Start the worker processes (they load TensorFlow and the runner); ``run`` does it if needed.

        Starting them early (e.g. while the task is being built) hides their start-up time.
        """
        if self._workers:
            return
        import multiprocessing

        context: Any = multiprocessing.get_context(self.start_method)
        self._jobs, self._results = context.Queue(), context.Queue()
        self._workers = [context.Process(target=worker_main,
                                         args=(self.runner_factory, self.threads, self._jobs, self._results),
                                         name=f"fleet-worker-{i}", daemon=True) for i in range(self.processes)]
        for worker in self._workers:
            worker.start()

    def stop(self) -> None:
        """Ask the workers to finish their sessions and exit; terminate the ones that do not."""
        if not self._workers:
            return
        for _ in range(self.processes * self.threads):
            self._jobs.put(None)
        for worker in self._workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.terminate()
                worker.join(timeout=5)
        self._jobs.close()
        self._results.close()
        self._workers = []

    def _record(self, report: SessionReport, queue_: list[tuple[float, int]],
                on_session: Callable[[SessionOutcome, FleetStats], None] | None,
                bar: _ProgressBar | None) -> None:
        if report.fatal:
            raise FedComputeError(f"device {report.device_id}'s session crashed in a worker: {report.fatal}")
        outcome = report.outcome
        idx = report.device_id
        self._sessions_run[idx] += 1
        self._history[idx] = report.last_contribution
        self.stats.record(outcome)
        self.cost.add(report)
        if outcome.status == "ERROR":
            self.stats.errors.append(outcome.detail[:300])
        self.rounds_seen = max(self.rounds_seen, outcome.round_number)
        if on_session is not None:
            on_session(outcome, self.stats)
        if bar is not None:
            bar.update(self.stats, self.rounds_seen)
        if outcome.status == "UPLOADED" and not self.interval.recurrent:
            return
        wait = outcome.retry_after if outcome.status in ("REJECTED", "ERROR") else self.interval.minimum_interval_s
        heapq.heappush(queue_, (time.monotonic() + wait * self.time_scale, idx))


class _ProgressBar:
    """Sessions done, with devices/s (sessions completed per second) and the latest round."""

    def __init__(self, desc: str) -> None:
        from tqdm import tqdm

        self._bar = tqdm(desc=desc, unit="session", dynamic_ncols=True)
        self._window: list[tuple[float, int]] = []

    def update(self, stats: FleetStats, round_number: int) -> None:
        now = time.monotonic()
        self._window.append((now, stats.sessions))
        while len(self._window) > 2 and now - self._window[0][0] > 10.0:
            self._window.pop(0)
        (t0, n0) = self._window[0]
        rate = (stats.sessions - n0) / (now - t0) if now > t0 else 0.0
        self._bar.update(1)
        self._bar.set_postfix({"round": round_number, "devices/s": f"{rate:.1f}",
                               "uploads": stats.outcomes["UPLOADED"]}, refresh=False)

    def write(self, text: str) -> None:
        self._bar.write(text)

    def close(self) -> None:
        self._bar.close()
