"""The local stack end to end: emulators round-trip data, functions answer, push works."""
from __future__ import annotations

import json
import os
import shlex
import signal
import time
import uuid
from typing import TYPE_CHECKING

import psutil
import pytest
from google.api_core.exceptions import DeadlineExceeded

from fedcompute.cli.main import main as cli_main
from fedcompute.errors import StackError
from fedcompute.services.scheduler import Timeouts
from fedcompute.settings import Topics
from fedcompute.stack import ALL_FUNCTIONS, FUNCTION_SPECS, LocalStack, push_subscription_name
from fedcompute.stack.local import PUSH_RELAY, TICKER, relayed
from fedcompute.stack.procs import wait_for
from fedcompute.stack.ticker import DEFAULT_INTERVAL_S
from fedcompute.web import EVENT_TYPE_ATTRIBUTE, HEALTH_EVENT_TYPE, health_event_headers
from support.helpers import http, unique
from support.stack_plugin import assert_nothing_left

pytestmark = pytest.mark.integration

HTTP_FUNCTIONS = [n for n in ALL_FUNCTIONS if FUNCTION_SPECS[n].signature_type == "http"]
CLOUDEVENT_FUNCTIONS = [n for n in ALL_FUNCTIONS if FUNCTION_SPECS[n].signature_type == "cloudevent"]


if TYPE_CHECKING:
    from support.stack_plugin import StackHandle  # the local_stack fixture's value


def test_stack_is_healthy_fast(local_stack: StackHandle) -> None:
    status = local_stack.stack.status()
    assert status.healthy, status.table()
    assert {c.name for c in status.components} == {"firestore", "pubsub", "gcs", *ALL_FUNCTIONS, TICKER, PUSH_RELAY}
    assert local_stack.time_to_healthy_s < 30.0


def test_the_ticker_runs_the_scheduler_periodically(local_stack: StackHandle) -> None:
    """Issue 13: locally nothing ticked the scheduler, so expired slots were held forever."""
    line = local_stack.wait_for_log(TICKER, "tick published: ", timeout_s=DEFAULT_INTERVAL_S + 30)
    message_id = line.rsplit("tick published: ", 1)[1].strip()
    assert local_stack.wait_for_log("scheduler", f"scheduler tick {message_id}:", timeout_s=30)


def test_firestore_round_trip(local_stack: StackHandle) -> None:
    doc = local_stack.clients.firestore.collection("it-stack").document(unique("doc"))
    doc.set({"round": 3, "status": "COLLECTING"})
    assert doc.get().to_dict() == {"round": 3, "status": "COLLECTING"}
    doc.delete()
    assert not doc.get().exists


def test_pubsub_publish_and_pull(local_stack: StackHandle) -> None:
    publisher, subscriber = local_stack.clients.publisher, local_stack.clients.subscriber
    project = local_stack.settings.project
    topic = publisher.topic_path(project, unique("it-topic"))
    subscription = subscriber.subscription_path(project, unique("it-sub"))
    publisher.create_topic(name=topic)
    subscriber.create_subscription(name=subscription, topic=topic)
    try:
        publisher.publish(topic, b"\x00hello", round="7").result(timeout=10)
        response = subscriber.pull(subscription=subscription, max_messages=5, timeout=10)
        assert [(m.message.data, dict(m.message.attributes)) for m in response.received_messages] == [
            (b"\x00hello", {"round": "7"})
        ]
        subscriber.acknowledge(subscription=subscription, ack_ids=[m.ack_id for m in response.received_messages])
    finally:
        subscriber.delete_subscription(subscription=subscription)
        publisher.delete_topic(topic=topic)


