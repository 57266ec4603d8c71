"""Device-side rules of the fleet simulator (no server needed)."""
from __future__ import annotations

import random
import time

import pytest

from fedcompute.errors import FedComputeError
from fedcompute.fleet.device import SessionOutcome, SimulatedDevice, TrainingExampleOutput
from fedcompute.fleet.runner import Fleet, TrainingInterval
from fedcompute.proto import eligibility_pb2, task_assignment_pb2


class _NoApp:
    def on_training_example(self, population_name, task_name, resumption_token):
        return TrainingExampleOutput()


def _assignment(current: int, separation: int) -> task_assignment_pb2.TaskAssignment:
    info = eligibility_pb2.EligibilityTaskInfo()
    policy = info.eligibility_policies.add(name="min_sep")
    policy.min_sep_policy.current_index = current
    policy.min_sep_policy.minimum_separation = separation
    return task_assignment_pb2.TaskAssignment(task_name="/population/p/task/1", eligibility_task_info=info)


@pytest.mark.parametrize(
    "last,current,separation,eligible",
    [(None, 1, 3, True), (1, 2, 3, False), (1, 3, 3, False), (1, 4, 3, True), (5, 5, 0, True), (5, 6, 1, True)],
)
def test_minimum_separation_is_decided_on_the_device(last, current, separation, eligible):
    device = SimulatedDevice(0, _NoApp())
    if last is not None:
        device.last_contribution["/population/p/task/1"] = last
    assert device._eligible(_assignment(current, separation)) is eligible


class _ScriptedDevice(SimulatedDevice):
    """Replays outcomes instead of talking to a server."""

    def __init__(self, device_id: int, outcomes: list[SessionOutcome]) -> None:
        super().__init__(device_id, _NoApp(), rng=random.Random(device_id))
        self.outcomes = outcomes
        self.times: list[float] = []

    def run_session(self, client, population, cache):
        self.times.append(time.monotonic())
        return self.outcomes.pop(0) if self.outcomes else SessionOutcome("REJECTED", retry_after=1e6)


def test_rejected_devices_wait_their_retry_window_scaled():
    device = _ScriptedDevice(0, [SessionOutcome("REJECTED", retry_after=50.0), SessionOutcome("UPLOADED")])
    fleet = Fleet([device], client=None, population="p", workers=1, time_scale=0.004,
                  interval=TrainingInterval(scheduling_mode=1))
    stats = fleet.run(lambda s: s.outcomes["UPLOADED"] >= 1, timeout_s=10)
    assert stats.outcomes == {"REJECTED": 1, "UPLOADED": 1}
    assert device.times[1] - device.times[0] >= 50.0 * 0.004 * 0.9


def test_one_time_devices_retire_after_uploading_and_recurrent_ones_return():
    one_time = [_ScriptedDevice(i, [SessionOutcome("UPLOADED"), SessionOutcome("UPLOADED")]) for i in range(3)]
    stats = Fleet(one_time, client=None, population="p", workers=2, time_scale=0.001,
                  interval=TrainingInterval(scheduling_mode=1)).run(lambda s: False, timeout_s=10)
    assert stats.outcomes["UPLOADED"] == 3  # each once, then the run ends by itself
    recurrent = [_ScriptedDevice(i, [SessionOutcome("UPLOADED")] * 3) for i in range(2)]
    stats = Fleet(recurrent, client=None, population="p", workers=2, time_scale=0.001,
                  interval=TrainingInterval(minimum_interval_s=1.0)).run(
        lambda s: s.outcomes["UPLOADED"] >= 6, timeout_s=10)
    assert stats.outcomes["UPLOADED"] >= 6


def test_transient_errors_back_off_and_are_recorded():
    class Flaky(_ScriptedDevice):
        def run_session(self, client, population, cache):
            if not self.times:
                self.times.append(time.monotonic())
                raise FedComputeError("server unavailable")
            return super().run_session(client, population, cache)

    device = Flaky(0, [SessionOutcome("UPLOADED")])
    stats = Fleet([device], client=None, population="p", workers=1, time_scale=0.001,
                  interval=TrainingInterval(scheduling_mode=1)).run(lambda s: s.outcomes["UPLOADED"] >= 1, timeout_s=10)
    assert stats.outcomes["ERROR"] == 1 and stats.errors == ["server unavailable"]


