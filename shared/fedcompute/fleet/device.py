"""A simulated device: the Android federated-compute client's work, in Python.

One :meth:`SimulatedDevice.run_session` is one training session of ODP's
``FederatedComputeScheduler``: check in, apply the eligibility policies itself, ask the
app for examples through an ``on_training_example``-style callback, train (or evaluate)
per the downloaded plan with its runtime (:mod:`fedcompute.fleet.runtimes`: the plan's
TFLite model or full TensorFlow), report the result and upload the update (gzip'd if the server asks). A plan the
runtime cannot execute is reported as ODP's FAILED_OPS_ERROR / FAILED_MODEL_COMPUTATION.
"""
from __future__ import annotations

import logging
import random
import shutil
import tempfile
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fedcompute.errors import DeviceComputationError
from fedcompute.fleet.protocol import DeviceHttpClient, Rejected, require_uri
from fedcompute.identity import DeviceKey
from fedcompute.plans import ClientPlan, UnpackedPlan, unpack_client_plan
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
    """An app whose log holds (features, labels) arrays; encodes them as the plan's Examples.

    The log does not change, so its serialized Examples are kept per spec, as an app keeps its
    example store on disk: re-encoding them took ~12 % of a device session's time.
    """

    def __init__(self, features: Any, labels: np.ndarray, *, population_name: str | None = None) -> None:
        self.features = features
        self.labels = labels
        self.population_name = population_name
        self.spec: Any = None  # set from the plan by the device before the first call
        self._encoded: tuple[Any, list[bytes]] | None = None  # (spec, its serialized Examples)

    def on_training_example(self, population_name, task_name, resumption_token):
        from fedcompute.data.examples import encode_examples

        if self.population_name is not None and population_name != self.population_name:
            return TrainingExampleOutput()  # "Check if the incoming training task is the task we want."
        if self._encoded is None or self._encoded[0] != self.spec:
            self._encoded = (self.spec, encode_examples(self.spec, self.features, self.labels))
        serialized = list(self._encoded[1])
        tokens = [f"token{i + 1}".encode() for i in range(len(serialized))]
        return TrainingExampleOutput(serialized, tokens)


class PlanCache:
    """Plans and checkpoints downloaded once per fleet (devices share the process)."""

    def __init__(self, root: Path | None = None) -> None:
        self._root = root or Path(tempfile.mkdtemp(prefix="fedcompute-fleet-"))
        # A directory the cache made is removed on close(), garbage collection or exit.
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._root, True) if root is None else None
        self._lock = threading.Lock()
        self._plans: dict[str, UnpackedPlan] = {}
        self._checkpoints: dict[str, list[np.ndarray]] = {}

    def close(self) -> None:
        """Remove the directory this cache created (plans already loaded stay usable)."""
        if self._cleanup is not None:
            self._cleanup()

    def plan(self, url: str, client: DeviceHttpClient) -> UnpackedPlan:
        with self._lock:
            if url not in self._plans:
                self._plans[url] = unpack_client_plan(client.download(url), self._root / f"plan{len(self._plans)}")
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
    runtime: Any = "auto"  # auto | tflite | tensorflow, or a fedcompute.fleet.runtimes.DeviceRuntime
    key: DeviceKey = field(default_factory=DeviceKey.generate)  # its identity (signs its requests)

    def run_session(self, client: DeviceHttpClient, population: str, cache: PlanCache) -> SessionOutcome:
        assignment = client.create_task_assignment(population, self.version_code, key=self.key)
        if isinstance(assignment, Rejected):
            return SessionOutcome("REJECTED", self.rng.uniform(assignment.retry_min_s, assignment.retry_max_s),
                                  detail=assignment.reason)
        round_number = int(assignment.aggregation_id)
        outcome = SessionOutcome("UPLOADED", task_id=assignment.task_id, round_number=round_number)
        if not self._eligible(assignment):
            client.report_result(assignment.self_uri, Result.NOT_ELIGIBLE, key=self.key)
            outcome.status = "NOT_ELIGIBLE"
            return outcome
        plan = cache.plan(require_uri(assignment.plan, "plan"), client)
        weights = cache.checkpoint(require_uri(assignment.init_checkpoint, "init_checkpoint"), client, plan.plan)
        examples = self._examples(population, assignment.task_name, plan.plan)
        if not examples:
            client.report_result(assignment.self_uri, Result.NOT_ELIGIBLE, key=self.key)
            outcome.status = "NOT_ELIGIBLE"
            outcome.detail = "no examples"
            return outcome
        if self.fail_probability and self.rng.random() < self.fail_probability:
            client.report_result(assignment.self_uri, Result.FAILED_MODEL_COMPUTATION, key=self.key)
            outcome.status = "FAILED"
            return outcome
        try:
            payload = self._compute(plan, weights, examples)
        except DeviceComputationError as error:  # never a silent success: the server learns why
            log.warning("device %d cannot run the plan: %s", self.device_id, error)
            client.report_result(assignment.self_uri, Result.Value(error.result), key=self.key)  # type: ignore[arg-type]
            outcome.status = "FAILED"
            outcome.detail = f"{error.result}: {error}"
            return outcome
        instruction = client.report_result(assignment.self_uri, Result.COMPLETED, key=self.key)
        if not isinstance(instruction, task_assignment_pb2.UploadInstruction):
            outcome.status = "DROPPED"  # the round closed while we trained
            return outcome
        status = client.upload(instruction, payload, assignment)
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

    def _examples(self, population: str, task_name: str, plan: ClientPlan) -> list[bytes]:
        from fedcompute.data.examples import ExampleSpec

        if getattr(self.app, "spec", "absent") is None:
            self.app.spec = ExampleSpec.from_dict(plan.example_spec)  # type: ignore[attr-defined]
        return list(self.app.on_training_example(population, task_name, None).training_examples)

    def _compute(self, plan: UnpackedPlan, weights: Sequence[np.ndarray], examples: list[bytes]) -> bytes:
        from fedcompute.fleet.runtimes import resolve
        from fedcompute.learning import metric_stats
        from fedcompute.learning.tensor_codec import encode_client_update

        runtime = resolve(self.runtime, plan)
        if plan.plan.kind == "EVALUATION":
            stats = runtime.evaluate(plan, weights, examples)
            num_examples = int(np.asarray(stats["num_examples"]["count"]).sum()) if "num_examples" in stats \
                else len(examples)
            return encode_client_update([], max(num_examples, 1), metric_stats.flatten_stats(stats), compress=False)
        result = runtime.train(plan, weights, examples)
        trainable = [w for w in plan.plan.weights if w.trainable]
        delta = [(w.name, d) for w, d in zip(trainable, result.delta)]
        return encode_client_update(delta, max(result.num_examples, 1), metric_stats.flatten_stats(result.metric_stats),
                                    compress=False)
