"""Load scenarios against the local stack with ``fedcompute.load`` (one stack, one run).

    python -m benchmarks.bench_load                      # standard scenarios, short
    python -m benchmarks.bench_load --goal 10000         # a 10,000-report round of the small model
    python -m benchmarks.bench_load --scenario checkin   # check-in only (open, full, do-nothing baseline)
    python -m benchmarks.bench_load --scenario ingest --ingest-goal 10000   # ingestion's drain rate, 1k..10k

Scenarios (every rate has its baseline from the same run; the machine may be shared):

* ``noop``: the same generator against a do-nothing functions-framework HTTP function
  (its ceiling on this machine: the reference for check-in).
* ``checkin_open`` / ``checkin_full``: check-ins only, on a round with room to spare and
  on a full round (every check-in rejected).
* ``round``: a small-model round of ``--goal`` reports through the whole protocol; the
  round's per-stage times come from its Firestore record; exactly-once is checked
  (accepted == goal, one checkpoint, equal to the initial weights + the mean of zero deltas).
* ``ingest``: result ingestion alone, at the rate it drains a backlog. The push relay (the
  local stand-in for Pub/Sub push to ingestion) is paused while ``--ingest-goal`` devices run
  the whole protocol, so every upload's notification waits in the subscription; then it is
  resumed and ingestion's accept times (its log) give the rate per tenth of the round, from
  the first uploads to the last (flat = O(1) per upload). Its baseline: the same relay at the
  same concurrency draining as many messages into a do-nothing event function.

Writes the JSON report to ``--out`` (default: standard output).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

NOOP_SOURCE = '''
import functions_framework


@functions_framework.http
def noop(request):
    request.get_data()
    return b"", 200, {"content-type": "application/x-protobuf"}
'''

NOOP_EVENT_SOURCE = '''
import os
import time

import functions_framework

EVENTS = os.environ["NOOP_EVENTS_FILE"]


@functions_framework.cloud_event
def noop_event(cloud_event):
    with open(EVENTS, "a") as out:
        out.write(f"{cloud_event['id']} {time.time()}\\n")
'''

SHAPES = ((64, 10), (10,))  # a small model: 650 weights
# The seed's EMNIST CNN (1,663,370 float32 weights, a 6.6 MB update), as trainable shapes.
CNN_SHAPES = ((5, 5, 1, 32), (32,), (5, 5, 32, 64), (64,), (3136, 512), (512,), (512, 10), (10,))


def create_task(settings: Any, clients: Any, population: str, goal: int, over: float,
                shapes: tuple[tuple[int, ...], ...] = SHAPES) -> int:
    import numpy as np

    from fedcompute.adapters.blobs import GcsBlobStore
    from fedcompute.adapters.task_management_client import TaskManagementClient
    from fedcompute.dp import DpParams
    from fedcompute.plans import ServerPhase
    from fedcompute.proto import task_management_pb2
    from fedcompute.taskbuilder.artifacts import artifacts_from_weights, publish_artifacts, weight_specs

    management = TaskManagementClient(settings.task_management_url, api_key=settings.api_key, timeout=180)
    max_size = int(np.floor(goal * (1.0 + over) + 1e-9))
    created = management.create_task(population, task_management_pb2.Task(
        total_iteration=1, min_aggregation_size=goal, max_aggregation_size=max_size))
    initial = [np.random.default_rng(0).normal(size=s).astype(np.float32) for s in shapes]
    phase = ServerPhase(learning_algo="FED_AVG", server_optimizer="SGD", server_learning_rate=1.0, report_goal=goal,
                        over_selection_rate=max_size / goal - 1.0, total_rounds=1, population_size=1_000_000,
                        target_epsilon=10.0, delta=1e-6, dp=DpParams(mechanism=None),
                        weights=weight_specs(initial), metrics=())
    blobs = GcsBlobStore(clients.storage, public_base_url=settings.storage_public_url or None)
    publish_artifacts(blobs, settings, population, created.task_id,
                      artifacts_from_weights(phase, initial, client_plan=b"synthetic plan"))
    management.open_task(population, created.task_id)
    return int(created.task_id)


def start_noop(work: Path) -> tuple[Any, str]:
    import requests

    from fedcompute.stack.local import functions_framework_executable
    from fedcompute.stack.procs import free_port, start_process

    source = work / "noop" / "main.py"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_text(NOOP_SOURCE)
    port = free_port()
    process = start_process([str(functions_framework_executable()), "--source", str(source), "--target", "noop",
                             "--signature-type", "http", "--host", "127.0.0.1", "--port", str(port)],
                            log_path=work / "noop.log", env=dict(os.environ), cwd=source.parent)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            requests.post(f"{url}/x", timeout=1)
            return process, url
        except requests.RequestException:
            time.sleep(0.2)
    raise RuntimeError("the do-nothing function did not start")


def start_noop_event(work: Path, events_file: Path) -> tuple[Any, str]:
    """A do-nothing CloudEvent function that appends each event's id and time to ``events_file``."""
    from fedcompute.stack.local import functions_framework_executable
    from fedcompute.stack.procs import free_port, start_process

    source = work / "noop_event" / "main.py"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_text(NOOP_EVENT_SOURCE)
    port = free_port()
    process = start_process([str(functions_framework_executable()), "--source", str(source), "--target",
                             "noop_event", "--signature-type", "cloudevent", "--host", "127.0.0.1",
                             "--port", str(port)],
                            log_path=work / "noop_event.log", env={**os.environ, "NOOP_EVENTS_FILE": str(events_file)},
                            cwd=source.parent)
    return process, f"http://127.0.0.1:{port}"


