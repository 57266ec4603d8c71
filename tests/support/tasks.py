"""Training tasks without TensorFlow, and simulated devices, on the running local stack.

:func:`create_numpy_task` creates a task through the task management function, publishes
artifacts for a tiny numpy model (checkpoint 0, client checkpoint 0, server phase, a
stand-in client plan) and opens it; :func:`create_numpy_eval_task` adds an evaluation task
of it. :func:`make_update` builds what a device uploads: a
``ClientUpdate`` with a known delta and the metric statistics the task expects.
:func:`run_device` walks one device through check-in, report and upload over HTTP.
:func:`open_task_in_memory` is the unit tier's way to open a task on the in-memory store.

Shared by the integration and e2e tiers (``from support.tasks import ...``).
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from fedcompute import layout
from fedcompute.adapters.blobs import GcsBlobStore
from fedcompute.adapters.firestore_store import FirestoreTaskStore
from fedcompute.adapters.task_management_client import TaskManagementClient
from fedcompute.crypto.hpke import KEYS_FILE, UploadKeyRing, open_upload, seal_update
from fedcompute.dp import DpParams
from fedcompute.fleet.protocol import DeviceHttpClient, Rejected
from fedcompute.learning import metric_stats
from fedcompute.learning.checkpoint import decode_checkpoint
from fedcompute.learning.tensor_codec import decode_bundle, encode_client_update
from fedcompute.learning.upload_contract import metric_statistics_spec
from fedcompute.plans import ServerPhase
from fedcompute.ports import TaskStore
from fedcompute.proto import eligibility_pb2, task_assignment_pb2, task_management_pb2
from fedcompute.taskbuilder.artifacts import artifacts_from_weights, publish_artifacts, weight_specs
from fedcompute.tasks.records import (
    AssignmentStatus,
    RoundKey,
    RoundRecord,
    RoundStatus,
    TaskKind,
    TaskRecord,
    TaskStatus,
)

if TYPE_CHECKING:
    from support.stack_plugin import StackHandle

T = TypeVar("T")

DEFAULT_SHAPES: tuple[tuple[int, ...], ...] = ((4, 3), (3,))
DEFAULT_METRICS: tuple[str, ...] = ("sparse_categorical_accuracy", "loss")
COMPLETED = task_assignment_pb2.ReportResultRequest.COMPLETED


def wait_until(predicate: Callable[[], T], timeout_s: float = 30.0, interval_s: float = 0.2,
               what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy; return it (AssertionError on timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s} s (last value {value!r})")
        time.sleep(interval_s)


def open_task_in_memory(store: TaskStore, population: str, *, kind: TaskKind = TaskKind.TRAINING,
                        exclusive_training: bool = True, **fields: Any) -> TaskRecord:
    """An OPEN task at round 1 with round 1 collecting: the records opening a task writes.

    ``fields`` are further :class:`TaskRecord` fields (report_goal, over_selection_rate and
    total_rounds are required). No artifacts: for services that read them, publish them with
    ``publish_artifacts`` and open through ``task_management`` instead.
    """
    task = store.create_task(
        population,
        lambda task_id: TaskRecord(population=population, task_id=task_id, kind=kind, status=TaskStatus.OPEN,
                                   current_round=1, **fields),
        exclusive_training=exclusive_training,
    )
    store.create_round(RoundRecord.opening(task, 1, created_time=0.0))
    return task


@dataclass
class NumpyTask:
    """A task created by :func:`create_numpy_task`, with accessors for its state and outputs."""

    stack: StackHandle
    population: str
    task_id: int
    phase: ServerPhase
    initial: list[np.ndarray]
    plan_bytes: bytes
    store: FirestoreTaskStore = field(repr=False)
    blobs: GcsBlobStore = field(repr=False)

    @property
    def names(self) -> list[str]:
        return [w.name for w in self.phase.update_spec]

    @property
    def metrics(self) -> tuple[str, ...]:
        return self.phase.metrics

    @property
    def report_goal(self) -> int:
        return self.phase.report_goal

    def key(self, round_number: int = 1) -> RoundKey:
        return RoundKey(self.population, self.task_id, round_number)

    def record(self) -> TaskRecord:
        task = self.store.get_task(self.population, self.task_id)
        assert task is not None
        return task

    def round_record(self, round_number: int = 1) -> RoundRecord | None:
        return self.store.get_round(self.key(round_number))

    def count(self, round_number: int = 1, status: AssignmentStatus | None = AssignmentStatus.UPLOAD_COMPLETED) -> int:
        return self.store.count_assignments(self.key(round_number), status)

    def statuses(self, round_number: int = 1) -> dict[str, str]:
        """Assignment id -> status of every assignment of the round."""
        return {a.assignment_id: a.status.value for a in self.store.list_assignments(self.key(round_number))}

    def read_model(self, name: str) -> bytes:
        return self.blobs.read(self.stack.settings.model_bucket, name)

    def checkpoint_weights(self, round_number: int) -> list[np.ndarray]:
        state = decode_checkpoint(self.read_model(layout.checkpoint_path(self.population, self.task_id, round_number)))
        return [np.asarray(w) for w in state.weights]

    def client_checkpoint(self, round_number: int) -> list[tuple[str, np.ndarray]]:
        named, _ = decode_bundle(self.read_model(
            layout.client_checkpoint_path(self.population, self.task_id, round_number)))
        return list(named)

    def round_metrics(self, round_number: int) -> dict[str, float]:
        return json.loads(self.read_model(layout.metrics_path(self.population, self.task_id, round_number)))

    def wait_round(self, round_number: int, status: RoundStatus = RoundStatus.COMPLETED,
                   timeout_s: float = 60.0) -> RoundRecord:
        def reached() -> RoundRecord | None:
            it = self.round_record(round_number)
            return it if it is not None and it.status == status else None

        return wait_until(reached, timeout_s, what=f"round {round_number} of {self.population}/{self.task_id} "
                                                   f"{status.value}")


def create_numpy_task(
    stack: StackHandle,
    population: str,
    *,
    report_goal: int = 3,
    over_selection_rate: float = 0.5,
    rounds: int = 2,
    dp: DpParams | None = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    shapes: Sequence[tuple[int, ...]] = DEFAULT_SHAPES,
    seed: int = 0,
    server_learning_rate: float = 1.0,
    min_client_version: str = "",
    max_client_version: str = "",
    min_separation: int = 0,
    population_size: int = 10_000,
    target_epsilon: float = 10.0,
    open_task: bool = True,
) -> NumpyTask:
    """Create (and by default open) a FED_AVG / server SGD task over a tiny float32 model.

    The max aggregation size sent is floor(report_goal × (1 + over_selection_rate)).
    """
    settings, clients = stack.settings, stack.clients
    management = TaskManagementClient(settings.task_management_url, api_key=settings.api_key)
    max_size = int(np.floor(report_goal * (1.0 + over_selection_rate) + 1e-9))
    proto = task_management_pb2.Task(
        total_iteration=rounds, min_aggregation_size=report_goal, max_aggregation_size=max_size,
        min_client_version=min_client_version, max_client_version=max_client_version,
    )
    policy = proto.info.training_info.eligibility_task_info.eligibility_policies.add(name="min_separation_policy")
    policy.min_sep_policy.CopyFrom(eligibility_pb2.MinimumSeparationPolicy(minimum_separation=min_separation))
    created = management.create_task(population, proto)

    rng = np.random.default_rng(seed)
    initial = [rng.normal(size=shape).astype(np.float32) for shape in shapes]
    phase = ServerPhase(
        learning_algo="FED_AVG", server_optimizer="SGD", server_learning_rate=server_learning_rate,
        report_goal=report_goal, over_selection_rate=max_size / report_goal - 1.0, total_rounds=rounds,
        population_size=population_size, target_epsilon=target_epsilon, delta=1e-6,
        dp=dp or DpParams(mechanism="NONE"), weights=weight_specs(initial), metrics=tuple(metrics),
    )
    plan = f"plan of {population}/{created.task_id}".encode()
    blobs = GcsBlobStore(clients.storage, public_base_url=settings.storage_public_url or None)
    publish_artifacts(blobs, settings, population, created.task_id,
                      artifacts_from_weights(phase, initial, client_plan=plan))
    if open_task:
        management.open_task(population, created.task_id)
    return NumpyTask(stack=stack, population=population, task_id=int(created.task_id), phase=phase,
                     initial=initial, plan_bytes=plan, store=FirestoreTaskStore(clients.firestore), blobs=blobs)


def create_numpy_eval_task(training: NumpyTask, *, report_goal: int = 2, over_selection_rate: float = 1.0,
                           every_k_rounds: int = 1) -> NumpyTask:
    """Create and open an EVALUATION task of ``training`` (same model and metrics), as the
    task builder does for an evaluation block: the scheduler opens its rounds on the training
    task's completed checkpoints (every ``every_k_rounds``); devices upload metric statistics only.
    """
    stack = training.stack
    settings = stack.settings
    management = TaskManagementClient(settings.task_management_url, api_key=settings.api_key)
    max_size = int(np.floor(report_goal * (1.0 + over_selection_rate) + 1e-9))
    proto = task_management_pb2.Task(total_iteration=1, min_aggregation_size=report_goal,
                                     max_aggregation_size=max_size)
    info = proto.info.evaluation_info
    info.training_population_name = training.population
    info.training_task_id = training.task_id
    info.check_point_selector.iteration_selector.size = every_k_rounds
    created = management.create_task(training.population, proto)
    phase = dataclasses.replace(training.phase, report_goal=report_goal,
                                over_selection_rate=max_size / report_goal - 1.0, total_rounds=1,
                                dp=DpParams(mechanism="NONE"))
    plan = f"evaluation plan of {training.population}/{created.task_id}".encode()
    publish_artifacts(training.blobs, settings, training.population, created.task_id,
                      artifacts_from_weights(phase, training.initial, eval_plan=plan))
    management.open_task(training.population, created.task_id)
    return dataclasses.replace(training, task_id=int(created.task_id), phase=phase, plan_bytes=plan)


def random_metric_stats(task: NumpyTask, rng: np.random.Generator, num_examples: int) -> dict[str, np.ndarray]:
    """Flat ``metric/stat`` statistics of random predictions over ``num_examples`` examples.

    Covers :func:`metric_statistics_spec` of the task (its metrics plus loss and
    num_examples); assumes a model whose last weight is the logits' bias (classes = its size).
    """
    names = list(dict.fromkeys((*task.metrics, "loss", "num_examples")))
    classes = int(task.initial[-1].shape[-1]) if task.initial[-1].ndim else 2
    y_true = rng.integers(0, classes, size=num_examples)
    logits = rng.normal(size=(num_examples, classes))
    y_pred = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    loss = float(-np.log(y_pred[np.arange(num_examples), y_true]).mean())
    flat = metric_stats.flatten_stats(metric_stats.compute_all(names, y_true, y_pred, batch_loss=loss))
    expected = {name for name, _, _ in metric_statistics_spec(task.metrics)}
    assert set(flat) == expected, (sorted(flat), sorted(expected))
    return flat


def make_update(task: NumpyTask, delta: Sequence[np.ndarray], *, num_examples: int = 10,
                stats: Mapping[str, np.ndarray] | None = None, seed: int = 0,
                metadata: Mapping[str, str] | None = None) -> tuple[bytes, dict[str, np.ndarray]]:
    """``(ClientUpdate bytes, flat metric statistics)``; the bytes are not gzip'd (upload() gzips only if the server asks)."""
    flat = dict(stats) if stats is not None else random_metric_stats(task, np.random.default_rng(seed), num_examples)
    named = [(name, np.asarray(d, dtype=np.float32)) for name, d in zip(task.names, delta)]
    return encode_client_update(named, num_examples, flat, metadata=metadata, compress=False), flat


