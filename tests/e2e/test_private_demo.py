"""End to end: a small `make demo PRIVATE=1` on the session stack (worker-process fleet, DP build).

The demo's summary must carry, for every round, the test accuracy and an ε that equals an
independent dp_accounting computation (Poisson-sampled Gaussian, PLD accountant) to 1e-6;
the private task is built without --skip_dp_check, the baseline run beside it has no noise.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedcompute.private_demo import PrivateDemoOptions, run_private_demo
from support.stack_plugin import StackHandle

pytestmark = pytest.mark.e2e

DEVICES, GOAL, ROUNDS, NOISE = 240, 24, 3, 1.0


def independent_epsilon(rounds: int, delta: float) -> float:
    import dp_accounting
    from dp_accounting import pld

    accountant = pld.PLDAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(GOAL / DEVICES, dp_accounting.GaussianDpEvent(NOISE)), rounds))
    return float(accountant.get_epsilon(delta))


def test_small_private_demo_records_accuracy_and_exact_epsilon_per_round(local_stack: StackHandle,
                                                                        tmp_path: Path) -> None:
    options = PrivateDemoOptions(devices=DEVICES, examples_per_device=6, report_goal=GOAL, rounds=ROUNDS, noise=NOISE,
                                 target_epsilon=10.0, processes=2, threads=4, time_scale=0.01,
                                 out_dir=tmp_path / "out", timeout_s=600)
    summary = run_private_demo(options, stack=local_stack.stack)
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["population_size"] == DEVICES and saved["delta"] == pytest.approx(1 / DEVICES)
    private, baseline = saved["private"], saved["non_private"]
    assert [r["round"] for r in private["rounds"]] == list(range(1, ROUNDS + 1))
    for row in private["rounds"]:
        assert abs(row["epsilon"] - independent_epsilon(row["round"], 1 / DEVICES)) <= 1e-6
        assert 0.0 < row["test_accuracy"] <= 1.0
    assert saved["final_epsilon"] == private["rounds"][-1]["epsilon"] <= 10.0
    assert saved["goals"]["epsilon_at_most_5"] == (saved["final_epsilon"] <= 5.0)
    # Built without --skip_dp_check: the report carries the check's epsilon and its assumptions.
    assert "--skip_dp_check" not in Path(tmp_path / "out" / "task_config_private.pbtxt").read_text()
    assert "q = report_goal / population_size = 24/240" in private["build_report"]
    assert "noise_seed" not in (tmp_path / "out" / "task_config_private.pbtxt").read_text()
    # The non-private run of the same task (in-process by default): same rounds, epsilon
    # infinite (None), its own trained weights (a different accuracy curve from the private run).
    assert baseline["label"] == "non-private (in-process reference)" and baseline["noise_multiplier"] == 0.0
    assert (baseline["population"], baseline["task_id"]) == (private["population"], private["task_id"])
    assert [r["round"] for r in baseline["rounds"]] == list(range(1, ROUNDS + 1))
    assert all(r["epsilon"] is None and 0.0 < r["test_accuracy"] <= 1.0 for r in baseline["rounds"])
    assert all(r["noise_stddev"] == 0.0 for r in baseline["rounds"])  # really without noise
    assert [r["test_accuracy"] for r in baseline["rounds"]] != [r["test_accuracy"] for r in private["rounds"]]
    table = (tmp_path / "out" / "table.md").read_text().splitlines()
    assert len(table) == 2 + ROUNDS and table[2].startswith("| 1 | ")
    assert Path(saved["figure"]).stat().st_size > 10_000
    fleet = private["fleet"]
    assert fleet["worker_processes"] == 2 and fleet["sessions"]["UPLOADED"] >= GOAL * ROUNDS
    # The small model passes the flex-ops check (its loss uses builtin ops): the task is built
    # without --skip_flex_ops_check and the devices train the plan's TFLite step, as ODP clients would.
    assert fleet["device_runtime"]["name"] == "tflite", fleet["device_runtime"]
    # Plans and checkpoints come from the origin once per worker process and round, not per device.
    assert fleet["origin_downloads"] <= 2 * (ROUNDS + 1)
    assert summary["final_test_accuracy"] == private["final_test_accuracy"]


def test_tradeoff_trains_the_built_task_at_each_noise_and_accounts_each_epsilon(local_stack: StackHandle,
                                                                              tmp_path: Path) -> None:
    from fedcompute.private_demo import run_tradeoff

    options = PrivateDemoOptions(devices=DEVICES, examples_per_device=6, report_goal=GOAL, rounds=2, noise=NOISE,
                                 target_epsilon=10.0, processes=1, out_dir=tmp_path / "out")
    result = run_tradeoff(options, (0.0, NOISE), stack=local_stack.stack)
    saved = json.loads((tmp_path / "out" / "tradeoff.json").read_text())
    assert saved["points"] == result["points"] and [p["noise_multiplier"] for p in saved["points"]] == [0.0, NOISE]
    no_noise, noised = saved["points"]
    assert no_noise["final_epsilon"] is None
    assert abs(noised["final_epsilon"] - independent_epsilon(2, 1 / DEVICES)) <= 1e-6
    assert all(0.0 < p["final_test_accuracy"] <= 1.0 for p in saved["points"])
    assert no_noise["final_test_accuracy"] != noised["final_test_accuracy"]  # the noise was really added
    assert Path(saved["figure"]).stat().st_size > 10_000
