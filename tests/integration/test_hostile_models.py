"""Fault suite, issue 13 part A: hostile models and operator inputs against the real local
stack (task_builder / task management / dashboard functions, Firestore and GCS emulators),
through the public interfaces (``task_builder_client`` CLI and HTTP).

Finding -> test:
- High 1 (model ops run on the builder: a model wrote files; another read a file and its
  content came back in the error): ``test_model_that_writes_a_file_is_refused_naming_the_op``,
  ``test_model_that_reads_a_secret_is_refused_and_nothing_is_echoed``;
- High 1 (the builder had no authentication locally) and Low (operator APIs open to any
  local process): ``test_local_stack_runs_with_an_api_key_on_every_operator_api``;
- High 2 (``gs://`` model directory with ``../`` or ``/`` object names written outside the
  build directory): ``test_gs_model_directory_with_escaping_names_is_refused``;
- Medium (a ``server_phase`` planted at the next task id was used):
  ``test_planted_artifact_at_the_next_task_id_fails_the_build``.
The pure parts (walker, extractor, bounds) are in tests/unit/test_op_allowlist.py,
test_safe_extract.py, test_hostile_input.py and test_operator_auth.py.
"""
from __future__ import annotations

import io
import os
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from fedcompute import layout
from fedcompute.proto import common_pb2, task_builder_pb2
from fedcompute.stack import LocalStack
from support import helpers
from support.helpers import http
from support.stack_plugin import assert_nothing_left
from support.task_builder_cli import assert_nothing_created, model_objects, run_cli, tasks_of

if TYPE_CHECKING:
    from support.stack_plugin import StackHandle

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
DICT_CONFIG = REPO / "examples" / "configs" / "dict_model_task_config.pbtxt"


def unique(prefix: str) -> str:
    return helpers.unique(prefix, sep="_")


@dataclass(frozen=True)
class HostileModels:
    writer: str  # its loss calls tf.io.write_file(target, ...)
    reader: str  # its loss calls tf.io.read_file(secret) and parses the content as a number
    honest: str  # the same dense model with a plain MSE loss
    write_target: Path
    secret_file: Path
    secret: str


@pytest.fixture(scope="module")
def hostile_models(tmp_path_factory: pytest.TempPathFactory) -> HostileModels:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    from fedcompute.models.functional import save_functional_model

    out = tmp_path_factory.mktemp("hostile_models")
    secret = f"TOPSECRET-{uuid.uuid4().hex}"
    secret_file = out / "secret.txt"
    secret_file.write_text(secret)
    write_target = out / "written-by-the-model.txt"

    def dense() -> tf.keras.Model:
        return tf.keras.Sequential([tf.keras.layers.InputLayer(input_shape=(4,)), tf.keras.layers.Dense(1)])

    spec = (tf.TensorSpec([None, 4], tf.float32), tf.TensorSpec([None, 1], tf.float32))

    def writing_loss(y_true: tf.Tensor, y_pred: tf.Tensor, sample_weight: tf.Tensor | None = None) -> tf.Tensor:
        tf.io.write_file(str(write_target), tf.strings.as_string(tf.reduce_sum(y_pred)))
        return tf.reduce_mean(tf.square(y_pred - y_true))

    def reading_loss(y_true: tf.Tensor, y_pred: tf.Tensor, sample_weight: tf.Tensor | None = None) -> tf.Tensor:
        # The audit's leak: the content fails to parse as a number and the error quoted it.
        return tf.reduce_mean(tf.square(y_pred - y_true)) + tf.strings.to_number(tf.io.read_file(str(secret_file)))

    return HostileModels(
        writer=save_functional_model(dense, spec, writing_loss, out / "writer"),
        reader=save_functional_model(dense, spec, reading_loss, out / "reader"),
        honest=save_functional_model(dense, spec, tf.keras.losses.MeanSquaredError(), out / "honest"),
        write_target=write_target, secret_file=secret_file, secret=secret)


