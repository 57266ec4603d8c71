"""fedcompute.adapters.clients: emulator detection and once-per-process creation."""
from __future__ import annotations

import threading

import pytest
from google.auth.credentials import AnonymousCredentials

from fedcompute.adapters import clients as clients_mod
from fedcompute.settings import Settings


def test_emulator_hosts_ignores_empty_values() -> None:
    env = {"FIRESTORE_EMULATOR_HOST": "127.0.0.1:1", "PUBSUB_EMULATOR_HOST": "", "OTHER": "x"}
    assert clients_mod.emulator_hosts(env) == {"FIRESTORE_EMULATOR_HOST": "127.0.0.1:1"}


def test_make_clients_uses_emulators_with_anonymous_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", "127.0.0.1:18001")
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", "127.0.0.1:18002")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:18003")
    made = clients_mod.make_clients(Settings(project="proj-x"))  # no network: clients connect lazily
    assert isinstance(made.storage._credentials, AnonymousCredentials)
    assert made.storage.project == "proj-x"
    assert made.storage._connection.API_BASE_URL == "http://127.0.0.1:18003"
    assert made.firestore.project == "proj-x" and made.firestore._emulator_host == "127.0.0.1:18001"
    assert made.publisher.topic_path("proj-x", "t") == "projects/proj-x/topics/t"


def test_process_clients_builds_once_across_threads() -> None:
    built: list[Settings] = []
    barrier = threading.Barrier(8)

    def factory(settings: Settings) -> object:
        built.append(settings)
        return object()

    holder = clients_mod.ProcessClients(lambda: Settings(project="p"), factory)  # type: ignore[arg-type]
    results: list[object] = []

    def worker() -> None:
        barrier.wait()
        results.append(holder.clients())

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 1 and len({id(r) for r in results}) == 1
    assert holder.clients_created and holder.settings().project == "p"
