"""Per-process wiring of the adapters the services need (created once, then reused).

Each function's ``main.py`` keeps one :class:`Runtime`; handlers call :meth:`deps` and pass
the result's parts to the service functions.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

from fedcompute.adapters.blobs import GcsBlobStore
from fedcompute.adapters.clients import ProcessClients
from fedcompute.adapters.events import PubSubRoundEvents
from fedcompute.adapters.firestore_store import FirestoreTaskStore
from fedcompute.settings import Settings


@dataclass(frozen=True)
class Deps:
    settings: Settings
    store: FirestoreTaskStore
    blobs: GcsBlobStore
    events: PubSubRoundEvents


class Runtime(ProcessClients):
    """:class:`ProcessClients` plus the store, blob store and event publisher built on them."""

    def __init__(self) -> None:
        super().__init__()
        self._deps: Deps | None = None
        self._deps_lock = threading.Lock()

    def deps(self) -> Deps:
        if self._deps is None:
            settings, clients = self.settings(), self.clients()
            with self._deps_lock:
                if self._deps is None:
                    self._deps = Deps(
                        settings=settings,
                        store=FirestoreTaskStore(clients.firestore),
                        blobs=GcsBlobStore(clients.storage, public_base_url=settings.storage_public_url or None),
                        events=PubSubRoundEvents(clients.publisher, settings.project, settings.topics.round_ready,
                                                 settings.topics.round_completed,
                                                 aggregation_shard_topic=settings.topics.aggregation_shard),
                    )
        return self._deps
