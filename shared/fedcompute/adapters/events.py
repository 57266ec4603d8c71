"""Round events on Pub/Sub: the adapter of the :class:`~fedcompute.ports.RoundEvents` port, the
event body codec (the in-memory fake is :class:`fedcompute.memory.InMemoryRoundEvents`)."""
from __future__ import annotations

import json
from typing import Any

from fedcompute.errors import InvariantError, TransientError
from fedcompute.tasks.records import RoundKey


def encode_round_event(key: RoundKey, **extra: Any) -> bytes:
    return json.dumps({"population": key.population, "task_id": key.task_id, "round": key.round_number, **extra},
                      sort_keys=True).encode()


def decode_round_event(data: bytes) -> RoundKey:
    """Parse a round event body; raises ValueError on anything malformed."""
    body = json.loads(data.decode())
    population, task_id, round_number = body["population"], body["task_id"], body["round"]
    if not isinstance(population, str) or not isinstance(task_id, int) or not isinstance(round_number, int):
        raise InvariantError("population must be a string, task_id and round integers")
    return RoundKey(population, task_id, round_number)


def decode_shard_event(data: bytes) -> tuple[RoundKey, int, int] | None:
    """``(round, shard, shards)`` of an aggregation-shard body; None for a plain round event."""
    body = json.loads(data.decode())
    if "shard" not in body:
        return None
    shard, shards = body["shard"], body["shards"]
    if not isinstance(shard, int) or not isinstance(shards, int) or not 0 <= shard < shards:
        raise InvariantError(f"shard must be an integer in [0, shards), got shard={shard!r} shards={shards!r}")
    return decode_round_event(data), shard, shards


class PubSubRoundEvents:
    """Publishes to the ``round-ready`` / ``aggregation-shard`` / ``round-completed`` topics
    (``PublisherClient`` passed in)."""

    def __init__(self, publisher: Any, project: str, round_ready_topic: str, round_completed_topic: str,
                 timeout: float = 30.0, *, aggregation_shard_topic: str = "aggregation-shard") -> None:
        self._publisher = publisher
        self._ready = publisher.topic_path(project, round_ready_topic)
        self._completed = publisher.topic_path(project, round_completed_topic)
        self._shard = publisher.topic_path(project, aggregation_shard_topic)
        self._timeout = timeout

    def _publish(self, topic: str, data: bytes, key: RoundKey) -> None:
        try:
            self._publisher.publish(
                topic, data, round_key=f"{key.population}/{key.task_id}/{key.round_number}"
            ).result(timeout=self._timeout)
        except Exception as error:  # the publish future raises many library-specific types
            raise TransientError(f"could not publish to {topic}: {error}") from error

    def round_ready(self, key: RoundKey) -> None:
        self._publish(self._ready, encode_round_event(key), key)

    def aggregation_shard(self, key: RoundKey, shard: int, shards: int) -> None:
        self._publish(self._shard, encode_round_event(key, shard=shard, shards=shards), key)

    def round_completed(self, key: RoundKey, **extra: Any) -> None:
        self._publish(self._completed, encode_round_event(key, **extra), key)
