"""A load generator: N synthetic devices speaking the ODP protocol, no TensorFlow.

Each device checks in, downloads the plan and the checkpoint, reports COMPLETED and
uploads a valid update of the checkpoint's trainable shapes (zeros plus the metric
statistics the task expects), through :class:`fedcompute.fleet.protocol.DeviceHttpClient`.
Each synthetic device speaks the protocol the server requires by default: it has its own
Ed25519 key (a new identity per session) that signs its check-in and report-result, and its
upload is HPKE-sealed to the key its assignment names. Both are cheap next to the HTTP
calls (an Ed25519 signature and an HPKE seal of a small update take tens of microseconds).
Threads, not processes: a device is a few HTTP calls, so one Python process keeps the
server busy long before it runs out of CPU (``benchmarks/bench_load.py`` measures the
generator against a do-nothing function to show its ceiling).

The report is plain JSON: per endpoint the number of calls, calls per second and
p50/p95/p99 latency in ms; rejections by reason; uploads per second.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedcompute.errors import FedComputeError
from fedcompute.fleet.protocol import DeviceHttpClient, Rejected, require_uri
from fedcompute.identity import DeviceKey
from fedcompute.proto import task_assignment_pb2

COMPLETED = task_assignment_pb2.ReportResultRequest.Result.COMPLETED


@dataclass(frozen=True)
class LoadConfig:
    """What to run. ``protocol``: ``full`` (check-in to upload) or ``check-in`` (check-in only)."""

    url: str
    population: str
    devices: int
    concurrency: int = 32
    protocol: str = "full"
    version_code: str = "341912000"
    metrics: tuple[str, ...] = ("loss",)
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.devices < 1 or self.concurrency < 1:
            raise ValueError(f"devices and concurrency must be >= 1, got {self.devices} and {self.concurrency}")
        if self.protocol not in ("full", "check-in"):
            raise ValueError(f"protocol must be 'full' or 'check-in', got {self.protocol!r}")


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99 of ``samples`` (seconds) in ms; zeros when empty."""
    if not samples:
        return {"p50_ms": 0.0, "p95_ms": 0.0, "p99_ms": 0.0}
    p50, p95, p99 = np.percentile(np.asarray(samples) * 1000.0, [50, 95, 99])
    return {"p50_ms": round(float(p50), 2), "p95_ms": round(float(p95), 2), "p99_ms": round(float(p99), 2)}