def random_delta(task: NumpyTask, rng: np.random.Generator, scale: float = 0.1) -> list[np.ndarray]:
    return [(scale * rng.normal(size=w.shape)).astype(np.float32) for w in task.initial]


def central_metrics(task: NumpyTask, all_stats: Sequence[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """Finalized metrics from the sum of every device's statistics (what the server must report)."""
    sums: dict[str, np.ndarray] = {}
    for flat in all_stats:
        for key, value in flat.items():
            sums[key] = sums.get(key, 0.0) + np.asarray(value, dtype=np.float64)
    grouped = metric_stats.unflatten_stats(sums)
    return {m: metric_stats.finalize(m, grouped[m]) for m in task.metrics}


@dataclass
class DeviceRun:
    """What one device went through: its assignment, the report answer and the upload status."""

    assignment: task_assignment_pb2.TaskAssignment
    instruction: task_assignment_pb2.UploadInstruction | Rejected | None = None
    upload_status: int | None = None

    @property
    def assignment_id(self) -> str:
        return self.assignment.assignment_id


def check_in(client: DeviceHttpClient, population: str, version: str = "1") -> task_assignment_pb2.TaskAssignment:
    result = client.create_task_assignment(population, version)
    assert not isinstance(result, Rejected), f"check-in to {population} rejected: {result}"
    return result


def run_device(client: DeviceHttpClient, population: str, payload: bytes | None, *, version: str = "1",
               assignment: task_assignment_pb2.TaskAssignment | None = None) -> DeviceRun:
    """Check in (unless ``assignment`` is given), report COMPLETED and upload ``payload`` (if any)."""
    run = DeviceRun(assignment or check_in(client, population, version))
    run.instruction = client.report_result(run.assignment.self_uri, COMPLETED)
    if payload is not None and isinstance(run.instruction, task_assignment_pb2.UploadInstruction):
        run.upload_status = client.upload(run.instruction, payload)
    return run


def log_lines(stack: StackHandle, component: str, *needles: str) -> list[str]:
    """Lines of ``component``'s log containing every one of ``needles``."""
    text = stack.log_path(component).read_text(errors="replace")
    return [line for line in text.splitlines() if all(n in line for n in needles)]


def model_blob_generation(task: NumpyTask, name: str) -> int | None:
    blob = task.stack.clients.storage.bucket(task.stack.settings.model_bucket).get_blob(name)
    return None if blob is None else int(blob.generation)


def gradient_object(task: NumpyTask, round_number: int, assignment_id: str) -> str:
    return layout.gradient_path(task.population, task.task_id, round_number, assignment_id)


__all__ = [
    "COMPLETED", "DeviceRun", "NumpyTask", "central_metrics", "check_in", "create_numpy_eval_task", "create_numpy_task",
    "gradient_object", "log_lines", "make_update", "model_blob_generation", "random_delta", "random_metric_stats",
    "run_device", "wait_until",
]


def stack_key_ring(stack: StackHandle) -> UploadKeyRing:
    """The local stack's HPKE upload key ring (what ingestion and the aggregator hold)."""
    return UploadKeyRing.from_json((stack.state_dir / "keys" / KEYS_FILE).read_text())


def seal_for_stack(stack: StackHandle, assignment_id: str, payload: bytes) -> bytes:
    """``payload`` (a gzip'd ClientUpdate) stored as a device would: gzip(HPKE envelope)."""
    return gzip.compress(seal_update(payload, stack_key_ring(stack).current, assignment_id=assignment_id))


def stack_unsealer(stack: StackHandle) -> Callable[[bytes, str], bytes]:
    """The aggregator's ``unseal`` for in-process runs against the stack's uploads."""
    ring = stack_key_ring(stack)
    return lambda data, assignment_id: open_upload(data, assignment_id=assignment_id, ring=ring, required=True,
                                                   max_bytes=64 << 20)


def unsharded_reference(stack: StackHandle, task: NumpyTask, round_number: int) -> tuple[Any, Any]:
    """(ServerState, RoundResult) of round ``round_number`` aggregated in this process in one job:
    the round's accepted updates, read back and opened, with the round's own noise seed."""
    from fedcompute.learning import server_round
    from fedcompute.learning.upload_contract import decode_upload

    record = task.record()
    phase = ServerPhase.from_json(task.read_model(layout.server_phase_path(task.population, task.task_id)))
    previous = decode_checkpoint(task.read_model(layout.checkpoint_path(task.population, task.task_id,
                                                                        round_number - 1)))
    optimizer, mechanism = server_round.build_round_machinery(phase)
    config = server_round.RoundConfig(
        report_goal=task.report_goal, optimizer=optimizer, dp=mechanism, metrics_finalizer=None,
        noise_seed=server_round.round_noise_seed(phase, record.noise_secret, task.population, task.task_id,
                                                 round_number))
    unseal = stack_unsealer(stack)
    bucket = stack.settings.gradient_bucket
    updates = (decode_upload(unseal(task.blobs.read(bucket, gradient_object(task, round_number, aid)), aid), record)
               for aid in sorted(task.store.accepted_ids(task.key(round_number))))
    expected, result, _ = server_round.server_round(previous, updates, config)
    return expected, result