def test_the_push_relay_delivers_above_the_emulators_two_loops_and_keeps_retry_and_dead_letters(
        local_stack: StackHandle) -> None:
    """The emulator pushes at most 2 requests at once, which capped ingestion at 2 uploads in
    flight; the relay delivers a pull subscription at the function's concurrency with push's
    body, and the emulator still backs off, counts attempts and dead-letters."""
    import base64
    import http.server
    import socketserver
    import threading

    from fedcompute.stack.push_relay import Relay, Route

    project = local_stack.settings.project
    publisher, subscriber = local_stack.clients.publisher, local_stack.clients.subscriber
    seen: list[dict] = []
    state = {"now": 0, "max": 0}
    lock = threading.Lock()

    class Endpoint(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            with lock:
                state["now"] += 1
                state["max"] = max(state["max"], state["now"])
                seen.append(body)
            time.sleep(0.2)
            with lock:
                state["now"] -= 1
            failing = body["message"].get("attributes", {}).get("fail") == "yes"
            self.send_response(500 if failing else 204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True

    server = Server(("127.0.0.1", 0), Endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    topic, dead = publisher.topic_path(project, unique("relay")), publisher.topic_path(project, unique("relay-dl"))
    sub = subscriber.subscription_path(project, unique("relay-sub"))
    dead_sub = subscriber.subscription_path(project, unique("relay-dl-sub"))
    publisher.create_topic(name=topic)
    publisher.create_topic(name=dead)
    subscriber.create_subscription(name=dead_sub, topic=dead)
    subscriber.create_subscription(request={
        "name": sub, "topic": topic, "ack_deadline_seconds": 30,
        "dead_letter_policy": {"dead_letter_topic": dead, "max_delivery_attempts": 5},
        "retry_policy": {"minimum_backoff": {"seconds": 1}, "maximum_backoff": {"seconds": 2}}})
    stop = threading.Event()
    relay = Relay(f"http://{local_stack.env()['PUBSUB_EMULATOR_HOST']}",
                  Route(sub, f"http://127.0.0.1:{server.server_address[1]}/projects/{project}/topics/x", 6), stop)
    relay.start()
    try:
        ids = {publisher.publish(topic, f"m{i}".encode(), n=str(i)).result(timeout=10) for i in range(30)}
        assert wait_for(lambda: relay.delivered >= 30, timeout_s=30)
        delivered = [b for b in seen if b["message"].get("attributes", {}).get("n")]
        assert {b["message"]["messageId"] for b in delivered} == ids
        assert 2 < state["max"] <= 6  # above the emulator's two loops, within the route's concurrency
        first = delivered[0]
        assert base64.b64decode(first["message"]["data"]).startswith(b"m")
        assert first["subscription"] == sub and first["message"]["message_id"] == first["message"]["messageId"]

        failing_id = publisher.publish(topic, b"bad", fail="yes").result(timeout=10)
        attempts = lambda: [b.get("deliveryAttempt") for b in seen if b["message"]["messageId"] == failing_id]  # noqa: E731
        assert wait_for(lambda: len(attempts()) >= 5, timeout_s=60)
        assert attempts()[:5] == [1, 2, 3, 4, 5]
        moved = subscriber.pull(subscription=dead_sub, max_messages=5, timeout=30)
        assert [m.message.data for m in moved.received_messages] == [b"bad"]
        time.sleep(3)  # past the backoff: no sixth delivery of a dead-lettered message
        assert len(attempts()) == 5 and relay.failed == 5
    finally:
        stop.set()
        server.shutdown()
        subscriber.delete_subscription(subscription=sub)
        subscriber.delete_subscription(subscription=dead_sub)
        publisher.delete_topic(topic=topic)
        publisher.delete_topic(topic=dead)


def pull_until(subscriber, subscription: str, predicate, timeout_s: float = 20.0) -> list:
    """Pull (and ack) messages until one satisfies ``predicate``; return all pulled."""
    pulled = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            response = subscriber.pull(subscription=subscription, max_messages=50, timeout=2)
        except DeadlineExceeded:
            continue
        if response.received_messages:
            subscriber.acknowledge(subscription=subscription, ack_ids=[m.ack_id for m in response.received_messages])
            pulled.extend(m.message for m in response.received_messages)
            if any(predicate(m) for m in pulled):
                return pulled
        else:
            time.sleep(0.2)
    raise AssertionError(f"no matching message within {timeout_s} s; got {[dict(m.attributes) for m in pulled]}")


def test_gcs_round_trip_and_finalize_notification(local_stack: StackHandle) -> None:
    settings, clients = local_stack.settings, local_stack.clients
    topic = clients.publisher.topic_path(settings.project, settings.topics.gcs_notifications)
    subscription = clients.subscriber.subscription_path(settings.project, unique("it-finalize"))
    clients.subscriber.create_subscription(name=subscription, topic=topic)
    try:
        model_name = f"{unique('pop')}/1/0/s/0/checkpoint"
        clients.storage.bucket(settings.model_bucket).blob(model_name).upload_from_string(b"model")
        name = f"{unique('pop')}/1/0/d/{uuid.uuid4()}/gradient"
        blob = clients.storage.bucket(settings.gradient_bucket).blob(name)
        blob.upload_from_string(b"\x1f\x8bupdate", if_generation_match=0)
        assert clients.storage.bucket(settings.gradient_bucket).blob(name).download_as_bytes() == b"\x1f\x8bupdate"

        pulled = pull_until(clients.subscriber, subscription, lambda m: m.attributes.get("objectId") == name)
        finalize = next(m for m in pulled if m.attributes.get("objectId") == name)
        assert finalize.attributes["eventType"] == "OBJECT_FINALIZE"
        assert finalize.attributes["bucketId"] == settings.gradient_bucket
        assert json.loads(finalize.data)["name"] == name
        # Like the cloud's Eventarc trigger, only the gradient bucket notifies.
        assert all(m.attributes.get("bucketId") == settings.gradient_bucket for m in pulled)
        # The same notification was pushed to result_ingestion.
        local_stack.wait_for_log("result_ingestion", f"event received by result_ingestion: id={finalize.message_id} ")
    finally:
        clients.subscriber.delete_subscription(subscription=subscription)


def test_public_download_url_serves_objects(local_stack: StackHandle) -> None:
    """Devices download artifacts from FEDCOMPUTE_STORAGE_PUBLIC_URL/<bucket>/<object>."""
    settings = local_stack.settings
    name = f"{unique('pop')}/1/0/s/0/client_only_plan"
    local_stack.clients.storage.bucket(settings.model_bucket).blob(name).upload_from_string(b"plan-bytes")
    response = http().get(f"{settings.storage_public_url}/{settings.model_bucket}/{name}", timeout=10)
    assert response.status_code == 200 and response.content == b"plan-bytes"


@pytest.mark.parametrize("name", HTTP_FUNCTIONS)
def test_http_function_health_and_404(local_stack: StackHandle, name: str) -> None:
    base = local_stack.urls[name]
    assert base == local_stack.env()[FUNCTION_SPECS[name].url_env]
    health = http().get(f"{base}/healthz", timeout=10)
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["function"] == name
    assert health.json()["project"] == local_stack.settings.project
    missing = http().get(f"{base}/no/such/route", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["status"] == "NOT_FOUND"


@pytest.mark.parametrize("name", CLOUDEVENT_FUNCTIONS)
def test_cloudevent_function_health_probe(local_stack: StackHandle, name: str) -> None:
    event_id = unique("probe")
    response = http().post(local_stack.urls[name] + "/", headers=health_event_headers(event_id), data=b"{}", timeout=10)
    assert response.status_code == 200
    local_stack.wait_for_log(name, f"health event received by {name}: id={event_id}", timeout_s=10)


def test_push_subscriptions_are_configured(local_stack: StackHandle) -> None:
    settings, subscriber = local_stack.settings, local_stack.clients.subscriber
    for name in CLOUDEVENT_FUNCTIONS:
        topic = getattr(settings.topics, FUNCTION_SPECS[name].topic_field)
        sub = subscriber.get_subscription(
            subscription=subscriber.subscription_path(settings.project, push_subscription_name(topic, name))
        )
        assert sub.topic.endswith(f"/topics/{topic}")
        if relayed(FUNCTION_SPECS[name]):  # pulled and pushed at the function's concurrency by the relay
            assert not sub.push_config.push_endpoint
        else:
            assert sub.push_config.push_endpoint.startswith(local_stack.urls[name] + "/")
        assert sub.dead_letter_policy.dead_letter_topic.endswith(f"/topics/{Topics.dead_letter(topic)}")
        assert sub.dead_letter_policy.max_delivery_attempts == 5
        assert sub.retry_policy.minimum_backoff.seconds >= 1
        if name == "aggregator":  # a live aggregation is not redelivered (audit: a second run at 600 s)
            assert sub.ack_deadline_seconds >= Timeouts.from_env(local_stack.env()).aggregation == 600
    for topic in settings.topics.all():  # dead letters can be inspected
        dead = subscriber.get_subscription(
            subscription=subscriber.subscription_path(settings.project, Topics.dead_letter(topic))
        )
        assert dead.topic.endswith(f"/topics/{Topics.dead_letter(topic)}") and not dead.push_config.push_endpoint


@pytest.mark.parametrize("name", CLOUDEVENT_FUNCTIONS)
def test_published_message_is_pushed_to_its_function(local_stack: StackHandle, name: str) -> None:
    settings, publisher = local_stack.settings, local_stack.clients.publisher
    topic = getattr(settings.topics, FUNCTION_SPECS[name].topic_field)
    message_id = publisher.publish(
        publisher.topic_path(settings.project, topic), b"{}", **{EVENT_TYPE_ATTRIBUTE: HEALTH_EVENT_TYPE}
    ).result(timeout=10)
    line = local_stack.wait_for_log(name, f"health event received by {name}: id={message_id} ", timeout_s=30)
    assert "type=google.cloud.pubsub.topic.v1.messagePublished" in line
    assert f"source=//pubsub.googleapis.com/projects/{settings.project}/topics/{topic}" in line


def test_start_is_idempotent_and_state_files_are_written(local_stack: StackHandle) -> None:
    stack = local_stack.stack
    before = {c.name: c.pid for c in stack.status().components}
    again = LocalStack(stack.state_dir, task_builder_port=0).start()  # another instance, same state dir
    assert {c.name: c.pid for c in again.components} == before
    exported = dict(
        shlex.split(line.removeprefix("export "))[0].split("=", 1) for line in stack.env_file.read_text().splitlines()
    )
    assert exported == local_stack.env()
    for key in ("FIRESTORE_EMULATOR_HOST", "PUBSUB_EMULATOR_HOST", "STORAGE_EMULATOR_HOST", "FEDCOMPUTE_PROJECT",
                "GOOGLE_CLOUD_PROJECT", "FEDCOMPUTE_STORAGE_PUBLIC_URL", "FEDCOMPUTE_MODEL_BUCKET",
                "FEDCOMPUTE_GRADIENT_BUCKET", "FEDCOMPUTE_AGGREGATE_BUCKET", "FEDCOMPUTE_TASK_BUILDER_URL",
                "FEDCOMPUTE_TASK_MANAGEMENT_URL", "FEDCOMPUTE_TASK_ASSIGNMENT_URL"):
        assert exported.get(key), key
    state = json.loads(stack.state_file.read_text())
    assert state["complete"] and {c["name"] for c in state["components"]} == set(before)


def test_cli_status_and_env(local_stack: StackHandle, tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["stack", "status", "--state-dir", str(local_stack.state_dir)]) == 0
    out = capsys.readouterr().out
    assert "stack healthy" in out and "scheduler" in out and str(local_stack.log_path("scheduler")) in out
    assert cli_main(["stack", "env", "--state-dir", str(local_stack.state_dir)]) == 0
    assert f"export PUBSUB_EMULATOR_HOST={local_stack.env()['PUBSUB_EMULATOR_HOST']}" in capsys.readouterr().out
    assert cli_main(["stack", "status", "--state-dir", str(tmp_path)]) == 1
    assert cli_main(["stack", "env", "--state-dir", str(tmp_path)]) == 1
    assert "no local stack is running" in capsys.readouterr().err


def test_task_builder_port_in_use_is_reported(local_stack: StackHandle, tmp_path) -> None:
    taken = int(local_stack.urls["task_builder"].rsplit(":", 1)[1])
    with pytest.raises(StackError) as info:
        LocalStack(tmp_path, task_builder_port=taken).start()
    assert f"port {taken} for the task builder is already in use" in str(info.value)
    assert "--task-builder-port 0" in str(info.value)
    assert not (tmp_path / "stack.json").exists()


def test_second_stack_restarts_dead_components_and_stops_without_leftovers(tmp_path) -> None:
    stack = LocalStack(tmp_path / "second", task_builder_port=0)
    with stack:
        assert stack.status().healthy
        processes = stack.leftover_processes()
        names = " ".join(" ".join(p.cmdline()) for p in processes)
        # Wrappers and children of every kind are tracked: Java emulators, fake-gcs, gunicorn workers.
        assert "java" in names and "fake-gcs-server" in names and "functions-framework" in names
        assert len(processes) >= 3 + 2 * len(ALL_FUNCTIONS)

        # A component dies: status says so, and start() replaces the whole stack.
        scheduler_pid = next(c.pid for c in stack.status().components if c.name == "scheduler")
        os.killpg(scheduler_pid, signal.SIGKILL)
        scheduler = psutil.Process(scheduler_pid)
        assert wait_for(lambda: not scheduler.is_running() or scheduler.status() == psutil.STATUS_ZOMBIE, 5)
        status = stack.status()
        dead = next(c for c in status.components if c.name == "scheduler")
        assert not status.healthy and not dead.alive and "process not running" in status.table()
        restarted = stack.start()
        assert restarted.healthy
        assert next(c.pid for c in restarted.components if c.name == "scheduler") != scheduler_pid
        assert all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in processes)
        processes = stack.leftover_processes()
    assert_nothing_left(stack, processes)
    assert stack.status().running is False
    assert stack.stop() == []  # idempotent


def test_start_failure_names_the_log_and_cleans_up(tmp_path) -> None:
    functions_dir = tmp_path / "functions"
    (functions_dir / "scheduler").mkdir(parents=True)
    (functions_dir / "scheduler" / "main.py").write_text("raise ImportError('broken on purpose')\n")
    stack = LocalStack(tmp_path / "state", task_builder_port=0, functions=("scheduler",), functions_dir=functions_dir)
    with pytest.raises(StackError) as info:
        stack.start()
    message = str(info.value)
    assert "scheduler exited during start-up" in message
    assert str(stack.log_path("scheduler")) in message and "broken on purpose" in message
    assert stack.leftover_processes() == [] and not stack.state_file.exists()
