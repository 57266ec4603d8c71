"""Replay of dead-lettered Pub/Sub messages (light: google-cloud-pubsub only).

A push delivery that fails ``MAX_DELIVERY_ATTEMPTS`` times (an outage of ~25 s is enough
locally) lands on ``<topic>-dead-letter``. Nobody would ever count that device's upload, or
aggregate that round. :func:`replay_dead_letters` pulls those messages from the pull
subscription named after each dead-letter topic and publishes them again on their topic
(every handler is idempotent, so a replay of an already handled message changes nothing).
The scheduler tick runs it; ``fedcompute ops replay`` runs it by hand.

A message replayed :data:`MAX_REPLAYS` times is left on the dead-letter subscription for
an operator (a poison message must not loop forever).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fedcompute.settings import Topics

log = logging.getLogger(__name__)

REPLAY_ATTRIBUTE = "fedcompute-replays"
MAX_REPLAYS = 3


@dataclass
class ReplayReport:
    replayed: dict[str, int] = field(default_factory=dict)
    left_for_operator: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.replayed.values())


def replay_dead_letters(subscriber: Any, publisher: Any, project: str, topics: Iterable[str], *,
                        max_messages: int = 100, timeout_s: float = 10.0) -> ReplayReport:
    """Publish dead-lettered messages of ``topics`` again; at most ``max_messages`` per topic."""

    report = ReplayReport()
    for topic in topics:
        pulled = _pull(subscriber, project, topic, max_messages, timeout_s)
        if pulled is None:
            continue  # no dead-letter subscription for this topic in this deployment
        subscription, response = pulled
        done: list[str] = []
        for received in response.received_messages:
            message = received.message
            attributes = {k: v for k, v in message.attributes.items() if not k.startswith("CloudPubSubDeadLetter")}
            replays = int(attributes.get(REPLAY_ATTRIBUTE, "0") or 0)
            if replays >= MAX_REPLAYS:
                report.left_for_operator[topic] = report.left_for_operator.get(topic, 0) + 1
                log.error("dead-lettered message %s on %s replayed %d times already: left for an operator",
                          message.message_id, topic, replays)
                continue
            attributes[REPLAY_ATTRIBUTE] = str(replays + 1)
            try:
                publisher.publish(publisher.topic_path(project, topic), message.data,
                                  **attributes).result(timeout=timeout_s)
            except Exception as error:  # noqa: BLE001 - not acknowledged: the next tick tries again
                log.error("cannot replay %s on %s: %s", message.message_id, topic, error)
                break
            done.append(received.ack_id)
            report.replayed[topic] = report.replayed.get(topic, 0) + 1
            log.warning("replayed dead-lettered message %s on %s (replay %d)", message.message_id, topic, replays + 1)
        if done:
            subscriber.acknowledge(request={"subscription": subscription, "ack_ids": done}, timeout=timeout_s)
    return report


# The pull subscription on a dead-letter topic: named after the topic locally, "-inspect" in infra/.
_DEAD_LETTER_SUBSCRIPTION_SUFFIXES = ("", "-inspect")


def _pull(subscriber: Any, project: str, topic: str, max_messages: int, timeout_s: float) -> tuple[str, Any] | None:
    from google.api_core import exceptions

    for suffix in _DEAD_LETTER_SUBSCRIPTION_SUFFIXES:
        subscription = subscriber.subscription_path(project, Topics.dead_letter(topic) + suffix)
        try:
            return subscription, subscriber.pull(request={"subscription": subscription, "max_messages": max_messages,
                                                          "return_immediately": True}, timeout=timeout_s)
        except exceptions.NotFound:
            continue
        except exceptions.DeadlineExceeded:
            return None  # nothing to pull
        except exceptions.GoogleAPICallError as error:  # e.g. no permission: never break the caller's tick
            log.warning("cannot pull dead letters of %s from %s: %s", topic, subscription, error)
            return None
    return None


def replayable_topics(topics: Topics) -> tuple[str, ...]:
    """Topics whose lost messages lose work: upload notifications and round-ready."""
    return (topics.gcs_notifications, topics.round_ready)
