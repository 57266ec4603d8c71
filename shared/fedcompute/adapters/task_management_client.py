"""HTTP client of the task management function (used by the task builder, CLI and tests)."""
from __future__ import annotations

from typing import Any

import requests
from google.protobuf import json_format

from fedcompute.adapters.http import keep_alive_session
from fedcompute.errors import (
    ConflictError,
    FedComputeError,
    InvalidRequestError,
    NotFoundError,
    PreconditionFailedError,
    TransientError,
    UnauthenticatedError,
)
from fedcompute.proto import task_management_pb2

PROTOBUF = "application/x-protobuf"
_ERRORS = {400: InvalidRequestError, 401: UnauthenticatedError, 404: NotFoundError, 409: ConflictError,
           412: PreconditionFailedError}


class TaskManagementClient:
    def __init__(self, base_url: str, *, api_key: str = "", timeout: float = 30.0) -> None:
        if not base_url:
            raise FedComputeError("the task management URL is not set",
                                  hint="set FEDCOMPUTE_TASK_MANAGEMENT_URL (the local stack exports it)")
        self._base = base_url.rstrip("/")
        self._headers = {"accept": PROTOBUF, **({"x-api-key": api_key} if api_key else {})}
        self._timeout = timeout
        self._session = keep_alive_session(resend_any_method=False)

    def _request(self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None) -> requests.Response:
        headers = dict(self._headers)
        if self._base.startswith("https://"):  # deployed: the function is authenticated-only
            headers["authorization"] = f"Bearer {self._id_token()}"
        data = None
        if body is not None:
            data = body.SerializeToString()
            headers["content-type"] = PROTOBUF
        try:
            response = self._session.request(method, self._base + path, data=data, headers=headers,
                                             params=params, timeout=self._timeout)
        except requests.RequestException as error:
            raise TransientError(f"task management unreachable at {self._base}: {error}") from error
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:500]
            cls = _ERRORS.get(response.status_code, TransientError if response.status_code >= 500 else FedComputeError)
            raise cls(f"task management: {message}")
        return response

    def _id_token(self) -> str:
        """A Google ID token for the task management URL (Cloud Run/Functions IAM invoker)."""
        import google.auth.transport.requests
        from google.oauth2 import id_token

        try:
            return id_token.fetch_id_token(google.auth.transport.requests.Request(), self._base)
        except Exception as error:  # noqa: BLE001 - surface any auth failure with the fix
            raise UnauthenticatedError(f"could not get an ID token for {self._base}: {error}",
                                       hint="run with a service account allowed to invoke task_management") from error

    def create_task(self, population: str, task: task_management_pb2.Task) -> task_management_pb2.Task:
        response = self._request("POST", f"/taskmanagement/v1/population/{population}:create-task",
                                 task_management_pb2.CreateTaskRequest(task=task))
        return task_management_pb2.CreateTaskResponse.FromString(response.content).task

    def get_task(self, population: str, task_id: int) -> task_management_pb2.Task:
        response = self._request("GET", f"/taskmanagement/v1/population/{population}/tasks/{task_id}:get")
        return task_management_pb2.GetTaskByIdResponse.FromString(response.content).task

    def open_task(self, population: str, task_id: int) -> task_management_pb2.Task:
        response = self._request("POST", f"/taskmanagement/v1/population/{population}/tasks/{task_id}:open")
        return task_management_pb2.GetTaskByIdResponse.FromString(response.content).task

    def cancel_task(self, population: str, task_id: int, reason: str = "") -> task_management_pb2.Task:
        response = self._request("POST", f"/taskmanagement/v1/population/{population}/tasks/{task_id}:cancel",
                                 params={"reason": reason} if reason else None)
        return task_management_pb2.GetTaskByIdResponse.FromString(response.content).task

    def delete_task(self, population: str, task_id: int) -> None:
        self._request("DELETE", f"/taskmanagement/v1/population/{population}/tasks/{task_id}")

    def list_tasks(self, population: str | None = None) -> list[task_management_pb2.Task]:
        path = f"/taskmanagement/v1/population/{population}/tasks" if population else "/taskmanagement/v1/tasks"
        response = self._request("GET", path)
        return [json_format.ParseDict(t, task_management_pb2.Task(), ignore_unknown_fields=True)
                for t in response.json()["tasks"]]
