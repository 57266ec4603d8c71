"""Process settings, read once from the environment.

The same code runs against the local emulators and against Google Cloud; only these
values differ. The local stack manager writes them to ``.fedcompute/stack.env`` and
exports them to every process it starts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

DEFAULT_PROJECT = "fedcompute-local"


@dataclass(frozen=True)
class Topics:
    """Pub/Sub topic names. Each has a dead-letter topic named ``<topic>-dead-letter``."""

    round_ready: str = "round-ready"
    round_completed: str = "round-completed"
    scheduler_tick: str = "scheduler-tick"
    # Local only: fake-gcs-server publishes OBJECT_FINALIZE notifications here
    # (Eventarc delivers them directly in the cloud).
    gcs_notifications: str = "gcs-object-finalize"

    def all(self) -> tuple[str, ...]:
        return (self.round_ready, self.round_completed, self.scheduler_tick, self.gcs_notifications)

    @staticmethod
    def dead_letter(topic: str) -> str:
        return f"{topic}-dead-letter"


@dataclass(frozen=True)
class Settings:
    """Where things live. Build with :meth:`from_env`."""

    project: str = DEFAULT_PROJECT
    model_bucket: str = "fcp-model"
    gradient_bucket: str = "fcp-gradient"
    aggregate_bucket: str = "fcp-aggregate"
    topics: Topics = field(default_factory=Topics)
    # Base URLs of the HTTP functions, for callers (task builder -> task management,
    # CLI and fleet -> assignment). Empty when unknown.
    task_builder_url: str = "http://localhost:5000"
    task_management_url: str = ""
    task_assignment_url: str = ""
    # Public base URL devices use to download artifacts (fake-gcs-server locally).
    storage_public_url: str = ""
    api_key: str = ""

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        e = os.environ if env is None else env
        return cls(
            project=e.get("FEDCOMPUTE_PROJECT") or e.get("GOOGLE_CLOUD_PROJECT") or DEFAULT_PROJECT,
            model_bucket=e.get("FEDCOMPUTE_MODEL_BUCKET", "fcp-model"),
            gradient_bucket=e.get("FEDCOMPUTE_GRADIENT_BUCKET", "fcp-gradient"),
            aggregate_bucket=e.get("FEDCOMPUTE_AGGREGATE_BUCKET", "fcp-aggregate"),
            task_builder_url=e.get("FEDCOMPUTE_TASK_BUILDER_URL", "http://localhost:5000"),
            task_management_url=e.get("FEDCOMPUTE_TASK_MANAGEMENT_URL", ""),
            task_assignment_url=e.get("FEDCOMPUTE_TASK_ASSIGNMENT_URL", ""),
            storage_public_url=e.get("FEDCOMPUTE_STORAGE_PUBLIC_URL", e.get("STORAGE_EMULATOR_HOST", "")),
            api_key=e.get("FEDCOMPUTE_API_KEY", ""),
        )
