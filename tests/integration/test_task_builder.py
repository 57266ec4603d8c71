"""The task builder on the local stack: the seed's ``task_builder_client`` against the real
``task_builder`` function (functions-framework), task management, Firestore and GCS emulators.

Most builds go through the console script in a subprocess with the stack's environment,
exactly as a developer runs it; the rollback cases call ``build_task_group`` in-process
with a task management port that fails on purpose, and the API-key case runs a second
``task_builder`` process with ``FEDCOMPUTE_API_KEY`` set (the session stack has no key).

Build times and the task builder's cold start are measured along the way and printed at
the end of the module (run with ``-s`` or look at the terminal summary).
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import requests

from fedcompute import layout
from fedcompute.adapters.blobs import GcsBlobStore
from fedcompute.adapters.task_management_client import TaskManagementClient
from fedcompute.config import load_and_validate, load_config_document
from fedcompute.errors import FedComputeError
from fedcompute.plans import ServerPhase, unpack_plan
from fedcompute.proto import task_builder_pb2, task_management_pb2
from fedcompute.stack.local import default_functions_dir, functions_framework_executable
from fedcompute.stack.procs import free_port, start_process
from fedcompute.taskbuilder import client as tb_client
from fedcompute.taskbuilder import service
from support import helpers
from support.helpers import http
from support.task_builder_cli import CliRun, assert_nothing_created, model_objects, run_cli, tasks_of

if TYPE_CHECKING:
    from support.stack_plugin import StackHandle

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "examples" / "configs"
CNN_CONFIG = CONFIGS / "emnist_cnn_task_config.pbtxt"
DICT_CONFIG = CONFIGS / "dict_model_task_config.pbtxt"
SEED_STEP3_CONFIG = CONFIGS / "seed_step3_fcp_server_config.pbtxt"

OPEN = task_management_pb2.TaskStatus.OPEN
CANCELED = task_management_pb2.TaskStatus.CANCELED
REGISTER_OPS = "Cannot build the ClientOnlyPlan: Please contact the server operator to register these ops: {"
GLOG_PREFIX = r"I\d{4} \d\d:\d\d:\d\d\.\d{6} \d+ task_builder_client\.py:\d+\] "
TRAINING_OBJECTS = ("0/s/0/client_only_plan", "0/s/0/server_phase", "0/s/0/checkpoint", "0/d/0/client_checkpoint")
EVAL_OBJECTS = ("0/s/0/eval_plan", "0/s/0/server_phase", "0/s/0/checkpoint", "0/d/0/client_checkpoint")


def unique(prefix: str) -> str:
    return helpers.unique(prefix, sep="_")  # underscores: these names end up in task configs


# ----------------------------------------------------------------------------- helpers


def write_config(path: Path, text: str, replacements: Sequence[tuple[str, str]] = ()) -> Path:
    """``text`` with each (old, new) replaced exactly once, written to ``path``."""
    for old, new in replacements:
        assert text.count(old) == 1, f"{old!r} appears {text.count(old)} times"
        text = text.replace(old, new)
    path.write_text(text)
    return path


def cheap_config(path: Path, *, label: str | None = "my_label", metrics: Sequence[str] | None = None,
                 rounds: int = 10) -> Path:
    """The dict model's config without the DP block (no privacy accounting) and few rounds.

    For the tests about something else than DP: these builds take about a second.
    """
    text = DICT_CONFIG.read_text()
    text = text[: text.index("differential_privacy {")]
    replacements = [("num_max_training_rounds: 1000", f"num_max_training_rounds: {rounds}")]
    if label is None:
        replacements.append(('label_name: "my_label"\n', ""))
    elif label != "my_label":
        replacements.append(('label_name: "my_label"', f'label_name: "{label}"'))
    if metrics is not None:
        start, end = text.index("    metrics {"), text.index("  evaluation {")
        block = "".join(f'    metrics {{\n      name: "{m}"\n    }}\n' for m in metrics)
        text = text[:start] + block + "  }\n" + text[end:]
    return write_config(path, text, replacements)


def build_request(model_dir: str, config: Path, population: str, **flags: bool) -> task_builder_pb2.BuildTaskRequest:
    document = load_config_document(config)
    document.config.population_name = population
    request = task_builder_pb2.BuildTaskRequest(saved_model=tb_client.model_resource(model_dir))
    request.task_config.CopyFrom(document.config)
    for name, value in flags.items():
        setattr(request.flags, name, value)
    return request


def post_build(url: str, request: task_builder_pb2.BuildTaskRequest, *, verb: str = "build-task-group",
               api_key: str | None = None) -> requests.Response:
    headers = {"content-type": "application/x-protobuf", "accept": "application/x-protobuf"}
    if api_key is not None:
        headers["x-api-key"] = api_key
    return http().post(f"{url}/taskbuilder/v1:{verb}", data=request.SerializeToString(), headers=headers,
                       timeout=600)


def server_build_seconds(stack: StackHandle, population: str) -> float:
    """The build time the task_builder function logged for ``population``."""
    line = stack.wait_for_log("task_builder", f"{population!r}: ", timeout_s=10)
    return float(re.search(r" in ([0-9.]+) s, steps", line).group(1))


def pld_epsilon(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float) -> float:
    """ε straight from dp_accounting: Poisson-subsampled Gaussian, self-composed, PLD accountant."""
    import dp_accounting
    from dp_accounting import pld

    accountant = pld.PLDAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)), rounds))
    return float(accountant.get_epsilon(delta))


def check_task_artifacts(stack: StackHandle, population: str, task_id: int, kind: str, tmp: Path,
                         *, input_type: int, label_name: str) -> None:
    """The ODP objects exist; the plan unpacks, its SavedModel loads and matches checkpoint 0."""
    from fedcompute.learning.tensor_codec import decode_bundle
    from fedcompute.taskbuilder import model_check

    names = set(model_objects(stack, layout.task_prefix(population, task_id)))
    expected = TRAINING_OBJECTS if kind == "training" else EVAL_OBJECTS
    assert {f"{population}/{task_id}/{suffix}" for suffix in expected} <= names, names
    blobs = GcsBlobStore(stack.clients.storage)
    bucket = stack.settings.model_bucket
    plan_path = (layout.client_plan_path if kind == "training" else layout.eval_plan_path)(population, task_id)
    plan = unpack_plan(blobs.read(bucket, plan_path), tmp)
    assert plan.kind == ("TRAINING" if kind == "training" else "EVALUATION")
    assert (plan.population_name, plan.input_type, plan.label_name) == (population, input_type, label_name)
    loaded = model_check.load_functional_model_checked(tmp / "saved_model")
    trainable, non_trainable = loaded.initial_weights()
    initial = [np.asarray(w.numpy()) for w in (*trainable, *non_trainable)]
    named, _ = decode_bundle(blobs.read(bucket, layout.client_checkpoint_path(population, task_id, 0)))
    assert [name for name, _ in named] == [w.name for w in plan.weights]
    decoded = [np.asarray(array) for _, array in named]
    assert [w.shape for w in decoded] == [w.shape for w in initial] == [tuple(w.shape) for w in plan.weights]
    for got, want in zip(decoded, initial):
        np.testing.assert_array_equal(got, want)
    phase = ServerPhase.from_json(blobs.read(bucket, layout.server_phase_path(population, task_id)))
    assert phase.weights == plan.weights and phase.metrics == plan.metrics


def check_task_pair(stack: StackHandle, population: str, ids: dict[str, int], config: Path, *,
                    min_versions: tuple[str, str]) -> tuple[task_management_pb2.Task, task_management_pb2.Task]:
    """Both tasks are OPEN in task management, ids max+1, the eval task pointing at the training one."""
    spec = load_and_validate(config).spec
    management = TaskManagementClient(stack.settings.task_management_url)
    training, evaluation = management.get_task(population, ids["training"]), management.get_task(
        population, ids["evaluation"])
    # A fresh population: max is 0, so the training task is 1 and the eval task 2.
    assert (training.task_id, evaluation.task_id) == (1, 2)
    assert training.status == evaluation.status == OPEN
    assert training.info.WhichOneof("info") == "training_info"
    assert evaluation.info.evaluation_info.training_task_id == training.task_id
    assert evaluation.info.evaluation_info.training_population_name == population
    assert (training.total_iteration, training.min_aggregation_size) == (spec.num_rounds, spec.report_goal)
    assert evaluation.min_aggregation_size == spec.evaluation.report_goal
    assert training.info.traffic_weight == round(1000 * (1 - spec.evaluation.traffic))
    assert evaluation.info.traffic_weight == round(1000 * spec.evaluation.traffic)
    assert (training.min_client_version, evaluation.min_client_version) == min_versions
    assert list(training.client_only_plan_url) == [
        f"gs://{stack.settings.model_bucket}/{layout.client_plan_path(population, training.task_id)}"]
    assert [t.task_id for t in management.list_tasks(population)] == [1, 2]
    return training, evaluation


# ----------------------------------------------------------------------------- fixtures


class Measurements:
    """Figures collected by the tests, printed at the end of the module."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, str]] = []

    def add(self, what: str, seconds: float, note: str = "") -> None:
        self.rows.append((what, seconds, note))


