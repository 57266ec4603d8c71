"""Root test configuration: shared by the unit, integration and e2e tiers."""
from __future__ import annotations

import os

import pytest

pytest_plugins = ["support.stack_plugin"]


def pytest_configure(config: pytest.Config) -> None:
    # google-api-core / google-auth warn about Python 3.11 and grpcio support dates on
    # every import; they say nothing about this project.
    config.addinivalue_line("filterwarnings", "ignore::FutureWarning:google")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Kill TFF ``worker_binary`` processes this session left behind.

    TFF's runtime starts one per process and it can outlive its parent (and keep a pipe
    open, hanging ``pytest | tail``). Ours are descendants of this process or members of
    its process group; orphans (parent gone) are strays whoever started them.
    """
    from fedcompute.stack.procs import kill_worker_binaries

    killed = kill_worker_binaries(root_pid=os.getpid(), pgid=os.getpgrp())
    if killed:
        print(f"\nkilled {killed} stray TFF worker_binary process(es)")
