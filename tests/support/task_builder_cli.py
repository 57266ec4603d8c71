"""Running ``task_builder_client`` against a local stack, and checking a build left nothing
behind (shared by the task builder and hostile-model integration tests)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedcompute.adapters.task_management_client import TaskManagementClient
from fedcompute.proto import task_management_pb2

if TYPE_CHECKING:
    from support.stack_plugin import StackHandle

REPO = Path(__file__).resolve().parents[2]
CLIENT = Path(sys.executable).with_name("task_builder_client")


@dataclass
class CliRun:
    rc: int
    stdout: str
    stderr: str
    seconds: float

    def json(self) -> dict[str, Any]:
        return json.loads(self.stdout)

    def task_ids(self) -> dict[str, int]:
        """``training``/``evaluation`` -> task id, from the text mode's stderr summary."""
        return {kind: int(task_id) for kind, task_id in
                re.findall(r"^(training|evaluation) task: population '[^']+', task_id (\d+)$", self.stderr, re.M)}


def run_cli(stack: StackHandle, *args: str, server: str | None = None, env: dict[str, str] | None = None,
            timeout: float = 600) -> CliRun:
    """``task_builder_client ARGS`` in a subprocess with the stack's environment."""
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    if env is None or "FEDCOMPUTE_API_KEY" not in env:
        full_env.pop("FEDCOMPUTE_API_KEY", None)
    cmd = [str(CLIENT), f"--task_builder_server={server or stack.urls['task_builder']}", *args]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=REPO)
    return CliRun(done.returncode, done.stdout, done.stderr, time.perf_counter() - started)


def model_objects(stack: StackHandle, prefix: str) -> list[str]:
    return sorted(b.name for b in stack.clients.storage.list_blobs(stack.settings.model_bucket, prefix=prefix))


def tasks_of(stack: StackHandle, population: str) -> list[task_management_pb2.Task]:
    return TaskManagementClient(stack.settings.task_management_url).list_tasks(population)


def assert_nothing_created(stack: StackHandle, population: str) -> None:
    assert tasks_of(stack, population) == []
    assert model_objects(stack, f"{population}/") == []
    assert model_objects(stack, f"artifacts/{population}/") == []
