"""The ``local_stack`` session fixture shared by the integration and e2e tiers (a pytest plugin).

``local_stack`` starts a :class:`LocalStack` on free ports in a temporary directory,
exports its environment into ``os.environ`` for the session (so Google clients and
Settings.from_env find the emulators) and yields a :class:`StackHandle` with the
stack, its URLs, settings and clients. At the end it stops the stack and asserts that
no process of it is left. Only tests that ask for it start it.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from fedcompute.adapters.clients import Clients, make_clients
from fedcompute.settings import Settings
from fedcompute.stack import LocalStack


@dataclass
class StackHandle:
    """A running local stack plus what tests need to talk to it."""

    stack: LocalStack
    settings: Settings
    clients: Clients
    time_to_healthy_s: float

    def env(self) -> dict[str, str]:
        return self.stack.env()

    @property
    def urls(self) -> dict[str, str]:
        return self.stack.urls

    @property
    def state_dir(self) -> Path:
        return self.stack.state_dir

    def log_path(self, component: str) -> Path:
        return self.stack.log_path(component)

    def wait_for_log(self, component: str, text: str, timeout_s: float = 30.0) -> str:
        """Wait until ``text`` appears in ``component``'s log; return the matching line."""
        path = self.log_path(component)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in path.read_text(errors="replace").splitlines():
                if text in line:
                    return line
            time.sleep(0.2)
        raise AssertionError(f"{text!r} did not appear in {path} within {timeout_s} s")


def assert_nothing_left(stack: LocalStack, pids: list[psutil.Process]) -> None:
    """No process of ``stack`` (marker, sessions, recorded pids) is still running."""
    assert stack.leftover_processes() == []
    alive = [p for p in pids if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"still running: {[(p.pid, p.name()) for p in alive]}"


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackHandle]:
    yield from running_stack(tmp_path_factory)


def running_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackHandle]:
    """Start a fresh local stack, point this process at it, stop it and restore the environment after."""
    stack = LocalStack(tmp_path_factory.mktemp("stack"), task_builder_port=0)
    status = stack.start()
    saved = {key: os.environ.get(key) for key in stack.env()}
    os.environ.update(stack.env())
    try:
        settings = Settings.from_env()
        handle = StackHandle(stack, settings, make_clients(settings), status.time_to_healthy_s or 0.0)
        print(f"\nlocal stack healthy after {handle.time_to_healthy_s:.1f} s in {stack.state_dir}")
        yield handle
    finally:
        processes = stack.leftover_processes()
        stack.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        assert_nothing_left(stack, processes)