def test_fleet_needs_devices_and_times_out():
    with pytest.raises(FedComputeError, match="at least one device"):
        Fleet([], client=None, population="p")
    slow = [_ScriptedDevice(0, [])]
    with pytest.raises(FedComputeError, match="did not finish"):
        Fleet(slow, client=None, population="p", time_scale=1.0).run(lambda s: False, timeout_s=0.5, poll_s=0.05)


def test_devices_get_disjoint_partitions_with_their_own_seeded_rng():
    import numpy as np

    from fedcompute.fleet.population import make_devices, partition_indices

    labels = np.repeat(np.arange(10), 30)
    images = np.arange(len(labels), dtype=np.float32).reshape(-1, 1, 1, 1)
    for partition in ("dirichlet", "shards", "iid"):
        devices = make_devices(images, labels, 10, partition, seed=3, version_code="7")
        seen = np.concatenate([d.app.features.ravel() for d in devices]).astype(int)
        assert len(seen) == len(set(seen.tolist()))  # every example at most once
        assert all(d.version_code == "7" for d in devices)
        assert len({d.rng.random() for d in devices}) == len(devices)  # independent per-device streams
    assert [p.tolist() for p in partition_indices(labels, 5, "iid", seed=1)] == \
        [p.tolist() for p in partition_indices(labels, 5, "iid", seed=1)]
    with pytest.raises(ValueError, match="unknown partition"):
        partition_indices(labels, 5, "round_robin")


def test_the_fleet_removes_its_plan_cache_directory_on_exit():
    from pathlib import Path

    from fedcompute.fleet import DeviceHttpClient

    with Fleet([SimulatedDevice(0, None, rng=random.Random(0))], DeviceHttpClient("http://127.0.0.1:9"), "p") as fleet:
        root = Path(fleet.cache._root)
        assert root.is_dir()
    assert not root.exists()



def test_an_array_app_encodes_its_log_once_per_spec(monkeypatch):
    import numpy as np

    from fedcompute.data import examples
    from fedcompute.fleet.device import ArrayApp

    calls = []
    real = examples.encode_examples
    monkeypatch.setattr(examples, "encode_examples", lambda *a: calls.append(a[0]) or real(*a))
    app = ArrayApp(np.arange(12, dtype=np.float32).reshape(3, 4), np.array([0, 1, 2]))
    app.spec = examples.ExampleSpec.type1((4,))
    first = app.on_training_example("p", "t", None)
    again = app.on_training_example("p", "t", None)
    assert again.training_examples == first.training_examples and len(first.training_examples) == 3
    assert len(calls) == 1
    again.training_examples.clear()  # a caller's list is its own
    assert len(app.on_training_example("p", "t", None).training_examples) == 3
    app.spec = examples.ExampleSpec.type1((2, 2))  # another plan's layout: encoded again
    app.on_training_example("p", "t", None)
    assert len(calls) == 2


def test_first_check_ins_spread_uniformly_over_the_window_or_all_at_once() -> None:
    import heapq
    import statistics

    from fedcompute.fleet.runner import first_check_ins

    heap = first_check_ins(10_000, 100.0, 120.0, seed=1)
    times = [heapq.heappop(heap) for _ in range(len(heap))]
    assert sorted(idx for _, idx in times) == list(range(10_000))  # every device once
    assert times[0][0] >= 100.0 and times[-1][0] <= 220.0
    per_half = sum(1 for t, _ in times if t < 160.0)
    assert 4_700 < per_half < 5_300 and abs(statistics.mean(t for t, _ in times) - 160.0) < 2.0
    burst = first_check_ins(50, 7.0, 0.0, seed=1)
    assert max(t for t, _ in burst) < 7.01 and sorted(i for _, i in burst) == list(range(50))
    assert first_check_ins(50, 7.0, 0.0, seed=1) == burst  # seeded
