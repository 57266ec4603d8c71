"""result_ingestion Cloud Function (CloudEvent, entry point ``result_ingestion``).

Triggered when a device's upload is finalized in the gradient bucket: an Eventarc
``google.cloud.storage.object.v1.finalized`` event in the cloud, a Pub/Sub
``gcs-object-finalize`` notification pushed by the local stack. Verifies the upload
belongs to a live assignment, counts it exactly once, and publishes ``round-ready`` when
the round's report goal is reached.

Thin entry point: decoding and dispatch only; the logic lives in the ``fedcompute`` library.
"""
from __future__ import annotations

import logging
from typing import Any

import functions_framework

from fedcompute.adapters.clients import ProcessClients
from fedcompute.web import configure_logging, dispatch_event, storage_object_from_event

NAME = "result_ingestion"

configure_logging()
logger = logging.getLogger(NAME)
RUNTIME = ProcessClients()  # settings + clients, created on first use, once per process


def handle_event(cloud_event: Any) -> None:
    """Handle one storage event (placeholder until ingestion is wired in)."""
    obj = storage_object_from_event(cloud_event)
    if obj is None:
        logger.info("ignoring non-finalize storage event %s", cloud_event["id"])
        return
    logger.info("object finalized: gs://%s/%s#%s (no ingestion handler yet)", obj.bucket, obj.name, obj.generation)


@functions_framework.cloud_event
def result_ingestion(cloud_event: Any) -> None:
    """CloudEvent entry point."""
    dispatch_event(NAME, cloud_event, handle_event)
