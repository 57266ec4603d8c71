"""The one function catalogue: every Cloud Function and how it runs.

Each :class:`FunctionSpec` names a function (= its ``functions/<name>/`` folder = its entry
point), how it is triggered (HTTP, a Pub/Sub topic or the gradient bucket's object events),
whether it is light (no TensorFlow, Python 3.12, ``functions/light/uv.lock``) or heavy
(TensorFlow, Python 3.11, root ``uv.lock``), and its cloud sizing (memory, timeout, maximum
instances, requests per instance). Everything else derives from :data:`FUNCTIONS`:

* the local stack (``fedcompute.stack``) starts one functions-framework process per entry
  and pushes each entry's topic to it;
* packaging (``fedcompute.deploy.package``) exports each function's lock by its weight;
* Terraform reads ``infra/modules/functions/catalogue.json``, written from here by
  ``python -m fedcompute.deploy.catalogue --write`` (``make package`` runs it; a unit test
  fails when the committed file differs).

Adding a function: one entry here, ``functions/<name>/main.py``, then ``--write``.
Pure data: no I/O, no TensorFlow.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

LIGHT_RUNTIME = "python312"
HEAVY_RUNTIME = "python311"


class Trigger(str, Enum):
    """What invokes a function."""

    HTTP = "http"  # devices or operators call it over HTTPS
    TOPIC = "topic"  # a Pub/Sub push subscription on ``topic_field``
    BUCKET = "bucket"  # object-finalize events of the gradient bucket (locally: a topic too)


@dataclass(frozen=True)
class FunctionSpec:
    """One Cloud Function and how it runs, locally and in the cloud."""

    name: str
    trigger: Trigger
    heavy: bool
    memory: str  # Cloud Functions memory size (the Terraform variable's default)
    timeout_s: int
    max_instances: int  # default maximum instances (an operator may override it in Terraform)
    concurrency: int  # requests one instance serves at once
    # Field of fedcompute.settings.Topics whose messages reach the function (topic and
    # bucket triggers: locally the bucket's notifications arrive on a topic too).
    topic_field: str | None = None
    # Further topics pushed to the function locally (their pull subscription stays).
    extra_topic_fields: tuple[str, ...] = ()
    # How long a push delivery may take before Pub/Sub redelivers it.
    ack_deadline_s: int = 60

    @property
    def entry_point(self) -> str:
        """The Python function functions-framework / Cloud Functions calls in ``main.py``."""
        return self.name

    @property
    def signature_type(self) -> str:
        """functions-framework signature: ``http`` for HTTP triggers, else ``cloudevent``."""
        return "http" if self.trigger is Trigger.HTTP else "cloudevent"

    @property
    def runtime(self) -> str:
        """The Cloud Functions runtime its lock targets."""
        return HEAVY_RUNTIME if self.heavy else LIGHT_RUNTIME

    @property
    def url_env(self) -> str:
        """Environment variable holding the function's base URL."""
        return f"FEDCOMPUTE_{self.name.upper()}_URL"

    def terraform_values(self) -> dict[str, Any]:
        """What Terraform reads per function (``catalogue.json``)."""
        return {"entry_point": self.entry_point, "runtime": self.runtime, "heavy": self.heavy,
                "trigger": self.trigger.value, "memory": self.memory, "timeout_seconds": self.timeout_s,
                "max_instances": self.max_instances, "concurrency": self.concurrency}


LIGHT_MEMORY = "512Mi"
LIGHT_TIMEOUT_S = 60

# Concurrency: the light HTTP functions wait on Firestore most of the time, so one instance
# (1 vCPU) keeps dozens of check-ins in flight. Ingestion holds an upload in memory while it
# checks it (a 6 MB CNN update, ~3 copies), so it gets fewer per 512 MiB instance; the
# builder and the aggregator use all of their instance.
FUNCTIONS: dict[str, FunctionSpec] = {
    spec.name: spec
    for spec in (
        FunctionSpec("task_builder", Trigger.HTTP, heavy=True, memory="8Gi", timeout_s=900, max_instances=2,
                     concurrency=1),
        FunctionSpec("task_management", Trigger.HTTP, heavy=False, memory=LIGHT_MEMORY, timeout_s=LIGHT_TIMEOUT_S,
                     max_instances=3, concurrency=8),
        FunctionSpec("task_assignment", Trigger.HTTP, heavy=False, memory=LIGHT_MEMORY, timeout_s=LIGHT_TIMEOUT_S,
                     max_instances=100, concurrency=80),
        FunctionSpec("result_ingestion", Trigger.BUCKET, heavy=False, memory=LIGHT_MEMORY,
                     timeout_s=LIGHT_TIMEOUT_S, max_instances=50, concurrency=8, topic_field="gcs_notifications"),
        # A big round fans out to K shards on aggregation-shard (fedcompute.learning.sharding): the
        # instance budget is max_instances (16 shards at once); every stage (a shard, the
        # combine) fits the 600 s ack deadline, which is also the function's timeout.
        FunctionSpec("aggregator", Trigger.TOPIC, heavy=True, memory="16Gi", timeout_s=600, max_instances=16,
                     concurrency=1, topic_field="round_ready", extra_topic_fields=("aggregation_shard",),
                     ack_deadline_s=600),
        # Locally nothing ticks every minute like Cloud Scheduler: every completed round also
        # runs the scheduler (opening evaluation rounds, sweeping timeouts) right away.
        FunctionSpec("scheduler", Trigger.TOPIC, heavy=False, memory=LIGHT_MEMORY, timeout_s=LIGHT_TIMEOUT_S,
                     max_instances=1, concurrency=1, topic_field="scheduler_tick",
                     extra_topic_fields=("round_completed",)),
        FunctionSpec("dashboard", Trigger.HTTP, heavy=False, memory=LIGHT_MEMORY, timeout_s=LIGHT_TIMEOUT_S,
                     max_instances=2, concurrency=8),
    )
}
ALL_FUNCTIONS: tuple[str, ...] = tuple(FUNCTIONS)


def terraform_catalogue() -> dict[str, dict[str, Any]]:
    """The per-function values Terraform reads, keyed by function name."""
    return {name: spec.terraform_values() for name, spec in FUNCTIONS.items()}
