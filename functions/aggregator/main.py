"""aggregator Cloud Function (CloudEvent on Pub/Sub ``round-ready`` and ``aggregation-shard``,
entry point ``aggregator``).

Streams a round's updates: clip, sum, noise (tensorflow_privacy DP queries), server
optimizer step; writes the checkpoint and the metrics; opens the next round or finishes
the task. A big round is aggregated in shards: an ``aggregation-shard`` message sums one
slice into a partial aggregate, and the round-ready its last shard publishes combines them.

Thin entry point: decoding and dispatch only; the logic lives in the ``fedcompute``
library. TensorFlow is never imported at module import: health probes and cold starts stay
cheap. The first event a serving process receives (the stack's health probe) starts a
background import of TensorFlow, tensorflow_privacy and dp_accounting, so the first round does
not pay those imports. Not at module import: functions-framework imports this module before
gunicorn forks its worker, and a fork during an import would leave the worker's import lock held.
"""
from __future__ import annotations

import logging
import os
import threading
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


def warm_up() -> None:
    """Import what the first round needs; a failure only costs that round the import time."""
    try:
        import dp_accounting  # noqa: F401
        import tensorflow_privacy.privacy.dp_query.gaussian_query  # noqa: F401

        from fedcompute.learning import dp_mechanisms, server_round  # noqa: F401
    except Exception:  # noqa: BLE001 - never let the warm-up take the function down
        logger.warning("warm-up imports failed; the first round imports them itself", exc_info=True)


_warmed_in: list[int] = []  # pid of the process whose warm-up started


def start_warm_up() -> None:
    """Start :func:`warm_up` once in this (forked, serving) process."""
    if _warmed_in[-1:] != [os.getpid()]:
        _warmed_in.append(os.getpid())
        threading.Thread(target=warm_up, name="warm-up", daemon=True).start()


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
    start_warm_up()
    dispatch_event(NAME, cloud_event, handle_event)