@pytest.fixture(scope="module")
def measurements(request: pytest.FixtureRequest) -> Iterator[Measurements]:
    found = Measurements()
    yield found
    lines = ["", "task builder measurements (wall clock, this machine):"]
    lines += [f"  {what:<62} {seconds:7.2f} s  {note}" for what, seconds, note in found.rows]
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n".join(lines), flush=True)


@pytest.fixture(scope="module")
def expected_dict_epsilon() -> Iterator[Future]:
    """ε of the dict model's config, computed here with dp_accounting in the background
    (a PLD at noise 0.1 takes seconds) while the first builds run."""
    spec = load_and_validate(DICT_CONFIG).spec
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool.submit(pld_epsilon, spec.dp.noise_multiplier, spec.sampling_rate, spec.num_rounds, spec.delta)


@dataclass(frozen=True)
class Models:
    emnist_cnn_type1: str
    dict_binary_type2: str
    l2_loss: str
    plain_keras: str


def half_squared_error() -> Any:
    """tf.nn.l2_loss on the squeezed residual: TFLite keeps it as the L2Loss Flex op
    (the squeeze has an unknown rank; see tests/unit/test_flex_ops.py)."""
    import tensorflow as tf

    class HalfSquaredError(tf.keras.losses.Loss):
        def call(self, y_true, y_pred):
            return tf.nn.l2_loss(tf.squeeze(y_pred - tf.cast(y_true, y_pred.dtype)))

    return HalfSquaredError()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, expected_dict_epsilon: Future) -> Models:
    """The seed's example models plus an L2Loss model and a plain Keras SavedModel, saved once."""
    import tensorflow as tf
    import tensorflow_federated as tff

    from fedcompute.models.example_models import save_example_models

    out = tmp_path_factory.mktemp("tb_models")
    saved = save_example_models(out, names=["emnist_cnn_type1", "dict_binary_type2"], seed=0)
    tf.keras.utils.set_random_seed(3)
    functional = tff.learning.models.functional_model_from_keras(
        tf.keras.Sequential([tf.keras.layers.InputLayer(input_shape=(4,)), tf.keras.layers.Dense(1)]),
        loss_fn=half_squared_error(),
        input_spec=(tf.TensorSpec([None, 4], tf.float32), tf.TensorSpec([None, 1], tf.float32)),
    )
    tff.learning.models.save_functional_model(functional, str(out / "l2_loss"))
    keras_model = tf.keras.Sequential([tf.keras.layers.InputLayer(input_shape=(2,)), tf.keras.layers.Dense(1)])
    tf.saved_model.save(keras_model, str(out / "plain_keras"))
    return Models(saved["emnist_cnn_type1"], saved["dict_binary_type2"], str(out / "l2_loss"),
                  str(out / "plain_keras"))


