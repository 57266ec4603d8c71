"""Google Cloud clients, created once per process and passed to whoever needs them.

:func:`make_clients` talks to the local emulators when their ``*_EMULATOR_HOST``
variables are set (anonymous credentials, no network) and to Google Cloud with the
application default credentials otherwise. Functions keep one :class:`ProcessClients`
at module level so the clients are built on the first request, after the
functions-framework worker has forked (gRPC channels do not survive a fork), and then
reused for every later request.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedcompute.errors import FedComputeError
from fedcompute.settings import Settings

if TYPE_CHECKING:  # the client libraries cost ~0.5 s each to import: only for type checkers
    from google.cloud import firestore, pubsub_v1, storage

FIRESTORE_EMULATOR_HOST = "FIRESTORE_EMULATOR_HOST"
PUBSUB_EMULATOR_HOST = "PUBSUB_EMULATOR_HOST"
STORAGE_EMULATOR_HOST = "STORAGE_EMULATOR_HOST"


@dataclass(frozen=True)
class Clients:
    """The four Google Cloud clients a process uses. Thread-safe; share them."""

    storage: storage.Client
    publisher: pubsub_v1.PublisherClient
    subscriber: pubsub_v1.SubscriberClient
    firestore: firestore.Client


def emulator_hosts(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ``*_EMULATOR_HOST`` variables that are set (non-empty) in ``env``."""
    e = os.environ if env is None else env
    names = (FIRESTORE_EMULATOR_HOST, PUBSUB_EMULATOR_HOST, STORAGE_EMULATOR_HOST)
    return {name: e[name] for name in names if e.get(name)}


def make_clients(settings: Settings) -> Clients:
    """Build the clients for ``settings.project``.

    Each client uses its emulator (with anonymous credentials) when the matching
    ``*_EMULATOR_HOST`` variable is set, and the application default credentials
    otherwise. The client libraries read the emulator host themselves, so the
    environment of the process decides; call this once per process.
    """
    from google.auth.credentials import AnonymousCredentials
    from google.auth.exceptions import DefaultCredentialsError
    from google.cloud import firestore, pubsub_v1, storage

    hosts = emulator_hosts()

    def credentials(variable: str) -> dict[str, Any]:
        return {"credentials": AnonymousCredentials()} if variable in hosts else {}

    try:
        storage_client = storage.Client(project=settings.project, **credentials(STORAGE_EMULATOR_HOST))
        widen_connection_pool(storage_client)
        publisher = pubsub_v1.PublisherClient(**credentials(PUBSUB_EMULATOR_HOST))
        subscriber = pubsub_v1.SubscriberClient(**credentials(PUBSUB_EMULATOR_HOST))
        firestore_client = firestore.Client(project=settings.project, **credentials(FIRESTORE_EMULATOR_HOST))
    except DefaultCredentialsError as error:
        missing = sorted({FIRESTORE_EMULATOR_HOST, PUBSUB_EMULATOR_HOST, STORAGE_EMULATOR_HOST} - set(hosts))
        raise FedComputeError(
            f"no Google Cloud credentials found for project {settings.project!r} "
            f"(emulator variables not set: {', '.join(missing)})",
            hint="for the local stack run `fedcompute stack up` and `eval $(fedcompute stack env)`; "
            "for Google Cloud run `gcloud auth application-default login`",
        ) from error
    return Clients(storage=storage_client, publisher=publisher, subscriber=subscriber, firestore=firestore_client)


# Concurrent storage readers per process (the aggregator's read-ahead, gunicorn threads):
# requests' default pool keeps 10 connections and re-opens one per extra reader.
STORAGE_POOL_SIZE = 32


def widen_connection_pool(storage_client: Any, size: int = STORAGE_POOL_SIZE) -> None:
    """Keep ``size`` HTTP connections to Cloud Storage open instead of requests' 10."""
    import requests.adapters

    session = storage_client._http  # google-cloud-storage's AuthorizedSession (a requests.Session)
    adapter = requests.adapters.HTTPAdapter(pool_connections=size, pool_maxsize=size)
    for prefix in ("http://", "https://"):
        session.mount(prefix, adapter)


class ProcessClients:
    """Settings and clients built on first use, once per process (thread-safe).

    Keep one instance at module level in a function's ``main.py``; handlers call
    :meth:`settings` / :meth:`clients` and pass the results down.
    """

    def __init__(
        self,
        settings_factory: Callable[[], Settings] = Settings.from_env,
        clients_factory: Callable[[Settings], Clients] = make_clients,
    ) -> None:
        self._settings_factory = settings_factory
        self._clients_factory = clients_factory
        self._lock = threading.Lock()
        self._settings: Settings | None = None
        self._clients: Clients | None = None

    def settings(self) -> Settings:
        """The process settings (read from the environment the first time)."""
        if self._settings is None:
            with self._lock:
                if self._settings is None:
                    self._settings = self._settings_factory()
        return self._settings

    def clients(self) -> Clients:
        """The process clients (created the first time, then reused)."""
        if self._clients is None:
            settings = self.settings()
            with self._lock:
                if self._clients is None:
                    self._clients = self._clients_factory(settings)
        return self._clients

    @property
    def clients_created(self) -> bool:
        """Whether :meth:`clients` has been called (health checks report it)."""
        return self._clients is not None
