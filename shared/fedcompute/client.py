"""The Python API of fedcompute for operators: build, list, inspect and cancel tasks; read metrics.

::

    from fedcompute.client import Client

    client = Client.from_env()            # the local stack's or a deployment's FEDCOMPUTE_* variables
    built = client.build_task("saved_model", "task_config.pbtxt")
    print(built.training_task_id, built.eval_task_id)
    for task in client.list_tasks(built.population):
        print(task_summary(task))
    client.round_metrics(built.population, built.training_task_id, 1)   # {"server/...": 0.42, ...}
    client.cancel_task(built.population, built.training_task_id, reason="enough")

Tasks are the ``task_management_pb2.Task`` protos the task management API serves
(:func:`task_to_dict` turns one into JSON-ready data). Metric values that are not finite
numbers are ``None`` (see README, "Strict JSON").
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from fedcompute import layout
from fedcompute.errors import ArtifactBuildError
from fedcompute.settings import Settings

__all__ = ["BuiltTasks", "Client", "task_summary", "task_to_dict"]


@dataclass(frozen=True)
class BuiltTasks:
    """What a task build created (task ids are 0 when the config has no such task)."""

    population: str
    training_task_id: int
    eval_task_id: int
    report: str  # the build report (protobuf text format), as task_builder_client prints it


class Client:
    """Operator client of a fedcompute deployment (local stack or Google Cloud)."""

    def __init__(self, settings: Settings | None = None, *, api_key: str | None = None,
                 timeout_s: float = 900.0) -> None:
        self.settings = settings or Settings.from_env()
        self.api_key = self.settings.api_key if api_key is None else api_key
        self.timeout_s = timeout_s
        self._management: Any = None
        self._blobs: Any = None

    @classmethod
    def from_env(cls) -> Client:
        """A client configured from the environment (``eval "$(fedcompute stack env)"`` locally)."""
        return cls(Settings.from_env())

    # -- tasks ---------------------------------------------------------------------

    @property
    def management(self) -> Any:
        if self._management is None:
            from fedcompute.adapters.task_management_client import TaskManagementClient

            self._management = TaskManagementClient(self.settings.task_management_url, api_key=self.api_key,
                                                    timeout=min(self.timeout_s, 60.0))
        return self._management

    def build_task(self, saved_model: str | os.PathLike[str], task_config: str | os.PathLike[str], *,
                   population_name: str = "", skip_flex_ops_check: bool = False,
                   skip_dp_check: bool = False) -> BuiltTasks:
        """Build the task(s) of ``task_config`` for a SavedFunctionalModel (directory, zip or gs:// path).

        Raises:
            ConfigError: the config is invalid (message names the field). ArtifactBuildError: the
            server refused the model or config. FedComputeError: the task builder is unreachable.
        """
        from fedcompute.taskbuilder.client import build_request, post_build
        from fedcompute.taskbuilder.service import report_to_text

        request, _warnings = build_request(task_config, os.fspath(saved_model), population_name=population_name,
                                           skip_flex_ops_check=skip_flex_ops_check, skip_dp_check=skip_dp_check)
        response = post_build(self.settings.task_builder_url, request, api_key=self.api_key, timeout=self.timeout_s)
        if response.WhichOneof("result") == "error_info":
            raise ArtifactBuildError(" ".join(response.error_info.error_message.split()),
                                     hint="fix the model or config as the message says, then build again")
        group = response.task_group
        report, _ = report_to_text(response)
        population = group.training_task.population_name or group.eval_task.population_name
        return BuiltTasks(population, group.training_task.task_id, group.eval_task.task_id, report)

    def list_tasks(self, population: str | None = None) -> list[Any]:
        """Tasks of ``population`` (every population when None), as ``Task`` protos."""
        return list(self.management.list_tasks(population))

    def get_task(self, population: str, task_id: int) -> Any:
        """One task (NotFoundError when it does not exist)."""
        return self.management.get_task(population, task_id)

    def cancel_task(self, population: str, task_id: int, reason: str = "") -> Any:
        """Cancel a task: no new rounds or assignments; returns the updated task."""
        return self.management.cancel_task(population, task_id, reason)

    # -- metrics -------------------------------------------------------------------

    @property
    def blobs(self) -> Any:
        if self._blobs is None:
            from fedcompute.adapters.blobs import GcsBlobStore
            from fedcompute.adapters.clients import make_clients

            self._blobs = GcsBlobStore(make_clients(self.settings).storage)
        return self._blobs

    def round_metrics(self, population: str, task_id: int, round_number: int) -> dict[str, float | None]:
        """The flat metrics object of one round (``{pop}/{task}/{n}/s/0/metrics``).

        Raises:
            NotFoundError: the round has not completed (no metrics object yet).
        """
        from fedcompute.errors import NotFoundError

        name = layout.metrics_path(population, task_id, round_number)
        try:
            data = self.blobs.read(self.settings.model_bucket, name)
        except NotFoundError as error:
            raise NotFoundError(f"round {round_number} of {population}/{task_id} has no metrics yet",
                                hint="a round's metrics appear when it completes; see client.get_task()") from error
        return dict(json.loads(data))

    def metrics(self, population: str, task_id: int) -> Any:
        """Every completed round's metrics as a ``RunMetrics`` (series per metric)."""
        from fedcompute.monitoring.metrics import load_run

        return load_run(self.blobs, self.settings.model_bucket, population, task_id)


def task_to_dict(task: Any) -> dict[str, Any]:
    """A ``Task`` proto as JSON-ready data (proto field names; status as its name)."""
    from google.protobuf import json_format

    return json_format.MessageToDict(task, preserving_proto_field_name=True)


def task_summary(task: Any) -> str:
    """One line: ``population/id  kind  STATUS  round r/total  epsilon  reason``."""
    from fedcompute.proto import task_management_pb2

    status = task_management_pb2.TaskStatus.Enum.Name(task.status)
    kind = "evaluation" if task.info.WhichOneof("info") == "evaluation_info" else "training"
    epsilon = f"eps {task.epsilon_spent:.4g}" if task.epsilon_spent else "eps -"
    line = (f"{task.population_name}/{task.task_id}  {kind:<10}  {status:<9}  "
            f"round {task.current_round}/{task.total_iteration}  {epsilon}")
    return f"{line}  {task.status_reason}" if task.status_reason else line

