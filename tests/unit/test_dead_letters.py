"""Dead-lettered messages are replayed, a poison message only MAX_REPLAYS times (issue 13, Medium)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.api_core import exceptions

from fedcompute.adapters.deadletters import MAX_REPLAYS, REPLAY_ATTRIBUTE, replay_dead_letters


@dataclass
class _Message:
    data: bytes
    attributes: dict[str, str]
    message_id: str


@dataclass
class _Received:
    ack_id: str
    message: _Message


class FakePubSub:
    """Dead-letter subscriptions as lists; publishing appends to the topic's list."""

    def __init__(self, dead: dict[str, list[_Message]]) -> None:
        self.dead = dead
        self.published: dict[str, list[tuple[bytes, dict[str, str]]]] = {}
        self.acked: list[str] = []

    def subscription_path(self, project: str, name: str) -> str:
        return name

    def topic_path(self, project: str, name: str) -> str:
        return name

    def pull(self, request: dict[str, Any], timeout: float) -> Any:
        if request["subscription"] not in self.dead:
            raise exceptions.NotFound("no such subscription")
        messages = self.dead[request["subscription"]]
        return type("Response", (), {"received_messages": [_Received(f"ack-{m.message_id}", m) for m in messages]})

    def acknowledge(self, request: dict[str, Any], timeout: float) -> None:
        self.acked.extend(request["ack_ids"])

    def publish(self, topic: str, data: bytes, **attributes: str) -> Any:
        self.published.setdefault(topic, []).append((data, attributes))
        return type("Future", (), {"result": lambda self, timeout=None: "id"})()


def test_dead_letters_are_published_again_and_acknowledged() -> None:
    fake = FakePubSub({"round-ready-dead-letter": [
        _Message(b'{"round": 1}', {"CloudPubSubDeadLetterSourceSubscription": "s"}, "1")]})
    report = replay_dead_letters(fake, fake, "p", ["round-ready", "gcs-object-finalize"])
    assert report.replayed == {"round-ready": 1}
    assert fake.published["round-ready"] == [(b'{"round": 1}', {REPLAY_ATTRIBUTE: "1"})]
    assert fake.acked == ["ack-1"]


def test_a_poison_message_is_left_for_an_operator_after_max_replays() -> None:
    poison = _Message(b"x", {REPLAY_ATTRIBUTE: str(MAX_REPLAYS)}, "9")
    fake = FakePubSub({"round-ready-dead-letter-inspect": [poison]})  # the infra/ name
    report = replay_dead_letters(fake, fake, "p", ["round-ready"])
    assert report.replayed == {} and report.left_for_operator == {"round-ready": 1}
    assert fake.published == {} and fake.acked == []


def test_replay_problems_never_fail_the_caller() -> None:
    class Denied(FakePubSub):
        def pull(self, request: dict[str, Any], timeout: float) -> Any:
            raise exceptions.PermissionDenied("the scheduler may not pull here")

    class Down(FakePubSub):
        def publish(self, topic: str, data: bytes, **attributes: str) -> Any:
            raise TimeoutError("publisher unavailable")

    assert replay_dead_letters(Denied({}), Denied({}), "p", ["round-ready"]).total == 0
    down = Down({"round-ready-dead-letter": [_Message(b"x", {}, "1")]})
    assert replay_dead_letters(down, down, "p", ["round-ready"]).total == 0 and down.acked == []
