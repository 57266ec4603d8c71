"""A task's artifacts as bytes, and publishing them at the ODP paths (no TensorFlow).

The task builder produces :class:`TaskArtifacts` (from a SavedFunctionalModel); tests and
tools can produce them from plain numpy weights with :func:`artifacts_from_weights`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fedcompute import layout
from fedcompute.errors import ArtifactBuildError, InvariantError
from fedcompute.plans import ServerPhase
from fedcompute.ports import BlobStore
from fedcompute.settings import Settings
from fedcompute.tensor_spec import TensorSpec


@dataclass(frozen=True)
class TaskArtifacts:
    """Everything written under ``{pop}/{task}/0/`` for one task."""

    server_phase: ServerPhase
    checkpoint: bytes  # server checkpoint 0 (weights + optimizer + DP state)
    client_checkpoint: bytes  # all model weights, for devices of round 1
    client_plan: bytes = b""  # training tasks: zip (plan.json + saved_model/)
    eval_plan: bytes = b""  # evaluation tasks
    extra: dict[str, bytes] = field(default_factory=dict)  # e.g. TFLite models, by object name suffix

    def objects(self, population: str, task_id: int) -> dict[str, bytes]:
        """Object name -> bytes, at the ODP layout."""
        out = {
            layout.server_phase_path(population, task_id): self.server_phase.to_json().encode(),
            layout.checkpoint_path(population, task_id, 0): self.checkpoint,
            layout.client_checkpoint_path(population, task_id, 0): self.client_checkpoint,
        }
        if self.client_plan:
            out[layout.client_plan_path(population, task_id)] = self.client_plan
        if self.eval_plan:
            out[layout.eval_plan_path(population, task_id)] = self.eval_plan
        for suffix, data in self.extra.items():
            out[f"{population}/{task_id}/0/s/0/{suffix}"] = data
        return out


class ArtifactExistsError(ArtifactBuildError):
    """A create-only artifact write found an object already there (planted or left over)."""


def write_new_artifact(blobs: BlobStore, bucket: str, name: str, data: bytes) -> None:
    """Create ``gs://bucket/name``; fail loudly if it exists (never build on someone else's object)."""
    if not blobs.write(bucket, name, data, create_only=True):
        raise ArtifactExistsError(
            f"gs://{bucket}/{name} already exists; the task builder never reuses an existing artifact",
            hint="an object at a new task's path was not written by this build: find out who wrote it, "
            "delete it, and build again")


def publish_artifacts(blobs: BlobStore, settings: Settings, population: str, task_id: int,
                      artifacts: TaskArtifacts) -> list[str]:
    """Write every artifact (create-only: a task's artifacts are immutable). Returns the names.

    Raises :class:`ArtifactExistsError` when any object is already there.
    """
    written = []
    for name, data in artifacts.objects(population, task_id).items():
        write_new_artifact(blobs, settings.model_bucket, name, data)
        written.append(name)
    return written


def artifacts_from_weights(
    phase: ServerPhase,
    weights: Sequence[np.ndarray],
    *,
    client_plan: bytes = b"",
    eval_plan: bytes = b"",
    extra: dict[str, bytes] | None = None,
) -> TaskArtifacts:
    """Checkpoint 0 and client checkpoint 0 for ``weights`` (in ``phase.weights`` order)."""
    from fedcompute.learning import checkpoint
    from fedcompute.learning.dp_core import adaptive_noise_split
    from fedcompute.learning.server_round import build_round_machinery, initial_server_state
    from fedcompute.learning.tensor_codec import encode_bundle

    if len(weights) != len(phase.weights):
        raise InvariantError(f"{len(weights)} weight arrays for {len(phase.weights)} weight specs")
    named = [(spec.name, np.asarray(w, dtype=spec.dtype)) for spec, w in zip(phase.weights, weights)]
    trainable = [(spec.name, w) for spec, (_, w) in zip(phase.weights, named) if spec.trainable]
    optimizer, dp = build_round_machinery(phase)
    if phase.dp.mechanism is not None and phase.dp.mechanism.is_adaptive:
        # The noise split needs the report goal, known here: refuse impossible configs at build time.
        adaptive_noise_split(phase.dp.noise_multiplier, phase.report_goal, phase.dp.clipped_count_stddev)
    state = initial_server_state(trainable, optimizer, dp)
    return TaskArtifacts(
        server_phase=phase,
        checkpoint=checkpoint.encode_checkpoint(state, optimizer=optimizer),
        client_checkpoint=encode_bundle(named),
        client_plan=client_plan,
        eval_plan=eval_plan,
        extra=dict(extra or {}),
    )


def weight_specs(trainable: Sequence[np.ndarray], non_trainable: Sequence[np.ndarray] = ()) -> tuple[TensorSpec, ...]:
    """Names ``trainable/<i>`` and ``non_trainable/<i>`` (functional models carry no names)."""
    specs = [TensorSpec(f"trainable/{i}", tuple(np.shape(w)), str(np.asarray(w).dtype), True)
             for i, w in enumerate(trainable)]
    specs += [TensorSpec(f"non_trainable/{i}", tuple(np.shape(w)), str(np.asarray(w).dtype), False)
              for i, w in enumerate(non_trainable)]
    return tuple(specs)