@pytest.fixture(scope="module")
def configs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tb_configs")


# ----------------------------------------------------------------------------- 7. cold start


def test_cold_start_first_build_then_a_warm_one(local_stack: StackHandle, models: Models, configs: Path,
                                                measurements: Measurements) -> None:
    """Two identical cheap builds: the first in a fresh task_builder process pays the TF import."""
    earlier = local_stack.log_path("task_builder").read_text(errors="replace").count("build-task-group '")
    config = cheap_config(configs / "cheap.pbtxt")
    seconds = []
    for attempt in ("first", "second"):
        population = unique(f"tb_cold_{attempt}")
        run = run_cli(local_stack, f"--saved_model={models.dict_binary_type2}", f"--task_config={config}",
                      f"--population_name={population}")
        assert run.rc == 0, run.stderr
        assert run.task_ids() == {"training": 1, "evaluation": 2}
        server = server_build_seconds(local_stack, population)
        assert server < run.seconds
        seconds.append((run.seconds, server))
    state = "cold: first build of the task_builder process" if earlier == 0 else f"after {earlier} earlier builds"
    measurements.add("dict model, no DP: 1st build, CLI wall / server", seconds[0][0], f"server {seconds[0][1]:.2f} s; {state}")
    measurements.add("dict model, no DP: 2nd build, CLI wall / server", seconds[1][0], f"server {seconds[1][1]:.2f} s")
    if earlier == 0:
        # The cold start is the TensorFlow import and first SavedModel load, seconds of it.
        assert seconds[0][1] > seconds[1][1] + 1.0, seconds


# ----------------------------------------------------------------------------- 1. the seed's models


@pytest.fixture(scope="module")
def cnn_build(local_stack: StackHandle, models: Models, measurements: Measurements) -> tuple[str, CliRun]:
    population = unique("tb_emnist")
    run = run_cli(local_stack, f"--saved_model={models.emnist_cnn_type1}", f"--task_config={CNN_CONFIG}",
                  f"--population_name={population}", "--skip_dp_check", "--skip_flex_ops_check=True")
    measurements.add("EMNIST CNN build, --skip_flex_ops_check (CLI wall)", run.seconds,
                     f"server {server_build_seconds(local_stack, population):.2f} s")
    return population, run


def test_emnist_cnn_type1_builds_a_training_and_eval_pair(local_stack: StackHandle, cnn_build: tuple[str, CliRun],
                                                          tmp_path: Path) -> None:
    population, run = cnn_build
    assert run.rc == 0, run.stderr
    ids = run.task_ids()
    assert ids == {"training": 1, "evaluation": 2}
    check_task_pair(local_stack, population, ids, CNN_CONFIG, min_versions=("0", "0"))  # flex check skipped
    check_task_artifacts(local_stack, population, ids["training"], "training", tmp_path / "t", input_type=1,
                         label_name="y")
    check_task_artifacts(local_stack, population, ids["evaluation"], "eval", tmp_path / "e", input_type=1,
                         label_name="y")