class _Recorder:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.rejections: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.uploads = 0
        self.first_upload = self.last_upload = 0.0

    def timed(self, endpoint: str, call: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        try:
            return call()
        finally:
            elapsed = time.perf_counter() - started
            with self._lock:
                self.latencies[endpoint].append(elapsed)

    def count(self, table: str, key: str) -> None:
        with self._lock:
            getattr(self, table)[key] += 1

    def uploaded(self) -> None:
        t = time.time()
        with self._lock:
            self.uploads += 1
            self.first_upload = self.first_upload or t
            self.last_upload = t


class _UpdateFactory:
    """One valid update per checkpoint URL: zeros of the trainable shapes, finite statistics."""

    def __init__(self, metrics: Sequence[str]) -> None:
        self._metrics = tuple(metrics)
        self._lock = threading.Lock()
        self._payloads: dict[str, bytes] = {}

    def payload(self, checkpoint_url: str, checkpoint: bytes) -> bytes:
        with self._lock:
            if checkpoint_url not in self._payloads:
                self._payloads[checkpoint_url] = self._build(checkpoint)
            return self._payloads[checkpoint_url]

    def _build(self, checkpoint: bytes) -> bytes:
        from fedcompute.learning import metric_stats
        from fedcompute.learning.tensor_codec import decode_bundle, encode_client_update

        named, _ = decode_bundle(checkpoint)
        trainable = [(n, a) for n, a in named if n.startswith("trainable/")] or named
        delta = [(n, np.zeros_like(a)) for n, a in trainable]
        names = list(dict.fromkeys((*self._metrics, "loss", "num_examples")))
        stats = metric_stats.flatten_stats({m: metric_stats.zero_stats(m) for m in names})
        return encode_client_update(delta, 1, stats, compress=False)


def run_load(config: LoadConfig, *, client: DeviceHttpClient | None = None,
             progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run ``config.devices`` device sessions, ``config.concurrency`` at a time; the JSON report."""
    client = client or DeviceHttpClient(config.url, timeout=config.timeout_s)
    recorder, updates = _Recorder(), _UpdateFactory(config.metrics)
    done = [0]
    done_lock = threading.Lock()

    def session(_: int) -> None:
        try:
            _device_session(config, client, recorder, updates)
        except FedComputeError as error:
            recorder.count("errors", type(error).__name__)
        with done_lock:
            done[0] += 1
            if progress is not None:
                progress(done[0])

    started = time.perf_counter()
    with ThreadPoolExecutor(config.concurrency, thread_name_prefix="load-device") as pool:
        list(pool.map(session, range(config.devices)))
    wall = time.perf_counter() - started
    endpoints = {
        name: {"calls": len(samples), "per_s": round(len(samples) / wall, 1), **percentiles(samples)}
        for name, samples in sorted(recorder.latencies.items())
    }
    upload_span = recorder.last_upload - recorder.first_upload
    return {
        "config": dataclasses.asdict(config),
        "wall_s": round(wall, 2),
        "sessions_per_s": round(config.devices / wall, 1),
        "endpoints": endpoints,
        "rejections": dict(recorder.rejections),
        "errors": dict(recorder.errors),
        "uploads": recorder.uploads,
        "uploads_per_s": round(recorder.uploads / upload_span, 1) if upload_span > 0 else 0.0,
    }


def _device_session(config: LoadConfig, client: DeviceHttpClient, recorder: _Recorder,
                    updates: _UpdateFactory) -> None:
    key = DeviceKey.generate()  # this synthetic device's identity: signs its check-in and report
    assignment = recorder.timed("check_in", lambda: client.create_task_assignment(
        config.population, config.version_code, key=key))
    if isinstance(assignment, Rejected):
        recorder.count("rejections", f"check_in:{assignment.reason}")
        return
    if config.protocol == "check-in":
        return
    plan_url = require_uri(assignment.plan, "plan")
    checkpoint_url = require_uri(assignment.init_checkpoint, "init_checkpoint")
    recorder.timed("plan_download", lambda: client.download(plan_url))
    checkpoint = recorder.timed("checkpoint_download", lambda: client.download(checkpoint_url))
    payload = updates.payload(checkpoint_url, checkpoint)
    instruction = recorder.timed("report_result",
                                 lambda: client.report_result(assignment.self_uri, COMPLETED, key=key))
    if isinstance(instruction, Rejected):
        recorder.count("rejections", f"report_result:{instruction.reason}")
        return
    if instruction is None:
        recorder.count("errors", "no upload instruction")
        return
    # Sealed to the assignment's upload key (the server refuses plaintext updates by default).
    status = recorder.timed("upload", lambda: client.upload(instruction, payload, assignment))
    if status in (200, 201):
        recorder.uploaded()
    else:
        recorder.count("rejections", f"upload:HTTP {status}")


def round_stages(store: Any, population: str, task_id: int, round_number: int) -> dict[str, float]:
    """Per-stage seconds of one round from its record (collect, close+aggregate+write, next open)."""
    from fedcompute.tasks.records import RoundKey

    round_record = store.get_round(RoundKey(population, task_id, round_number))
    if round_record is None:
        return {}
    stages = {"status": round_record.status.value}
    if round_record.aggregating_time:
        stages["collect_s"] = round(round_record.aggregating_time - round_record.created_time, 2)
    if round_record.completed_time and round_record.aggregating_time:
        stages["aggregate_and_write_s"] = round(round_record.completed_time - round_record.aggregating_time, 2)
    following = store.get_round(RoundKey(population, task_id, round_number + 1))
    if following is not None and round_record.completed_time:
        stages["next_round_open_s"] = round(max(0.0, following.created_time - round_record.completed_time), 2)
    return stages


def peak_rss_mib(pids: dict[str, int]) -> dict[str, float]:
    """Peak resident set (VmHWM) of each named process, in MiB (Linux; 0 when unreadable)."""
    peaks = {}
    for name, pid in pids.items():
        try:
            with open(f"/proc/{pid}/status") as status:
                line = next(row for row in status if row.startswith("VmHWM:"))
            peaks[name] = round(int(line.split()[1]) / 1024, 1)
        except (OSError, StopIteration, ValueError):
            peaks[name] = 0.0
    return peaks
