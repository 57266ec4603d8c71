"""``task_builder_client``: the seed's command, talking to fedcompute's task builder.

    task_builder_client --task_builder_server=http://localhost:5000 \\
        --saved_model=saved_model --task_config=fcp_server_config.pbtxt \\
        [--build_artifact_only] [--skip_flex_ops_check] [--skip_dp_check]

The config is parsed and validated locally first (errors name the line and the fix), the
model directory or zip is sent inline (or uploaded to the model bucket when large, or
passed through when it is a gs:// path), and the report is printed in protobuf text
format, shaped like the seed's log. Exit codes: 0 built, 1 the build failed, 2 bad input.
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import io
import os
import sys
import threading
import uuid
import zipfile
from pathlib import Path
from typing import Any

from fedcompute.errors import ConfigError, FedComputeError

EXIT_OK, EXIT_BUILD_FAILED, EXIT_BAD_INPUT = 0, 1, 2
DEFAULT_SERVER = "http://localhost:5000"
INLINE_LIMIT = 24 * 1024 * 1024
SUCCESS = "Success! Tasks are built, and artifacts are uploaded to the cloud."
ARTIFACTS_ONLY_SUCCESS = "Success! Artifacts are built and uploaded to the cloud (no task was created)."


def parse_bool(value: str | bool) -> bool:
    """absl-style booleans: true/True/1/yes and false/False/0/no."""
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "t", "y"):
        return True
    if lowered in ("false", "0", "no", "f", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="task_builder_client",
        description="Build a federated learning task (training + evaluation) on a fedcompute server.",
    )
    from fedcompute import __version__

    parser.add_argument("--version", action="version", version=f"task_builder_client (fedcompute {__version__})")
    parser.add_argument("--task_builder_server", default=os.environ.get("FEDCOMPUTE_TASK_BUILDER_URL", DEFAULT_SERVER),
                        help=f"task builder endpoint (default {DEFAULT_SERVER}, the local stack)")
    parser.add_argument("--saved_model", required=True,
                        help="SavedFunctionalModel: a directory, a .zip, or a gs://bucket/path")
    parser.add_argument("--task_config", required=True, help="task config (protobuf text format or JSON)")
    for flag, text in (("--build_artifact_only", "build and upload the artifacts, create no task"),
                       ("--skip_flex_ops_check", "skip the TFLite flex-ops check"),
                       ("--skip_dp_check", "build even if epsilon exceeds dp_target_epsilon"),
                       ("--non_private_test_run", "allow differential_privacy.noise_seed: a reproducible test run "
                                                  "whose epsilon is not a guarantee (printed in the report)")):
        parser.add_argument(flag, nargs="?", const=True, default=False, type=parse_bool, metavar="BOOL", help=text)
    parser.add_argument("--population_name", default="", help="override the config's population_name")
    parser.add_argument("--api_key", default=os.environ.get("FEDCOMPUTE_API_KEY", ""),
                        help="task builder API key (default $FEDCOMPUTE_API_KEY)")
    parser.add_argument("--output", choices=("text", "json"), default="text", help="report format")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the build")
    return parser


def _log(message: str, *, stream=None) -> None:
    """One absl/glog-style line, like the seed's ``I1023 22:16:53.058027 ... task_builder_client.py:109]``."""
    now = datetime.datetime.now()
    frame = inspect.currentframe()
    line = frame.f_back.f_lineno if frame and frame.f_back else 0
    prefix = f"I{now:%m%d} {now:%H:%M:%S.%f} {threading.get_ident()} task_builder_client.py:{line}]"
    print(f"{prefix} {message}", file=stream or sys.stdout, flush=True)


