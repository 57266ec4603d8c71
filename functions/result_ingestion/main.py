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

from fedcompute.crypto.hpke import KeyRingSource, upload_unsealer
from fedcompute.learning.upload_contract import make_upload_validator
from fedcompute.runtime import Runtime
from fedcompute.services import ingestion
from fedcompute.web import configure_logging, dispatch_event, storage_object_from_event

NAME = "result_ingestion"

configure_logging()
logger = logging.getLogger(NAME)
RUNTIME = Runtime()  # settings, clients and adapters, created on first use, once per process
VALIDATE = make_upload_validator()
# HPKE private keys: only ingestion and the aggregator hold them.
UNSEAL = upload_unsealer(KeyRingSource(), lambda: RUNTIME.settings().upload_encryption_required)
ROUNDS = ingestion.RoundContextCache()  # task and round records, read at most once a second per round


def handle_event(cloud_event: Any) -> None:
    """Ingest one finalized upload (idempotent; rejections are logged, never raised)."""
    obj = storage_object_from_event(cloud_event)
    if obj is None:
        logger.info("ignoring non-finalize storage event %s", cloud_event["id"])
        return
    deps = RUNTIME.deps()
    result = ingestion.ingest_upload(
        deps.store, deps.blobs, deps.events, deps.settings,
        ingestion.ObjectFinalized(event_id=str(cloud_event["id"]), bucket=obj.bucket, name=obj.name,
                                  size=obj.size, generation=obj.generation),
        validate=VALIDATE, unseal=UNSEAL, context=ROUNDS,
    )
    logger.info("ingestion of gs://%s/%s: %s %s%s", obj.bucket, obj.name, result.outcome, result.reason,
                " (round closed)" if result.round_closed else "")


@functions_framework.cloud_event
def result_ingestion(cloud_event: Any) -> None:
    """CloudEvent entry point."""
    dispatch_event(NAME, cloud_event, handle_event)
