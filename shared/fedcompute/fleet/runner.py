"""Run many simulated devices against a server, concurrently, with progress.

Devices are scheduled like ODP's ``TrainingInterval``: after a session a device waits its
minimum interval (recurrent) or retires (one-time); after a rejection it waits a random
time inside the server's retry window. Simulated waits are real seconds × ``time_scale``.
"""
from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fedcompute.errors import FedComputeError
from fedcompute.fleet.device import PlanCache, SessionOutcome, SimulatedDevice
from fedcompute.fleet.protocol import DeviceHttpClient

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
