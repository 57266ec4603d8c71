"""Process helpers for the local stack: start in a new session, find, stop, verify.

Every process the stack starts gets its own session (``start_new_session=True``, so
session id = process group id = pid) and the environment marker
``FEDCOMPUTE_STACK_ID=<id>``, which all its descendants inherit (Java emulators behind
the gcloud wrapper, gunicorn workers, TFF ``worker_binary`` children). Stopping kills the
process groups, then anything still carrying the marker or still in one of the
sessions, and verifies that nothing is left.
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

STACK_ID_ENV = "FEDCOMPUTE_STACK_ID"
WORKER_BINARY = "worker_binary"


@dataclass(frozen=True)
class ProcessRef:
    """A process identified by pid *and* start time, so a reused pid is never mistaken for it."""

    pid: int
    create_time: float

    @classmethod
    def of(cls, pid: int) -> ProcessRef:
        return cls(pid, psutil.Process(pid).create_time())

    def process(self) -> psutil.Process | None:
        """The live process, or ``None`` if it exited (or the pid now belongs to another)."""
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.create_time) > 0.01:
                return None
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None

    def alive(self) -> bool:
        return self.process() is not None

    def exists(self) -> bool:
        """Whether this very process still exists, zombie included (it still holds its pid)."""
        try:
            return abs(psutil.Process(self.pid).create_time() - self.create_time) <= 0.01
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``host:port`` can be bound now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def port_owner(port: int) -> str:
    """A short description of who listens on ``port`` (best effort, may be empty)."""
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
                try:
                    cmd = " ".join(psutil.Process(conn.pid).cmdline())[:120]
                except psutil.Error:
                    cmd = "?"
                return f"pid {conn.pid}: {cmd}"
    except (psutil.Error, OSError):
        pass
    return ""


def start_process(
    cmd: Sequence[str], *, log_path: Path, env: Mapping[str, str], cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in a new session with stdout+stderr appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} $ {' '.join(cmd)}\n".encode())
        log.flush()
        return subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=str(cwd) if cwd else None,
            start_new_session=True,
        )


def _environ_marker(proc: psutil.Process) -> str | None:
    try:
        return proc.environ().get(STACK_ID_ENV)
    except (psutil.Error, OSError):
        return None


def find_stack_processes(stack_id: str, leaders: Iterable[ProcessRef] = ()) -> list[psutil.Process]:
    """Live processes that belong to the stack ``stack_id``.

    A process belongs if its environment carries the stack marker, or if it is in the
    session of one of ``leaders`` while that leader still exists (alive or zombie) with
    its recorded start time: then the session id cannot have been reused. Without a
    verified leader only the marker counts, so a stale state file never targets a
    stranger's session.
    """
    session_ids = {ref.pid for ref in leaders if ref.exists()}
    me = os.getpid()
    found: list[psutil.Process] = []
    for proc in psutil.process_iter(["pid", "status"]):
        pid = proc.info["pid"]
        if pid == me or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if _environ_marker(proc) == stack_id:
            found.append(proc)
            continue
        if session_ids:
            try:
                sid = os.getsid(pid)
            except OSError:
                continue
            if sid in session_ids:
                found.append(proc)
    return found


def signal_groups(pgids: Iterable[int], sig: int) -> None:
    """Send ``sig`` to each process group, ignoring groups that are already gone."""
    for pgid in pgids:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def terminate(procs: Sequence[psutil.Process], *, grace_s: float = 5.0, send_term: bool = True) -> list[psutil.Process]:
    """SIGTERM ``procs`` (unless already signalled: ``send_term=False``), SIGKILL whatever
    is left after ``grace_s``; return the survivors."""
    if send_term:
        for proc in procs:
            try:
                proc.terminate()
            except psutil.Error:
                pass
    _, alive = psutil.wait_procs(list(procs), timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(alive, timeout=2.0)
    return [p for p in alive if _is_running(p)]


def _is_running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _is_worker_binary(proc: psutil.Process) -> bool:
    try:
        return any(WORKER_BINARY in part for part in proc.cmdline())
    except psutil.Error:
        return False


def stray_worker_binaries(*, root_pid: int | None = None, pgid: int | None = None) -> list[psutil.Process]:
    """TFF ``worker_binary`` processes that are strays from our point of view.

    That is: descendants of ``root_pid``, members of process group ``pgid``, or orphans
    (re-parented to pid 1: their TFF parent is gone, nobody can use them). Other users'
    live workers are left alone.
    """
    candidates: dict[int, psutil.Process] = {}
    if root_pid is not None:
        try:
            for child in psutil.Process(root_pid).children(recursive=True):
                if _is_worker_binary(child):
                    candidates[child.pid] = child
        except psutil.Error:
            pass
    for proc in psutil.process_iter(["pid", "ppid"]):
        if proc.info["pid"] in candidates or not _is_worker_binary(proc):
            continue
        in_group = False
        if pgid is not None:
            try:
                in_group = os.getpgid(proc.info["pid"]) == pgid
            except OSError:
                pass
        if in_group or proc.info["ppid"] == 1:
            candidates[proc.info["pid"]] = proc
    return list(candidates.values())


def kill_worker_binaries(*, root_pid: int | None = None, pgid: int | None = None) -> int:
    """Kill the stray ``worker_binary`` processes (see :func:`stray_worker_binaries`); return how many."""
    strays = stray_worker_binaries(root_pid=root_pid, pgid=pgid)
    if strays:
        terminate(strays, grace_s=2.0)
    return len(strays)


def describe(procs: Iterable[psutil.Process]) -> str:
    """``pid: cmdline`` lines for error messages."""
    lines = []
    for proc in procs:
        try:
            lines.append(f"{proc.pid}: {' '.join(proc.cmdline())[:160]}")
        except psutil.Error:
            lines.append(f"{proc.pid}: ?")
    return "\n".join(lines)


def wait_for(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.1) -> bool:
    """Poll ``predicate()`` until it is true or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)

