"""The local stand-in for Pub/Sub push at a function's concurrency.

The Pub/Sub emulator delivers a push subscription through two fixed loops: at most two
requests are in flight, however many the endpoint could take (measured: 200 messages to an
endpoint answering in 0.2 s took 20.5 s, never more than 2 at once). In the cloud, push
delivers as many as the function's instances × concurrency accept. Result ingestion gets one
event per device upload, so locally those two loops were the collect phase's bottleneck.

For a function whose catalogue concurrency is above two, the local stack therefore creates
a pull subscription (same name, dead-letter and retry policies as the push one would have)
and starts this process (``python -m fedcompute.stack.push_relay --route SUB=URL:N``), which
delivers each message to the function in the push request format, up to N at a time: ack on
a 2xx answer, nack otherwise. The emulator keeps the rest of push's contract: it waits the
retry policy's backoff before redelivering, counts delivery attempts and moves a message to
the dead-letter topic after the fifth (measured on pull subscriptions as on push ones).
"""
from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass

import requests

from fedcompute.adapters.http import keep_alive_session

log = logging.getLogger("push_relay")

PULL_TIMEOUT_S = 90.0  # a pull waits for messages (long poll); the emulator answers sooner
PUSH_TIMEOUT_S = 660.0  # past the longest ack deadline: the function's own timeout decides
SETTLE_BATCH_S = 0.05  # acks wait this long for company (a batch costs the emulator one request)
PULL_INTERVAL_S = 0.05


@dataclass(frozen=True)
class Route:
    """``subscription`` (projects/P/subscriptions/S) delivered to ``endpoint``, ``concurrency`` at a time."""

    subscription: str
    endpoint: str
    concurrency: int

    @classmethod
    def parse(cls, text: str) -> Route:
        """``SUBSCRIPTION=ENDPOINT:CONCURRENCY`` (the endpoint may hold colons of its own)."""
        subscription, sep, rest = text.partition("=")
        endpoint, _, concurrency = rest.rpartition(":")
        if not sep or not subscription.startswith("projects/") or not endpoint.startswith("http") \
                or not concurrency.isdigit() or int(concurrency) < 1:
            raise ValueError(f"route {text!r} is not projects/P/subscriptions/S=http://host:port/path:N")
        return cls(subscription, endpoint, int(concurrency))


def push_body(received: dict, subscription: str) -> dict:
    """The JSON body Pub/Sub push sends for one pulled ``receivedMessage``."""
    message = dict(received["message"])
    message.setdefault("message_id", message.get("messageId", ""))
    message.setdefault("publish_time", message.get("publishTime", ""))
    body = {"message": message, "subscription": subscription}
    if received.get("deliveryAttempt"):
        body["deliveryAttempt"] = received["deliveryAttempt"]
    return body