def test_cli_prints_the_seed_shaped_report(cnn_build: tuple[str, CliRun]) -> None:
    _, run = cnn_build
    assert run.rc == 0, run.stderr
    spec = load_and_validate(CNN_CONFIG).spec
    lines = run.stdout.splitlines()
    assert re.fullmatch(GLOG_PREFIX + re.escape(tb_client.SUCCESS), lines[0]), lines[0]
    assert re.fullmatch(GLOG_PREFIX + "applied_algorithms {", lines[1]), lines[1]
    body = [line.strip() for line in lines[2:]]
    expected_order = [
        "learning_algo: FED_AVG", "client_optimizer: SGD", "server_optimizer: SGD", "dp_aggregator: FIXED_GAUSSIAN",
        "metric_results {",
        'accepted_metrics: "sparse_categorical_accuracy, sparse_categorical_crossentropy"',
        "dp_hyperparameters {", "dp_delta:", "dp_epsilon:", "noise_multiplier:", "dp_clip_norm:",
        "num_training_rounds: 1000",
        "training_task {", 'min_client_version: "0"', "eval_task {", 'min_client_version: "0"',
    ]
    position = 0
    for wanted in expected_order:
        found = next((i for i in range(position, len(body)) if re.sub(GLOG_PREFIX, "", body[i]).startswith(wanted)),
                     None)
        assert found is not None, f"{wanted!r} missing after line {position} in:\n{run.stdout}"
        position = found + 1
    assert re.search(r"^" + GLOG_PREFIX + r"training_task \{$", run.stdout, re.M)
    values = dict(re.findall(r"^\s+(dp_delta|dp_epsilon|noise_multiplier|dp_clip_norm): (\S+)$", run.stdout, re.M))
    assert float(values["dp_delta"]) == pytest.approx(spec.delta, rel=1e-6)
    assert float(values["noise_multiplier"]) == pytest.approx(spec.dp.noise_multiplier, rel=1e-6)
    assert float(values["dp_clip_norm"]) == pytest.approx(spec.dp.clip_norm, rel=1e-6)
    assert float(values["dp_epsilon"]) > spec.target_epsilon  # why --skip_dp_check was needed
    assert "rejected_metrics" not in run.stdout


def test_emnist_cnn_with_the_flex_ops_check_names_the_ops_to_register(local_stack: StackHandle, models: Models,
                                                                      measurements: Measurements) -> None:
    population = unique("tb_emnist_flex")
    run = run_cli(local_stack, f"--saved_model={models.emnist_cnn_type1}", f"--task_config={CNN_CONFIG}",
                  f"--population_name={population}", "--skip_dp_check=True")
    measurements.add("EMNIST CNN build with the flex-ops check (fails on ops)", run.seconds,
                     f"server {server_build_seconds(local_stack, population):.2f} s")
    assert run.rc == 1, run.stderr
    assert run.stdout == ""
    assert f"common.TaskBuilderException: {REGISTER_OPS}" in run.stderr
    assert run.stderr.rstrip().endswith(". Stop building remaining artifacts.")
    named = set(re.findall(r"'(\w+)': '", run.stderr))
    assert named == {"Conv2DBackpropFilter", "MaxPoolGrad", "SparseSoftmaxCrossEntropyWithLogits"}
    assert_nothing_created(local_stack, population)


@pytest.fixture(scope="module")
def dict_build(local_stack: StackHandle, models: Models, measurements: Measurements) -> tuple[str, CliRun]:
    population = unique("tb_dict")
    run = run_cli(local_stack, f"--saved_model={models.dict_binary_type2}", f"--task_config={DICT_CONFIG}",
                  f"--population_name={population}", "--skip_dp_check=true", "--output", "json")
    measurements.add("dict model build with the flex-ops check, DP noise 0.1 (CLI)", run.seconds,
                     f"server {server_build_seconds(local_stack, population):.2f} s")
    return population, run


