"""Noise seeds: refused by the build unless a declared non-private test run; never returned by an API.

Pure: the task builder service with no model (the check comes first), task management,
the dashboard's ops and metrics views on the in-memory store and blob store.
"""
from __future__ import annotations

import json

import pytest
from google.protobuf import text_format

from fedcompute import layout
from fedcompute.dp import DpParams
from fedcompute.errors import ConfigError
from fedcompute.memory import InMemoryBlobStore, InMemoryTaskStore
from fedcompute.monitoring.metrics import load_run
from fedcompute.monitoring.ops import load_task_ops
from fedcompute.plans import ServerPhase
from fedcompute.privacy import disclosure
from fedcompute.proto import task_builder_pb2, task_config_pb2, task_management_pb2
from fedcompute.services import task_management as tm
from fedcompute.settings import Settings
from fedcompute.taskbuilder import client
from fedcompute.taskbuilder.service import build_task_group, report_to_text
from fedcompute.tensor_spec import TensorSpec

SETTINGS = Settings()
SEED = 424242
CONFIG = f"""
population_name: "seeded"
mode: TRAINING_ONLY
policies {{ model_release_policy {{ num_max_training_rounds: 3 population_size: 10000 }} }}
federated_learning {{ learning_process {{ type: FED_AVG runtime_config {{ report_goal: 100 }} }} }}
differential_privacy {{ type: FIXED_GAUSSIAN noise_multiplier: 1.0 clip_norm: 1.0 noise_seed: {SEED} }}
"""


def _request(*, non_private_test_run: bool) -> task_builder_pb2.BuildTaskRequest:
    request = task_builder_pb2.BuildTaskRequest()
    text_format.Parse(CONFIG, request.task_config)
    request.flags.non_private_test_run = non_private_test_run
    return request  # no saved_model: a build that gets past the seed check stops at the model


def _build(request: task_builder_pb2.BuildTaskRequest) -> task_builder_pb2.BuildTaskResponse:
    return build_task_group(request, blobs=InMemoryBlobStore(), settings=SETTINGS, task_management=None,
                            artifacts_only=False).response


def test_a_config_with_a_noise_seed_is_refused_naming_the_field_and_the_flag() -> None:
    response = _build(_request(non_private_test_run=False))
    assert response.error_info.error_type == task_builder_pb2.ErrorType.INVALID_REQUEST
    message = response.error_info.error_message
    assert "differential_privacy.noise_seed" in message and str(SEED) in message
    assert disclosure.NON_PRIVATE_TEST_RUN_FLAG in message


def test_a_declared_non_private_test_run_passes_the_seed_check() -> None:
    response = _build(_request(non_private_test_run=True))
    # Past the seed check, the build stops at the (absent) model instead.
    assert "noise_seed" not in response.error_info.error_message
    assert "saved_model" in response.error_info.error_message


def test_without_a_seed_no_flag_is_needed() -> None:
    request = _request(non_private_test_run=False)
    request.task_config.differential_privacy.ClearField("noise_seed")
    assert "saved_model" in _build(request).error_info.error_message


def test_check_noise_seed_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="noise_seed"):
        disclosure.check_noise_seed(0, non_private_test_run=False)  # 0 is a seed too
    disclosure.check_noise_seed(0, non_private_test_run=True)
    disclosure.check_noise_seed(None, non_private_test_run=False)


def test_task_builder_client_parses_the_test_run_flag() -> None:
    args = client.build_parser().parse_args(["--saved_model=m", "--task_config=c", "--non_private_test_run"])
    assert args.non_private_test_run is True
    assert client.build_parser().parse_args(["--saved_model=m", "--task_config=c"]).non_private_test_run is False


def test_report_text_prints_the_test_run_and_the_assumptions() -> None:
    response = task_builder_pb2.BuildTaskResponse()
    response.task_report.non_private_test_run = True
    response.task_report.privacy_assumptions = disclosure.privacy_assumptions(
        "FIXED_GAUSSIAN", report_goal=1000, population_size=10000, over_selection_rate=0.3)
    report, _ = report_to_text(response)
    assert "non_private_test_run: true" in report
    assert "q = report_goal / population_size = 1000/10000 = 0.1" in report
    assert "client-level" in report and "over-selection" in report and "first-come" in report


# ----------------------------------------------------------------------------- redaction


@pytest.fixture
def seeded_task() -> tuple[InMemoryTaskStore, InMemoryBlobStore, int]:
    store, blobs = InMemoryTaskStore(), InMemoryBlobStore()
    proto = task_management_pb2.Task(total_iteration=3, min_aggregation_size=2, max_aggregation_size=3)
    proto.info.training_info.SetInParent()
    created = tm.create_task(store, tm.new_task_from_proto("seeded", proto))
    phase = ServerPhase(learning_algo="FED_AVG", server_optimizer="SGD", server_learning_rate=1.0, report_goal=2,
                        over_selection_rate=0.5, total_rounds=3, population_size=100, target_epsilon=10.0,
                        delta=0.01, dp=DpParams("FIXED_GAUSSIAN", 1.0, 0.5, noise_seed=SEED),
                        weights=(TensorSpec("dense/kernel", (4, 2), "float32"),), metrics=())
    blobs.write(SETTINGS.model_bucket, layout.server_phase_path("seeded", created.task_id), phase.to_json().encode())
    blobs.write(SETTINGS.model_bucket, layout.metrics_path("seeded", created.task_id, 1),
                json.dumps({"server/privacy/epsilon": 1.5}).encode())
    tm.open_task(store, blobs, SETTINGS, "seeded", created.task_id)
    return store, blobs, created.task_id


def _assert_no_secret(text: str, secret: str) -> None:
    assert "noise_seed" not in text and str(SEED) not in text
    assert "noise_secret" not in text and secret not in text


def test_no_view_of_a_task_carries_its_noise_seed_or_secret(seeded_task) -> None:
    store, blobs, task_id = seeded_task
    record = store.get_task("seeded", task_id)
    assert record is not None and len(record.noise_secret) == 64  # the server's secret exists...
    assert record.dp is not None and "noise_seed" not in record.dp.to_dict()  # ...but the task record keeps no seed
    views = {
        "dashboard /api/tasks and /api/ops": json.dumps(load_task_ops(store, record).to_dict()),
        "dashboard /api/metrics": json.dumps(load_run(blobs, SETTINGS.model_bucket, "seeded", task_id).to_dict()),
        "task management get": text_format.MessageToString(tm.task_to_proto(record)),
        "task management list": "".join(text_format.MessageToString(tm.task_to_proto(t))
                                        for t in store.list_tasks("seeded")),
    }
    for name, text in views.items():
        assert "FIXED_GAUSSIAN" in text or "seeded" in text, name  # the view is not empty
        _assert_no_secret(text, record.noise_secret)


def test_redact_dp_drops_only_the_secret_fields() -> None:
    dp = {"type": "FIXED_GAUSSIAN", "noise_multiplier": 1.0, "noise_seed": 3, "noise_secret": "ab"}
    assert disclosure.redact_dp(dp) == {"type": "FIXED_GAUSSIAN", "noise_multiplier": 1.0}
    assert dp["noise_seed"] == 3  # a copy
    assert disclosure.redact_dp(None) == {}


def test_task_config_still_parses_a_noise_seed() -> None:
    config = task_config_pb2.TaskConfig()
    text_format.Parse(CONFIG, config)
    assert config.differential_privacy.noise_seed == SEED
