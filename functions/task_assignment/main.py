"""task_assignment Cloud Function (HTTP, entry point ``task_assignment``).

Device check-in and result reporting (the ODP Federated Compute protocol):
``POST /taskassignment/v1/population/{pop}:create-task-assignment`` (eligibility,
assignment record, plan + checkpoint URLs) and
``PUT .../task-assignment/{id}:report-result`` (status + upload instruction).

Thin entry point: parse the wire message, call :mod:`fedcompute.services.assignment`,
build the wire answer. No TensorFlow: its cold start is part of every device's check-in.
"""
from __future__ import annotations

import os

import flask
import functions_framework
from google.protobuf import duration_pb2

from fedcompute import layout
from fedcompute.errors import InvalidRequestError
from fedcompute.proto import common_pb2, eligibility_pb2, task_assignment_pb2
from fedcompute.runtime import Runtime
from fedcompute.services import assignment as service
from fedcompute.tasks.records import ReportedResult, RoundKey
from fedcompute.web import Router, configure_logging, health_payload, json_response, message_response, parse_message

NAME = "task_assignment"
MAX_REQUEST_BYTES = 64 * 1024  # check-in and report messages are tiny

configure_logging()
RUNTIME = Runtime()  # settings, clients and adapters, created on first use, once per process
# Open rounds and signed URLs, per process (see fedcompute.services.assignment.CheckInCache).
CHECK_IN_CACHE = service.CheckInCache(ttl_s=float(os.environ.get("FEDCOMPUTE_CHECKIN_CACHE_TTL_S", "2")))
ROUTER = Router(NAME)
SEGMENT = layout.POPULATION_PATTERN


@ROUTER.route("GET", r"/healthz")
def healthz(request: flask.Request) -> flask.Response:
    """Liveness: answers without touching the cloud clients."""
    return json_response(health_payload(NAME, clients_ready=RUNTIME.clients_created))


def _rejection(rejection: service.Rejection) -> common_pb2.RejectionInfo:
    low, high = rejection.retry_window
    return common_pb2.RejectionInfo(
        reason=common_pb2.RejectionReason.Enum.Value(rejection.reason.value),  # type: ignore[arg-type]  # Value() is typed int
        retry_window=common_pb2.RetryWindow(delay_min=duration_pb2.Duration(seconds=low),
                                            delay_max=duration_pb2.Duration(seconds=high)),
    )


@ROUTER.route("POST", rf"/taskassignment/v1/population/(?P<population>{SEGMENT}):create-task-assignment")
def create_task_assignment(request: flask.Request, population: str) -> flask.Response:
    body = parse_message(request, task_assignment_pb2.CreateTaskAssignmentRequest, max_bytes=MAX_REQUEST_BYTES)
    if not body.HasField("client_version"):
        raise InvalidRequestError("client_version is required", hint="send client_version.version_code")
    service.validate_version_code(body.client_version.version_code)  # bad input never reaches storage
    deps = RUNTIME.deps()
    result = service.create_task_assignment(deps.store, deps.blobs, deps.settings,
                                            service.CheckIn(population, body.client_version.version_code),
                                            cache=CHECK_IN_CACHE)
    if isinstance(result, service.Rejection):
        return message_response(task_assignment_pb2.CreateTaskAssignmentResponse(rejection_info=_rejection(result)),
                                200, request)
    info = eligibility_pb2.EligibilityTaskInfo()
    policy = info.eligibility_policies.add(name="min_separation_policy")
    policy.min_sep_policy.CopyFrom(eligibility_pb2.MinimumSeparationPolicy(
        current_index=result.round_number, minimum_separation=result.min_separation))
    assignment = task_assignment_pb2.TaskAssignment(
        population_name=result.population, task_id=str(result.task_id), aggregation_id=str(result.round_number),
        assignment_id=result.assignment_id, task_name=result.task_name,
        init_checkpoint=common_pb2.Resource(uri=result.checkpoint_url),
        plan=common_pb2.Resource(uri=result.plan_url), self_uri=result.self_uri, eligibility_task_info=info,
        eligibility_task_info_signature=task_assignment_pb2.EligibilityTaskInfoSignature(),
    )
    return message_response(task_assignment_pb2.CreateTaskAssignmentResponse(task_assignment=assignment), 201, request)


@ROUTER.route(
    "PUT",
    rf"/taskassignment/v1/population/(?P<population>{SEGMENT})/task/(?P<task_id>[0-9]+)"
    rf"/aggregation/(?P<round_number>[0-9]+)/task-assignment/(?P<assignment_id>[A-Za-z0-9\-]+):report-result",
)
def report_result(request: flask.Request, population: str, task_id: str, round_number: str,
                  assignment_id: str) -> flask.Response:
    body = parse_message(request, task_assignment_pb2.ReportResultRequest, max_bytes=MAX_REQUEST_BYTES)
    hint = "report COMPLETED, FAILED, NOT_ELIGIBLE or a FAILED_* code"
    if body.result not in task_assignment_pb2.ReportResultRequest.Result.values():
        raise InvalidRequestError(f"result {body.result} is not a ReportResultRequest.Result value", hint=hint)
    if body.result == task_assignment_pb2.ReportResultRequest.UNKNOWN:
        raise InvalidRequestError("result is UNKNOWN (or missing)", hint=hint)
    result = ReportedResult(task_assignment_pb2.ReportResultRequest.Result.Name(body.result))
    deps = RUNTIME.deps()
    outcome = service.report_result(deps.store, deps.blobs, deps.settings,
                                    RoundKey(population, int(task_id), int(round_number)), assignment_id, result)
    response = task_assignment_pb2.ReportResultResponse()
    if isinstance(outcome, service.Rejection):
        response.rejection_info.CopyFrom(_rejection(outcome))
    elif isinstance(outcome, service.UploadInstruction):
        response.upload_instruction.upload_location = outcome.upload_location
        response.upload_instruction.extra_request_headers.update(outcome.extra_request_headers)
        if outcome.gzip:  # unset: the device uploads the raw ClientUpdate bytes
            response.upload_instruction.compression_format = common_pb2.RESOURCE_COMPRESSION_FORMAT_GZIP
    return message_response(response, 200, request)


@functions_framework.http
def task_assignment(request: flask.Request) -> flask.Response:
    """HTTP entry point."""
    return ROUTER.dispatch(request)