def test_dict_model_type2_builds_a_pair_with_the_flex_ops_min_version(local_stack: StackHandle, models: Models,
                                                                      dict_build: tuple[str, CliRun],
                                                                      tmp_path: Path) -> None:
    from fedcompute.taskbuilder import flex_ops, model_check

    population, run = dict_build
    assert run.rc == 0, run.stderr
    response = run.json()
    group = response["task_group"]
    ids = {"training": int(group["training_task"]["task_id"]), "evaluation": int(group["eval_task"]["task_id"])}
    # The dict model passes the flex-ops check; its version comes from the table, for the
    # ops TFLite keeps in its training and evaluation computations (worked out here).
    spec = load_and_validate(DICT_CONFIG).spec
    loaded = model_check.load_functional_model_checked(models.dict_binary_type2)
    report = flex_ops.check_flex_ops(loaded, client_optimizer=spec.client_optimizer, learning_algo=spec.learning_algo,
                                     example_spec=model_check.check_model(loaded, label_name="my_label").example_spec)
    table = flex_ops.load_flex_ops_table()
    assert report.training_min_client_version == str(max(int(table.min_versions[op]) for op in report.training_ops))
    versions = (report.training_min_client_version, report.eval_min_client_version)
    assert versions == ("341812000", "341812000")  # the seed's eval_task version
    assert (group["training_task"]["min_client_version"], group["eval_task"]["min_client_version"]) == versions
    check_task_pair(local_stack, population, ids, DICT_CONFIG, min_versions=versions)
    check_task_artifacts(local_stack, population, ids["training"], "training", tmp_path / "t", input_type=2,
                         label_name="my_label")
    check_task_artifacts(local_stack, population, ids["evaluation"], "eval", tmp_path / "e", input_type=2,
                         label_name="my_label")
    # The flex-ops check's TFLite models are published next to the plan.
    assert {layout.tflite_training_path(population, ids["training"]),
            layout.tflite_eval_path(population, ids["training"])} <= set(model_objects(local_stack, f"{population}/"))
    assert response["task_report"]["metric_results"]["accepted_metrics"] == ", ".join(spec.metrics)


# ----------------------------------------------------------------------------- 3. epsilon


def test_reported_epsilon_equals_dp_accounting(dict_build: tuple[str, CliRun], expected_dict_epsilon: Future,
                                               measurements: Measurements) -> None:
    _, run = dict_build
    assert run.rc == 0, run.stderr
    hp = run.json()["task_report"]["dp_hyperparameters"]
    started = time.perf_counter()
    expected = expected_dict_epsilon.result(timeout=600)
    measurements.add("waited for the test's own dp_accounting epsilon", time.perf_counter() - started)
    # dp_epsilon is a proto float (float32): its rounding error is at most 2**-24 relative
    # (6e-8), well inside the 1e-6 asked for.
    assert float(hp["dp_epsilon"]) == pytest.approx(expected, rel=1e-6)
    assert abs(float(hp["dp_epsilon"]) - expected) <= np.spacing(np.float32(expected))  # within one float32 ulp
    spec = load_and_validate(DICT_CONFIG).spec
    assert int(hp["num_training_rounds"]) == spec.num_rounds
    assert float(hp["noise_multiplier"]) == pytest.approx(spec.dp.noise_multiplier, rel=1e-6)


# ----------------------------------------------------------------------------- 2. DP check


@pytest.mark.parametrize("which", ["emnist_cnn", "dict"])
def test_without_skip_dp_check_the_build_fails_on_epsilon(local_stack: StackHandle, models: Models, which: str,
                                                          measurements: Measurements) -> None:
    model, config = ((models.emnist_cnn_type1, CNN_CONFIG) if which == "emnist_cnn"
                     else (models.dict_binary_type2, DICT_CONFIG))
    spec = load_and_validate(config).spec
    population = unique(f"tb_dp_{which}")
    flags = ["--skip_flex_ops_check"] if which == "emnist_cnn" else ["--skip_dp_check=false"]
    run = run_cli(local_stack, f"--saved_model={model}", f"--task_config={config}",
                  f"--population_name={population}", *flags)
    measurements.add(f"{which}: build refused by the DP check (CLI)", run.seconds)
    assert run.rc == 1, run.stderr
    message = run.stderr
    assert "common.TaskBuilderException: DP check failed: ε = " in message
    assert f"exceeds the target ε = {spec.target_epsilon:g}" in message
    assert f"noise_multiplier {spec.dp.noise_multiplier:g}" in message
    assert "--skip_dp_check" in message
    passing = float(re.search(r"The smallest noise_multiplier that passes is ([0-9.]+)", message).group(1))
    assert passing > spec.dp.noise_multiplier
    # ... and it really passes (checked with dp_accounting here).
    assert pld_epsilon(passing, spec.sampling_rate, spec.num_rounds, spec.delta) <= spec.target_epsilon
    assert_nothing_created(local_stack, population)


# ----------------------------------------------------------------------------- 4. flex ops


def test_l2_loss_model_gets_the_l2loss_min_client_version(local_stack: StackHandle, models: Models,
                                                          configs: Path) -> None:
    config = cheap_config(configs / "l2.pbtxt", label=None, metrics=["mean_squared_error", "loss"])
    population = unique("tb_l2")
    run = run_cli(local_stack, f"--saved_model={models.l2_loss}", f"--task_config={config}",
                  f"--population_name={population}")
    assert run.rc == 0, run.stderr
    assert run.stdout.count('min_client_version: "341912000"') == 2, run.stdout
    ids = run.task_ids()
    management = TaskManagementClient(local_stack.settings.task_management_url)
    for task_id in ids.values():
        task = management.get_task(population, task_id)
        assert (task.min_client_version, task.status) == ("341912000", OPEN)


# ----------------------------------------------------------------------------- 5. bad inputs