@pytest.fixture(scope="module")
def cheap_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dict model's config without DP (no accounting), 5 rounds; the model is type 1."""
    text = DICT_CONFIG.read_text()
    text = text[: text.index("differential_privacy {")].replace("num_max_training_rounds: 1000",
                                                                   "num_max_training_rounds: 5")
    path = tmp_path_factory.mktemp("hostile_configs") / "task.pbtxt"
    path.write_text(text)
    return path


def test_model_that_writes_a_file_is_refused_naming_the_op(local_stack: StackHandle, hostile_models: HostileModels,
                                                           cheap_config: Path) -> None:
    population = unique("hostile_writer")
    run = run_cli(local_stack, f"--saved_model={hostile_models.writer}", f"--task_config={cheap_config}",
                  f"--population_name={population}", "--skip_dp_check")
    assert run.rc != 0
    assert "the saved model uses ops the task builder does not run (WriteFile)" in run.stderr
    assert "op WriteFile (node " in run.stderr and "in function '__inference_" in run.stderr
    assert not hostile_models.write_target.exists()
    assert_nothing_created(local_stack, population)


def test_model_that_reads_a_secret_is_refused_and_nothing_is_echoed(
        local_stack: StackHandle, hostile_models: HostileModels, cheap_config: Path) -> None:
    population = unique("hostile_reader")
    run = run_cli(local_stack, f"--saved_model={hostile_models.reader}", f"--task_config={cheap_config}",
                  f"--population_name={population}", "--skip_dp_check")
    assert run.rc != 0
    assert "does not run (ReadFile)" in run.stderr
    assert hostile_models.secret not in run.stdout + run.stderr
    assert hostile_models.secret not in local_stack.log_path("task_builder").read_text(errors="replace")
    assert_nothing_created(local_stack, population)


def test_gs_model_zip_with_escaping_names_is_refused(local_stack: StackHandle, cheap_config: Path,
                                                     tmp_path: Path) -> None:
    """gs:// model input whose entry names escape the build directory (audit High 2).

    The names ride in a zip object: the local stack's fake-gcs-server (filesystem backend)
    cleans ``..`` out of object names itself, so a ``gs://`` *directory* with such names can
    only be planted in real GCS; that case goes through the same ``safe_extract`` check and is
    covered against an in-memory store in tests/unit/test_safe_extract.py.
    """
    from fedcompute.config import load_config_document

    population = unique("hostile_gs")
    bucket = local_stack.clients.storage.bucket(local_stack.settings.model_bucket)
    marker = f"escaped-{uuid.uuid4().hex}.txt"
    request = task_builder_pb2.BuildTaskRequest()
    request.task_config.CopyFrom(load_config_document(cheap_config).config)
    request.task_config.population_name = population
    # The builder unpacks into <tmp>/fedcompute-build-*/model: four '..' reach the root.
    for evil, rule in ((f"../../../../tmp/{marker}", "contains '..'"), (f"/tmp/{marker}", "is an absolute path")):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr("saved_model.pb", b"not used")
            archive.writestr(zipfile.ZipInfo(evil), b"written outside the build directory")
        name = f"uploads/{unique('evil')}.zip"
        bucket.blob(name).upload_from_string(buffer.getvalue())
        request.saved_model.CopyFrom(common_pb2.Resource(uri=f"gs://{bucket.name}/{name}"))
        response = http().post(f"{local_stack.urls['task_builder']}/taskbuilder/v1:build-task-group",
                               data=request.SerializeToString(), timeout=120,
                               headers={"content-type": "application/x-protobuf", "accept": "application/x-protobuf"})
        assert response.status_code == 400
        message = task_builder_pb2.BuildTaskResponse.FromString(response.content).error_info.error_message
        assert f"gs://{bucket.name}/{name}: entry {evil!r} {rule}" in message
    assert not (Path("/tmp") / marker).exists()
    assert_nothing_created(local_stack, population)


