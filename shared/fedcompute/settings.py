"""Process settings, read once from the environment.

The same code runs against the local emulators and against Google Cloud; only these
values differ. The local stack manager writes them to ``.fedcompute/stack.env`` and
exports them to every process it starts.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

DEFAULT_PROJECT = "fedcompute-local"


@dataclass(frozen=True)
class Topics:
    """Pub/Sub topic names. Each has a dead-letter topic named ``<topic>-dead-letter``."""

    round_ready: str = "round-ready"
    round_completed: str = "round-completed"
    scheduler_tick: str = "scheduler-tick"
    # Sharded aggregation: one message per shard of a closed round (pushed to the aggregator).
    aggregation_shard: str = "aggregation-shard"
    # Local only: fake-gcs-server publishes OBJECT_FINALIZE notifications here
    # (Eventarc delivers them directly in the cloud).
    gcs_notifications: str = "gcs-object-finalize"

    def all(self) -> tuple[str, ...]:
        return (self.round_ready, self.round_completed, self.scheduler_tick, self.aggregation_shard,
                self.gcs_notifications)

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
    # Devices (issue 13): "required" refuses unsigned check-ins / reports and plaintext
    # uploads; "optional" accepts both (ODP devices that neither sign nor encrypt).
    device_auth: str = "required"
    upload_encryption: str = "required"
    # Check-ins per minute one device identity may make (in-memory token bucket; 0 = no limit).
    checkins_per_minute: float = 30.0
    # Sharded aggregation (fedcompute.learning.sharding.shard_count): 0 derives the number of
    # shards from the report goal and the update size; >= 1 forces it (1 = one job, no fan-out).
    aggregation_shards: int = 0
    # Work one shard takes on (update bytes + a per-object cost) and the instance budget.
    aggregation_shard_bytes: int = 1 << 30
    max_aggregation_shards: int = 16
    # Aggregate a round's full accept counters while it still collects (learning.sharding).
    aggregation_streaming: bool = True

    @property
    def device_auth_required(self) -> bool:
        return self.device_auth != "optional"

    @property
    def upload_encryption_required(self) -> bool:
        return self.upload_encryption != "optional"

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
            device_auth=_choice(e, "FEDCOMPUTE_DEVICE_AUTH", ("required", "optional")),
            upload_encryption=_choice(e, "FEDCOMPUTE_UPLOAD_ENCRYPTION", ("required", "optional")),
            checkins_per_minute=float(e.get("FEDCOMPUTE_CHECKINS_PER_MINUTE", "30") or 0),
            aggregation_shards=_int(e, "FEDCOMPUTE_AGGREGATION_SHARDS", 0, minimum=0),
            aggregation_shard_bytes=_int(e, "FEDCOMPUTE_AGGREGATION_SHARD_BYTES", 1 << 30, minimum=1),
            max_aggregation_shards=_int(e, "FEDCOMPUTE_MAX_AGGREGATION_SHARDS", 16, minimum=1),
            aggregation_streaming=_choice(e, "FEDCOMPUTE_AGGREGATION_STREAMING", ("on", "off")) == "on",
        )


def _choice(env: Mapping[str, str], name: str, allowed: tuple[str, ...]) -> str:
    value = (env.get(name) or allowed[0]).strip().lower()
    if value not in allowed:
        from fedcompute.errors import ConfigError

        raise ConfigError(f"{name}={value!r} is not one of {', '.join(allowed)}", hint=f"unset it or set {allowed[0]}")
    return value


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int) -> int:
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        from fedcompute.errors import ConfigError

        raise ConfigError(f"{name}={raw!r} is not an integer >= {minimum}", hint=f"unset it for the default {default}")
    return value
