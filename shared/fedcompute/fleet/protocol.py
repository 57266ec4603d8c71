"""Device side of the ODP Federated Compute HTTP protocol (light: requests + protobuf).

What an Android federated-compute client does over HTTP: check in, download the plan and
checkpoint, report the result, upload the update (gzip'd if the instruction says so) to the instructed location.
"""
from __future__ import annotations

import gzip
import threading
import urllib.parse
from dataclasses import dataclass
from typing import TypeVar

import requests
from google.protobuf.message import Message

from fedcompute.errors import FedComputeError, InvalidRequestError, TransientError
from fedcompute.proto import common_pb2, task_assignment_pb2

_M = TypeVar("_M", bound=Message)

PROTOBUF = "application/x-protobuf"
TASK_ASSIGNMENT_PREFIX = "/taskassignment/v1"


class ProtocolError(FedComputeError):
    """The server answered something a device cannot use (status and body in the message)."""


@dataclass(frozen=True)
class Rejected:
    reason: str
    retry_min_s: float
    retry_max_s: float


class DeviceHttpClient:
    """One HTTP session per device process (connection reuse); thread-safe for our use."""

    def __init__(self, assignment_url: str, *, timeout: float = 60.0) -> None:
        self._base = assignment_url.rstrip("/")
        self._timeout = timeout
        self._local = threading.local()

    @property
    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = _keep_alive_session()
        return session

    def _call(self, method: str, path: str, message: Message, response_cls: type[_M]) -> tuple[int, _M]:
        url = f"{self._base}{TASK_ASSIGNMENT_PREFIX}{path}"
        for attempt in (1, 2):
            try:
                response = self._session.request(
                    method, url, data=message.SerializeToString(),
                    headers={"content-type": PROTOBUF, "accept": PROTOBUF}, timeout=self._timeout,
                )
                break
            except requests.ConnectionError as error:
                # A kept-alive connection the server closed while idle fails before the request
                # is read ("Connection aborted"): send it once more on a fresh connection.
                if attempt == 1 and "aborted" in str(error):
                    continue
                raise TransientError(f"{method} {url} failed: {error}") from error
            except requests.RequestException as error:
                raise TransientError(f"{method} {url} failed: {error}") from error
        if response.status_code >= 500:
            raise TransientError(f"{method} {url}: HTTP {response.status_code}: {response.text[:300]}")
        if response.status_code >= 400:
            raise ProtocolError(f"{method} {url}: HTTP {response.status_code}: {response.text[:500]}")
        parsed = response_cls()
        parsed.ParseFromString(response.content)
        return response.status_code, parsed

    def create_task_assignment(
        self, population: str, version_code: str
    ) -> task_assignment_pb2.TaskAssignment | Rejected:
        request = task_assignment_pb2.CreateTaskAssignmentRequest(
            client_version=common_pb2.ClientVersion(version_code=version_code),
            resource_capabilities=common_pb2.ResourceCapabilities(
                supported_compression_formats=[common_pb2.RESOURCE_COMPRESSION_FORMAT_GZIP]),
        )
        path = f"/population/{urllib.parse.quote(population, safe='')}:create-task-assignment"
        _, response = self._call("POST", path, request, task_assignment_pb2.CreateTaskAssignmentResponse)
        if response.WhichOneof("result") == "task_assignment":
            return response.task_assignment
        return _rejected(response.rejection_info)

    def report_result(
        self, self_uri: str, result: task_assignment_pb2.ReportResultRequest.Result
    ) -> task_assignment_pb2.UploadInstruction | Rejected | None:
        request = task_assignment_pb2.ReportResultRequest(result=result)
        _, response = self._call("PUT", f"{self_uri}:report-result", request, task_assignment_pb2.ReportResultResponse)
        if response.HasField("rejection_info"):
            return _rejected(response.rejection_info)
        if response.HasField("upload_instruction"):
            return response.upload_instruction
        return None

    def download(self, url: str) -> bytes:
        try:
            response = self._session.get(url, timeout=self._timeout)
        except requests.RequestException as error:
            raise TransientError(f"GET {url} failed: {error}") from error
        if response.status_code != 200:
            raise ProtocolError(f"GET {url}: HTTP {response.status_code}")
        return response.content

    def upload(self, instruction: task_assignment_pb2.UploadInstruction, payload: bytes) -> int:
        """PUT ``payload``, gzip'd if the instruction's compression_format asks; returns the HTTP status."""
        body = payload
        if instruction.HasField("compression_format") and \
                instruction.compression_format == common_pb2.RESOURCE_COMPRESSION_FORMAT_GZIP:
            # Level 1: ~5x faster than the default on float deltas for a ~1% larger body.
            body = gzip.compress(payload, compresslevel=1, mtime=0)
        headers = dict(instruction.extra_request_headers)
        try:
            response = self._session.put(instruction.upload_location, data=body, headers=headers,
                                         timeout=self._timeout)
        except requests.RequestException as error:
            raise TransientError(f"upload failed: {error}") from error
        if response.status_code >= 500:
            raise TransientError(f"upload: HTTP {response.status_code}")
        return response.status_code


def _keep_alive_session() -> requests.Session:
    """A keep-alive session that resends a request once when its pooled connection was closed.

    Servers close idle keep-alive connections (gunicorn after 2 s); a device that reuses
    one just then gets "connection reset" before the server saw its request. One retry on
    a fresh connection is what an HTTP client library on a phone does too.
    """
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    session = requests.Session()
    retry = Retry(total=1, connect=1, read=1, status=0, other=0, allowed_methods=None, raise_on_status=False)
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _rejected(info: common_pb2.RejectionInfo) -> Rejected:
    window = info.retry_window
    return Rejected(
        reason=common_pb2.RejectionReason.Enum.Name(info.reason),
        retry_min_s=window.delay_min.seconds + window.delay_min.nanos / 1e9,
        retry_max_s=window.delay_max.seconds + window.delay_max.nanos / 1e9,
    )


def require_uri(resource: common_pb2.Resource, what: str) -> str:
    if resource.WhichOneof("resource") != "uri":
        raise InvalidRequestError(f"{what} is not a URI resource")
    return resource.uri