def test_planted_artifact_at_the_next_task_id_fails_the_build(local_stack: StackHandle,
                                                              hostile_models: HostileModels,
                                                              cheap_config: Path) -> None:
    population = unique("hostile_plant")
    planted = layout.server_phase_path(population, 1)  # a fresh population's first task id
    bucket = local_stack.clients.storage.bucket(local_stack.settings.model_bucket)
    bucket.blob(planted).upload_from_string(b'{"server_learning_rate": 1000}')
    run = run_cli(local_stack, f"--saved_model={hostile_models.honest}", f"--task_config={cheap_config}",
                  f"--population_name={population}", "--skip_dp_check", "--skip_flex_ops_check")
    assert run.rc != 0
    assert f"gs://{bucket.name}/{planted} already exists; the task builder never reuses an existing artifact" \
        in run.stderr
    assert tasks_of(local_stack, population) == []  # the created task was rolled back
    assert not [name for name in model_objects(local_stack, f"{population}/") if name != planted]


def test_local_stack_runs_with_an_api_key_on_every_operator_api(tmp_path: Path) -> None:
    key = uuid.uuid4().hex
    stack = LocalStack(tmp_path / "keyed", task_builder_port=0, api_key=key,
                       functions=("task_management", "task_builder", "dashboard"))
    stack.start()
    processes = stack.leftover_processes()
    try:
        urls, session = stack.urls, http()
        calls = {
            "task_management": ("GET", f"{urls['task_management']}/taskmanagement/v1/population/p/tasks"),
            "dashboard": ("GET", f"{urls['dashboard']}/api/tasks"),
            "task_builder": ("POST", f"{urls['task_builder']}/taskbuilder/v1:build-task-group"),
        }
        for name, (method, url) in calls.items():
            assert session.request(method, url, timeout=30).status_code == 401, name
            assert session.request(method, url, headers={"x-api-key": "guess"}, timeout=30).status_code == 401, name
            authorized = session.request(method, url, headers={"x-api-key": key, "content-type": "application/json"},
                                         data="{}" if method == "POST" else None, timeout=60)
            # Past authentication: listings answer, an empty build request is bad input.
            assert authorized.status_code == (400 if name == "task_builder" else 200), (name, authorized.text)
            assert session.get(url.split("/", 3)[0] + "//" + url.split("/", 3)[2] + "/healthz",
                               timeout=10).status_code == 200
        assert key not in stack.env_file.read_text()  # the key never lands in the state directory
    finally:
        stack.stop()
    assert_nothing_left(stack, processes)


def test_ordinary_keras_layers_pass_the_op_allow_list(tmp_path: Path) -> None:
    """The allow-list is generous enough for ordinary models: convolutions, recurrent layers
    (While + TensorList), layer normalization, the usual activations and a sparse loss."""
    import tensorflow as tf

    from fedcompute.models.functional import save_functional_model
    from fedcompute.taskbuilder.op_allowlist import check_saved_model_file

    layers = tf.keras.layers

    def build() -> tf.keras.Model:
        inputs = layers.Input(shape=(8,))
        x = layers.Conv1D(4, 2, padding="same", activation="elu")(layers.Reshape((4, 2))(inputs))
        x = layers.GRU(5)(layers.LSTM(6, return_sequences=True)(x))
        x = layers.Dense(8, activation="gelu")(layers.LayerNormalization()(x))
        return tf.keras.Model(inputs, layers.Dense(3, activation="softmax")(x))

    spec = (tf.TensorSpec([None, 8], tf.float32), tf.TensorSpec([None, 1], tf.int64))
    check_saved_model_file(save_functional_model(build, spec, tf.keras.losses.SparseCategoricalCrossentropy(),
                                                 tmp_path / "kitchen_sink"))


@pytest.fixture(autouse=True)
def _no_leftover_write(hostile_models: HostileModels) -> Iterator[None]:
    yield
    assert not hostile_models.write_target.exists()
