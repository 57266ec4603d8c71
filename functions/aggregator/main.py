"""aggregator Cloud Function (CloudEvent on Pub/Sub ``round-ready``, entry point ``aggregator``).

Streams a round's updates: clip, sum, noise (tensorflow_privacy DP queries), server
optimizer step; writes the checkpoint and the metrics; opens the next round or finishes
the task.

Thin entry point: decoding and dispatch only; the logic lives in the ``fedcompute``
library. TensorFlow is imported inside the handler, never at module import, so health
probes and cold starts stay cheap.
"""
from __future__ import annotations

import logging
from typing import Any

import functions_framework

from fedcompute.adapters.clients import ProcessClients
from fedcompute.web import configure_logging, decode_pubsub_event, dispatch_event

NAME = "aggregator"

configure_logging()
logger = logging.getLogger(NAME)
RUNTIME = ProcessClients()  # settings + clients, created on first use, once per process


def handle_event(cloud_event: Any) -> None:
    """Handle one ``round-ready`` message (placeholder until aggregation is wired in)."""
    message = decode_pubsub_event(cloud_event)
    logger.info("round-ready message %s attributes=%s (no aggregation handler yet)", message.message_id, message.attributes)


@functions_framework.cloud_event
def aggregator(cloud_event: Any) -> None:
    """CloudEvent entry point."""
    dispatch_event(NAME, cloud_event, handle_event)
