"""A simulated device: the Android federated-compute client's work, in Python.

One :meth:`SimulatedDevice.run_session` is one training session of ODP's
``FederatedComputeScheduler``: check in, apply the eligibility policies itself, ask the
app for examples through an ``on_training_example``-style callback, train (or evaluate)
per the downloaded plan, report the result and upload the gzip'd update.
"""
from __future__ import annotations

import logging
import random
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fedcompute.fleet.protocol import DeviceHttpClient, Rejected, require_uri
from fedcompute.plans import ClientPlan, unpack_plan
from fedcompute.proto import task_assignment_pb2

log = logging.getLogger(__name__)

Result = task_assignment_pb2.ReportResultRequest.Result


@dataclass
class TrainingExampleOutput:
    """What the app's ``on_training_example`` returns: serialized tf.train.Examples + tokens."""

    training_examples: list[bytes] = field(default_factory=list)
    resumption_tokens: list[bytes] = field(default_factory=list)


class DeviceApp(Protocol):
    """The app side of ODP (``IsolatedWorker#onTrainingExample``)."""

    def on_training_example(self, population_name: str, task_name: str,
                            resumption_token: bytes | None) -> TrainingExampleOutput: ...


class ArrayApp:
    """An app whose log holds (features, labels) arrays; encodes them as the plan's Examples."""

    def __init__(self, features: Any, labels: np.ndarray, *, population_name: str | None = None) -> None:
        self.features = features
        self.labels = labels
        self.population_name = population_name
        self.spec: Any = None  # set from the plan by the device before the first call

    def on_training_example(self, population_name, task_name, resumption_token):
        from fedcompute.data.examples import encode_examples

        if self.population_name is not None and population_name != self.population_name:
            return TrainingExampleOutput()  # "Check if the incoming training task is the task we want."
        serialized = encode_examples(self.spec, self.features, self.labels)
        tokens = [f"token{i + 1}".encode() for i in range(len(serialized))]
        return TrainingExampleOutput(serialized, tokens)


class PlanCache:
    """Plans and checkpoints downloaded once per fleet (devices share the process)."""

    def __init__(self, root: Path | None = None) -> None:
        self._root = root or Path(tempfile.mkdtemp(prefix="fedcompute-fleet-"))
        self._lock = threading.Lock()
        self._plans: dict[str, tuple[ClientPlan, Any]] = {}
        self._checkpoints: dict[str, list[np.ndarray]] = {}

    def plan(self, url: str, client: DeviceHttpClient) -> tuple[ClientPlan, Any]:
        from fedcompute.learning.client_training import load_model

        with self._lock:
            if url not in self._plans:
                target = self._root / f"plan{len(self._plans)}"
                plan = unpack_plan(client.download(url), target)
                self._plans[url] = (plan, load_model(target / "saved_model"))
            return self._plans[url]

    def checkpoint(self, url: str, client: DeviceHttpClient, plan: ClientPlan) -> list[np.ndarray]:
        from fedcompute.learning.tensor_codec import decode_bundle

        with self._lock:
            if url not in self._checkpoints:
                spec = [(w.name, w.shape, w.dtype) for w in plan.weights]
                named, _ = decode_bundle(client.download(url), expected_spec=spec)
                if len(self._checkpoints) > 8:  # keep the few most recent rounds
                    self._checkpoints.pop(next(iter(self._checkpoints)))
                self._checkpoints[url] = [np.asarray(a) for _, a in named]
            return self._checkpoints[url]


@dataclass
class SessionOutcome:
    """What one session did (for the fleet's statistics and tests)."""

    status: str  # UPLOADED | REJECTED | NOT_ELIGIBLE | FAILED | UPLOAD_REFUSED | DROPPED
    retry_after: float = 0.0
    task_id: str = ""
    round_number: int = 0
    detail: str = ""


