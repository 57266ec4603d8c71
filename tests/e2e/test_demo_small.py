"""End to end: a small `make demo` run (the main job) on a private stack.

Checks the demo's outputs (summary.json, the plot, the exported model) and that the metrics
objects sit at the seed's layout, load the way the seed's monitoring script reads them and
are strict JSON; then the operator tools on the finished run: model export (Keras and
TFLite against the demo's own evaluation), TensorBoard export, `fedcompute task`.
"""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fedcompute import strict_json
from fedcompute.demo import DemoOptions, DemoSummary, run_demo
from fedcompute.stack import LocalStack

pytestmark = pytest.mark.e2e

# TFLite runs the same float32 graph with other kernels: probabilities agree to 1e-4.
TFLITE_TOLERANCE = 1e-4


@dataclass
class DemoRun:
    options: DemoOptions
    summary: DemoSummary
    stack: LocalStack

    @property
    def out(self) -> Path:
        return self.options.out_dir

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **self.stack.env()}
        return subprocess.run([sys.executable, "-m", "fedcompute.cli.main", *args], capture_output=True, text=True,
                              env=env, timeout=300)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRun]:
    tmp_path = tmp_path_factory.mktemp("demo")
    options = DemoOptions(rounds=2, devices=24, report_goal=8, epochs=1, out_dir=tmp_path / "out",
                          state_dir=tmp_path / "stack", task_builder_port=0, keep_stack=True, timeout_s=600,
                          clip_norm=5.0)
    stack = LocalStack(options.state_dir)
    try:
        yield DemoRun(options, run_demo(options), stack)
    finally:
        stack.stop()
        assert stack.leftover_processes() == []


def test_small_demo_trains_and_writes_seed_layout(demo: DemoRun) -> None:
    summary, stack, tmp_path = demo.summary, demo.stack, demo.options.out_dir.parent
    assert summary.rounds == 2 and summary.devices == 24 and summary.report_goal == 8
    assert len(summary.round_wall_times_s) == 2
    assert summary.fleet_sessions["UPLOADED"] >= 16
    assert 0.0 < summary.final_test_accuracy <= 1.0
    # The seed CNN's plan carries TFLite steps whose Flex ops no ODP client has: auto picks TensorFlow, and says why.
    assert summary.device_runtime == "tensorflow"
    assert "Conv2DBackpropFilter" in summary.device_runtime_reason
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


def test_metrics_objects_and_summary_are_strict_json(demo: DemoRun) -> None:
    from fedcompute.adapters.blobs import GcsBlobStore
    from fedcompute.adapters.clients import make_clients
    from fedcompute.settings import Settings

    settings = Settings.from_env()
    blobs = GcsBlobStore(make_clients(settings).storage)
    names = [n for n in blobs.list(settings.model_bucket, f"{demo.summary.population}/") if n.endswith("/metrics")]
    assert len(names) == demo.summary.rounds
    for name in names:
        strict_json.loads(blobs.read(settings.model_bucket, name))  # raises on NaN / Infinity
    summary = strict_json.loads((demo.out / "summary.json").read_text())
    # noise 0: epsilon is unbounded, written as null (the strict-JSON rule), not Infinity.
    assert summary["epsilon"] is None and summary["metrics_per_round"][-1]["server/privacy/epsilon"] is None


def _test_images(count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    from fedcompute.data.fashion_mnist import load_fashion_mnist

    x, y = load_fashion_mnist("test")
    x = np.asarray(x, np.float32).reshape(-1, 28, 28, 1)
    return (x, y) if count is None else (x[:count], y[:count])


def test_exported_keras_model_evaluates_to_the_demo_accuracy(demo: DemoRun, tmp_path: Path) -> None:
    import tensorflow as tf

    run = demo.cli("model", "export", "--population", demo.summary.population, "--task", str(demo.summary.task_id),
                   "--format", "keras", "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert f"after round {demo.summary.rounds}" in run.stdout and "tf.keras.models.load_model" in run.stdout
    x, y = _test_images()
    for path in (tmp_path / "model.keras", demo.out / "model" / "model.keras", demo.out / "model" / "saved_model"):
        model = tf.keras.models.load_model(path, compile=False)
        accuracy = float(np.mean(np.argmax(model.predict(x, batch_size=500, verbose=0), axis=1) == y.reshape(-1)))
        assert accuracy == pytest.approx(demo.summary.final_test_accuracy, abs=0.001), path


def test_tflite_export_predicts_what_the_keras_model_predicts(demo: DemoRun) -> None:
    import tensorflow as tf

    from fedcompute.models.export import tflite_predict

    x, _ = _test_images(100)
    keras_model = tf.keras.models.load_model(demo.out / "model" / "model.keras", compile=False)
    expected = keras_model.predict(x, verbose=0)
    got = tflite_predict(demo.out / "model" / "model.tflite", x)
    assert got.shape == expected.shape == (100, 10)
    assert float(np.max(np.abs(got - expected))) <= TFLITE_TOLERANCE
    assert (np.argmax(got, axis=1) == np.argmax(expected, axis=1)).all()


def test_tensorboard_export_has_one_series_per_metric_by_round(demo: DemoRun, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = demo.cli("metrics", "export", "--population", demo.summary.population, "--tensorboard", str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert f"tensorboard --logdir {tmp_path}" in run.stdout
    events = EventAccumulator(str(tmp_path / demo.summary.population / str(demo.summary.task_id)))
    events.Reload()
    rows = demo.summary.metrics_per_round
    finite = {name for name in rows[0] if all(r.get(name) is not None for r in rows)}
    assert set(events.Tags()["scalars"]) == finite
    for name in finite:
        scalars = events.Scalars(name)
        assert [s.step for s in scalars] == list(range(1, len(rows) + 1))
        assert [s.value for s in scalars] == pytest.approx([r[name] for r in rows], rel=1e-6)


def test_task_cli_lists_and_gets_the_demo_task(demo: DemoRun) -> None:
    population, task_id = demo.summary.population, demo.summary.task_id
    listed = demo.cli("task", "list", "--population", population, "--json")
    assert listed.returncode == 0, listed.stderr
    tasks = strict_json.loads(listed.stdout)
    assert [(t["population_name"], int(t["task_id"]), t["status"]) for t in tasks] == \
        [(population, task_id, "COMPLETED")]
    text = demo.cli("task", "list", "--population", population)
    assert text.stdout.startswith(f"{population}/{task_id}  training    COMPLETED  round ")
    got = demo.cli("task", "get", "--population", population, "--task", str(task_id))
    assert got.returncode == 0 and f"population_name: \"{population}\"" in got.stdout
