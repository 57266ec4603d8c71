"""``task_builder_client``: flag parsing, the request it sends and how it reports answers.

Pure: the HTTP call is replaced by a fake ``requests.post``; no stack, no TensorFlow.
"""
from __future__ import annotations

import argparse
import io
import json
import re
import zipfile
from pathlib import Path
from typing import Any

import pytest
import requests

from fedcompute.errors import ConfigError
from fedcompute.proto import task_builder_pb2, task_management_pb2
from fedcompute.taskbuilder import client

REPO = Path(__file__).resolve().parents[2]
DICT_CONFIG = REPO / "examples" / "configs" / "dict_model_task_config.pbtxt"
SEED_STEP3_CONFIG = REPO / "examples" / "configs" / "seed_step3_fcp_server_config.pbtxt"
FLAGS = ("build_artifact_only", "skip_flex_ops_check", "skip_dp_check", "non_private_test_run")
GLOG = r"I\d{4} \d\d:\d\d:\d\d\.\d{6} \d+ task_builder_client\.py:\d+\] "


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDCOMPUTE_TASK_BUILDER_URL", raising=False)
    monkeypatch.delenv("FEDCOMPUTE_API_KEY", raising=False)


def parse(*argv: str) -> argparse.Namespace:
    return client.build_parser().parse_args(["--saved_model=m", "--task_config=c", *argv])


# ----------------------------------------------------------------------------- flags


@pytest.mark.parametrize("text", ["true", "True", "TRUE", "1", "yes", "t", "y"])
def test_parse_bool_true_spellings(text: str) -> None:
    assert client.parse_bool(text) is True


@pytest.mark.parametrize("text", ["false", "False", "0", "no", "f", "n"])
def test_parse_bool_false_spellings(text: str) -> None:
    assert client.parse_bool(text) is False


def test_parse_bool_rejects_anything_else() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="expected true or false, got 'maybe'"):
        client.parse_bool("maybe")


@pytest.mark.parametrize("flag", FLAGS)
@pytest.mark.parametrize(("argv", "expected"), [
    ([], False),
    (["--{}"], True),  # bare, as in the seed's commands
    (["--{}=true"], True),
    (["--{}=True"], True),
    (["--{}", "True"], True),
    (["--{}=false"], False),
    (["--{}=False"], False),
])
def test_boolean_flags_accept_bare_and_valued_forms(flag: str, argv: list[str], expected: bool) -> None:
    args = parse(*[a.format(flag) for a in argv])
    assert getattr(args, flag) is expected
    assert all(getattr(args, other) is False for other in FLAGS if other != flag)


def test_invalid_boolean_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse("--skip_dp_check=maybe")
    assert exit_info.value.code == 2
    assert "--skip_dp_check: expected true or false, got 'maybe'" in capsys.readouterr().err


