"""Hostile HTTP input and config values get a 4xx with a reason, never a 500 (issue 13, Low
findings: JSON nested 25,000 deep, version code ``²`` and Arabic-Indic digits, population
``__x__`` or 1,600 characters, report goal / rounds of 2^31-1). Through the functions'
entry points in-process: every case is refused before any storage client is created."""
from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import flask
import pytest

from fedcompute import layout
from fedcompute.config import ConfigValidationError, validate_task_config
from fedcompute.config.spec import parse_checkpoint_selector
from fedcompute.errors import InvalidRequestError
from fedcompute.proto import task_config_pb2, task_management_pb2
from fedcompute.services.task_management import new_task_from_proto
from support.functions import load_function

CONFIG = Path(__file__).resolve().parents[2] / "examples" / "configs" / "dict_model_task_config.pbtxt"
ASSIGN = "/taskassignment/v1/population/{pop}:create-task-assignment"
REPORT = "/taskassignment/v1/population/pop/task/{task}/aggregation/1/task-assignment/a1:report-result"


@pytest.fixture(scope="module")
def assignment() -> ModuleType:
    module = load_function("task_assignment", "fn_hostile_")

    def no_storage() -> Any:
        raise AssertionError("bad input must be refused before any storage client is created")

    module.RUNTIME.deps = no_storage  # type: ignore[method-assign]
    return module


def call(module: ModuleType, path: str, body: str | bytes, content_type: str = "application/json",
         method: str = "POST") -> tuple[int, str]:
    app = flask.Flask("t")
    with app.test_request_context(path, method=method, data=body, content_type=content_type,
                                  environ_base={"REMOTE_ADDR": "127.0.0.1"}):
        response = app.make_response(module.task_assignment(flask.request))
    return response.status_code, json.loads(response.get_data())["error"]["message"]


def check_in(version: str) -> str:
    return json.dumps({"clientVersion": {"versionCode": version}})


@pytest.mark.parametrize("version", ["²", "٣٤١٩١٢٠٠٠", "３４１", "-1", "1" * 19, ""])
def test_version_codes_must_be_ascii_digits(assignment: ModuleType, version: str) -> None:
    status, message = call(assignment, ASSIGN.format(pop="pop"), check_in(version))
    assert status == 400
    assert "is not a decimal version code (ASCII digits 0-9" in message


@pytest.mark.parametrize("population, reason", ids=["dunder", "leading-dash", "1600-chars"], argvalues=[
    ("__x__", "must start with a letter or digit"),
    ("-x", "must start with a letter or digit"),
    ("p" * 1600, "population name is 1600 characters, over 128"),
])
def test_population_names_in_paths_are_checked(assignment: ModuleType, population: str, reason: str) -> None:
    status, message = call(assignment, ASSIGN.format(pop=population), check_in("341912000"))
    assert (status, reason in message) == (400, True), message


def test_json_nested_25000_deep_is_a_400(assignment: ModuleType) -> None:
    body = "[" * 25_000 + "]" * 25_000
    status, message = call(assignment, ASSIGN.format(pop="pop"), body)
    assert status == 400
    assert "nested too deeply" in message


@pytest.mark.parametrize("task", ["9" * 5000, "9" * 19], ids=["5000-digits", "19-digits"])
def test_oversized_ids_in_paths_are_a_400(assignment: ModuleType, task: str) -> None:
    status, message = call(assignment, REPORT.format(task=task), b"", "application/x-protobuf", "PUT")
    assert status == 400
    assert "is not a decimal id of at most 18 digits" in message


def test_ascii_decimal_rule() -> None:
    assert layout.is_ascii_decimal("341912000")
    assert not any(layout.is_ascii_decimal(t) for t in ("²", "٣", "", "1.0", " 1", "1" * 19))
    assert "²".isdigit() and "٣".isdigit()  # why str.isdigit is not the rule


# --------------------------------------------------------------------------- config bounds


def config_with(**changes: Any) -> task_config_pb2.TaskConfig:
    from fedcompute.config import load_config_document

    config = load_config_document(CONFIG).config
    for path, value in changes.items():
        target = config
        *parents, leaf = path.split("__")
        for name in parents:
            target = getattr(target, name)
        setattr(target, leaf, value)
    return config


@pytest.mark.parametrize("path, value, field", [
    ("federated_learning__learning_process__runtime_config__report_goal", 2**31 - 1, "runtime_config.report_goal"),
    ("policies__model_release_policy__num_max_training_rounds", 2**31 - 1, "num_max_training_rounds"),
    ("federated_learning__evaluation__report_goal", 2**31 - 1, "evaluation.report_goal"),
    ("policies__dataset_policy__batch_size", 2**31 - 1, "dataset_policy.batch_size"),
    ("federated_learning__learning_process__runtime_config__over_selection_rate", 5.0, "over_selection_rate"),
    ("population_name", "__x__", "population_name"),
    ("population_name", "p" * 1600, "population_name"),
    ("population_name", "pop\n", "population_name"),
])
def test_config_values_over_their_bounds_are_refused_naming_the_field(path: str, value: Any, field: str) -> None:
    with pytest.raises(ConfigValidationError) as raised:
        validate_task_config(config_with(**{path: value}))
    assert field in str(raised.value)


def test_checkpoint_selector_takes_ascii_digits_only() -> None:
    assert parse_checkpoint_selector("every_2_round") is not None
    assert parse_checkpoint_selector("every_٢_round") is None
    assert parse_checkpoint_selector("every_" + "9" * 5000 + "_round") is None


@pytest.mark.parametrize("field, value, reason", [
    ("min_aggregation_size", 2**31 - 1, "task.min_aggregation_size 2147483647 is over the limit"),
    ("total_iteration", 2**31 - 1, "task.total_iteration 2147483647 is over the limit"),
    ("min_client_version", "²", "task.min_client_version '²' is not a decimal version code"),
])
def test_task_management_refuses_the_same_out_of_bound_tasks(field: str, value: Any, reason: str) -> None:
    task = task_management_pb2.Task(min_aggregation_size=10, total_iteration=5)
    setattr(task, field, value)
    with pytest.raises(InvalidRequestError, match=reason):
        new_task_from_proto("pop", task)
