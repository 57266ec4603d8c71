"""aggregator Cloud Function (CloudEvent on Pub/Sub ``round-ready`` and ``aggregation-shard``,
entry point ``aggregator``).

Streams a round's updates: clip, sum, noise (tensorflow_privacy DP queries), server
optimizer step; writes the checkpoint and the metrics; opens the next round or finishes
the task. A big round is aggregated in shards: an ``aggregation-shard`` message sums one
slice into a partial aggregate, and the round-ready its last shard publishes combines them.

Thin entry point: decoding and dispatch only; the logic lives in the ``fedcompute``
library. TensorFlow is imported inside the handler, never at module import, so health
probes and cold starts stay cheap.
"""
from __future__ import annotations

import logging
from typing import Any

import functions_framework

from fedcompute.adapters.events import decode_round_event, decode_shard_event
from fedcompute.crypto.hpke import KeyRingSource, upload_unsealer
from fedcompute.errors import InvalidRequestError
from fedcompute.runtime import Runtime
from fedcompute.services import aggregator as service
from fedcompute.web import configure_logging, decode_pubsub_event, dispatch_event

NAME = "aggregator"

configure_logging()
logger = logging.getLogger(NAME)
RUNTIME = Runtime()  # settings, clients and adapters, created on first use, once per process
# HPKE private keys: only ingestion and the aggregator hold them.
UNSEAL = upload_unsealer(KeyRingSource(), lambda: RUNTIME.settings().upload_encryption_required)


def handle_event(cloud_event: Any) -> None:
    """Aggregate the round (or the shard) named by one message (idempotent per round and shard)."""
    message = decode_pubsub_event(cloud_event)
    try:
        key = decode_round_event(message.data)
        shard = decode_shard_event(message.data)
    except (ValueError, KeyError, TypeError) as error:
        raise InvalidRequestError(f"round event {message.message_id} is malformed: {error}") from error
    deps = RUNTIME.deps()
    if shard is not None:
        _, index, shards = shard
        outcome = service.aggregate_shard(deps.store, deps.blobs, deps.events, deps.settings, key, index, shards,
                                          unseal=UNSEAL)
        logger.info("round %s/%s/%s shard %d/%d: %s", key.population, key.task_id, key.round_number, index, shards,
                    outcome.status)
        return
    outcome = service.aggregate_round(deps.store, deps.blobs, deps.events, deps.settings, key, unseal=UNSEAL)
    logger.info("round %s/%s/%s: %s (task %s)", key.population, key.task_id, key.round_number, outcome.status,
                outcome.task_status or "-")


@functions_framework.cloud_event
def aggregator(cloud_event: Any) -> None:
    """CloudEvent entry point."""
    dispatch_event(NAME, cloud_event, handle_event)
