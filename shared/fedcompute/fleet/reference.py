"""A built task's rounds run in-process: the same device step and server round, no protocol.

The private demo sets the non-private run of its configuration beside the private one. Through
the stack that doubles the demo's time (every round trip costs the same whether or not noise is
added), so by default the reference runs here: each round draws ``report_goal`` devices
uniformly at random from the same population, every device runs the plan the task builder made
(the fleet's own step, :meth:`SimulatedDevice._compute`, on its own examples), and the updates
go through the server's own :func:`fedcompute.learning.server_round.server_round` with the
task's server phase (optimizer, clipping; no noise when the task has none). What is left out:
check-in order (the stack takes the first devices to check in), storage and encryption.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import random
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedcompute import layout
from fedcompute.errors import NotFoundError
from fedcompute.fleet.population import PopulationSpec
from fedcompute.ports import BlobStore, TaskStore
from fedcompute.tasks.records import TaskRecord

NamedArrays = list[tuple[str, np.ndarray]]


@dataclass(frozen=True)
class ReferenceTask:
    """What the task builder wrote for a task, as bytes (picklable for worker processes)."""

    plan: bytes  # the client plan (ClientOnlyPlan)
    client_checkpoint: bytes  # round 0's client checkpoint bundle
    server_phase: bytes  # the server phase JSON
    server_checkpoint: bytes  # round 0's server checkpoint
    record: TaskRecord  # shapes, metrics and bounds the server checks every update against


def load_reference_task(store: TaskStore, blobs: BlobStore, model_bucket: str, population: str,
                        task_id: int) -> ReferenceTask:
    """The built task's record and artifacts."""
    record = store.get_task(population, task_id)
    if record is None:
        raise NotFoundError(f"task {task_id} does not exist in population {population!r}",
                            hint="build it first (task_builder_client)")
    return ReferenceTask(
        record=record,
        plan=blobs.read(model_bucket, layout.client_plan_path(population, task_id)),
        client_checkpoint=blobs.read(model_bucket, layout.client_checkpoint_path(population, task_id, 0)),
        server_phase=blobs.read(model_bucket, layout.server_phase_path(population, task_id)),
        server_checkpoint=blobs.read(model_bucket, layout.checkpoint_path(population, task_id, 0)),
    )


# -- device side (one per worker process) ----------------------------------------------------
_worker: dict[str, Any] = {}


def _init_worker(plan: bytes, spec: PopulationSpec, population: str) -> None:
    from fedcompute.fleet.workers import _single_threaded_tensorflow
    from fedcompute.plans import unpack_client_plan

    _single_threaded_tensorflow()
    directory = tempfile.TemporaryDirectory(prefix="fedcompute-reference-")
    _worker.update(directory=directory, plan=unpack_client_plan(plan, Path(directory.name)), spec=spec,
                   population=population)


def _device_update(job: tuple[int, list[np.ndarray]]) -> bytes:
    """One device's encoded update (the bytes it would upload), from its own examples."""
    from fedcompute.fleet.device import ArrayApp, SimulatedDevice

    device_id, weights = job
    spec: PopulationSpec = _worker["spec"]
    x, y = spec.examples(device_id)
    device = SimulatedDevice(device_id, ArrayApp(x, y), version_code=spec.version_code)
    plan = _worker["plan"]
    examples = device._examples(_worker["population"], "reference", plan.plan)
    return device._compute(plan, weights, examples)


# -- server side -----------------------------------------------------------------------------
def run_reference(task: ReferenceTask, spec: PopulationSpec, *, population: str, report_goal: int, rounds: int,
                  noise_multiplier: float | None = None, seed: int = 0, processes: int = 2,
                  on_round: Callable[[int, NamedArrays, dict[str, float]], None] | None = None) -> list[NamedArrays]:
    """The client weights after each of ``rounds`` rounds (``report_goal`` devices each).

    ``noise_multiplier`` replaces the task's (0.0: the same task without noise, same clipping).
    """

    from fedcompute.learning import checkpoint, server_round
    from fedcompute.learning.tensor_codec import decode_bundle
    from fedcompute.learning.upload_contract import decode_upload
    from fedcompute.plans import ServerPhase

    if not 1 <= report_goal <= spec.num_devices:
        raise ValueError(f"report_goal must be in 1..{spec.num_devices} (the population), got {report_goal}")
    phase = ServerPhase.from_json(task.server_phase)
    if noise_multiplier is not None:
        phase = dataclasses.replace(phase, dp=dataclasses.replace(phase.dp, noise_multiplier=noise_multiplier))
    optimizer, dp = server_round.build_round_machinery(phase)
    state = checkpoint.decode_checkpoint(task.server_checkpoint)
    if noise_multiplier is not None:
        # The mechanism reads the noise from its state (the checkpoint's): start it afresh.
        state = dataclasses.replace(state, dp_state=dp.initial_state())
    initial_client, _ = decode_bundle(task.client_checkpoint)
    rng = random.Random(seed)
    finalize = server_round.task_metrics_finalizer(task.record.metrics)
    history: list[NamedArrays] = []
    client_weights = [np.asarray(a) for _, a in initial_client]
    context = multiprocessing.get_context("spawn")  # TensorFlow is not fork-safe
    with context.Pool(processes, initializer=_init_worker, initargs=(task.plan, spec, population)) as pool:
        for round_number in range(1, rounds + 1):
            chosen = rng.sample(range(spec.num_devices), report_goal)
            jobs = [(device_id, client_weights) for device_id in chosen]

            def updates(results: Iterator[bytes]) -> Iterator[Any]:
                for data in results:
                    yield decode_upload(data, task.record)

            config = server_round.RoundConfig(report_goal=report_goal, optimizer=optimizer, dp=dp,
                                              noise_seed=seed * 1_000_003 + round_number, metrics_finalizer=finalize)
            state, _result, metrics = server_round.server_round(
                state, updates(pool.imap(_device_update, jobs, chunksize=16)), config)
            trained = dict(state.named_weights())
            named = [(name, np.asarray(trained.get(name, array))) for name, array in initial_client]
            client_weights = [a for _, a in named]
            history.append(named)
            if on_round is not None:
                on_round(round_number, named, metrics)
    return history
