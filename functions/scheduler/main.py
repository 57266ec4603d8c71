"""scheduler Cloud Function (CloudEvent on Pub/Sub ``scheduler-tick``, entry point ``scheduler``).

Periodic housekeeping, ticked by Cloud Scheduler: assignment timeouts, stuck rounds,
evaluation iterations from the checkpoint selector, task completion.

Thin entry point: decoding and dispatch only; the logic lives in the ``fedcompute`` library.
"""
from __future__ import annotations

import logging
from typing import Any

import functions_framework

from fedcompute.adapters.deadletters import replay_dead_letters, replayable_topics
from fedcompute.runtime import Runtime
from fedcompute.services import scheduler as service
from fedcompute.web import configure_logging, decode_pubsub_event, dispatch_event

NAME = "scheduler"

configure_logging()
logger = logging.getLogger(NAME)
RUNTIME = Runtime()  # settings, clients and adapters, created on first use, once per process


def handle_event(cloud_event: Any) -> None:
    """One housekeeping pass per ``scheduler-tick`` message (every action is conditional)."""
    message = decode_pubsub_event(cloud_event)
    deps = RUNTIME.deps()
    report = service.tick(deps.store, deps.events, timeouts=service.Timeouts.from_env())
    clients = RUNTIME.clients()
    # Never lets a replay problem fail the tick (it would be redelivered and dead-lettered itself).
    replay = replay_dead_letters(clients.subscriber, clients.publisher, deps.settings.project,
                                 replayable_topics(deps.settings.topics))
    logger.info("scheduler tick %s: %d local timeouts, %d upload timeouts, %d rounds re-published, "
                "%d dead-lettered messages replayed", message.message_id, report.local_timeouts,
                report.upload_timeouts, len(report.republished), replay.total)


@functions_framework.cloud_event
def scheduler(cloud_event: Any) -> None:
    """CloudEvent entry point."""
    dispatch_event(NAME, cloud_event, handle_event)