def component(stack: Any, name: str) -> Any:
    """The running stack's component ``name`` (its pid, log, url)."""
    for found in stack.status().components:
        if found.name == name and found.pid:
            return found
    raise RuntimeError(f"the local stack has no running {name}")


def accept_times(log_path: Path, population: str) -> tuple[list[float], dict[str, int]]:
    """Ingestion's verdicts on ``population``'s uploads from its JSON log: sorted accept times, outcomes."""
    from collections import Counter
    from datetime import datetime

    times: list[float] = []
    outcomes: Counter[str] = Counter()
    for line in log_path.read_text(errors="replace").splitlines():
        if not line.startswith("{") or f"/{population}/" not in line:
            continue
        record = json.loads(line)
        message = record.get("message", "")
        if not message.startswith("ingestion of gs://"):
            continue
        outcome = message.rsplit(": ", 1)[-1].split()[0]
        outcomes[outcome] += 1
        if outcome == "ACCEPTED":
            times.append(datetime.fromisoformat(record["time"]).timestamp())
    return sorted(times), dict(outcomes)


def steady_rate(times: list[float]) -> float:
    """Events per second from the first to the last of ``times`` (start-up excluded)."""
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    return round((len(times) - 1) / span, 1) if span > 0 else 0.0


def rates_per_tenth(times: list[float], started: float) -> list[float]:
    """Accepts per second in each tenth of ``times`` (the first tenth measured from ``started``)."""
    block = max(len(times) // 10, 1)
    rates, previous = [], started
    for end in range(block, len(times) + 1, block):
        span = times[end - 1] - previous
        rates.append(round(block / span, 1) if span > 0 else 0.0)
        previous = times[end - 1]
    return rates


WARM_UP_UPLOADS = 50


def ingest_drain(stack: Any, settings: Any, clients: Any, store: Any, population: str, goal: int,
                 devices_at_once: int, profiler: Profiler) -> dict[str, Any]:
    """Fill a round's backlog with the relay paused (``devices_at_once`` device sessions at a
    time), then time ingestion draining it."""
    import signal

    from fedcompute.load import LoadConfig, run_load
    from fedcompute.stack.local import PUSH_RELAY

    # Warm-up, as the do-nothing function gets one: ingestion's first uploads create its
    # storage clients and read its keys, which is not the per-upload cost being measured.
    warm_id = create_task(settings, clients, f"{population}_warm", goal=WARM_UP_UPLOADS, over=0.0)
    run_load(LoadConfig(url=settings.task_assignment_url, population=f"{population}_warm", devices=WARM_UP_UPLOADS,
                        concurrency=devices_at_once))
    wait_round(store, f"{population}_warm", warm_id, timeout_s=300.0)
    task_id = create_task(settings, clients, population, goal=goal, over=0.0)
    relay = int(component(stack, PUSH_RELAY).pid)
    os.kill(relay, signal.SIGSTOP)
    try:
        fill = run_load(LoadConfig(url=settings.task_assignment_url, population=population, devices=goal,
                                   concurrency=devices_at_once))
    finally:
        profiler.start("result_ingestion", function_pids(stack)["result_ingestion"])
        cpu_before = component_cpu_s(stack)
        resumed = time.time()
        os.kill(relay, signal.SIGCONT)
    round_record = wait_round(store, population, task_id, timeout_s=max(600.0, goal / 2))
    cpu_after = component_cpu_s(stack)
    profile = profiler.stop()
    times, outcomes = accept_times(Path(component(stack, "result_ingestion").log), population)
    drain = times[-1] - resumed if times else 0.0
    tenths = rates_per_tenth(times, resumed)
    return {
        "goal": goal, "uploads_queued": fill["uploads"], "fill_errors": fill["errors"],
        "fill_rejections": fill["rejections"], "outcomes": outcomes, "accepted": len(times),
        "drain_s": round(drain, 2), "accepted_per_s": steady_rate(times),
        "accepted_per_s_by_tenth": tenths,
        "last_tenth_vs_first": round(tenths[-1] / tenths[0], 2) if tenths and tenths[0] else None,
        "round_status": round_record.status.value, "profile": profile,
        "cpu_ms_per_upload": cpu_ms_per(cpu_before, cpu_after, len(times)),
    }


def noop_event_drain(work: Path, stack: Any, messages: int, concurrency: int, *,
                     like_ingestion: bool = True) -> dict[str, Any]:
    """The relay at ``concurrency`` draining ``messages`` notifications into a do-nothing event
    function; ``per_s`` from its first event to its last, as for ingestion. ``like_ingestion``:
    the subscription has ingestion's dead-letter and retry policies and ack deadline (the
    emulator's bookkeeping for them costs it CPU per message), else a plain pull subscription."""
    import base64
    import subprocess

    import requests

    from fedcompute.catalogue import FUNCTIONS
    from fedcompute.stack.local import PubSubAdmin
    from fedcompute.stack.procs import terminate

    events_file = work / "noop_events.txt"
    events_file.write_text("")
    process, url = start_noop_event(work, events_file)
    project, pubsub = stack.project, component(stack, "pubsub")
    base = f"{pubsub.url}/v1/projects/{project}"
    topic = subscription = f"noop-drain-{int(time.time())}"
    http = requests.Session()
    admin = PubSubAdmin(http, pubsub.url, project, pubsub.log)
    admin.create_topic(topic)
    if like_ingestion:
        admin.create_topic(f"{topic}-dead-letter")
        admin.create_push_subscription(subscription, topic, None, dead_letter_topic=f"{topic}-dead-letter",
                                       ack_deadline_s=FUNCTIONS["result_ingestion"].ack_deadline_s)
    else:
        admin.create_pull_subscription(subscription, topic)
    # A finalize notification's size and attributes, as fake-gcs publishes them.
    body = base64.b64encode(json.dumps({"kind": "storage#object", "bucket": "gradients", "name": "p/1/1/d/" + "a" * 36
                                        + "/gradient", "size": "3000", "generation": "1"}).encode()).decode()
    for start in range(0, messages, 1000):
        batch = [{"data": body, "attributes": {"eventType": "OBJECT_FINALIZE", "bucketId": "gradients",
                                               "objectId": f"p/1/1/d/{i}/gradient"}}
                 for i in range(start, min(start + 1000, messages))]
        http.post(f"{base}/topics/{topic}:publish", json={"messages": batch}, timeout=60).raise_for_status()
    deadline = time.time() + 60
    while time.time() < deadline:  # the function is up when it answers a push
        try:
            http.post(f"{url}/projects/{project}/topics/{topic}", json={"message": {"data": body, "messageId": "w"},
                      "subscription": "warm"}, timeout=2)
            break
        except requests.RequestException:
            time.sleep(0.2)
    import psutil

    pubsub_before, noop_before = component_cpu_s(stack)["pubsub"], tree_cpu_s(process.pid)
    started = time.time()
    relay = subprocess.Popen([sys.executable, "-m", "fedcompute.stack.push_relay", "--route",
                              f"projects/{project}/subscriptions/{subscription}="
                              f"{url}/projects/{project}/topics/{topic}:{concurrency}"],
                             env={**os.environ, **stack.env()}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + max(300.0, messages / 5)
        while time.time() < deadline:
            delivered = sum(1 for line in events_file.read_text().splitlines() if not line.startswith("w "))
            if delivered >= messages:
                break
            time.sleep(0.2)
        elapsed = time.time() - started
        first_times: dict[str, float] = {}  # a redelivered message counts once
        for line in events_file.read_text().splitlines():
            event_id, _, at = line.partition(" ")
            if event_id != "w":
                first_times.setdefault(event_id, float(at))
        used = {"noop_event": tree_cpu_s(process.pid) - noop_before, "push_relay": tree_cpu_s(relay.pid),
                "pubsub": component_cpu_s(stack)["pubsub"] - pubsub_before}
    finally:
        relay.terminate()
        relay.wait(timeout=30)
        terminate([psutil.Process(process.pid)])
    return {"messages": messages, "delivered": len(first_times), "drain_s": round(elapsed, 2),
            "per_s": steady_rate(sorted(first_times.values())), "concurrency": concurrency,
            "subscription": "ingestion's policies" if like_ingestion else "plain pull",
            "cpu_ms_per_event": cpu_ms_per({}, used, len(first_times))}


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` and its descendants have used so far."""
    import psutil

    total = 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return total
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            continue
    return total


def component_cpu_s(stack: Any) -> dict[str, float]:
    """CPU seconds each stack component's process tree has used so far."""
    return {comp.name: tree_cpu_s(comp.pid) for comp in stack.status().components if comp.pid}


def settle(stack: Any, *, quiet_share: float = 0.1, window_s: float = 2.0, timeout_s: float = 180.0) -> float:
    """Wait until the stack uses under ``quiet_share`` of one core over ``window_s`` (the
    aggregator imports TensorFlow in the background after start: ~15 CPU-s that would
    otherwise land in the first scenario); returns the seconds waited."""
    started = time.time()
    while time.time() - started < timeout_s:
        before = sum(component_cpu_s(stack).values())
        time.sleep(window_s)
        if sum(component_cpu_s(stack).values()) - before < quiet_share * window_s:
            break
    return round(time.time() - started, 1)


def own_cpu_s() -> float:
    """CPU seconds this process (the load generator) has used so far."""
    times = os.times()
    return times.user + times.system


def cpu_ms_per(before: dict[str, float], after: dict[str, float], events: int) -> dict[str, float]:
    """Each component's CPU milliseconds per event between two ``component_cpu_s`` readings."""
    per = {name: round((after[name] - before.get(name, 0.0)) * 1000 / max(events, 1), 2) for name in after}
    return {name: ms for name, ms in sorted(per.items(), key=lambda item: -item[1]) if ms > 0}


def function_pids(stack: Any) -> dict[str, int]:
    """Function name -> pid of the worker process serving it (the leader's newest child, or itself)."""
    import psutil

    pids = {}
    for component in stack.status().components:
        if component.kind != "function" or not component.pid:
            continue
        try:
            proc = psutil.Process(component.pid)
            children = proc.children(recursive=True)
            pids[component.name] = children[-1].pid if children else proc.pid
        except psutil.Error:
            continue
    return pids


class Profiler:
    """``py-spy record`` of named processes while a scenario runs; top frames from the raw stacks."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self.running: dict[str, tuple[Any, Path]] = {}

    def start(self, name: str, pid: int) -> None:
        import shutil
        import subprocess

        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if self.directory is None or not Path(spy).exists():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        out = self.directory / f"{name}.txt"
        process = subprocess.Popen([spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "50",
                                    "--output", str(out), "--nonblocking"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.running[name] = (process, out)

    def stop(self, top: int = 12) -> dict[str, Any]:
        import signal

        found: dict[str, Any] = {}
        for name, (process, out) in self.running.items():
            process.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            process.wait(timeout=60)
            found[name] = top_frames(out, top)
        self.running.clear()
        return found


def top_frames(path: Path, top: int) -> dict[str, Any]:
    """Self and inclusive sample shares of the hottest frames of a py-spy raw (collapsed) file."""
    from collections import Counter

    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    if not path.exists():
        return {}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if f]
        total += n
        if frames:
            own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    def share(counts: Counter[str]) -> dict[str, float]:
        return {f: round(100.0 * n / total, 1) for f, n in counts.most_common(top)} if total else {}

    ours = Counter({f: n for f, n in inclusive.items() if "fedcompute/" in f or "main.py" in f})
    return {"samples": total, "self_pct": share(own), "project_inclusive_pct": share(ours)}


def checkpoint_drift(clients: Any, settings: Any, population: str, task_id: int) -> float:
    """Max absolute difference between the round-1 checkpoint's weights and the initial ones.
    The synthetic devices send zero deltas and the round scenario adds no noise, so the numpy
    reference for round 1 is the initial weights themselves. It catches corrupted or
    misordered weights, noise where none is configured and a wrong server step; with zero
    deltas it cannot see a wrong count (``exactly_goal`` and ``num_reports`` do)."""
    import numpy as np

    from fedcompute import layout
    from fedcompute.learning.checkpoint import decode_checkpoint

    bucket = clients.storage.bucket(settings.model_bucket)
    before, after = (decode_checkpoint(bucket.blob(layout.checkpoint_path(population, task_id, n)).download_as_bytes())
                     for n in (0, 1))
    if len(before.weights) != len(after.weights):
        raise AssertionError(f"round 1 changed the number of weight tensors: {len(before.weights)} -> "
                             f"{len(after.weights)}")
    return max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0.0))
               for b, a in zip(before.weights, after.weights))


def wait_round(store: Any, population: str, task_id: int, timeout_s: float) -> Any:
    from fedcompute.tasks.records import RoundKey

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        round_record = store.get_round(RoundKey(population, task_id, 1))
        if round_record is not None and round_record.status.value in ("COMPLETED", "FAILED", "CANCELED"):
            return round_record
        time.sleep(0.5)
    raise TimeoutError(f"round 1 of {population}/{task_id} did not complete in {timeout_s} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=("all", "checkin", "round", "ingest"), default="all")
    parser.add_argument("--checkins", type=int, default=2000, help="check-ins per check-in scenario")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--goal", type=int, default=1000, help="report goal of the round scenario")
    parser.add_argument("--ingest-goal", type=int, default=2000, help="uploads drained by the ingest scenario")
    parser.add_argument("--model", choices=("small", "cnn"), default="small",
                        help="round scenario's model: small (650 weights) or the seed CNN's shapes (6.6 MB updates)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="py-spy record the functions during each scenario; top frames go to the report")
    args = parser.parse_args(argv)

    from fedcompute.adapters.clients import make_clients
    from fedcompute.adapters.firestore_store import FirestoreTaskStore
    from fedcompute.load import LoadConfig, peak_rss_mib, round_stages, run_load
    from fedcompute.settings import Settings
    from fedcompute.stack import LocalStack
    from fedcompute.stack.procs import terminate

    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    stack = LocalStack(work / "stack", task_builder_port=0)
    stack.start()
    noop = None
    profiler = Profiler(Path(args.profile) if args.profile else None)
    report: dict[str, Any] = {"machine": f"{os.cpu_count()} cores, shared with other work; ratios are from one run"}
    try:
        report["settled_after_start_s"] = settle(stack)
        os.environ.update(stack.env())
        settings = Settings.from_env()
        clients = make_clients(settings)
        store = FirestoreTaskStore(clients.firestore)
        url = settings.task_assignment_url
        tag = str(int(time.time()))
        if args.scenario in ("all", "checkin"):
            import psutil

            noop, noop_url = start_noop(work)
            warm = LoadConfig(url=noop_url, population="noop", devices=200, concurrency=args.concurrency,
                              protocol="check-in")
            run_load(warm)
            report["noop"] = run_load(LoadConfig(url=noop_url, population="noop", devices=args.checkins,
                                                 concurrency=args.concurrency, protocol="check-in"))
            open_pop = f"open_{tag}"
            create_task(settings, clients, open_pop, goal=10 * args.checkins, over=0.3)
            run_load(LoadConfig(url=url, population=open_pop, devices=100, concurrency=8, protocol="check-in"))
            profiler.start("task_assignment", function_pids(stack)["task_assignment"])
            cpu_before = {**component_cpu_s(stack), "load generator": own_cpu_s()}
            report["checkin_open"] = run_load(LoadConfig(url=url, population=open_pop, devices=args.checkins,
                                                         concurrency=args.concurrency, protocol="check-in"))
            report["checkin_open"]["cpu_ms_per_check_in"] = cpu_ms_per(
                cpu_before, {**component_cpu_s(stack), "load generator": own_cpu_s()}, args.checkins)
            report["profile_checkin_open"] = profiler.stop()
            full_pop = f"full_{tag}"
            create_task(settings, clients, full_pop, goal=5, over=0.0)
            run_load(LoadConfig(url=url, population=full_pop, devices=20, concurrency=4, protocol="check-in"))
            report["checkin_full"] = run_load(LoadConfig(url=url, population=full_pop, devices=args.checkins,
                                                         concurrency=args.concurrency, protocol="check-in"))
            noop_rate = report["noop"]["endpoints"]["check_in"]["per_s"]
            report["ratios_vs_noop"] = {
                name: round(report[name]["endpoints"]["check_in"]["per_s"] / noop_rate, 3)
                for name in ("checkin_open", "checkin_full")}
            report["noop_function_rss_mib"] = round(psutil.Process(noop.pid).memory_info().rss / 2**20, 1)
        if args.scenario in ("all", "round"):
            pop = f"round_{tag}"
            over = 0.3
            task_id = create_task(settings, clients, pop, goal=args.goal, over=over,
                                  shapes=CNN_SHAPES if args.model == "cnn" else SHAPES)
            devices = int(args.goal * (1 + over))
            pids = function_pids(stack)
            for name in ("task_assignment", "result_ingestion", "aggregator"):
                profiler.start(name, pids[name])
            started = time.time()
            load = run_load(LoadConfig(url=url, population=pop, devices=devices, concurrency=args.concurrency))
            round_record = wait_round(store, pop, task_id, timeout_s=max(300.0, args.goal / 5))
            report["profile_round"] = profiler.stop()
            from fedcompute import layout
            from fedcompute.tasks.records import AssignmentStatus, RoundKey

            key = RoundKey(pop, task_id, 1)
            accepted = store.count_assignments(key, AssignmentStatus.UPLOAD_COMPLETED)
            frozen = len(store.accepted_ids(key))
            stages = round_stages(store, pop, task_id, 1)
            collect_from_first_upload = round_record.aggregating_time - started
            report["round"] = {
                "goal": args.goal, "model": args.model, "devices": devices, "load": load, "stages": stages,
                "accepted": accepted, "accepted_set": frozen,
                "exactly_goal": accepted == frozen == args.goal,
                "checkpoint_max_abs_diff_from_reference": checkpoint_drift(clients, settings, pop, task_id),
                "metrics": json.loads(clients.storage.bucket(settings.model_bucket)
                                      .blob(layout.metrics_path(pop, task_id, 1)).download_as_bytes()),
                "accepted_per_s_over_collect": round(args.goal / max(collect_from_first_upload, 1e-9), 1),
            }
        if args.scenario in ("all", "ingest"):
            from fedcompute.catalogue import FUNCTIONS

            concurrency = FUNCTIONS["result_ingestion"].concurrency
            # The do-nothing drain brackets ingestion's: the emulators' JVMs get faster as they
            # warm (Pub/Sub CPU per message fell 2.4 -> 1.0 ms over successive 2,000-message
            # drains), so a baseline taken only after ingestion would be flattered.
            noop_before = noop_event_drain(work, stack, args.ingest_goal, concurrency)
            report["ingest"] = ingest_drain(stack, settings, clients, store, f"ingest_{tag}", args.ingest_goal,
                                            args.concurrency, profiler)
            noop_after = noop_event_drain(work, stack, args.ingest_goal, concurrency)
            report["ingest_noop_event"] = {"before": noop_before, "after": noop_after,
                                           "per_s": round((noop_before["per_s"] + noop_after["per_s"]) / 2, 1)}
            report["ingest_noop_event_plain_subscription"] = noop_event_drain(
                work, stack, args.ingest_goal, concurrency, like_ingestion=False)
            rate = report["ingest"]["accepted_per_s"]
            report["ingest"]["vs_noop_event"] = round(rate / max(report["ingest_noop_event"]["per_s"], 1e-9), 3)
            report["ingest"]["vs_noop_event_after_only"] = round(rate / max(noop_after["per_s"], 1e-9), 3)
        report["peak_rss_mib"] = peak_rss_mib(function_pids(stack))
    finally:
        profiler.stop()
        if noop is not None:
            import psutil

            terminate([psutil.Process(noop.pid)])
        stack.stop()
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