class Relay:
    """Deliver one route's messages, ``route.concurrency`` at a time.

    One thread pulls in batches and settles (acks or nacks) in batches; ``concurrency``
    threads push. Pulling one message per request cost the emulator 14 ms of CPU per
    message (measured: 2,000 messages pulled and acked one by one, 28 CPU-s; by eights,
    2.8 CPU-s), so at most ``2 × concurrency`` messages are held (pushing or queued) and a
    pull asks for every free place at once.
    """

    def __init__(self, emulator: str, route: Route, stop: threading.Event) -> None:
        self.base = f"{emulator.rstrip('/')}/v1/{route.subscription}"
        self.route, self.stop = route, stop
        self.delivered = self.failed = 0
        self.capacity = 2 * route.concurrency
        self._queue: queue.Queue[dict] = queue.Queue()
        self._held = threading.Semaphore(self.capacity)  # pulled and not yet settled
        self._lock = threading.Lock()
        self._acks: list[str] = []
        self._nacks: list[str] = []
        self._settle_now = threading.Event()

    def start(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._pull_loop, name="relay-pull", daemon=True),
                   threading.Thread(target=self._settle_loop, name="relay-settle", daemon=True)]
        threads += [threading.Thread(target=self._push_loop, name=f"relay-push-{i}", daemon=True)
                    for i in range(self.route.concurrency)]
        for thread in threads:
            thread.start()
        return threads

    def _pull_loop(self) -> None:
        session = requests.Session()
        last_pull = 0.0
        while not self.stop.is_set():
            # Pulls at most every PULL_INTERVAL_S: under a steady trickle each one then takes
            # several messages (each pull request costs the emulator milliseconds of CPU).
            self.stop.wait(max(0.0, last_pull + PULL_INTERVAL_S - time.monotonic()))
            if not self._held.acquire(timeout=0.5):
                continue
            last_pull = time.monotonic()
            free = 1
            while free < self.capacity and self._held.acquire(blocking=False):
                free += 1
            try:
                pulled = session.post(f"{self.base}:pull", json={"maxMessages": free}, timeout=PULL_TIMEOUT_S)
                pulled.raise_for_status()
                messages = pulled.json().get("receivedMessages", [])
            except requests.RequestException as error:  # emulator restarting or gone: back off
                messages = []
                if not self.stop.is_set():
                    log.warning("pull from %s failed: %s", self.route.subscription, error)
                    self.stop.wait(1.0)
            for received in messages:
                self._queue.put(received)
            for _ in range(free - len(messages)):
                self._held.release()

    def _push_loop(self) -> None:
        session = keep_alive_session(resend_any_method=True)  # a push is at-least-once anyway
        while not self.stop.is_set():
            try:
                received = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            ok, detail = self._push(session, received)
            with self._lock:
                (self._acks if ok else self._nacks).append(received["ackId"])
                if ok:
                    self.delivered += 1
                else:
                    self.failed += 1
            self._settle_now.set()
            if not ok:
                log.warning("push of message %s to %s failed (%s, attempt %s): nacked",
                            received["message"].get("messageId"), self.route.endpoint, detail,
                            received.get("deliveryAttempt", "?"))

    def _push(self, session: requests.Session, received: dict) -> tuple[bool, str]:
        try:
            answer = session.post(self.route.endpoint, json=push_body(received, self.route.subscription),
                                  timeout=PUSH_TIMEOUT_S)
        except requests.RequestException as error:
            return False, type(error).__name__
        return 200 <= answer.status_code < 300, f"HTTP {answer.status_code}"

    def _settle_loop(self) -> None:
        """Ack and nack what the pushers finished, a batch per request (a few ms apart)."""
        session = requests.Session()
        while not self.stop.is_set():
            self._settle_now.wait(0.5)
            self.stop.wait(SETTLE_BATCH_S)  # let a few more finish: one request settles them all
            self._settle_now.clear()
            with self._lock:
                acks, nacks = self._acks, self._nacks
                self._acks, self._nacks = [], []
            try:
                if acks:
                    session.post(f"{self.base}:acknowledge", json={"ackIds": acks}, timeout=30).raise_for_status()
                if nacks:  # the emulator redelivers after the retry policy's backoff, or dead-letters
                    session.post(f"{self.base}:modifyAckDeadline", json={"ackIds": nacks, "ackDeadlineSeconds": 0},
                                 timeout=30).raise_for_status()
            except requests.RequestException as error:  # unsettled: the emulator redelivers them
                log.warning("settling %d messages of %s failed: %s", len(acks) + len(nacks),
                            self.route.subscription, error)
            for _ in range(len(acks) + len(nacks)):
                self._held.release()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--route", action="append", type=Route.parse, required=True,
                        help="projects/P/subscriptions/S=ENDPOINT:CONCURRENCY (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    host = os.environ.get("PUBSUB_EMULATOR_HOST")
    if not host:
        parser.error("PUBSUB_EMULATOR_HOST is not set (the local stack sets it)")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    for route in args.route:
        Relay(f"http://{host}", route, stop).start()
        log.info("relaying %s to %s, %d at a time", route.subscription, route.endpoint, route.concurrency)
    stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
