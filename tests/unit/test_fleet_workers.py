"""The worker-process fleet: processes share the work, devices keep their own schedule and
history, plans and checkpoints are fetched once per process (no server: scripted runners)."""
from __future__ import annotations

import os
import threading
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from fedcompute.errors import FedComputeError
from fedcompute.fleet import device as device_module
from fedcompute.fleet.device import PlanCache
from fedcompute.fleet.population import PopulationSpec
from fedcompute.fleet.runner import ProcessFleet, TrainingInterval
from fedcompute.learning.tensor_codec import encode_bundle
from fedcompute.tensor_spec import TensorSpec
from support.fleet_fakes import ScriptedRunnerFactory


def _details(fleet_outcomes: list) -> list[dict[str, str]]:
    return [dict(part.split("=") for part in o.detail.split()) for o in fleet_outcomes]


def test_worker_processes_share_the_devices_and_load_the_model_once_each() -> None:
    outcomes = []
    fleet = ProcessFleet(60, ScriptedRunnerFactory(), processes=2, threads=3, time_scale=0.0,
                         interval=TrainingInterval(minimum_interval_s=0.0))
    # Sessions start as soon as one worker is up; run until the other has served some too.
    stats = fleet.run(lambda s: s.outcomes["UPLOADED"] >= 180 and len(fleet.cost.worker_pids) == 2, timeout_s=60,
                      poll_s=0.05, on_session=lambda o, s: outcomes.append(o))
    assert stats.outcomes["UPLOADED"] >= 180
    assert len(fleet.cost.worker_pids) == 2 and os.getpid() not in fleet.cost.worker_pids
    details = _details(outcomes)
    assert {d["loads"] for d in details} == {"1"}  # one model load per process, whatever the sessions
    # Each device's history travelled with it: its n-th session saw its n-1 earlier uploads.
    per_device = Counter()
    for o, d in zip(outcomes, details):
        assert int(d["history"]) == o.round_number - 1
        per_device[o.round_number] += 1
    assert fleet.cost.sessions == stats.sessions and fleet.cost.per_session_ms()["check_in"] == pytest.approx(0.5)
    assert fleet.cost.cpu_share_outside_training == pytest.approx(0.25)


def test_rejected_devices_come_back_after_their_scaled_retry_window() -> None:
    outcomes = []
    fleet = ProcessFleet(8, ScriptedRunnerFactory(reject_every=2, retry_after_s=100.0), processes=2, threads=2,
                         time_scale=0.003, interval=TrainingInterval(scheduling_mode=1))
    stats = fleet.run(lambda s: False, timeout_s=60, poll_s=0.05, on_session=lambda o, s: outcomes.append(o))
    # One-time schedule: every device uploads once, then the run ends by itself.
    assert stats.outcomes == {"REJECTED": 4, "UPLOADED": 8}
    times: dict[int, list[float]] = defaultdict(list)
    for o, d in zip(outcomes, _details(outcomes)):
        times[o.round_number].append(float(d["t"]))
    rejected_at = min(float(d["t"]) for o, d in zip(outcomes, _details(outcomes)) if o.status == "REJECTED")
    retried_at = min(float(d["t"]) for o, d in zip(outcomes, _details(outcomes))
                     if o.status == "UPLOADED" and o.round_number == 2)  # a rejected device's 2nd session
    assert retried_at - rejected_at >= 100.0 * 0.003 * 0.9


def test_a_crash_in_a_worker_stops_the_fleet_with_its_trace() -> None:
    fleet = ProcessFleet(4, ScriptedRunnerFactory(crash_device=2), processes=1, threads=2, time_scale=0.0)
    with pytest.raises(FedComputeError, match="ZeroDivisionError: scripted crash"):
        fleet.run(lambda s: False, timeout_s=60, poll_s=0.05)


def test_population_spec_rebuilds_the_same_device_data_in_any_process() -> None:
    spec = PopulationSpec(num_devices=50, dataset="digits", examples_per_device=6, seed=4)
    x, y = spec.examples(7)
    assert x.shape == (6, 28, 28, 1) and y.shape == (6, 1)
    again = PopulationSpec(num_devices=50, dataset="digits", examples_per_device=6, seed=4)
    np.testing.assert_array_equal(again.examples(7)[0], x)
    firsts = {spec.examples(i)[0].tobytes() for i in range(50)}
    assert len(firsts) == 50  # disjoint slices
    with pytest.raises(ValueError, match="examples_per_device needs partition 'iid'"):
        PopulationSpec(num_devices=5, partition="shards", examples_per_device=6)


class _CountingClient:
    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects
        self.downloads: Counter = Counter()
        self.lock = threading.Lock()

    def download(self, url: str) -> bytes:
        with self.lock:
            self.downloads[url] += 1
        return self.objects[url]


def test_plan_cache_fetches_each_plan_and_round_checkpoint_once_like_a_cdn(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Path) -> None:
    unpacked: list[Path] = []
    weights = (TensorSpec("dense/kernel", (3, 2), "float32"),)

    class _Plan:
        def __init__(self) -> None:
            self.weights = weights

    def unpack(data: bytes, target: Path) -> _Plan:
        target.mkdir()
        unpacked.append(target)
        return _Plan()

    monkeypatch.setattr(device_module, "unpack_client_plan", unpack)
    checkpoints = {f"ckpt{r}": encode_bundle([("dense/kernel", np.full((3, 2), r, np.float32))]) for r in range(3)}
    client = _CountingClient({"plan": b"zip", **checkpoints})
    cache = PlanCache(tmp_path)

    def device_session(round_number: int) -> None:
        plan = cache.plan("plan", client)
        (kernel,) = cache.checkpoint(f"ckpt{round_number}", client, plan)
        assert kernel[0, 0] == round_number

    for round_number in range(3):
        threads = [threading.Thread(target=device_session, args=(round_number,)) for _ in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert client.downloads == {"plan": 1, "ckpt0": 1, "ckpt1": 1, "ckpt2": 1}  # 60 sessions, 4 fetches
    assert len(unpacked) == 1  # the plan (and its model) unpacked once for all devices of the process
    assert [p.name for p in tmp_path.iterdir()] == ["plan0"]  # one directory, not one per device
