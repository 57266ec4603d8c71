"""``fedcompute load`` against the local stack: the full protocol, exactly the goal accepted."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np
import pytest

from fedcompute.cli.main import main as cli_main
from fedcompute.crypto.hpke import is_envelope
from fedcompute.load import LoadConfig, round_stages, run_load
from support.helpers import unique
from support.tasks import create_numpy_task, gradient_object

if TYPE_CHECKING:
    from pathlib import Path

    from support.stack_plugin import StackHandle

pytestmark = pytest.mark.integration


def test_load_runs_the_protocol_and_the_round_aggregates_exactly_the_goal(local_stack: StackHandle) -> None:
    task = create_numpy_task(local_stack, unique("load"), report_goal=20, over_selection_rate=0.5, rounds=1,
                             metrics=())
    report = run_load(LoadConfig(url=local_stack.settings.task_assignment_url, population=task.population,
                                 devices=40, concurrency=8))
    assert report["errors"] == {}
    assert report["endpoints"]["check_in"]["calls"] == 40
    # At most 30 devices get a slot (the cap: 20 × 1.5); the rest are turned away at check-in,
    # and so is a device that checks in after the 20th accepted upload closed the round. Of those
    # with a slot, one that reports after the close is told so at report-result and drops its
    # update (races of the round's close, not faults).
    turned_away = report["rejections"]["check_in:NO_TASK_AVAILABLE"]
    assert turned_away >= 10
    dropped = sum(n for reason, n in report["rejections"].items() if reason.startswith("report_result:"))
    assert report["uploads"] + dropped == 40 - turned_away and report["uploads"] >= 20
    assert {"plan_download", "checkpoint_download", "report_result", "upload"} <= set(report["endpoints"])
    assert report["endpoints"]["upload"]["p99_ms"] >= report["endpoints"]["upload"]["p50_ms"] > 0
    task.wait_round(1, timeout_s=90)
    accepted = task.store.accepted_ids(task.key(1))
    assert task.count(1) == 20 and len(accepted) == 20
    # The synthetic devices speak the default protocol: signed requests, HPKE-sealed updates.
    stored = task.blobs.read(local_stack.settings.gradient_bucket, gradient_object(task, 1, sorted(accepted)[0]))
    assert is_envelope(stored)
    for got, initial in zip(task.checkpoint_weights(1), task.initial):  # zero deltas: unchanged
        np.testing.assert_allclose(got, initial, atol=1e-6)
    stages = round_stages(task.store, task.population, task.task_id, 1)
    assert stages["status"] == "COMPLETED" and stages["collect_s"] > 0 and stages["aggregate_and_write_s"] > 0


def test_load_cli_writes_a_json_report(local_stack: StackHandle, tmp_path: Path) -> None:
    task = create_numpy_task(local_stack, unique("loadcli"), report_goal=50, rounds=1)
    out = tmp_path / "report.json"
    assert cli_main(["load", "--url", local_stack.settings.task_assignment_url, "--population", task.population,
                     "--devices", "10", "--concurrency", "4", "--protocol", "check-in", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["endpoints"]["check_in"]["calls"] == 10 and report["rejections"] == {}
