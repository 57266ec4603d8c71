"""End to end: a small `make demo` run (the main job) on a private stack.

Checks the demo's outputs (summary.json, the plot) and that the metrics objects sit at the
seed's layout and load the way the seed's monitoring script reads them.
"""
from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest

from fedcompute.demo import DemoOptions, run_demo
from fedcompute.stack import LocalStack

pytestmark = pytest.mark.e2e


def test_small_demo_trains_and_writes_seed_layout(tmp_path: Path) -> None:
    options = DemoOptions(rounds=2, devices=24, report_goal=8, epochs=1, out_dir=tmp_path / "out",
                          state_dir=tmp_path / "stack", task_builder_port=0, keep_stack=True, timeout_s=600)
    stack = LocalStack(options.state_dir)
    try:
        summary = run_demo(options)
        assert summary.rounds == 2 and summary.devices == 24 and summary.report_goal == 8
        assert len(summary.round_wall_times_s) == 2
        assert summary.fleet_sessions["UPLOADED"] >= 16
        assert 0.0 < summary.final_test_accuracy <= 1.0
        saved = json.loads((tmp_path / "out" / "summary.json").read_text())
        assert saved["final_test_accuracy"] == summary.final_test_accuracy
        assert [round(r["server/client_work/train/sparse_categorical_accuracy"], 9)
                for r in saved["metrics_per_round"]] == [
            round(r["server/client_work/train/sparse_categorical_accuracy"], 9) for r in summary.metrics_per_round]
        assert Path(summary.plot).stat().st_size > 10_000
        metric_pngs = sorted((tmp_path / "out" / "metrics").glob("*.png"))
        assert len(metric_pngs) == len(summary.metrics_per_round[0])  # one per metric in the JSON
        assert len(list((tmp_path / "out" / "ops").glob("*.png"))) == 3

        # The seed's monitoring script, with the bucket name and object prefix of this stack.
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        storage_client = storage.Client(project="fedcompute-local", credentials=AnonymousCredentials(),
                                        client_options={"api_endpoint": stack.env()["STORAGE_EMULATOR_HOST"]})
        bucket = storage_client.bucket("fcp-model")
        metrics = collections.defaultdict(list)
        for i in range(summary.rounds):
            blob = bucket.blob(f"{summary.population}/{summary.task_id}/{i + 1}/s/0/metrics")
            with blob.open("r") as f:
                metric = json.loads(f.read())
                for metric_name in metric:
                    metrics[metric_name].append(metric[metric_name])
        assert len(metrics["server/client_work/train/sparse_categorical_accuracy"]) == 2
        assert metrics["server/finalizer/update_non_finite"] == [0.0, 0.0]
    finally:
        stack.stop()
        assert stack.leftover_processes() == []