def test_missing_saved_model_directory_is_bad_input(local_stack: StackHandle, tmp_path: Path) -> None:
    population = unique("tb_nomodel")
    run = run_cli(local_stack, f"--saved_model={tmp_path / 'nowhere'}", f"--task_config={DICT_CONFIG}",
                  f"--population_name={population}")
    assert run.rc == 2
    assert f"--saved_model '{tmp_path / 'nowhere'}' does not exist" in run.stderr
    assert "save_functional_model" in run.stderr
    assert_nothing_created(local_stack, population)


def test_plain_keras_saved_model_is_not_a_functional_model(local_stack: StackHandle, models: Models,
                                                           configs: Path) -> None:
    population = unique("tb_keras")
    config = cheap_config(configs / "keras.pbtxt")
    run = run_cli(local_stack, f"--saved_model={models.plain_keras}", f"--task_config={config}",
                  f"--population_name={population}")
    assert run.rc == 1
    assert "is a TensorFlow SavedModel but not a TFF SavedFunctionalModel: it lacks" in run.stderr
    assert "functional" in run.stderr.split("it lacks", 1)[1]  # the fix: how to convert it
    assert_nothing_created(local_stack, population)


@pytest.mark.parametrize(("label", "fragment"), [
    (None, "the model takes a dict of features (input type 2) but the config has no label_name"),
    ("feature-1", "label_name 'feature-1' is also one of the model's feature names"),
])
def test_type2_model_needs_a_label_name_that_is_not_a_feature(local_stack: StackHandle, models: Models,
                                                              configs: Path, label: str | None, fragment: str) -> None:
    population = unique("tb_label")
    config = cheap_config(configs / f"label_{label}.pbtxt", label=label)
    run = run_cli(local_stack, f"--saved_model={models.dict_binary_type2}", f"--task_config={config}",
                  f"--population_name={population}")
    assert run.rc == 1, run.stderr
    assert fragment in run.stderr
    assert_nothing_created(local_stack, population)


@pytest.mark.parametrize(("replacement", "fragments"), [
    (None, [":47:", 'unknown field "sever_learning_rate"', 'did you mean "server_learning_rate"?']),
    (("mode: TRAINING_AND_EVAL", "mode: TRAINING_AND_EVALUATION"),
     [":4:", "unknown TaskMode value TRAINING_AND_EVALUATION", 'did you mean "TRAINING_AND_EVAL"?']),
    (("report_goal: 2000", "report_goal: 0"), [":26:", "report_goal is required for training"]),
    (('checkpoint_selector: "every_1_round"', 'checkpoint_selector: "every_round"'),
     [":48:", "checkpoint_selector 'every_round' is not every_<k>_round or every_<k>_hour"]),
])
def test_config_errors_exit_2_naming_the_line(local_stack: StackHandle, models: Models, configs: Path,
                                              replacement: tuple[str, str] | None, fragments: list[str]) -> None:
    if replacement is None:  # noqa: SIM108 (each branch carries its own comment)
        config = SEED_STEP3_CONFIG  # the seed's own Step 3 config, typo included
    else:
        config = write_config(configs / f"bad_{uuid.uuid4().hex[:6]}.pbtxt", DICT_CONFIG.read_text(), [replacement])
    population = unique("tb_badcfg")
    run = run_cli(local_stack, f"--saved_model={models.dict_binary_type2}", f"--task_config={config}",
                  f"--population_name={population}")
    assert run.rc == 2
    assert run.stdout == ""
    for fragment in fragments:
        assert fragment in run.stderr, run.stderr
    assert_nothing_created(local_stack, population)


def test_invalid_config_sent_straight_to_the_service_is_a_400(local_stack: StackHandle, models: Models) -> None:
    """The service validates too (for callers other than the CLI)."""
    population = unique("tb_rawcfg")
    request = build_request(models.dict_binary_type2, DICT_CONFIG, population)
    request.task_config.federated_learning.learning_process.runtime_config.report_goal = 0
    response = post_build(local_stack.urls["task_builder"], request)
    assert response.status_code == 400
    parsed = task_builder_pb2.BuildTaskResponse.FromString(response.content)
    assert parsed.error_info.error_type == task_builder_pb2.ErrorType.INVALID_REQUEST
    assert "report_goal is required for training" in parsed.error_info.error_message
    assert_nothing_created(local_stack, population)


def test_unknown_metric_is_rejected_not_an_error(local_stack: StackHandle, models: Models, configs: Path) -> None:
    population = unique("tb_metric")
    config = cheap_config(configs / "metric.pbtxt", metrics=["binary_accuracy", "f1_score", "recall"])
    run = run_cli(local_stack, f"--saved_model={models.dict_binary_type2}", f"--task_config={config}",
                  f"--population_name={population}")
    assert run.rc == 0, run.stderr
    assert 'accepted_metrics: "binary_accuracy, recall"' in run.stdout
    assert 'rejected_metrics: "f1_score"' in run.stdout
    assert "metric 'f1_score' is not in the allow-list and will be rejected" in run.stderr  # a warning
    ids = run.task_ids()
    blobs = GcsBlobStore(local_stack.clients.storage)
    phase = ServerPhase.from_json(blobs.read(local_stack.settings.model_bucket,
                                             layout.server_phase_path(population, ids["training"])))
    assert phase.metrics == ("binary_accuracy", "recall")