def _zip_directory(path: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            archive.write(file, file.relative_to(path).as_posix())
    return buffer.getvalue()


def model_resource(saved_model: str):
    """A ``Resource`` for the model: gs:// passes through; local dirs/zips go inline or to GCS."""
    from fedcompute.proto import common_pb2

    if saved_model.startswith("gs://"):
        return common_pb2.Resource(uri=saved_model)
    path = Path(saved_model)
    if not path.exists():
        raise ConfigError(f"--saved_model {saved_model!r} does not exist",
                          hint="pass the directory written by tff.learning.models.save_functional_model")
    if path.is_dir():
        if not (path / "saved_model.pb").exists():
            raise ConfigError(f"--saved_model {saved_model!r} has no saved_model.pb",
                              hint="save the model with tff.learning.models.save_functional_model")
        data = _zip_directory(path)
    elif zipfile.is_zipfile(path):
        data = path.read_bytes()
    else:
        raise ConfigError(f"--saved_model {saved_model!r} is neither a directory nor a zip file")
    if len(data) <= INLINE_LIMIT:
        return common_pb2.Resource(inline_resource=common_pb2.Resource.InlineResource(data=data))
    return common_pb2.Resource(uri=_upload_to_bucket(data))


def _upload_to_bucket(data: bytes) -> str:
    """Large models go to the model bucket (the service reads gs:// paths)."""
    from fedcompute.adapters.clients import make_clients
    from fedcompute.settings import Settings

    settings = Settings.from_env()
    name = f"uploads/{uuid.uuid4().hex}/saved_model.zip"
    try:
        make_clients(settings).storage.bucket(settings.model_bucket).blob(name).upload_from_string(data)
    except Exception as error:  # noqa: BLE001 - report any client failure as a fix to apply
        raise FedComputeError(f"could not upload the {len(data)}-byte model to gs://{settings.model_bucket}: {error}",
                              hint="upload the SavedModel directory yourself and pass --saved_model=gs://...") from error
    return f"gs://{settings.model_bucket}/{name}"


def _post_with_progress(url: str, body: bytes, headers: dict[str, str], timeout: float):
    """POST the build; on a terminal, show elapsed time while the server works."""
    import concurrent.futures

    import requests

    if not sys.stderr.isatty():
        return requests.post(url, data=body, headers=headers, timeout=timeout)
    from tqdm import tqdm

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(requests.post, url, data=body, headers=headers, timeout=timeout)
        with tqdm(desc="building (checks, artifacts, tasks)", unit="s", bar_format="{desc}: {elapsed}",
                  file=sys.stderr, leave=False) as bar:
            while True:
                try:
                    return future.result(timeout=0.5)
                except concurrent.futures.TimeoutError:
                    bar.update(0)
                    bar.refresh()


class BuildRefused(FedComputeError):
    """The task builder answered with an HTTP error (``http_status`` is its status)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"task builder answered HTTP {status}: {message}")
        self.http_status = status


def build_request(task_config: str | os.PathLike[str], saved_model: str, *, population_name: str = "",
                  skip_flex_ops_check: bool = False, skip_dp_check: bool = False,
                  non_private_test_run: bool = False) -> tuple[Any, list[Any]]:
    """The ``BuildTaskRequest`` for a config file and a model, and the config's warnings.

    The config is validated locally first. Raises:
        ConfigError: the config or the model path is invalid (the message names the field and the fix).
    """
    from fedcompute.config import load_config_document, validate_task_config
    from fedcompute.proto import task_builder_pb2

    document = load_config_document(os.fspath(task_config))
    config = document.config
    if population_name:
        config.population_name = population_name
    validated = validate_task_config(document)  # errors name the line and the fix
    request = task_builder_pb2.BuildTaskRequest(saved_model=model_resource(saved_model))
    request.task_config.CopyFrom(config)
    request.flags.skip_flex_ops_check = skip_flex_ops_check
    request.flags.skip_dp_check = skip_dp_check
    request.flags.non_private_test_run = non_private_test_run
    return request, list(validated.warnings)


def post_build(server: str, request: Any, *, build_artifact_only: bool = False, api_key: str = "",
               timeout: float = 900.0) -> Any:
    """POST ``request`` to the task builder; returns the ``BuildTaskResponse``.

    Raises:
        FedComputeError: the server is unreachable. BuildRefused: it answered an HTTP error.
    """
    import requests

    from fedcompute.proto import task_builder_pb2

    verb = "build-artifacts" if build_artifact_only else "build-task-group"
    url = f"{server.rstrip('/')}/taskbuilder/v1:{verb}"
    headers = {"content-type": "application/x-protobuf", "accept": "application/x-protobuf"}
    if api_key:
        headers["x-api-key"] = api_key
    try:
        http = _post_with_progress(url, request.SerializeToString(), headers, timeout)
    except requests.RequestException as error:
        raise FedComputeError(f"cannot reach the task builder at {server}: {error}",
                              hint="start the local stack with `make up`, or pass --task_builder_server") from error
    if http.headers.get("content-type", "").startswith("application/json") and http.status_code >= 400:
        try:
            message = http.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = http.text[:500]
        raise BuildRefused(http.status_code, message)
    return task_builder_pb2.BuildTaskResponse.FromString(http.content)


def run(args: argparse.Namespace) -> int:
    from google.protobuf import json_format

    from fedcompute.taskbuilder.service import report_to_text

    request, warnings = build_request(args.task_config, args.saved_model, population_name=args.population_name,
                                      skip_flex_ops_check=args.skip_flex_ops_check, skip_dp_check=args.skip_dp_check,
                                      non_private_test_run=args.non_private_test_run)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    try:
        response = post_build(args.task_builder_server, request, build_artifact_only=args.build_artifact_only,
                              api_key=args.api_key, timeout=args.timeout)
    except BuildRefused as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT if error.http_status in (400, 401, 413, 415) else EXIT_BUILD_FAILED
    if args.output == "json":
        print(json_format.MessageToJson(response, preserving_proto_field_name=True))
    if response.WhichOneof("result") == "error_info":
        if args.output == "text":
            message = " ".join(response.error_info.error_message.split())
            print(f"common.TaskBuilderException: {message}. Stop building remaining artifacts.", file=sys.stderr)
        return EXIT_BUILD_FAILED
    if args.output == "text":
        report, group = report_to_text(response)
        _log(ARTIFACTS_ONLY_SUCCESS if args.build_artifact_only else SUCCESS)
        _log(report)
        _log(group)
        for label, task in (("training", response.task_group.training_task),
                            ("evaluation", response.task_group.eval_task)):
            if task.task_id:
                print(f"{label} task: population {task.population_name!r}, task_id {task.task_id}",
                      file=sys.stderr)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except FedComputeError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT if error.http_status // 100 == 4 else EXIT_BUILD_FAILED


if __name__ == "__main__":
    sys.exit(main())
