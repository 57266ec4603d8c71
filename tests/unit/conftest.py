"""Shared fixtures of the unit tier: fresh in-memory fakes of the project's ports per test.

``store``, ``blobs`` and ``events`` have the semantics of the Firestore, GCS and Pub/Sub
adapters (conditional writes, create-only objects, recorded events) without emulators.
Open a task on them with :func:`support.tasks.open_task_in_memory`.
"""
from __future__ import annotations

import pytest

from fedcompute.adapters.blobs import InMemoryBlobStore
from fedcompute.adapters.events import InMemoryRoundEvents
from fedcompute.tasks.memory_store import InMemoryTaskStore


@pytest.fixture
def store() -> InMemoryTaskStore:
    return InMemoryTaskStore()


@pytest.fixture
def blobs() -> InMemoryBlobStore:
    return InMemoryBlobStore()


@pytest.fixture
def events() -> InMemoryRoundEvents:
    return InMemoryRoundEvents()