@pytest.mark.parametrize("missing", ["--saved_model", "--task_config"])
def test_saved_model_and_task_config_are_required(missing: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [a for a in ("--saved_model=m", "--task_config=c") if not a.startswith(missing)]
    with pytest.raises(SystemExit) as exit_info:
        client.build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    assert missing in capsys.readouterr().err


def test_defaults_are_the_local_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    args = parse()
    assert (args.task_builder_server, args.api_key, args.output, args.population_name) == (
        "http://localhost:5000", "", "text", "")
    monkeypatch.setenv("FEDCOMPUTE_TASK_BUILDER_URL", "http://127.0.0.1:6123")
    monkeypatch.setenv("FEDCOMPUTE_API_KEY", "k3y")
    args = parse()
    assert (args.task_builder_server, args.api_key) == ("http://127.0.0.1:6123", "k3y")
    assert parse("--task_builder_server=http://tb:1", "--api_key=other").task_builder_server == "http://tb:1"


def test_output_is_text_or_json() -> None:
    assert parse("--output", "json").output == "json"
    with pytest.raises(SystemExit) as exit_info:
        parse("--output=yaml")
    assert exit_info.value.code == 2


# ----------------------------------------------------------------------------- the model resource


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    path = tmp_path / "saved_model"
    (path / "variables").mkdir(parents=True)
    (path / "saved_model.pb").write_bytes(b"\x08\x01graph")
    (path / "variables" / "variables.index").write_bytes(b"index")
    return path


def test_model_directory_goes_inline_as_a_zip(model_dir: Path) -> None:
    resource = client.model_resource(str(model_dir))
    archive = zipfile.ZipFile(io.BytesIO(resource.inline_resource.data))
    assert sorted(archive.namelist()) == ["saved_model.pb", "variables/variables.index"]
    assert archive.read("saved_model.pb") == b"\x08\x01graph"


def test_zip_and_gs_paths(model_dir: Path, tmp_path: Path) -> None:
    zipped = tmp_path / "model.zip"
    zipped.write_bytes(client._zip_directory(model_dir))
    assert client.model_resource(str(zipped)).inline_resource.data == zipped.read_bytes()
    assert client.model_resource("gs://fcp-model/models/m1").uri == "gs://fcp-model/models/m1"


@pytest.mark.parametrize(("make", "fragment"), [
    (lambda tmp: tmp / "nowhere", "does not exist"),
    (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "has no saved_model.pb"),
    (lambda tmp: (tmp / "model.txt").write_text("hi") and tmp / "model.txt", "neither a directory nor a zip file"),
])
def test_bad_model_paths_are_config_errors(tmp_path: Path, make: Any, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        client.model_resource(str(make(tmp_path)))


# ----------------------------------------------------------------------------- main() with a fake server


class FakeResponse:
    def __init__(self, status: int, body: bytes, content_type: str) -> None:
        self.status_code, self.content, self.headers = status, body, {"content-type": content_type}
        self.text = body.decode(errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)


def proto_response(message: task_builder_pb2.BuildTaskResponse, status: int = 200) -> FakeResponse:
    return FakeResponse(status, message.SerializeToString(), "application/x-protobuf")


def json_error(status: int, message: str) -> FakeResponse:
    return FakeResponse(status, json.dumps({"error": {"message": message}}).encode(), "application/json")


def success_response() -> task_builder_pb2.BuildTaskResponse:
    response = task_builder_pb2.BuildTaskResponse()
    response.task_group.training_task.CopyFrom(task_management_pb2.Task(
        population_name="pop_x", task_id=7, min_client_version="341912000"))
    response.task_group.eval_task.CopyFrom(task_management_pb2.Task(
        population_name="pop_x", task_id=8, min_client_version="341812000"))
    report = response.task_report
    report.applied_algorithms.learning_algo = 1
    report.metric_results.accepted_metrics = "binary_accuracy, recall"
    report.metric_results.rejected_metrics = "f1_score"
    hp = report.dp_hyperparameters
    hp.dp_delta, hp.dp_epsilon, hp.noise_multiplier, hp.dp_clip_norm, hp.num_training_rounds = 1e-6, 6.4, 1.0, 1.0, 10000
    return response


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Replace requests.post; ``server["answer"]`` is what it returns (or raises)."""
    state: dict[str, Any] = {"answer": proto_response(success_response()), "calls": []}

    def fake_post(url: str, data: bytes, headers: dict[str, str], timeout: float) -> FakeResponse:
        state["calls"].append({"url": url, "request": task_builder_pb2.BuildTaskRequest.FromString(data),
                               "headers": headers, "timeout": timeout})
        if isinstance(state["answer"], Exception):
            raise state["answer"]
        return state["answer"]

    monkeypatch.setattr(requests, "post", fake_post)
    return state


def run_main(model_dir: Path, *argv: str, config: Path = DICT_CONFIG) -> int:
    return client.main([f"--saved_model={model_dir}", f"--task_config={config}", "--task_builder_server=http://tb:9",
                        *argv])


def test_request_carries_config_flags_and_population_override(server: dict[str, Any], model_dir: Path) -> None:
    assert run_main(model_dir, "--population_name=pop_x", "--skip_dp_check", "--skip_flex_ops_check=false",
                    "--api_key=k3y") == client.EXIT_OK
    (call,) = server["calls"]
    assert call["url"] == "http://tb:9/taskbuilder/v1:build-task-group"
    assert call["headers"]["x-api-key"] == "k3y"
    assert call["headers"]["content-type"] == "application/x-protobuf"
    request = call["request"]
    assert request.task_config.population_name == "pop_x"
    assert request.task_config.label_name == "my_label"
    assert (request.flags.skip_dp_check, request.flags.skip_flex_ops_check) == (True, False)
    assert "saved_model.pb" in zipfile.ZipFile(io.BytesIO(request.saved_model.inline_resource.data)).namelist()


def test_build_artifact_only_calls_build_artifacts(server: dict[str, Any], model_dir: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(model_dir, "--build_artifact_only=True") == client.EXIT_OK
    assert server["calls"][0]["url"].endswith("/taskbuilder/v1:build-artifacts")
    assert "x-api-key" not in server["calls"][0]["headers"]
    assert client.ARTIFACTS_ONLY_SUCCESS in capsys.readouterr().out


def test_success_prints_the_seed_shaped_report(server: dict[str, Any], model_dir: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(model_dir) == client.EXIT_OK
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert re.fullmatch(GLOG + re.escape(client.SUCCESS), lines[0])
    assert re.fullmatch(GLOG + "applied_algorithms {", lines[1])
    assert lines[2:] == [
        "  learning_algo: FED_AVG", "}", "metric_results {", '  accepted_metrics: "binary_accuracy, recall"',
        '  rejected_metrics: "f1_score"', "}", "dp_hyperparameters {", "  dp_delta: 1e-06", "  dp_epsilon: 6.4",
        "  noise_multiplier: 1.0", "  dp_clip_norm: 1.0", "  num_training_rounds: 10000", "}", "",
        lines[16], '  min_client_version: "341912000"', "}", "eval_task {", '  min_client_version: "341812000"', "}",
        "",
    ]
    assert re.fullmatch(GLOG + "training_task {", lines[16])
    assert "training task: population 'pop_x', task_id 7" in err
    assert "evaluation task: population 'pop_x', task_id 8" in err


def test_json_output_is_the_whole_response(server: dict[str, Any], model_dir: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(model_dir, "--output", "json") == client.EXIT_OK
    printed = json.loads(capsys.readouterr().out)
    assert printed["task_group"]["training_task"]["task_id"] == "7"
    assert printed["task_report"]["dp_hyperparameters"]["num_training_rounds"] == "10000"


def test_build_error_exits_1_with_the_seed_exception_line(server: dict[str, Any], model_dir: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    failed = task_builder_pb2.BuildTaskResponse(error_info=task_builder_pb2.ErrorInfo(
        error_type=task_builder_pb2.ErrorType.ARTIFACT_BUILDING_ERROR,
        error_message="Cannot build the ClientOnlyPlan: Please contact the server operator to register these ops:\n"
                      "{'L2Loss': 'L2LossOp<CPUDevice, float>'}"))
    server["answer"] = proto_response(failed, 400)
    assert run_main(model_dir) == client.EXIT_BUILD_FAILED
    out, err = capsys.readouterr()
    assert out == ""
    assert err.strip().splitlines()[-1] == (
        "common.TaskBuilderException: Cannot build the ClientOnlyPlan: Please contact the server operator to "
        "register these ops: {'L2Loss': 'L2LossOp<CPUDevice, float>'}. Stop building remaining artifacts.")


@pytest.mark.parametrize(("status", "code"), [(400, 2), (401, 2), (413, 2), (415, 2), (409, 1), (500, 1), (503, 1)])
def test_http_errors_map_to_exit_codes(server: dict[str, Any], model_dir: Path, capsys: pytest.CaptureFixture[str],
                                       status: int, code: int) -> None:
    server["answer"] = json_error(status, "missing x-api-key header")
    assert run_main(model_dir) == code
    assert f"error: task builder answered HTTP {status}: missing x-api-key header" in capsys.readouterr().err


def test_unreachable_server_exits_1(server: dict[str, Any], model_dir: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    server["answer"] = requests.ConnectionError("refused")
    assert run_main(model_dir) == client.EXIT_BUILD_FAILED
    assert "cannot reach the task builder at http://tb:9" in capsys.readouterr().err


def test_bad_local_input_exits_2_before_any_request(server: dict[str, Any], model_dir: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(tmp_path / "nowhere") == client.EXIT_BAD_INPUT
    assert "does not exist" in capsys.readouterr().err
    assert run_main(model_dir, config=SEED_STEP3_CONFIG) == client.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"{SEED_STEP3_CONFIG}:47:" in err and 'did you mean "server_learning_rate"?' in err
    assert server["calls"] == []


def test_both_commands_print_their_version(capsys):
    from fedcompute import __version__
    from fedcompute.cli.main import main as fedcompute_main
    from fedcompute.taskbuilder.client import main as task_builder_main

    for entry, name in ((fedcompute_main, "fedcompute"), (task_builder_main, "task_builder_client")):
        with pytest.raises(SystemExit) as exit_info:
            entry(["--version"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(name) and __version__ in out
