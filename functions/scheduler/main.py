"""scheduler Cloud Function (CloudEvent on Pub/Sub ``scheduler-tick``, entry point ``scheduler``).

Periodic housekeeping, ticked by Cloud Scheduler: assignment timeouts, stuck rounds,
evaluation iterations from the checkpoint selector, task completion.

Thin entry point: decoding and dispatch only; the logic lives in the ``fedcompute`` library.
"""
from __future__ import annotations

import logging
from typing import Any

import functions_framework

from fedcompute.adapters.clients import ProcessClients
from fedcompute.web import configure_logging, decode_pubsub_event, dispatch_event

NAME = "scheduler"

configure_logging()
logger = logging.getLogger(NAME)
RUNTIME = ProcessClients()  # settings + clients, created on first use, once per process


def handle_event(cloud_event: Any) -> None:
    """Handle one ``scheduler-tick`` message (placeholder until the sweeps are wired in)."""
    message = decode_pubsub_event(cloud_event)
    logger.info("scheduler tick %s attributes=%s (no sweep handler yet)", message.message_id, message.attributes)


@functions_framework.cloud_event
def scheduler(cloud_event: Any) -> None:
    """CloudEvent entry point."""
    dispatch_event(NAME, cloud_event, handle_event)
