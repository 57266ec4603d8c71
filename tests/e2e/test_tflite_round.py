"""End to end: devices run the plan's TFLite model; min_client_version is a real gate.

The dense digits model passes the flex-ops check, so the task builder (the real
``task_builder_client``, no skip flags for ops) sets ``min_client_version`` V from the table.
On the local stack:

* a device reporting V - 1 is refused at check-in (``CLIENT_VERSION_MISMATCH``);
* devices reporting V train with :class:`TfliteRuntime` restricted to the Flex ops version V
  has, executing the ``ClientOnlyPlan``'s ``tflite_graph`` as downloaded;
* a device that lacks an op reports ``FAILED_OPS_ERROR`` and one whose plan's TFLite model is
  corrupted reports ``FAILED_MODEL_COMPUTATION``: neither uploads, the round still completes;
* the aggregated model equals the mean of the TensorFlow runtime's deltas on the same
  examples (server SGD 1.0, DP noise 0, a clip that never binds) to 1e-5.
"""
from __future__ import annotations

import dataclasses
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedcompute import layout
from fedcompute.adapters.blobs import GcsBlobStore
from fedcompute.adapters.task_management_client import TaskManagementClient
from fedcompute.data.digits import load_digits
from fedcompute.data.examples import ExampleSpec, encode_examples
from fedcompute.fleet import runtimes
from fedcompute.fleet.device import ArrayApp, PlanCache, SimulatedDevice
from fedcompute.fleet.protocol import DeviceHttpClient
from fedcompute.learning.tensor_codec import decode_bundle
from fedcompute.models import dense_digits
from fedcompute.plans import UnpackedPlan

pytestmark = pytest.mark.e2e

REPORT_GOAL = 3
EXAMPLES_PER_DEVICE = 25
MIN_VERSION = 341812000  # the table's version of ParseExampleV2, BroadcastGradientArgs, ReluGrad

CONFIG = """
population_name: "{population}"
mode: TRAINING_ONLY
policies {{
  model_release_policy {{ num_max_training_rounds: 1 population_size: 1000 }}
  dataset_policy {{ batch_size: 10 }}
}}
federated_learning {{
  learning_process {{
    type: FED_AVG
    client_optimizer: SGD
    client_learning_rate: 0.1
    server_optimizer: SGD
    server_learning_rate: 1
    runtime_config {{ report_goal: {goal} over_selection_rate: 0 }}
    metrics {{ name: "sparse_categorical_accuracy" }}
  }}
}}
differential_privacy {{ type: FIXED_GAUSSIAN noise_multiplier: 0 clip_norm: 1000000 }}
"""


class CorruptingPlanCache(PlanCache):
    """Hands its device the downloaded plan with a few bytes of the TFLite model flipped."""

    def plan(self, url, client) -> UnpackedPlan:  # type: ignore[override]
        plan = super().plan(url, client)
        model = plan.tflite.model
        broken = model[:200] + bytes(b ^ 0x5A for b in model[200:232]) + model[232:]
        return dataclasses.replace(plan, tflite=dataclasses.replace(plan.tflite, model=broken))


def test_tflite_devices_train_a_round_gated_by_min_client_version(local_stack, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    dense_digits.save(str(model_dir))
    population = f"tflite_{int(time.time() * 1000)}"
    config = tmp_path / "task.pbtxt"
    config.write_text(CONFIG.format(population=population, goal=REPORT_GOAL))
    build = subprocess.run(
        [str(Path(sys.executable).parent / "task_builder_client"),
         f"--task_builder_server={local_stack.urls['task_builder']}", f"--saved_model={model_dir}",
         f"--task_config={config}", "--skip_dp_check=true"],
        capture_output=True, text=True, env={**local_stack.env(), "PATH": "/usr/bin:/bin"},
    )
    assert build.returncode == 0, build.stderr
    assert f'min_client_version: "{MIN_VERSION}"' in build.stdout

    settings = local_stack.settings
    management = TaskManagementClient(settings.task_management_url)
    task = management.list_tasks(population)[0]
    assert task.min_client_version == str(MIN_VERSION)
    client = DeviceHttpClient(settings.task_assignment_url)
    cache = PlanCache(tmp_path / "plans")

    images, labels = load_digits()
    order = np.random.default_rng(3).permutation(len(labels))

    def device(i: int, version: int, runtime) -> SimulatedDevice:
        idx = order[i * EXAMPLES_PER_DEVICE:(i + 1) * EXAMPLES_PER_DEVICE]
        return SimulatedDevice(i, ArrayApp(images[idx], labels[idx].reshape(-1, 1)), version_code=str(version),
                               rng=random.Random(i), runtime=runtime)

    old = device(0, MIN_VERSION - 1, "tflite").run_session(client, population, cache)
    assert (old.status, old.detail) == ("REJECTED", "CLIENT_VERSION_MISMATCH")

    lacking = device(1, MIN_VERSION, runtimes.TfliteRuntime(supported_flex_ops={"ParseExampleV2"}))
    outcome = lacking.run_session(client, population, cache)
    assert (outcome.status, outcome.detail.split(":")[0]) == ("FAILED", "FAILED_OPS_ERROR"), outcome
    assert "BroadcastGradientArgs" in outcome.detail

    corrupted = device(2, MIN_VERSION, "tflite").run_session(client, population, CorruptingPlanCache(tmp_path / "c"))
    assert (corrupted.status, corrupted.detail.split(":")[0]) == ("FAILED", "FAILED_MODEL_COMPUTATION"), corrupted
    assert "corrupted" in corrupted.detail

    at_version = runtimes.TfliteRuntime.for_client_version(str(MIN_VERSION))
    trained = [device(i, MIN_VERSION + i, at_version) for i in range(3, 3 + REPORT_GOAL)]
    for d in trained:
        assert d.run_session(client, population, cache).status == "UPLOADED"
    deadline = time.monotonic() + 120
    while management.get_task(population, task.task_id).status != 2:  # COMPLETED
        assert time.monotonic() < deadline, "the round was not aggregated within 120 s"
        time.sleep(0.5)

    # The plan every device ran is an ODP ClientOnlyPlan whose tflite_graph the TFLite runtime executed.
    plan = next(iter(cache._plans.values()))
    assert plan.tflite is not None and plan.tflite.model[4:8] == b"TFL3"
    assert runtimes.choose_runtime("auto", plan).name == "tflite"

    blobs = GcsBlobStore(local_stack.clients.storage)
    start = [np.asarray(a) for _, a in decode_bundle(
        blobs.read(settings.model_bucket, layout.client_checkpoint_path(population, task.task_id, 0)))[0]]
    ours = [np.asarray(a) for _, a in decode_bundle(
        blobs.read(settings.model_bucket, layout.client_checkpoint_path(population, task.task_id, 1)))[0]]
    spec = ExampleSpec.from_dict(plan.plan.example_spec)
    deltas = []
    for d in trained:
        examples = encode_examples(spec, d.app.features, d.app.labels)
        deltas.append(runtimes.TensorflowRuntime().train(plan, start, examples).delta)
    expected = [w + np.mean([delta[i] for delta in deltas], axis=0) for i, w in enumerate(start)]
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(ours, expected)) < 1e-5
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(ours, start)) > 1e-3  # the round did train