def test_second_active_training_task_is_refused_and_creates_nothing(local_stack: StackHandle, models: Models,
                                                                    configs: Path) -> None:
    population = unique("tb_twice")
    config = cheap_config(configs / "twice.pbtxt")
    first = run_cli(local_stack, f"--saved_model={models.dict_binary_type2}", f"--task_config={config}",
                    f"--population_name={population}")
    assert first.rc == 0, first.stderr
    before = (tasks_of(local_stack, population), model_objects(local_stack, f"{population}/"))
    assert [t.task_id for t in before[0]] == [1, 2]
    response = post_build(local_stack.urls["task_builder"], build_request(models.dict_binary_type2, config, population))
    assert response.status_code == 409
    parsed = task_builder_pb2.BuildTaskResponse.FromString(response.content)
    assert parsed.error_info.error_type == task_builder_pb2.ErrorType.TASK_MANAGEMENT_ERROR
    assert f"population {population!r} already has an active training task 1 (OPEN)" in parsed.error_info.error_message
    assert "cancel it first" in parsed.error_info.error_message
    again = run_cli(local_stack, f"--saved_model={models.dict_binary_type2}", f"--task_config={config}",
                    f"--population_name={population}")
    assert again.rc == 1 and "already has an active training task 1" in again.stderr
    assert (tasks_of(local_stack, population), model_objects(local_stack, f"{population}/")) == before
    assert model_objects(local_stack, f"artifacts/{population}/") == []