@dataclass
class SimulatedDevice:
    """One phone: its data (via its app), module version, and contribution history."""

    device_id: int
    app: DeviceApp
    version_code: str = "341912000"
    rng: random.Random = field(default_factory=random.Random)
    last_contribution: dict[str, int] = field(default_factory=dict)  # task name -> round
    fail_probability: float = 0.0

    def run_session(self, client: DeviceHttpClient, population: str, cache: PlanCache) -> SessionOutcome:
        assignment = client.create_task_assignment(population, self.version_code)
        if isinstance(assignment, Rejected):
            return SessionOutcome("REJECTED", self.rng.uniform(assignment.retry_min_s, assignment.retry_max_s),
                                  detail=assignment.reason)
        round_number = int(assignment.aggregation_id)
        outcome = SessionOutcome("UPLOADED", task_id=assignment.task_id, round_number=round_number)
        if not self._eligible(assignment):
            client.report_result(assignment.self_uri, Result.NOT_ELIGIBLE)
            outcome.status = "NOT_ELIGIBLE"
            return outcome
        plan, model = cache.plan(require_uri(assignment.plan, "plan"), client)
        weights = cache.checkpoint(require_uri(assignment.init_checkpoint, "init_checkpoint"), client, plan)
        x, y = self._examples(population, assignment.task_name, plan)
        if x is None:
            client.report_result(assignment.self_uri, Result.NOT_ELIGIBLE)
            outcome.status = "NOT_ELIGIBLE"
            outcome.detail = "no examples"
            return outcome
        if self.fail_probability and self.rng.random() < self.fail_probability:
            client.report_result(assignment.self_uri, Result.FAILED_MODEL_COMPUTATION)
            outcome.status = "FAILED"
            return outcome
        payload = self._compute(plan, model, weights, x, y)
        instruction = client.report_result(assignment.self_uri, Result.COMPLETED)
        if not isinstance(instruction, task_assignment_pb2.UploadInstruction):
            outcome.status = "DROPPED"  # the round closed while we trained
            return outcome
        status = client.upload(instruction, payload)
        if status not in (200, 201):
            outcome.status = "UPLOAD_REFUSED"
            outcome.detail = f"HTTP {status}"
            return outcome
        self.last_contribution[assignment.task_name] = round_number
        return outcome

    def _eligible(self, assignment: task_assignment_pb2.TaskAssignment) -> bool:
        """Minimum separation, decided on the device from eligibility_task_info (as ODP)."""
        for policy in assignment.eligibility_task_info.eligibility_policies:
            if policy.WhichOneof("policy_type") == "min_sep_policy":
                last = self.last_contribution.get(assignment.task_name)
                sep = policy.min_sep_policy
                if last is not None and sep.current_index - last < sep.minimum_separation:
                    return False
        return True

    def _examples(self, population: str, task_name: str, plan: ClientPlan) -> tuple[Any, Any]:
        from fedcompute.data.examples import ExampleSpec, parse_examples

        spec = ExampleSpec.from_dict(plan.example_spec)
        if getattr(self.app, "spec", "absent") is None:
            self.app.spec = spec  # type: ignore[attr-defined]
        output = self.app.on_training_example(population, task_name, None)
        if not output.training_examples:
            return None, None
        x, y = parse_examples(output.training_examples, spec)
        to_numpy = lambda t: t.numpy() if hasattr(t, "numpy") else np.asarray(t)  # noqa: E731
        x = {k: to_numpy(v) for k, v in x.items()} if isinstance(x, dict) else to_numpy(x)
        return x, to_numpy(y)

    def _compute(self, plan: ClientPlan, model: Any, weights: Sequence[np.ndarray], x: Any, y: Any) -> bytes:
        from fedcompute.learning import client_training, metric_stats
        from fedcompute.learning.tensor_codec import encode_client_update

        batches = _batches(x, y, plan.batch_size)
        if plan.kind == "EVALUATION":
            stats = client_training.evaluate_on_device(model, weights, batches, plan.metrics)
            num_examples = int(np.asarray(stats["num_examples"]["count"]).sum()) if "num_examples" in stats else len(y)
            return encode_client_update([], max(num_examples, 1), metric_stats.flatten_stats(stats), compress=False)
        result = client_training.train_on_device(
            model, weights, batches, algorithm=plan.learning_algo, optimizer=plan.client_optimizer,
            learning_rate=plan.client_learning_rate, epochs=plan.epochs, max_batches=plan.max_batches,
            metrics=plan.metrics,
        )
        trainable = [w for w in plan.weights if w.trainable]
        delta = [(w.name, d) for w, d in zip(trainable, result.delta)]
        return encode_client_update(delta, max(result.num_examples, 1), metric_stats.flatten_stats(result.metric_stats),
                                    compress=False)


def _batches(x: Any, y: np.ndarray, batch_size: int) -> list[tuple[Any, np.ndarray]]:
    n = len(y)
    out = []
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        xb = {k: v[sl] for k, v in x.items()} if isinstance(x, dict) else x[sl]
        out.append((xb, y[sl]))
    return out
