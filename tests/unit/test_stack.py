"""fedcompute.stack without emulators: specs, state handling, process helpers."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from fedcompute.errors import StackError
from fedcompute.stack import ALL_FUNCTIONS, FUNCTION_SPECS, LocalStack, local, procs, push_subscription_name

SLEEPER = "import time; time.sleep(60)"


def test_function_specs_cover_the_design() -> None:
    assert ALL_FUNCTIONS == ("task_builder", "task_management", "task_assignment",
                             "result_ingestion", "aggregator", "scheduler", "dashboard")
    topics = {name: spec.topic_field for name, spec in FUNCTION_SPECS.items() if spec.topic_field}
    assert topics == {"result_ingestion": "gcs_notifications", "aggregator": "round_ready",
                      "scheduler": "scheduler_tick"}
    assert all(FUNCTION_SPECS[n].signature_type == "http" for n in ("task_builder", "task_management", "task_assignment"))
    assert push_subscription_name("round-ready", "aggregator") == "round-ready-to-aggregator"
    assert FUNCTION_SPECS["task_builder"].url_env == "FEDCOMPUTE_TASK_BUILDER_URL"


def test_every_function_source_exists() -> None:
    functions_dir = local.default_functions_dir()
    for name in ALL_FUNCTIONS:
        assert (functions_dir / name / "main.py").is_file(), name


def test_bundled_executables_are_found() -> None:
    assert os.access(local.fake_gcs_server_binary(), os.X_OK)
    assert local.functions_framework_executable().name == "functions-framework"


def test_unknown_function_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(StackError, match="unknown function.*task_bulder.*known: task_builder"):
        LocalStack(tmp_path, functions=("task_bulder",))


def test_no_stack_running(tmp_path: Path) -> None:
    stack = LocalStack(tmp_path)
    status = stack.status()
    assert not status.running and not status.healthy
    assert "no local stack running" in status.table()
    with pytest.raises(StackError, match="no local stack is running") as info:
        stack.env()
    assert "fedcompute stack up" in str(info.value)
    assert stack.stop() == []


def test_corrupt_state_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / "stack.json").write_text("{not json")
    with pytest.raises(StackError, match="cannot read the stack state"):
        LocalStack(tmp_path).status()


def test_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    assert local.log_tail(log, 3) == "line 97\nline 98\nline 99"
    assert "cannot read" in local.log_tail(tmp_path / "missing.log")


def test_free_port_and_port_is_free() -> None:
    port = procs.free_port()
    assert procs.port_is_free(port)
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        assert not procs.port_is_free(port)


def test_process_ref_detects_exit_and_pid_reuse() -> None:
    child = subprocess.Popen([sys.executable, "-c", SLEEPER])
    try:
        ref = procs.ProcessRef.of(child.pid)
        assert ref.alive()
        assert not procs.ProcessRef(child.pid, ref.create_time - 100).alive()  # same pid, other process
    finally:
        child.kill()
        child.wait()
    assert not ref.alive()


def test_find_stack_processes_by_marker(tmp_path: Path) -> None:
    marker = "test-" + os.urandom(4).hex()
    env = dict(os.environ, **{procs.STACK_ID_ENV: marker})
    child = procs.start_process([sys.executable, "-c", SLEEPER], log_path=tmp_path / "c.log", env=env)
    try:
        assert procs.wait_for(lambda: [p.pid for p in procs.find_stack_processes(marker)] == [child.pid], 5)
        assert os.getsid(child.pid) == child.pid  # its own session
        assert procs.terminate(procs.find_stack_processes(marker), grace_s=2) == []
    finally:
        child.kill()
        child.wait()
    assert procs.find_stack_processes(marker) == []
    assert "$ " in (tmp_path / "c.log").read_text()  # the command line heads the log


def test_kill_worker_binaries_kills_ours_and_spares_others() -> None:
    ours = subprocess.Popen([sys.executable, "-c", SLEEPER, "worker_binary"])
    # Someone else's live worker W: its parent B is alive, outside our process tree (B's
    # own parent A exits at once) and in another session. No literal marker in A or B.
    b_code = (
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', {SLEEPER!r}, 'worker_' + 'binary'])\n"
        "time.sleep(60)\n"
    )
    a_code = (  # B must not inherit A's stdout pipe, or reading A's output waits for B
        "import subprocess, sys\n"
        f"print(subprocess.Popen([sys.executable, '-c', {b_code!r}], stdout=subprocess.DEVNULL,"
        " stderr=subprocess.DEVNULL).pid)\n"
    )
    a = subprocess.run([sys.executable, "-c", a_code], capture_output=True, text=True, start_new_session=True, check=True)
    parent = psutil.Process(int(a.stdout))
    try:
        assert procs.wait_for(lambda: len(parent.children()) == 1, 10)
        other = parent.children()[0]
        strays = procs.stray_worker_binaries(root_pid=os.getpid(), pgid=os.getpgrp())
        assert ours.pid in {p.pid for p in strays}
        assert other.pid not in {p.pid for p in strays}
        assert procs.kill_worker_binaries(root_pid=os.getpid(), pgid=os.getpgrp()) >= 1
        assert ours.wait(timeout=5) is not None
        assert other.is_running()
    finally:
        ours.kill()
        ours.wait()
        for proc in [*parent.children(), parent]:
            with contextlib.suppress(psutil.Error):
                proc.kill()