@pytest.fixture
def keyed_task_builder(local_stack: StackHandle, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A second task_builder process on the same emulators with FEDCOMPUTE_API_KEY set."""
    key, port = uuid.uuid4().hex, free_port()
    source = default_functions_dir() / "task_builder" / "main.py"
    log = tmp_path / "task_builder.log"
    process = start_process(
        [str(functions_framework_executable()), "--source", str(source), "--target", "task_builder",
         "--signature-type", "http", "--host", "127.0.0.1", "--port", str(port)],
        log_path=log, env={**os.environ, "FEDCOMPUTE_API_KEY": key, "PYTHONUNBUFFERED": "1",
                           "TF_CPP_MIN_LOG_LEVEL": "2"}, cwd=source.parent)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(requests.RequestException):
                if http().get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"keyed task_builder did not answer: {log.read_text()[-2000:]}"
            time.sleep(0.2)
        yield url, key
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # the session it leads (started with start_new_session)
            process.wait(timeout=5)


def test_task_builder_requires_the_api_key_when_configured(local_stack: StackHandle, models: Models,
                                                           keyed_task_builder: tuple[str, str]) -> None:
    url, key = keyed_task_builder
    population = unique("tb_keyed")
    args = (f"--saved_model={models.dict_binary_type2}", f"--task_config={DICT_CONFIG}",
            f"--population_name={population}")
    missing = run_cli(local_stack, *args, server=url)
    assert missing.rc == 2
    assert "error: task builder answered HTTP 401: missing x-api-key header" in missing.stderr
    wrong = run_cli(local_stack, *args, "--api_key=guess", server=url)
    assert wrong.rc == 2 and "HTTP 401: invalid x-api-key" in wrong.stderr
    from_env = run_cli(local_stack, *args, server=url, env={"FEDCOMPUTE_API_KEY": "guess-again"})
    assert from_env.rc == 2 and "HTTP 401: invalid x-api-key" in from_env.stderr
    request = build_request(models.dict_binary_type2, DICT_CONFIG, population)
    assert post_build(url, request, api_key="nope").status_code == 401
    assert post_build(url, request, verb="build-artifacts").status_code == 401
    # With the key the request gets past authentication (and stops at the missing model,
    # before any TensorFlow work).
    request.ClearField("saved_model")
    accepted = post_build(url, request, api_key=key)
    assert accepted.status_code == 400
    assert "saved_model is missing" in task_builder_pb2.BuildTaskResponse.FromString(
        accepted.content).error_info.error_message
    assert http().get(f"{url}/healthz", timeout=10).status_code == 200  # liveness needs no key
    assert_nothing_created(local_stack, population)


def test_build_artifact_only_uploads_artifacts_and_creates_no_task(local_stack: StackHandle, models: Models,
                                                                   configs: Path) -> None:
    population = unique("tb_artifacts")
    config = cheap_config(configs / "artifacts.pbtxt")
    run = run_cli(local_stack, f"--saved_model={models.dict_binary_type2}", f"--task_config={config}",
                  f"--population_name={population}", "--build_artifact_only=true")
    assert run.rc == 0, run.stderr
    assert re.match(GLOG_PREFIX + re.escape(tb_client.ARTIFACTS_ONLY_SUCCESS), run.stdout)
    assert 'training_task {\n  min_client_version: "341812000"\n}' in run.stdout
    assert run.task_ids() == {}
    assert tasks_of(local_stack, population) == []
    assert model_objects(local_stack, f"{population}/") == []
    names = model_objects(local_stack, f"artifacts/{population}/")
    builds = {name.split("/")[2] for name in names}
    assert len(builds) == 1
    prefix = f"artifacts/{population}/{builds.pop()}"
    assert {f"{prefix}/training/{suffix}" for suffix in TRAINING_OBJECTS} <= set(names)
    assert {f"{prefix}/eval/{suffix}" for suffix in EVAL_OBJECTS} <= set(names)
    blobs = GcsBlobStore(local_stack.clients.storage)
    plan = unpack_plan(blobs.read(local_stack.settings.model_bucket, f"{prefix}/training/0/s/0/client_only_plan"),
                       configs / f"unpacked_{population}")
    assert (plan.kind, plan.population_name, plan.label_name) == ("TRAINING", population, "my_label")


class FailingTaskManagement(service.TaskManagementPort):
    """The real task management (over HTTP) that fails once at a chosen call."""

    def __init__(self, real: TaskManagementClient, fail_at: str) -> None:
        self.real, self.fail_at, self.calls = real, fail_at, []

    def _maybe_fail(self, call: str) -> None:
        self.calls.append(call)
        if call == self.fail_at:
            raise FedComputeError(f"injected failure at {call}")

    def create_task(self, population, task):
        self._maybe_fail("create_eval" if task.info.WhichOneof("info") == "evaluation_info" else "create_training")
        return self.real.create_task(population, task)

    def open_task(self, population, task_id):
        self._maybe_fail("open_first" if "open_first" not in self.calls else "open_second")
        return self.real.open_task(population, task_id)

    def delete_task(self, population, task_id):
        self.calls.append(f"delete {task_id}")
        self.real.delete_task(population, task_id)

    def get_task(self, population, task_id):
        return self.real.get_task(population, task_id)

    def cancel_task(self, population, task_id, reason=""):
        self.calls.append(f"cancel {task_id}")
        return self.real.cancel_task(population, task_id, reason)


@pytest.mark.parametrize("fail_at", ["create_eval", "open_first", "open_second"])
def test_failed_build_rolls_back_tasks_and_artifacts(local_stack: StackHandle, models: Models, configs: Path,
                                                     fail_at: str) -> None:
    population = unique("tb_rollback")
    config = cheap_config(configs / "rollback.pbtxt")
    real = TaskManagementClient(local_stack.settings.task_management_url)
    port = FailingTaskManagement(real, fail_at)
    blobs = GcsBlobStore(local_stack.clients.storage)
    # The flex-ops check is beside the point here (and costs seconds per build).
    outcome = service.build_task_group(build_request(models.dict_binary_type2, config, population,
                                                     skip_flex_ops_check=True), blobs=blobs,
                                       settings=local_stack.settings, task_management=port, artifacts_only=False)
    error = outcome.response.error_info
    assert error.error_type == task_builder_pb2.ErrorType.TASK_MANAGEMENT_ERROR
    assert error.error_message == f"injected failure at {fail_at}"
    assert service.http_status_for_response(outcome.response) == 409
    left = tasks_of(local_stack, population)
    if fail_at == "open_second":
        # The training task was already OPEN when the eval task's open failed: task
        # management only deletes CREATED tasks, so the rollback cancels it.
        assert port.calls[-3:] == ["delete 2", "delete 1", "cancel 1"]
        assert [(t.task_id, t.status) for t in left] == [(1, CANCELED)]
        assert left[0].status_reason == f"task build failed: injected failure at {fail_at}"
        assert model_objects(local_stack, f"{population}/2/") == []
    else:
        assert left == []
        assert model_objects(local_stack, f"{population}/") == []
        assert port.calls[-1] == "delete 1"
    # The population is not blocked: the next build creates a fresh pair at ids max+1.
    retry = service.build_task_group(build_request(models.dict_binary_type2, config, population,
                                                   skip_flex_ops_check=True), blobs=blobs,
                                     settings=local_stack.settings, task_management=real, artifacts_only=False)
    assert retry.response.WhichOneof("result") == "task_group", retry.response.error_info.error_message
    created = 1 if fail_at == "create_eval" else 2  # ids allocated by the failed build are not reused
    assert (retry.response.task_group.training_task.task_id, retry.response.task_group.eval_task.task_id) == (
        created + 1, created + 2)
    assert retry.response.task_group.training_task.status == OPEN


# ----------------------------------------------------------------------------- 6. exit codes


def test_unreachable_task_builder_exits_1(local_stack: StackHandle, models: Models, configs: Path) -> None:
    config = cheap_config(configs / "unreachable.pbtxt")
    run = run_cli(local_stack, f"--saved_model={models.dict_binary_type2}", f"--task_config={config}",
                  server=f"http://127.0.0.1:{free_port()}")
    assert run.rc == 1
    assert "cannot reach the task builder at http://127.0.0.1:" in run.stderr
    assert "make up" in run.stderr
